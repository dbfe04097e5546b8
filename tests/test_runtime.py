"""emjax.runtime: the process re-executes its own command line once with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from emjax import runtime

CHILD = """
import os, sys
from emjax import runtime
print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES", "<unset>"), sys.flags.dev_mode, *sys.argv[1:], flush=True)
runtime.reexec_with_huge_pages()
print("done")
"""


def _run(tmp_path, **env):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.DISABLE)}
  base["PYTHONPATH"] = ROOT
  out = subprocess.run([sys.executable, "-X", "dev", str(script), "an", "argument"], env={**base, **env},
                       capture_output=True, text=True, check=True).stdout
  return [line.split() for line in out.strip().splitlines()]


def test_reexec_runs_the_same_command_line_with_the_tunable_and_the_same_pid(tmp_path):
  first, second, done = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
  assert first[2] == "glibc.malloc.arena_max=2"
  assert second[2] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert second[1] == first[1]  # exec, not a child process
  assert second[3:] == first[3:] == ["True", "an", "argument"]  # interpreter options and arguments kept
  assert done == ["done"]


def test_no_reexec_when_set_disabled_or_not_linux(tmp_path):
  assert len(_run(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")) == 2
  assert len(_run(tmp_path, **{runtime.DISABLE: "0"})) == 2
  assert not runtime.wants_reexec({}, platform="darwin")
  assert runtime.wants_reexec({}, platform="linux")
  assert runtime.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


# What libtpu and JAX print on a machine without a TPU when JAX_PLATFORMS leaves the TPU in.
TPU_NOISE = ("unexpected worker hostname", "Unable to initialize backend 'tpu'", "Unable to initialize backend tpu",
             "libtpu", "TPU_SKIP_MDS_QUERY")


def _pci_device(root, name, vendor, device):
  path = root / "sys" / "bus" / "pci" / "devices" / name
  path.mkdir(parents=True)
  (path / "vendor").write_text(vendor + "\n")
  (path / "device").write_text(device + "\n")


def test_a_tpu_is_a_google_pci_device_other_than_gvnic_or_a_tpu_device_file(tmp_path):
  _pci_device(tmp_path, "0000:00:04.0", runtime.GOOGLE_PCI_VENDOR, runtime.GVNIC_PCI_DEVICE)
  _pci_device(tmp_path, "0000:00:05.0", "0x10de", "0x2330")  # an NVIDIA GPU
  _pci_device(tmp_path, "0000:00:07.0", runtime.GOOGLE_PCI_VENDOR, "0x001f")  # a Compute Engine local SSD
  assert runtime.tpu_evidence(str(tmp_path)) == []
  _pci_device(tmp_path, "0000:00:06.0", runtime.GOOGLE_PCI_VENDOR, "0x0099")  # a chip id JAX may not know yet
  assert [os.path.basename(p) for p in runtime.tpu_evidence(str(tmp_path))] == ["0000:00:06.0"]
  (tmp_path / "dev").mkdir()
  (tmp_path / "dev" / "accel0").touch()
  assert len(runtime.tpu_evidence(str(tmp_path))) == 2


def test_cpu_only_when_libtpu_would_find_nothing_and_nothing_else_is_chosen():
  assert runtime.cpu_only({}, has_libtpu=True, tpu_evidence_found=[], plugins=[])
  assert not runtime.cpu_only({}, has_libtpu=False, tpu_evidence_found=[], plugins=[])  # nothing to hide
  assert not runtime.cpu_only({}, has_libtpu=True, tpu_evidence_found=["/dev/accel0"], plugins=[])  # a TPU VM
  assert not runtime.cpu_only({}, has_libtpu=True, tpu_evidence_found=[], plugins=["xla_cuda12"])  # a GPU
  for chosen in ("", "cpu", "tpu", "cuda"):  # the user's choice stands
    assert not runtime.cpu_only({"JAX_PLATFORMS": chosen}, has_libtpu=True, tpu_evidence_found=[], plugins=[])


@pytest.mark.skipif(runtime.tpu_evidence() != [] or runtime.jax_plugins() != [],
                    reason="a machine with a TPU or a GPU plugin: JAX_PLATFORMS stays JAX's choice")
def test_a_job_on_a_cpu_machine_prints_nothing_from_libtpu(tmp_path):
  # As a user runs a job: JAX_PLATFORMS unset (the suite sets it), the test extra's libtpu installed.
  env = {k: v for k, v in subprocess_env().items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
  proc = subprocess.run([sys.executable, "-m", "emjax.main", "--config=configs/pretrain/tiny.py:smoke",
                         f"--workdir={tmp_path / 'run'}", "--config.train.steps=2", "--noprogress"],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  noise = [line for line in proc.stderr.splitlines() if any(n in line for n in TPU_NOISE)]
  assert noise == [], "\n".join(noise)
