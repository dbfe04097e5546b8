"""Throughput bookkeeping: peak FLOP/s of the detected device and MFU."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per chip (vendor figures). Matched as substrings of
# `device.device_kind`, most specific first.
PEAK_FLOPS_BY_KIND = (
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
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
  kind = device.device_kind.lower()
  for marker, flops in PEAK_FLOPS_BY_KIND:
    if marker in kind:
      return flops
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
  if not peak_per_device or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (num_devices * peak_per_device)
