"""The plan job: tiny models compiled for a v5e slice by libtpu on this CPU (jax[tpu]; no TPU).

CI installs jax[tpu] (the test extra), so a missing libtpu fails here instead of skipping.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, jaxpr_eqns, subprocess_env, tiny_config

TOPOLOGY = "v5e-4"  # 2x2 chips on one host


def test_libtpu_is_installed():
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("libtpu is not installed: the plan job compiles for TPU slices with it. Install the test extra "
                "(pip install -e '.[test]', which has jax[tpu]) or pip install 'jax[tpu]' for this jax")


@pytest.fixture(scope="module")
def topo():
  from emjax.train import aot
  return aot.topology(TOPOLOGY)


def _plan_config(**model):
  c = tiny_config()
  c.job = "plan"
  c.compile.topology = TOPOLOGY
  c.model.update(model)
  return c


@pytest.fixture(scope="module")
def train_plan(topo, tmp_path_factory):
  from emjax.train import aot
  workdir = str(tmp_path_factory.mktemp("plan"))
  config = _plan_config(n_layers=3)
  return aot.plan(config, workdir), config, workdir


def test_slice_names():
  from emjax.train import aot
  shapes = {name: (chip.name, dims) for name in ("v5e-16", "v5litepod-16", "v5e-256", "v6e-64", "v5p-64", "v5p-8",
                                                 "v4-32", "v5e:4x8", "v5p:4x4x4")
            for chip, dims in [aot.parse_topology(name)]}
  assert shapes == {"v5e-16": ("v5e", (4, 4)), "v5litepod-16": ("v5e", (4, 4)), "v5e-256": ("v5e", (16, 16)),
                    "v6e-64": ("v6e", (8, 8)),
                    # v5p-N and v4-N count TensorCores, two per chip
                    "v5p-64": ("v5p", (2, 4, 4)), "v5p-8": ("v5p", (2, 2, 1)), "v4-32": ("v4", (2, 2, 4)),
                    "v5e:4x8": ("v5e", (4, 8)), "v5p:4x4x4": ("v5p", (4, 4, 4))}


@pytest.mark.parametrize("name, message", [
    ("v9-16", "config.compile.topology='v9-16': unknown TPU chip 'v9'; known chips: v4, v5e"),
    ("v5p-63", "config.compile.topology='v5p-63': v5p-N counts TensorCores"),
    ("v5e-12", "12 chips is not a power of two"),
    ("tpu16", "config.compile.topology='tpu16' is not a TPU slice name"),
    ("", "config.compile.topology: the plan job compiles for a TPU slice"),
])
def test_unknown_topology_is_an_error_naming_the_key(name, message):
  from emjax.train import aot
  config = _plan_config()
  config.compile.topology = name
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    aot.plan(config, "")


def test_plan_job_refuses_an_unknown_topology_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "emjax.main", "--config=configs/pretrain/tiny.py", "--config.job=plan",
       "--config.compile.topology=v7-16", f"--workdir={tmp_path}"],
      cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "emjax: error: config.compile.topology='v7-16': unknown TPU chip 'v7'" in proc.stderr


def test_plan_reports_memory_cost_and_projection(train_plan, topo):
  report, config, workdir = train_plan
  assert (report["chip"], report["chips"], report["devices"], report["libtpu_topology"]) == ("v5e", 4, 4, "v5e:2x2")
  assert report["device_kind"] == "TPU v5 lite" and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  mem = report["memory"]
  b = mem["per_device_bytes"]
  assert b["peak"] == b["argument"] + b["output"] + b["temp"] - b["alias"]
  assert 0 < b["argument"] and 0 < b["peak"] <= mem["hbm_per_device_bytes"] == 16 * 2**30
  assert mem["fits"] and mem["xla_refusal"] is None
  cost = report["cost_per_device"]
  assert cost["loops_left"] == 0 and cost["layers_compiled"] == [1, 2]
  # XLA's count is of the same order as the model's matmul FLOPs per device.
  tokens = config.train.batch_size * config.data.seq_len
  assert report["tokens_per_step"] == tokens
  from emjax.models import transformer
  model_flops = transformer.TransformerConfig.from_config(config.model).flops_per_token(config.data.seq_len)
  assert 0.7 < cost["flops"] / (model_flops * tokens / 4) < 3
  proj = report["projection"]
  assert math.isclose(proj["compute_s"], cost["flops"] / 197e12)
  assert math.isclose(proj["memory_s"], cost["bytes_accessed"] / 819e9)
  assert proj["seconds"] == max(proj["compute_s"], proj["memory_s"]) > 0
  assert math.isclose(proj["tokens_per_s"], tokens / proj["seconds"])
  with open(os.path.join(workdir, "plan.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))


def test_cost_extrapolation_is_xlas_count_of_the_unrolled_step(train_plan, topo):
  """The 3-layer cost from the 1- and 2-layer compiles equals XLA's count for 3 unrolled layers,
  while the scanned step itself (its layer loop body counted once) counts less."""
  from emjax import sharding as shd
  from emjax.train import aot, loop
  report, config, _ = train_plan
  mesh = shd.make_mesh(config.mesh, topo.devices)
  direct = aot._cost(loop.Trainer(aot._with_layers(config, 3), mesh, unroll_loops=True).compile(aot.NO_HIDDEN_LOOPS))
  # Bytes only nearly: XLA fuses the first and last layers a little differently from the others.
  for key, rel_tol in (("flops", 0.01), ("bytes_accessed", 0.05)):
    assert math.isclose(report["cost_per_device"][key], direct[key], rel_tol=rel_tol), (key, direct)
  scanned = aot._cost(loop.Trainer(config, mesh).compile())
  assert scanned["flops"] < 0.8 * report["cost_per_device"]["flops"]


@pytest.mark.slow  # an oversize plan compiles for a minute and more
def test_an_oversize_plan_does_not_fit_and_still_reports(topo, capsys):
  from emjax.train import aot
  # ~2.3B float32 parameters with AdamW, replicated on data=4: ~28 GB of arguments per device of a 16 GiB chip.
  config = _plan_config(vocab_size=262144, d_model=4096, n_layers=1, n_heads=32, n_kv_heads=8, d_ff=8192)
  report = aot.plan(config, "")
  mem = report["memory"]
  assert not mem["fits"] and "RESOURCE_EXHAUSTED" in mem["xla_refusal"]
  assert mem["per_device_bytes"]["peak"] > mem["hbm_per_device_bytes"]
  assert mem["per_device_bytes"]["argument"] > 16 * 2**30
  assert report["cost_per_device"]["flops"] > 0 and report["projection"]["seconds"] > 0
  out = capsys.readouterr().out
  assert "DOES NOT FIT" in out and "RESOURCE_EXHAUSTED" in out


def test_sampling_plan(topo):
  from emjax.sample import run as sample_run
  from emjax.train import aot
  config = _plan_config()
  config.sample = sample_run.sample_block()
  config.sample.update(batch_size=4, n=2, max_new_tokens=16, max_prompt_length=32)
  config.compile.step = "sample"
  report = aot.plan(config, "")
  assert (report["prompt_bucket"], report["max_new_tokens"], report["rows"]) == (32, 16, 8)
  assert report["fits"]
  for name in ("prefill", "decode"):
    b = report["memory"][name]["per_device_bytes"]
    assert 0 < b["peak"] <= report["memory"][name]["hbm_per_device_bytes"]
    assert report["cost_per_device"][name]["flops"] > 0
  # The decode loop itself is the one loop left: its body (one decode step) is what is counted.
  assert report["cost_per_device"]["prefill"]["loops_left"] == 0
  assert report["cost_per_device"]["decode"]["loops_left"] == 1
  proj = report["projection"]
  assert math.isclose(proj["batch_seconds"], proj["prefill"]["seconds"] + 16 * proj["decode"]["seconds"])
  assert math.isclose(proj["decode_tokens_per_s"], 8 / proj["decode"]["seconds"])


# The mesh shapes the configs and the plans table use, and the usual splits of a 16-chip slice.
MESH_SHAPES = {
    "v5e:4x4": [(16, 1, 1), (1, 16, 1), (2, 8, 1), (1, 8, 2), (4, 2, 2), (2, 1, 8), (2, 2, 4), (4, 4, 1)],
    "v5p:2x2x4": [(16, 1, 1), (1, 16, 1), (2, 8, 1), (1, 8, 2), (4, 2, 2), (2, 2, 4), (1, 4, 4)],
}


@pytest.mark.parametrize("name", sorted(MESH_SHAPES))
def test_tpu_meshes_keep_every_axis_on_physical_links(name, caplog):
  """Every shape gets jax's physical layout (splitting torus axes where the shape needs it), with the
  layout logged; none falls back to jax's device order, which puts rings across non-neighbours."""
  import logging
  from jax.experimental import mesh_utils
  from emjax import sharding as shd
  from emjax.train import aot
  devices = list(aot.topology(name).devices)
  wrong, logs = [], {}
  for shape in MESH_SHAPES[name]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="emjax.sharding"):
      mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices)
    logs[shape] = [(r.levelno, r.getMessage()) for r in caplog.records]
    want = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    if [d.id for d in mesh.devices.flat] != [d.id for d in want.flat]:
      wrong.append(shape)
  assert not wrong, f"meshes not in jax's physical layout: {wrong}"
  for shape, records in logs.items():
    assert [level for level, _ in records] == [logging.INFO], (shape, records)
    assert "physical layout" in records[0][1] and " along " in records[0][1], (shape, records)


def test_a_tpu_mesh_without_a_physical_layout_is_a_warning_naming_the_order(monkeypatch, caplog):
  import logging
  from jax.experimental import mesh_utils
  from emjax import sharding as shd
  from emjax.train import aot

  def refuse(*args, **kwargs):
    raise ValueError("no assignment")

  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
  devices = list(aot.topology("v5e:4x4").devices)
  with caplog.at_level(logging.INFO, logger="emjax.sharding"):
    mesh = shd.make_mesh(dict(data=2, fsdp=8, tensor=1), devices)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "no physical layout (jax: no assignment); devices in jax's order, ids" in warnings[0]


def test_a_plan_traces_the_attention_the_tpu_runs(topo):
  """`model.attention=auto` under a TPU mesh is jax's XLA attention, as on the TPU itself, although the
  plan runs on a CPU (where auto is emjax's einsum attention)."""
  from emjax import sharding as shd
  from emjax.train import loop

  def attention_scopes(trainer):
    traced = trainer.step_fn.trace(trainer.layout.abstract, trainer.layout.frozen_abstract, trainer.batch_abstract,
                                   None)
    return {part for s in (str(e.source_info.name_stack) for e in jaxpr_eqns(traced.jaxpr.jaxpr)) for part in s.replace("(", "/").replace(")", "/").split("/")
            if part.startswith("attention_")}

  config = _plan_config(dtype="bfloat16")
  assert attention_scopes(loop.Trainer(config, shd.make_mesh(config.mesh, topo.devices))) == {"attention_fused"}
  assert attention_scopes(loop.Trainer(config)) == {"attention_xla"}  # this CPU's own devices
