"""Process settings read once, at start: glibc's malloc on transparent huge pages, JAX's platforms.

XLA:CPU allocates every execution's temporary buffers afresh, and glibc serves blocks that large
with fresh mmaps, so each training step page-faults all its temporaries back in 4 KiB at a time
(the kernel zeroing every page): on a small model most of the step's system time, and a large
part of the step. `glibc.malloc.hugetlb=1` makes glibc madvise those mappings as transparent huge
pages, which fault in 2 MiB at a time. PyTorch's CPU allocator gets the same benefit, so
benchmarks/train.py sets it for both sides of its comparison.

glibc reads GLIBC_TUNABLES once, when the process starts, so `reexec_with_huge_pages` replaces
the current process (same pid, same arguments) with one that has the tunable set, once. It does
nothing off Linux, where the tunable is already set (in any form), or with EMJAX_HUGE_PAGES=0.

JAX reads JAX_PLATFORMS once too, when it is imported. With libtpu installed (jax[tpu], which the
test extra brings) and JAX_PLATFORMS unset, JAX's first device query loads libtpu even on a machine
without a TPU, and libtpu prints its failure to find one ('unexpected worker hostname ...', then
JAX's 'Unable to initialize backend tpu'). `skip_absent_tpu` sets JAX_PLATFORMS=cpu where that is
the only other backend and no TPU can be attached, so a CPU machine starts quietly. A TPU VM is left
to JAX (which picks the TPU itself), as is a machine with another PJRT plugin (a GPU's), and any
JAX_PLATFORMS the user set. Compiling for a TPU topology (emjax.train.aot) loads libtpu by itself
and works with JAX_PLATFORMS=cpu (benchmarks/plans.py sets it).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import sys
from typing import Iterable, Mapping

TUNABLE = "glibc.malloc.hugetlb"
DISABLE = "EMJAX_HUGE_PAGES"

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips; also the gVNIC and local NVMe SSDs of Compute Engine VMs
GVNIC_PCI_DEVICE = "0x0042"
NOT_TPU_PCI_DEVICES = {GVNIC_PCI_DEVICE: "gVNIC network card", "0x001f": "local NVMe SSD"}


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


def tpu_evidence(root: str = "/") -> list[str]:
  """What on this machine may be a TPU: Google PCI devices other than the VM's own (gVNIC network cards,
  local NVMe SSDs: `NOT_TPU_PCI_DEVICES`), with any other chip id, so a newer TPU counts too (JAX's own
  test, which errs toward a TPU), and TPU device files (/dev/accel*, /dev/vfio/N)."""
  found = []
  for device in glob.glob(os.path.join(root, "sys/bus/pci/devices/*")):
    try:
      with open(os.path.join(device, "vendor"), encoding="ascii") as f:
        vendor = f.read().strip()
      with open(os.path.join(device, "device"), encoding="ascii") as f:
        device_id = f.read().strip()
    except OSError:
      continue
    if vendor == GOOGLE_PCI_VENDOR and device_id not in NOT_TPU_PCI_DEVICES:
      found.append(device)
  found += glob.glob(os.path.join(root, "dev/accel*")) + glob.glob(os.path.join(root, "dev/vfio/[0-9]*"))
  return found


def jax_plugins() -> list[str]:
  """The PJRT plugins JAX would load besides libtpu (e.g. jax_cuda12_plugin's), by name."""
  names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  namespace = importlib.util.find_spec("jax_plugins")  # the older form: modules of a namespace package
  for path in (namespace.submodule_search_locations or []) if namespace is not None else []:
    names += [name for name in os.listdir(path) if not name.startswith(("_", "."))]
  return names


def cpu_only(env: Mapping[str, str], has_libtpu: bool, tpu_evidence_found: Iterable[str],
             plugins: Iterable[str]) -> bool:
  """Whether JAX_PLATFORMS=cpu changes nothing but skipping libtpu's failed search for a TPU."""
  return has_libtpu and "JAX_PLATFORMS" not in env and not list(tpu_evidence_found) and not list(plugins)


def skip_absent_tpu() -> None:
  """Sets JAX_PLATFORMS=cpu when `cpu_only` (module docstring). Call it before jax starts a backend."""
  if cpu_only(os.environ, importlib.util.find_spec("libtpu") is not None, tpu_evidence(), jax_plugins()):
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (the `emjax` console script imports emjax.main first)
      sys.modules["jax"].config.update("jax_platforms", "cpu")
