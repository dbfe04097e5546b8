"""Process settings read before Python starts: glibc's malloc on transparent huge pages.

XLA:CPU allocates every execution's temporary buffers afresh, and glibc serves blocks that large
with fresh mmaps, so each training step page-faults all its temporaries back in 4 KiB at a time
(the kernel zeroing every page): on a small model most of the step's system time, and a large
part of the step. `glibc.malloc.hugetlb=1` makes glibc madvise those mappings as transparent huge
pages, which fault in 2 MiB at a time. PyTorch's CPU allocator gets the same benefit, so
benchmarks/train.py sets it for both sides of its comparison.

glibc reads GLIBC_TUNABLES once, when the process starts, so `reexec_with_huge_pages` replaces
the current process (same pid, same arguments) with one that has the tunable set, once. It does
nothing off Linux, where the tunable is already set (in any form), or with EMJAX_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
DISABLE = "EMJAX_HUGE_PAGES"


def wants_reexec(env: Mapping[str, str], platform: str = sys.platform) -> bool:
  return (platform.startswith("linux") and env.get(DISABLE, "1") != "0"
          and TUNABLE not in env.get("GLIBC_TUNABLES", ""))


def environment(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with the tunable added to GLIBC_TUNABLES (any other tunables kept)."""
  out = dict(env)
  out["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1") if t)
  return out


def reexec_with_huge_pages() -> None:
  """Re-execute this very command line (interpreter options, script or console entry point and
  arguments, from `sys.orig_argv`) with the tunable set, unless `wants_reexec` says no.
  Call it first thing, before anything else has started (threads, files, jax)."""
  if wants_reexec(os.environ):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment(os.environ))
