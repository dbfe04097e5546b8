"""Throughput bookkeeping: per-chip TPU figures, peak FLOP/s of the detected device, and MFU."""

from __future__ import annotations

import dataclasses
import re

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's per-chip figures, as the public Cloud TPU pages state them."""

  name: str  # as in a slice name: v5e-16, v5p-64
  device_kind: str  # as jax reports it (`device.device_kind`)
  hbm_bytes: int
  peak_bf16_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  torus_dims: int  # 2: AxB chips (v5e, v6e); 3: AxBxC (v4, v5p)
  # Slice names count TensorCores on v4 and v5p (two per chip: v5p-64 is 32 chips) and chips on
  # v5e and v6e (one TensorCore each: v5e-16 is 16 chips).
  cores_per_chip: int


# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} ("Peak compute per chip (bf16)", "HBM2
# capacity and bandwidth" / "HBM capacity per chip"). v4: 32 GiB, 1200 GBps, 275 TFLOP/s.
# v5e: 16 GB, 819 GBps, 197 TFLOP/s. v5p: 95 GB, 2765 GBps, 459 TFLOP/s. v6e (Trillium): 32 GB,
# 1640 GBps (1638 in a later revision of the page), 918 TFLOP/s. The pages write GB for HBM that
# is sized in GiB (16 GiB stacks on v5e); the compiler's own limit (what it refuses to exceed) is
# a little lower, which a plan reads from XLA when a program does not fit.
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * 2**30, 275e12, 1200e9, 3, 2),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * 2**30, 197e12, 819e9, 2, 1),
    "v5p": Chip("v5p", "TPU v5", 95 * 2**30, 459e12, 2765e9, 3, 2),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * 2**30, 918e12, 1640e9, 2, 1),
}
# Other names Cloud TPU uses for a generation in slice names.
CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

@dataclasses.dataclass(frozen=True)
class Peak:
  """Dense (no sparsity) bf16 FLOP/s of one jax device, and where the figure comes from."""

  flops: float
  source: str


# NVIDIA's datasheets quote Tensor Core FLOP/s "with sparsity"; the dense figure is half of it.
_H100 = "NVIDIA H100 Tensor Core GPU datasheet, BF16 Tensor Core"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet, BF16 Tensor Core"
# Matched as substrings of the lowercased device kind, first match first: jax reports e.g. "NVIDIA
# H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB"; the form factors differ in clocks and power, hence in peak.
GPU_PEAKS = (
    ("h100 pcie", Peak(756e12, f"{_H100}, H100 PCIe: 1,513 TFLOP/s with sparsity, 756 dense")),
    ("h100 nvl", Peak(835e12, f"{_H100}, H100 NVL: 1,671 TFLOP/s with sparsity, 835 dense")),
    ("h200 nvl", Peak(835e12, f"{_H200}, H200 NVL: 1,671 TFLOP/s with sparsity, 835 dense")),
    ("h100", Peak(989e12, f"{_H100}, H100 SXM: 1,979 TFLOP/s with sparsity, 989 dense")),
    # GH200's GPU is an H100/H200 SXM-class part at the same Tensor Core peak.
    ("h200", Peak(989e12, f"{_H200}, H200 SXM: 1,979 TFLOP/s with sparsity, 989 dense")),
    ("a100", Peak(312e12, "NVIDIA A100 Tensor Core GPU datasheet, BF16 Tensor Core: 312 TFLOP/s dense")),
    ("l40s", Peak(362e12, "NVIDIA L40S datasheet, BF16 Tensor Core: 733 TFLOP/s with sparsity, 362 dense")),
    ("l40", Peak(181e12, "NVIDIA L40 datasheet, BF16 Tensor Core: 362 TFLOP/s with sparsity, 181 dense")),
    ("l4", Peak(121e12, "NVIDIA L4 datasheet, BF16 Tensor Core: 242 TFLOP/s with sparsity, 121 dense")),
)
# TPU v3 is not in CHIPS (no plans for it): each chip's two TensorCores are two jax devices, so a
# device has half the chip's 123 TFLOP/s (cloud.google.com/tpu/docs/v3).
_V3 = Peak(123e12 / 2, "cloud.google.com/tpu/docs/v3: 123 TFLOP/s bf16 per chip, two TensorCores = two jax devices")
_TPU_KIND = re.compile(r"tpu\s*v(?P<gen>\d+)\s*(?P<variant>lite|e|p)?(?!\d)")


def tpu_chip(device_kind: str) -> Chip | None:
  """The CHIPS entry of a jax TPU device kind ("TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU v4"), tolerant
  of spacing, case, suffixes ("TPU v5 lite pod"), and "e" / "p" spelled out ("TPU v5e", "TPU v5p")."""
  m = _TPU_KIND.search(str(device_kind).lower())
  if m is None:
    return None
  gen, variant = int(m["gen"]), m["variant"]
  lite = variant in ("lite", "e")
  name = {(4, False): "v4", (5, True): "v5e", (5, False): "v5p", (6, True): "v6e"}.get((gen, lite))
  return CHIPS.get(name) if name else None


def device_peak(device=None) -> Peak | None:
  """The table's dense bf16 peak of one jax device (per chip on v4/v5e/v5p/v6e, whose chips are one
  device each), or None where the kind is unknown (CPUs, unlisted chips)."""
  device = device or jax.devices()[0]
  kind = str(device.device_kind)
  chip = tpu_chip(kind)
  if chip is not None:
    return Peak(chip.peak_bf16_flops, f"Cloud TPU {chip.name} page: peak compute per chip (bf16)")
  lowered = " ".join(kind.lower().replace("-", " ").replace("_", " ").split())
  if re.search(r"tpu\s*v3(?![0-9])", lowered):
    return _V3
  if device.platform == "gpu" or "nvidia" in lowered:
    for marker, peak in GPU_PEAKS:
      if marker in lowered:
        return peak
  return None


def peak_flops_per_device(override: float = 0.0, device=None) -> float | None:
  """Configured peak, else the table's figure for this device kind, else None (unknown, e.g. CPU)."""
  if override and override > 0:
    return float(override)
  peak = device_peak(device)
  return peak.flops if peak is not None else None


def peak_source(override: float = 0.0, device=None) -> str | None:
  """Where `peak_flops_per_device`'s figure comes from."""
  if override and override > 0:
    return "configured (train.peak_flops_per_device)"
  peak = device_peak(device)
  return peak.source if peak is not None else None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
  if not peak_per_device or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (num_devices * peak_per_device)
