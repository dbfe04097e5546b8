"""The training loop: exact resume, transparent sharding, accumulation, schedules, failures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, subprocess_env, tiny_config
from emjax import sharding as shd
from emjax.train import checkpoint as ckpt_lib
from emjax.train import loop, objectives, state as state_lib


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- exact resume


def _cli(workdir, *overrides):
  return [sys.executable, "-m", "emjax.main", "--config=configs/pretrain/tiny.py:smoke", f"--workdir={workdir}",
          "--noprogress", "--config.train.steps=16", "--config.checkpoint.every_steps=3", *overrides]


@pytest.mark.slow  # end to end: processes started and killed
def test_sigkill_and_resume_reproduces_losses_params_and_mixture_order(tmp_path):
  env = subprocess_env(1)
  mixture = ["--config.data.sources.arithmetic.weight=0.6", "--config.data.sources.grammar.weight=0.3",
             "--config.data.sources.sorting.weight=0.1"]
  straight = tmp_path / "straight"
  subprocess.run(_cli(straight, *mixture), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed, *mixture), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = killed / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:  # kill once step 8 is logged: after the step-6 checkpoint, before the end
    if metrics.exists() and any(json.loads(l)["step"] >= 8 for l in metrics.read_text().splitlines() if l):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "COMPLETED").exists()
  steps_before = ckpt_lib.Checkpointer(str(killed / "checkpoints"), keep=10).steps()
  assert steps_before and max(steps_before) < 16, steps_before

  resumed = subprocess.run(_cli(killed, *mixture), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stderr
  assert (killed / "COMPLETED").exists()

  a, b = read_metrics(straight), read_metrics(killed)
  assert [r["step"] for r in a] == list(range(1, 17)) == [r["step"] for r in b]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact, not approximate
  assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]

  params_a, params_b = saved_params(straight, 16), saved_params(killed, 16)
  assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(x, y)  # bitwise


def saved_params(workdir, step):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))["params"]


def test_unreadable_latest_checkpoint_is_skipped_with_a_message(tmp_path, one_device_mesh, caplog):
  config = tiny_config(steps=4)
  loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  ckdir = tmp_path / "checkpoints"
  assert ckpt_lib.Checkpointer(str(ckdir), keep=10).steps() == [2, 4]
  # Damage step 4: remove its array data.
  for root, _, files in os.walk(ckdir / "4" / "state"):
    for name in files:
      os.remove(os.path.join(root, name))
  (ckdir / "7.orbax-checkpoint-tmp-123").mkdir()  # what a kill during a save leaves behind
  config.train.steps = 6
  with caplog.at_level("WARNING"):
    loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  text = caplog.text
  assert "step 4" in text and "unreadable" in text and "skipping" in text
  assert "incomplete save" in text and "7.orbax-checkpoint-tmp-123" in text
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 recomputed from step 2
  assert (tmp_path / "checkpoints_unreadable" / "4").exists()  # kept aside, not deleted


# ----------------------------------------------------------------------------- sharding


def test_eight_device_mesh_matches_one_device_and_shards_params(tmp_path, one_device_mesh):
  config = tiny_config(steps=4)
  config.model.update(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
  config.checkpoint.every_steps = 100
  single = loop.train(config, str(tmp_path / "one"), mesh=one_device_mesh, show_progress=False)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh8 = shd.make_mesh(config.mesh)
  assert mesh8.size == 8
  sharded = loop.train(config, str(tmp_path / "eight"), mesh=mesh8, show_progress=False)
  a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
  np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=2e-5)
  assert abs(single["loss"] - sharded["loss"]) < 1e-4

  trainer = loop.Trainer(config, mesh8)
  state, _ = trainer.init_state()
  specs = {"/".join(str(k.key) for k in path): tuple(leaf.sharding.spec)
           for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])}
  assert specs["layers/mlp/gate_proj"] == (None, "fsdp", "tensor")
  assert specs["layers/attn/q_proj"] == (None, "fsdp", "tensor", None)
  assert specs["embed"] == ("tensor", "fsdp")
  gate = state["params"]["layers"]["mlp"]["gate_proj"]
  assert gate.addressable_shards[0].data.shape == (2, 32, 64)  # 1/4 of (2, 64, 128) on each device
  mu = state["opt_state"][1][0].mu["layers"]["mlp"]["gate_proj"]  # adam's first moment: same sharding
  assert tuple(mu.sharding.spec) == (None, "fsdp", "tensor")


@pytest.mark.parametrize("mesh_cfg,match", [
    (dict(data=3, fsdp=1, tensor=1), "has 3 devices in total, but there are 8"),
    (dict(data=-1, fsdp=3, tensor=1), "divisible by 3"),
    (dict(data=-1, fsdp=-1, tensor=1), "only one axis may be -1"),
])
def test_mesh_that_does_not_match_devices(mesh_cfg, match):
  with pytest.raises(ValueError, match=match):
    shd.make_mesh(mesh_cfg)


def test_batch_not_divisible_by_data_parallel_size():
  config = tiny_config(batch_size=6)
  config.mesh.update(data=4, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match=r"train.batch_size=6 must be divisible by the data-parallel size"):
    loop.Trainer(config)


# ----------------------------------------------------------------------------- step, losses, schedules


def test_cross_entropy_is_a_token_mean_over_the_mask():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  mask = np.array([[1, 1, 0], [0, 1, 0]], np.float32)
  out = objectives.cross_entropy(logits, {"targets": targets, "loss_mask": mask})
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  assert float(out.weight) == 3.0
  np.testing.assert_allclose(float(out.loss_sum) / float(out.weight), (nll * mask).sum() / 3, rtol=1e-6)


def test_schedules_warm_up_and_decay():
  config = tiny_config(steps=100, warmup_steps=10, lr=1.0)
  config.train.end_lr_fraction = 0.1
  for name in ("cosine", "linear"):
    config.train.schedule = name
    sched = state_lib.make_schedule(config.train)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6
    assert abs(float(sched(10)) - 1.0) < 1e-6 and abs(float(sched(100)) - 0.1) < 1e-6
  config.train.schedule = "constant"
  assert float(state_lib.make_schedule(config.train)(50)) == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor"])
def test_other_optimizers_train(tmp_path, one_device_mesh, optimizer):
  config = tiny_config(steps=3, optimizer=optimizer, lr=0.05)
  config.checkpoint.every_steps = 100
  final = loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  assert np.isfinite(final["loss"])


@pytest.mark.parametrize("key,value,match", [
    ("optimizer", "adamax", "config.train.optimizer: unknown optimizer 'adamax'"),
    ("schedule", "step", "config.train.schedule: unknown schedule 'step'"),
    ("objective", "kl", "config.train.objective: unknown objective 'kl'"),
])
def test_unknown_names_are_clear_errors(key, value, match):
  with pytest.raises(ValueError, match=match):
    loop.Trainer(tiny_config(**{key: value}))


def _saved_steps_are_finite(workdir, config, mesh):
  """Every checkpoint in `workdir` holds a finite train state; returns their steps."""
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10)
  abstract = loop.Trainer(config, mesh).layout.abstract
  try:
    for s in ck.steps():
      state = ck._manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
      for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"checkpoint {s} holds non-finite values"
    return ck.steps()
  finally:
    ck.close()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, one_device_mesh):
  config = tiny_config(steps=8, lr=1e30, warmup_steps=0, grad_clip=0.0)
  config.train.optimizer = "sgd"
  config.train.momentum = 0.0
  with pytest.raises(loop.NonFiniteLossError) as e:
    loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  message = str(e.value)
  assert "at step" in message
  bad_step = int(message.split("at step ")[1].split(";")[0].split(" ")[0])
  saved = _saved_steps_are_finite(str(tmp_path), config, one_device_mesh)
  assert all(s < bad_step for s in saved)
  assert (f"the last good checkpoint is step {saved[-1]}" in message if saved
          else "no checkpoint was written before it" in message)
  assert not (tmp_path / "COMPLETED").exists()


def _poison_step(monkeypatch, at_step: int, grad_norm: bool):
  """The compiled step makes the parameters non-finite at step `at_step`, its loss (computed before the
  update) finite: a NaN gradient (grad_norm NaN too) or an update that overflows (grad_norm finite)."""
  make = loop.make_train_step

  def make_poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, frozen, batch, teacher_params=None):
      new_state, metrics = step_fn(state, frozen, batch, teacher_params)
      hit = new_state["step"] == at_step
      poison = jax.numpy.nan if grad_norm else jax.numpy.inf
      params = jax.tree.map(lambda p: jax.numpy.where(hit, poison, p), new_state["params"])
      if grad_norm:
        metrics = dict(metrics, grad_norm=jax.numpy.where(hit, jax.numpy.nan, metrics["grad_norm"]))
      return dict(new_state, params=params), metrics
    return step
  monkeypatch.setattr(loop, "make_train_step", make_poisoned)


@pytest.mark.parametrize("grad_norm", [True, False], ids=["nan_gradient", "overflowing_update"])
def test_a_step_with_non_finite_gradient_or_parameters_is_never_saved(tmp_path, one_device_mesh, monkeypatch,
                                                                      grad_norm):
  config = tiny_config(steps=8)  # saves every 2 steps
  _poison_step(monkeypatch, at_step=4, grad_norm=grad_norm)
  with pytest.raises(loop.NonFiniteLossError) as e:
    loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  message = str(e.value)
  assert "at step 4" in message
  assert f"the last good checkpoint is step 2 in {tmp_path / 'checkpoints'}" in message
  assert ("grad_norm" in message) == grad_norm
  assert not (tmp_path / "checkpoints" / "4").exists()
  assert _saved_steps_are_finite(str(tmp_path), config, one_device_mesh) == [2]
  assert not (tmp_path / "COMPLETED").exists()


# ----------------------------------------------------------------------------- a fresh start never overwrites


def _tree(root):
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


def test_resume_false_starts_fresh_but_is_refused_where_checkpoints_exist(tmp_path, one_device_mesh):
  workdir = str(tmp_path / "run")
  config = tiny_config(steps=4)
  config.checkpoint.resume = False  # a fresh start in a new workdir: trains and saves as usual
  loop.train(config, workdir, mesh=one_device_mesh, show_progress=False)
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10).steps() == [2, 4]
  before = _tree(workdir)
  config.train.seed = 7  # another run in the same workdir: its saves would be declined by orbax (a later
  with pytest.raises(ckpt_lib.CheckpointsExistError) as e:  # step exists) or mixed with the old run's
    loop.train(config, workdir, mesh=one_device_mesh, show_progress=False)
  message = str(e.value)
  assert workdir in message and "steps [2, 4]" in message
  assert "new --workdir" in message and "delete" in message
  assert _tree(workdir) == before  # nothing written, moved or removed (COMPLETED of the first run included)


def test_cli_reports_errors_without_a_traceback_and_marks_failure(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "emjax.main", "--config=configs/pretrain/tiny.py:smoke", f"--workdir={tmp_path}",
       "--config.data.sources.arithmetic.weight=0", "--config.data.sources.grammar.weight=0",
       "--config.data.sources.sorting.weight=0"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  assert "emjax: error:" in run.stderr and "weight" in run.stderr
  assert "Traceback" not in run.stderr
  assert (tmp_path / "FAILED").exists() and not (tmp_path / "COMPLETED").exists()


def test_cli_rejects_a_misspelt_key(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "emjax.main", "--config=configs/pretrain/tiny.py:smoke", f"--workdir={tmp_path}",
       "--config.train.stpes=5"],
      cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert run.returncode != 0
  assert "stpes" in run.stderr


# ----------------------------------------------------------------------------- ahead of time


def test_aot_compile_from_abstract_shapes_only(capsys):
  """The step compiles for the 2x2x2 mesh without any parameter being materialised."""
  from emjax.train import aot
  config = tiny_config()
  config.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  before = {id(a) for a in jax.live_arrays()}
  report = aot.compile_and_report(config, "")
  assert not [a.shape for a in jax.live_arrays() if id(a) not in before]  # nothing allocated
  assert report["devices"] == 8 and report["memory_per_device_bytes"]["argument"] > 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_params"] == report["num_params"]


def test_aot_compile_of_the_1b_config_on_the_2x2x2_mesh():
  """configs/pretrain/llama_1b.py:compile: 1.24B parameters, compiled without materialising them."""
  import importlib.util
  from emjax.train import aot
  spec = importlib.util.spec_from_file_location("llama_1b", os.path.join(ROOT, "configs/pretrain/llama_1b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("compile,seq=512,batch=8")
  assert config.job == "compile"
  report = aot.compile_and_report(config, "")
  assert report["num_params"] > 1.2e9 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # fp32 params + two Adam moments (12 bytes/param), split 4 ways by fsdp x tensor, are arguments.
  assert 0.9 < report["memory_per_device_bytes"]["argument"] / (12 * report["num_params"] / 4) < 1.1
