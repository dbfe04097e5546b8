"""The command line: a user's mistake is one line on stderr, a bug in emjax keeps its traceback."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, subprocess_env

TINY = "--config=configs/pretrain/tiny.py:smoke"


def emjax_main(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "emjax.main", *args], cwd=ROOT, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(run, *needles):
  assert run.returncode == 1, (run.returncode, run.stderr)
  assert "Traceback" not in run.stderr, run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("emjax: error: "), run.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("args,needles", [
    # ml_collections' suggestion is kept.
    (["--config.train.stepz=3"], ["--config.train.stepz", "'stepz'", 'did you mean "steps" instead of "stepz"']),
    (["--config.trian.steps=3"], ["--config.trian.steps", 'did you mean "train"']),
    (["--config.train.steps=abc"], ["--config.train.steps=abc", "invalid literal for int()"]),
    (["--config.train.steps.x=3"], ["--config.train.steps.x"]),
    (["--nosuchflag=1"], ["nosuchflag"]),
], ids=["misspelt_key", "misspelt_section", "bad_type", "key_below_a_value", "unknown_flag"])
def test_command_line_mistake_is_one_line(tmp_path, args, needles):
  run = emjax_main(TINY, f"--workdir={tmp_path}", *args)
  assert_one_line_error(run, *needles)
  assert "FAILED" in os.listdir(tmp_path)


@pytest.mark.parametrize("config,needles", [
    ("configs/pretrain/tiny.py:smok", ["configs/pretrain/tiny.py:smok", "unknown option 'smok'"]),
    ("configs/pretrain/nope.py", ["configs/pretrain/nope.py", "no such config file"]),
], ids=["bad_variant", "missing_file"])
def test_bad_config_argument_is_one_line(tmp_path, config, needles):
  run = emjax_main(f"--config={config}", f"--workdir={tmp_path / 'new'}")
  assert_one_line_error(run, *needles)
  assert not (tmp_path / "new").exists()  # a mistake creates no workdir


def test_internal_key_error_keeps_its_traceback_and_marks_failure(tmp_path):
  """A KeyError from inside a job is our bug, not the user's: it must not be shortened to one line."""
  config = tmp_path / "broken.py"
  config.write_text(textwrap.dedent("""
      from emjax.train import settings
      from emjax.train import loop

      def _broken_lookup(*args, **kwargs):
        return {}["a_key_emjax_forgot"]

      def get_config(arg=None):
        loop.train = _broken_lookup  # stands in for a lookup deep inside the training job
        return settings.base_config()
  """))
  run = emjax_main(f"--config={config}", f"--workdir={tmp_path}")
  assert run.returncode != 0
  assert "Traceback" in run.stderr and "_broken_lookup" in run.stderr, run.stderr
  assert "KeyError: 'a_key_emjax_forgot'" in run.stderr
  assert "emjax: error:" not in run.stderr
  assert (tmp_path / "FAILED").read_text().startswith("KeyError")


@pytest.mark.parametrize("verbosity,shown", [([], {"an info line", "a warning line"}),
                                             (["--verbosity=-1"], {"a warning line"})])
def test_verbosity_sets_how_much_the_jobs_log(tmp_path, verbosity, shown):
  """--verbosity=-1 (launch/quickstart.sh) keeps emjax's own INFO lines off the terminal, warnings stay."""
  config = tmp_path / "chatty.py"
  config.write_text(textwrap.dedent("""
      import logging
      from emjax.train import settings
      from emjax.train import loop

      def _chatty(*args, **kwargs):
        logging.getLogger("emjax.train.loop").info("an info line")
        logging.getLogger("emjax.train.loop").warning("a warning line")
        return {}

      def get_config(arg=None):
        loop.train = _chatty
        c = settings.base_config()
        c.train.steps = 1
        return c
  """))
  run = emjax_main(f"--config={config}", f"--workdir={tmp_path}", *verbosity)
  assert run.returncode == 0, run.stderr
  assert {x for x in ("an info line", "a warning line") if x in run.stderr} == shown, run.stderr


def test_a_libraries_value_error_inside_a_job_keeps_its_traceback(tmp_path):
  """A ValueError emjax did not raise itself (numpy, jax, orbax) is a bug too, not a user mistake."""
  config = tmp_path / "broken.py"
  config.write_text(textwrap.dedent("""
      import numpy as np
      from emjax.train import settings
      from emjax.train import loop

      def _bad_reshape(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)

      def get_config(arg=None):
        loop.train = _bad_reshape  # stands in for a shape bug deep inside the training job
        return settings.base_config()
  """))
  run = emjax_main(f"--config={config}", f"--workdir={tmp_path}")
  assert run.returncode != 0
  assert "Traceback" in run.stderr and "_bad_reshape" in run.stderr, run.stderr
  assert "emjax: error:" not in run.stderr
  assert (tmp_path / "FAILED").read_text().startswith("ValueError")


def test_every_job_has_a_function_and_the_staged_ones_write_plain_files():
  from emjax import main
  from emjax.train import settings

  assert tuple(main.JOBS) == settings.JOBS
  assert set(main.STAGED_JOBS) == {"sft_grid", "teacher_top_k", "sl", "study", "sample", "eval", "judge", "report", "em_curve",
                                   "directions"}


def test_importing_the_jobs_starts_no_jax_backend():
  """emjax.main imports every job's module; jax.distributed must still be startable after that."""
  code = ("import emjax.main\n"
          "from jax._src import xla_bridge\n"
          "assert not xla_bridge.backends_are_initialized()\n")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]


# ----------------------------------------------------------------------------- launch/quickstart.sh


@pytest.fixture
def quickstart(tmp_path):
  """Runs quickstart.sh against a stand-in `python` that records its calls: no install, no training.
  Returns the arguments it gave `python -m emjax.main` and the workdir it summarised."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "python_calls"
  fake = bin_dir / "python"
  fake.write_text(f'#!/bin/sh\nprintf "%s\\t" "$@" >> "{log}"\necho >> "{log}"\nexit 0\n')
  fake.chmod(0o755)
  venv = tmp_path / "venv"
  venv.mkdir()
  # _env.sh skips the install when the active virtualenv's stamp matches pyproject.toml.
  stamp = subprocess.run("cat pyproject.toml | sha1sum | cut -c1-12", shell=True, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
  (venv / ".venv-installed").write_text(stamp + "\n")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv))

  def run(*args):
    log.write_text("")
    subprocess.run(["bash", os.path.join(ROOT, "launch/quickstart.sh"), *args], env=env, check=True, timeout=30,
                   capture_output=True)
    calls = [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()]
    main_args = next(c[2:] for c in calls if c[:2] == ["-m", "emjax.main"])
    summarised = next(c[1] for c in calls if c[0] == "-")
    return main_args, summarised
  return run


@pytest.mark.parametrize("args,workdir,rest", [
    ([], "runs/world_quick", []),
    (["--config.study.seeds=1"], "runs/world_quick", ["--config.study.seeds=1"]),
    (["-config.study.seeds=1", "--noprogress"], "runs/world_quick", ["-config.study.seeds=1", "--noprogress"]),
    (["runs/mine", "--config.study.seeds=1"], "runs/mine", ["--config.study.seeds=1"]),
])
def test_quickstart_takes_a_leading_flag_as_a_flag_not_the_workdir(quickstart, args, workdir, rest):
  assert quickstart(*args) == (["--config=configs/paper/world.py:quick", f"--workdir={workdir}", "--verbosity=-1",
                                *rest], workdir)


def test_quickstart_workdir_flag_wins_and_is_summarised(quickstart):
  main_args, summarised = quickstart("--workdir=runs/flag", "--config.train.steps=100")
  assert main_args[-2:] == ["--workdir=runs/flag", "--config.train.steps=100"]  # after the default: absl takes it
  assert summarised == "runs/flag"
