"""emjax.runtime: the process re-executes itself once with glibc's huge-page tunable."""

import os
import subprocess
import sys

from conftest import ROOT
from emjax import runtime

SHOW = "import os; print(os.environ.get('GLIBC_TUNABLES', '<unset>'), os.getpid())"
CHILD = f"from emjax import runtime; import os; print('pid', os.getpid(), flush=True); " \
        f"runtime.reexec_with_huge_pages(['-c', {SHOW!r}]); print('not re-executed')"


def _run(**env):
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.DISABLE)}
  base["PYTHONPATH"] = ROOT
  out = subprocess.run([sys.executable, "-c", CHILD], env={**base, **env}, capture_output=True, text=True,
                       check=True).stdout.split()
  return out


def test_reexec_sets_the_tunable_keeps_others_and_the_pid():
  pid_line = _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
  assert pid_line[0] == "pid"
  assert pid_line[2] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert pid_line[3] == pid_line[1]  # exec, not a child process


def test_no_reexec_when_set_disabled_or_not_linux():
  assert _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")[-2:] == ["not", "re-executed"]
  assert _run(**{runtime.DISABLE: "0"})[-2:] == ["not", "re-executed"]
  assert not runtime.wants_reexec({}, platform="darwin")
  assert runtime.wants_reexec({}, platform="linux")
  assert runtime.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
