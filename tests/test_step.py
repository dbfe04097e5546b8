"""The jitted step itself: accumulation over uneven micro-batches, rows staying on their device,
chunked losses, a frozen teacher, objective-declared batch keys, a bf16 base held once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from emjax import sharding as shd
from emjax.models import transformer
from emjax.train import loop, objectives, state as state_lib


def _mesh(n):
  return shd.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:n])


def uneven_batch(batch_size, seq_len, vocab, seed=0):
  """Rows whose loss masks hold very different token counts (1 token up to the whole row)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  counts = np.geomspace(1, seq_len, batch_size).astype(int)
  rng.shuffle(counts)
  mask = (np.arange(seq_len)[None, :] < counts[:, None]).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}


def _one_step(config, mesh, batch):
  trainer = loop.Trainer(config, mesh)
  state, frozen = trainer.init_state()
  new_state, metrics = trainer.step_fn(state, frozen, shd.put_local_batch(batch, mesh), None)
  return jax.device_get(new_state["params"]), jax.device_get(metrics)


def test_accumulation_over_uneven_micro_batches_equals_one_big_batch():
  """Micro-batches of 1..32 target tokens: the update is the token mean over the whole batch.

  A mean of per-micro-batch means (or a split that drops/duplicates rows) moves the
  loss and the updated parameters well past float32 noise.
  """
  config = tiny_config()
  config.train.update(optimizer="sgd", momentum=0.0, lr=1.0, grad_clip=0.0, weight_decay=0.0, warmup_steps=0)
  mesh = _mesh(4)
  batch = uneven_batch(config.train.batch_size, config.data.seq_len, config.model.vocab_size)
  params_1, metrics_1 = _one_step(config, mesh, batch)
  config.train.grad_accum_steps = 2
  params_2, metrics_2 = _one_step(config, mesh, batch)
  assert metrics_1["loss_tokens"] == batch["loss_mask"].sum()
  np.testing.assert_allclose(metrics_2["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_2["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_2, params_1)


def test_micro_batches_keep_each_devices_rows_without_communication():
  """Every device's share of every micro-batch is rows it already holds; the split compiles to no collective.

  The batch is split over data x fsdp (4 ways) and replicated over tensor.
  """
  mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8])
  accum, per_device = 2, 4
  rows = np.arange(4 * per_device, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32)
  batch = shd.put_local_batch({"inputs": rows}, mesh)
  split = jax.jit(lambda b: loop.micro_batches(b, accum, mesh))
  micro = split(batch)["inputs"]
  assert micro.shape == (accum, 4 * per_device // accum, 3)
  for shard in micro.addressable_shards:
    device_rows = next(s.data for s in batch["inputs"].addressable_shards if s.device == shard.device)
    own = set(np.asarray(device_rows)[:, 0].tolist())
    got = set(np.asarray(shard.data)[..., 0].ravel().tolist())
    assert got <= own, f"{shard.device} got rows {sorted(got)} but holds {sorted(own)}"
  hlo = split.lower(batch).compile().as_text()
  for collective in ("all-to-all", "collective-permute", "all-gather", "all-reduce"):
    assert collective not in hlo, collective


# ----------------------------------------------------------------------------- chunked loss


def test_chunked_loss_and_grads_equal_the_whole_sequence():
  """Chunks of 12 positions over L=32 (a padded last chunk): same loss sums and gradients."""
  config = tiny_config()
  mesh = _mesh(1)
  trainer = loop.Trainer(config, mesh)
  state, frozen = trainer.init_state()
  batch = shd.put_local_batch(uneven_batch(8, config.data.seq_len, config.model.vocab_size), mesh)
  objective = objectives.get_objective("ce")
  results = []
  for chunk in (0, 12):
    loss_sums = loop.make_loss_sums(trainer.layout.graphdef, objective, mesh, chunk)
    (loss, out), grads = jax.jit(jax.value_and_grad(loss_sums, has_aux=True))(state["params"], frozen, batch)
    results.append((float(loss), float(out.weight), float(out.metrics["accuracy"]), jax.device_get(grads)))
  for loss, weight, acc, grads in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
    assert (weight, acc) == (results[0][1], results[0][2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, results[0][3])


def test_chunked_loss_never_holds_the_full_float32_logits():
  """Compiled memory of the training step: temporaries stay below one [B, L, V] float32 logits array."""
  config = tiny_config()
  config.model.update(vocab_size=16384, dtype="bfloat16")
  config.data.seq_len = 256
  config.train.batch_size = 4
  full_logits_bytes = 4 * 256 * 16384 * 4
  temps = {}
  for chunk in (0, 32):
    config.train.loss_chunk_len = chunk
    mem = loop.Trainer(config, _mesh(1)).compile().memory_analysis()
    temps[chunk] = mem.temp_size_in_bytes
  assert temps[0] > full_logits_bytes  # the measurement can see the logits at all
  # Chunks of 32 positions: everything the step keeps at once is less than one full float32 logits array.
  assert temps[32] < full_logits_bytes, temps
  assert temps[32] < temps[0] / 3, temps


# ----------------------------------------------------------------------------- teacher


def _teacher(model_cfg, mesh, seed):
  model = transformer.Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
  graphdef, params = transformer.split_model(model)
  axes = transformer.param_logical_axes(model)
  shardings = shd.tree_shardings(axes, params, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
  return loop.Teacher(graphdef, abstract, shardings), jax.device_put(params, shardings)


def _kl_reference(student_logits, teacher_logits, mask):
  s = jax.nn.log_softmax(np.asarray(student_logits, np.float64), -1)
  t = jax.nn.log_softmax(np.asarray(teacher_logits, np.float64), -1)
  kl = (np.exp(t) * (t - s)).sum(-1)
  return float((kl * mask).sum() / mask.sum())


def test_forward_kl_against_a_frozen_teacher_of_another_size():
  config = tiny_config()
  chunk = 12
  config.train.update(loss_chunk_len=chunk, grad_accum_steps=2)
  mesh = _mesh(2)
  kl = objectives.get_objective("forward_kl")
  trainer = loop.Trainer(config, mesh)
  teacher_cfg = dataclasses.replace(trainer.model_cfg, d_model=48, n_layers=1, d_ff=96, dtype="bfloat16",
                                    param_dtype="bfloat16")
  teacher, teacher_params = _teacher(teacher_cfg, mesh, seed=7)
  step = loop.make_train_step(trainer.layout.graphdef, kl, trainer.tx, trainer.schedule, 2, mesh,
                              loss_chunk_len=chunk, teacher_graphdef=teacher.graphdef)
  step_fn = jax.jit(step, in_shardings=(trainer.layout.shardings, trainer.layout.frozen_shardings,
                                        trainer.batch_shardings, teacher.shardings), donate_argnums=(0,))
  state, frozen = trainer.init_state()
  student_params = jax.device_get(state["params"])
  raw = uneven_batch(8, config.data.seq_len, config.model.vocab_size)
  batch = shd.put_local_batch(raw, mesh)
  before = jax.device_get(teacher_params)
  _, metrics = step_fn(state, frozen, batch, teacher_params)

  student = nnx.merge(trainer.layout.graphdef, student_params)
  s_logits = student(raw["inputs"], raw["positions"], raw["segment_ids"])
  t_logits = nnx.merge(teacher.graphdef, before)(raw["inputs"], raw["positions"], raw["segment_ids"])
  np.testing.assert_allclose(float(metrics["loss"]), _kl_reference(s_logits, t_logits, raw["loss_mask"]),
                             rtol=2e-3)
  # The teacher is read, never donated or changed.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(teacher_params), before)


def test_a_teacher_objective_without_a_teacher_is_a_clear_error():
  config = tiny_config()
  config.train.objective = "forward_kl"
  with pytest.raises(ValueError, match=r"needs a teacher: set config.teacher.path"):
    loop.Trainer(config, _mesh(1))


def test_objectives_declare_the_batch_keys_the_step_is_compiled_for():
  def weighted_ce(logits, batch, teacher=None):
    out = objectives.cross_entropy(logits, batch)
    w = batch["token_weight"][..., 0]
    return out._replace(loss_sum=jnp.sum(-objectives.token_log_probs(logits, batch["targets"]) * w))

  spec = {"targets": ((), "int32"), "loss_mask": ((), "float32"), "token_weight": ((1,), "float32")}
  objectives.OBJECTIVES["weighted_ce_test"] = objectives.Objective("weighted_ce_test", weighted_ce, spec)
  try:
    config = tiny_config()
    config.train.update(objective="weighted_ce_test", loss_chunk_len=8)
    trainer = loop.Trainer(config, _mesh(1))
    assert trainer.batch_abstract["token_weight"].shape == (8, config.data.seq_len, 1)
    assert set(trainer.batch_keys) == {"inputs", "positions", "segment_ids", "targets", "loss_mask", "token_weight"}
    trainer.compile()
    with pytest.raises(ValueError, match=r"reads batch keys \['token_weight'\]"):
      loop._model_batch(uneven_batch(8, config.data.seq_len, 288), trainer.batch_keys)
  finally:
    del objectives.OBJECTIVES["weighted_ce_test"]


# ----------------------------------------------------------------------------- frozen base


def test_lora_base_is_held_once_in_bfloat16():
  """base_dtype=bfloat16: the frozen tree is bf16, adapters float32, and the loaded base is consumed."""
  config = tiny_config()
  config.lora.update(enabled=True, rank=4, base_dtype="bfloat16")
  mesh = _mesh(2)
  trainer = loop.Trainer(config, mesh)
  assert {str(a.dtype) for a in jax.tree.leaves(trainer.layout.frozen_abstract)} == {"bfloat16"}
  assert {str(a.dtype) for a in jax.tree.leaves(trainer.layout.abstract["params"])} == {"float32"}
  base = jax.jit(lambda: transformer.split_model(transformer.Transformer(trainer.model_cfg, rngs=nnx.Rngs(0)))[1],
                 out_shardings=jax.tree.map(lambda a: a.sharding, trainer.layout.base_abstract))()
  base_leaves = jax.tree.leaves(base)
  state, frozen = state_lib.init_state(trainer.model_cfg, trainer.tx, trainer.layout, 0, trainer.lora_cfg, base)
  assert all(leaf.is_deleted() for leaf in base_leaves)  # no second copy of the base stays alive
  assert {str(a.dtype) for a in jax.tree.leaves(frozen)} == {"bfloat16"}
  assert {str(a.dtype) for a in jax.tree.leaves(state["params"])} == {"float32"}  # adapters train in float32
  # The ahead-of-time step the loop runs: it accepts exactly the layout's dtypes.
  _, metrics = trainer.compile()(state, frozen, shd.put_local_batch(uneven_batch(8, 32, 288), mesh), None)
  assert np.isfinite(float(metrics["loss"]))


def test_full_fine_tuning_reuses_the_loaded_base_buffers(recwarn):
  """The donated base becomes buffers of the new state: deleted as an input, every donation used."""
  config = tiny_config()
  mesh = _mesh(1)
  trainer = loop.Trainer(config, mesh)
  base = jax.jit(lambda: transformer.split_model(transformer.Transformer(trainer.model_cfg, rngs=nnx.Rngs(0)))[1],
                 out_shardings=jax.tree.map(lambda a: a.sharding, trainer.layout.base_abstract))()
  # Copies, not device_get's zero-copy views: a live view of a buffer blocks its donation.
  expected = jax.tree.map(lambda x: np.array(x, copy=True), base)
  leaves = jax.tree.leaves(base)
  state, _ = state_lib.init_state(trainer.model_cfg, trainer.tx, trainer.layout, 0, None, base)
  assert all(leaf.is_deleted() for leaf in leaves)
  assert not [w for w in recwarn if "donated buffers were not usable" in str(w.message)]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), expected)
