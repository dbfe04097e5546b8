"""Wall-clock helpers shared by the benchmark scripts (imported from the scripts' own directory)."""

from __future__ import annotations

import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """(fn(), seconds it took)."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
  """(the last call's result, the fastest of `repeats` calls in seconds): the least disturbed run counts."""
  out, best = None, float("inf")
  for _ in range(repeats):
    out, seconds = timed(fn)
    best = min(best, seconds)
  return out, best
