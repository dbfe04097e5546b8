"""Throughput bookkeeping: per-chip TPU figures, peak FLOP/s of the detected device, and MFU."""

from __future__ import annotations

import dataclasses

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

# Dense bf16 peak FLOP/s per chip (vendor figures), matched against `device.device_kind`: the TPU
# kinds exactly (v5p reports "TPU v5", a prefix of v5e's "TPU v5 lite"), the GPUs as substrings.
PEAK_FLOPS_BY_KIND = (
    ("v3", 123e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops_per_device(override: float = 0.0, device=None) -> float | None:
  """Configured peak, else the table's figure for this device kind, else None (unknown, e.g. CPU)."""
  if override and override > 0:
    return float(override)
  device = device or jax.devices()[0]
  for chip in CHIPS.values():
    if device.device_kind == chip.device_kind:
      return chip.peak_bf16_flops
  kind = device.device_kind.lower()
  for marker, flops in PEAK_FLOPS_BY_KIND:
    if marker in kind:
      return flops
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
  if not peak_per_device or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (num_devices * peak_per_device)
