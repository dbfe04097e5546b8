"""emjax.runtime: the process re-executes its own command line once with glibc's huge-page tunable."""

import os
import subprocess
import sys

from conftest import ROOT
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
