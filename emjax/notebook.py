"""What the Colab notebooks (colab/*.ipynb) share: the runtime, the install, jobs run with their progress.

    from emjax import notebook
    notebook.setup()                                    # CPU / GPU / TPU, the install (in Colab), what JAX sees
    notebook.run_job("configs/pretrain/tiny.py:smoke", "runs/tiny", "--config.train.steps=50")

Jobs run as `python -m emjax.main` children, never inside the notebook's kernel: on a TPU only one
process may hold the chips, and on a GPU the kernel's JAX would reserve most of the memory. So the
kernel never starts a JAX backend either; `setup` asks a child what JAX sees.

At import this module needs the standard library only: a notebook's first cell imports it from the
checkout before emjax's dependencies are installed. The offline stand-in the notebooks use when no
hub model is given (their `ci` settings) is here too: `tiny_hf_model` (a random 2-layer transformers
model on a given tokenizer); their offline data, the synthetic world's files in the paper's formats,
is `emjax.world.corpus.world_data` (it needs the installed dependencies).

Settings: each notebook reads `EMJAX_NOTEBOOK_VARIANT` (`variant`: `ci` = seconds on a CPU, what the
test suite runs; unset = the notebook's Colab settings) and `EMJAX_NOTEBOOK_WORKDIR` (`default_workdir`).
"""

from __future__ import annotations

import collections
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

RUNTIMES = ("cpu", "gpu", "tpu")
# The pyproject extras that bring a JAX for each runtime (jax[cuda12], jax[tpu]).
EXTRAS = {"cpu": "", "gpu": "[cuda]", "tpu": "[tpu]"}
JAX_INSTALL = {"cpu": 'pip install -U "jax"', "gpu": 'pip install -U "jax[cuda12]"', "tpu": 'pip install -U "jax[tpu]"'}
# What the child reports: JAX's version, backend and devices (the kernel starts no backend).
_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'jax': jax.__version__, "
          "'backend': jax.default_backend(), 'devices': [str(x) for x in d], 'kind': d[0].device_kind}))")
# An absl log line: 'I1202 16:13:03.886101 139914232634240 em_grid.py:67] grid: training ...'.
_ABSL = re.compile(r"^([IWEF])\d{4} (\d\d:\d\d:\d\d)\.\d+\s+\d+ ([\w.]+):\d+\] (.*)$")
_MAX_MESSAGE = 200
_LEVELS = {"I": "", "W": "warning: ", "E": "error: ", "F": "fatal: "}
_BAR = re.compile(r"^\w[\w ]*:\s+\d+%\|")  # a tqdm bar ('train:  45%|####5     | 9/20 ...')


def repo_root() -> str:
  """The checkout this module belongs to (it lives in <repo>/emjax/)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_colab() -> bool:
  try:
    return importlib.util.find_spec("google.colab") is not None
  except ModuleNotFoundError:  # no `google` package at all
    return False


def detect_runtime(environ=None, *, paths=glob.glob, which=shutil.which) -> str:
  """'tpu', 'gpu' or 'cpu': the accelerator attached to this machine, found without starting JAX."""
  env = os.environ if environ is None else environ
  if env.get("COLAB_TPU_ADDR") or env.get("TPU_ACCELERATOR_TYPE") or paths("/dev/accel*") or paths("/dev/vfio/[0-9]*"):
    return "tpu"
  if which("nvidia-smi") or paths("/dev/nvidia[0-9]*"):
    return "gpu"
  return "cpu"


def variant() -> str:
  """`ci` (EMJAX_NOTEBOOK_VARIANT=ci: the test suite's seconds-long settings) or `colab`."""
  return "ci" if os.environ.get("EMJAX_NOTEBOOK_VARIANT", "") == "ci" else "colab"


def default_workdir(name: str) -> str:
  """Where a notebook writes its runs: EMJAX_NOTEBOOK_WORKDIR, else /content/runs/<name> in Colab, else runs/<name>."""
  given = os.environ.get("EMJAX_NOTEBOOK_WORKDIR")
  if given:
    return given
  return os.path.join("/content/runs" if in_colab() else os.path.join(repo_root(), "runs"), name)


def job_env() -> dict:
  """The children's environment: this one, with the checkout on the path and unbuffered output."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root(), env.get("PYTHONPATH", "")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def setup(*, install: bool | None = None) -> dict:
  """Detects the runtime, installs emjax with the runtime's JAX (in Colab), prints what JAX sees.

  Returns {runtime, backend, devices, kind, jax, colab}. A GPU or TPU that JAX does not use gets the
  install line that fixes it; a JAX that does not start is an error with the child's output.
  """
  runtime, colab = detect_runtime(), in_colab()
  print(f"runtime: {runtime.upper()}{' (Colab)' if colab else ''}")
  if (colab if install is None else install):
    spec = "." + EXTRAS[runtime]
    print(f"installing emjax: pip install -q -e '{spec}'   (JAX for this runtime: {JAX_INSTALL[runtime]})")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", spec], check=True, cwd=repo_root())
  probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=repo_root(),
                         env=job_env())
  if probe.returncode != 0:
    print(probe.stderr[-3000:])
    raise RuntimeError(f"JAX did not start (exit status {probe.returncode}, output above); for this {runtime.upper()} "
                       f"runtime: {JAX_INSTALL[runtime]}, then restart the runtime")
  info = json.loads(probe.stdout.strip().splitlines()[-1])
  print(f"JAX {info['jax']}: backend {info['backend']}, {len(info['devices'])} x {info['kind']}")
  forced = os.environ.get("JAX_PLATFORMS", "")
  if runtime != "cpu" and info["backend"] != runtime:
    why = f"JAX_PLATFORMS={forced!r}" if forced else f"{JAX_INSTALL[runtime]}, then restart the runtime"
    print(f"a {runtime.upper()} is attached but JAX runs on {info['backend']}: {why}")
  elif runtime == "cpu":
    print("no accelerator: the notebook's small settings run on this CPU (Runtime > Change runtime type for a "
          f"GPU or TPU; JAX for them: {JAX_INSTALL['gpu']} / {JAX_INSTALL['tpu']})")
  return {"runtime": runtime, "backend": info["backend"], "devices": len(info["devices"]), "kind": info["kind"],
          "jax": info["jax"], "colab": colab}


class _Status:
  """One line redrawn in place (a display handle in IPython, else printed): the training bar."""

  def __init__(self, min_interval_s: float = 0.5):
    self._handle, self._last, self._shown, self._min = None, None, 0.0, min_interval_s
    try:
      from IPython import get_ipython  # pylint: disable=g-import-not-at-top
      self._ipython = get_ipython() is not None
    except ImportError:
      self._ipython = False

  def update(self, text: str, force: bool = False) -> None:
    self._last = text
    if not force and time.monotonic() - self._shown < self._min:
      return
    self._shown = time.monotonic()
    if not self._ipython:
      print(text, flush=True)
      return
    from IPython.display import Pretty, display  # pylint: disable=g-import-not-at-top
    if self._handle is None:
      self._handle = display(Pretty(text), display_id=True)
    else:
      self._handle.update(Pretty(text))

  def close(self) -> None:
    if self._last is not None:
      self.update(self._last, force=True)
    self._handle, self._last = None, None


def compact(line: str) -> tuple[str, str] | None:
  """('log', 'HH:MM:SS module: message') for an absl log line, ('bar', line) for a tqdm bar, else None."""
  m = _ABSL.match(line)
  if m:
    level, clock, module, message = m.groups()
    mark = _LEVELS[level]
    if len(message) > _MAX_MESSAGE:  # a job's final summary dict, say
      message = message[:_MAX_MESSAGE - 3] + "..."
    return "log", f"{clock} {module.removesuffix('.py')}: {mark}{message}"
  if _BAR.match(line):
    return "bar", line.strip()
  return None


def run_job(config: str, workdir: str, *flags: str, show: tuple[str, ...] | None = None) -> None:
  """`python -m emjax.main --config=CONFIG --workdir=WORKDIR FLAGS...`, its progress shown as it runs.

  Progress: every log line, compacted ('HH:MM:SS module: message'), or with `show` only the output
  lines that start with one of its prefixes (e.g. the study's '[study' lines); the training bar is
  redrawn in place either way. A job that fails raises after printing the end of its output (the
  traceback, or `emjax: error: ...`). Rerunning the cell reruns the job, which continues where it
  stopped (every emjax job resumes).
  """
  cmd = [sys.executable, "-m", "emjax.main", f"--config={config}", f"--workdir={workdir}", *flags]
  print("$ python -m emjax.main " + " ".join(shlex.quote(a) for a in cmd[3:]), flush=True)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo_root(),
                          env=job_env())
  tail: collections.deque[str] = collections.deque(maxlen=60)
  status = _Status()
  # Text mode reads universal newlines, so each of tqdm's '\r' redraws arrives as a line of its own.
  for line in proc.stdout:
    line = line.rstrip("\n")
    if not line.strip():
      continue
    kind = compact(line)
    if kind is not None and kind[0] == "bar":
      status.update(kind[1])
      continue
    tail.append(line)
    shown = line if show is not None and line.startswith(show) else None
    if show is None and kind is not None:
      shown = kind[1]
    if shown is not None:
      status.close()
      print(shown, flush=True)
  code = proc.wait()
  status.close()
  if code != 0:
    print("\n".join(tail))
    raise RuntimeError(f"the job failed (exit status {code}; its output ends above): --config={config} "
                       f"--workdir={workdir}")


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def markdown_table(header, rows) -> str:
  """A Markdown table (display it with IPython.display.Markdown)."""
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- offline stand-ins


WORLD_JUDGE = "emjax.world.judge:make_judge"  # the world's programmatic judge (options: {"world": world.json})


def tiny_hf_model(tokenizer_dir: str, out_dir: str, *, d_model: int = 64, n_layers: int = 2, seed: int = 0) -> str:
  """A random Qwen2-architecture `transformers` model of the tokenizer's vocabulary, saved with the tokenizer.

  The offline stand-in for a hub model (a Hugging Face directory like any other); written once.
  """
  if os.path.exists(os.path.join(out_dir, "model.safetensors")):
    return out_dir
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                                 num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=4096, tie_word_embeddings=True, use_sliding_window=False,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float()
  tmp = f"{out_dir}.tmp"
  model.save_pretrained(tmp)
  tok.save_pretrained(tmp)
  os.replace(tmp, out_dir)
  return out_dir
