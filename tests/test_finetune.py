"""Fine-tuning in the one loop: LoRA adapters on a pretrained base, full-parameter switch."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from emjax import weights
from emjax.train import loop


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A briefly pretrained tiny model: the base that the fine-tuning tests start from."""
  import jax
  from emjax import sharding as shd
  workdir = tmp_path_factory.mktemp("base")
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  loop.train(tiny_config(steps=4), str(workdir), mesh=mesh, show_progress=False)
  return workdir


def lora_config(base_dir, **lora):
  config = tiny_config(steps=6, lr=1e-2)
  config.init.checkpoint = str(base_dir)
  config.lora.update(enabled=True, rank=4, alpha=8.0, **lora)
  config.data.sources.arithmetic.weight = 1.0
  config.data.sources.grammar.weight = 0.0
  config.data.sources.sorting.weight = 0.0
  return config


def saved_tree(workdir, step):
  return ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


def disk_base(path, mesh):
  """The pretrained base as stored, read independently of the trainer."""
  return weights.load_weights(str(path), mesh=mesh).params


def watch_frozen(monkeypatch):
  """Records the frozen parameters every training step of `loop.train` is given."""
  seen = []
  compile_step = loop.Trainer.compile

  def compile_and_watch(self):
    compiled = compile_step(self)

    def step(state, frozen, *rest):
      seen.append(jax.device_get(frozen))
      return compiled(state, frozen, *rest)
    return step

  monkeypatch.setattr(loop.Trainer, "compile", compile_and_watch)
  return seen


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_trains_only_adapters_on_its_pinned_base(tmp_path, pretrained, one_device_mesh, monkeypatch):
  """Every step of a LoRA run, fresh and resumed, runs on exactly the stored base; only adapters train.

  The base is pinned (RUN/base.json): a newer step of the base run is not the run's base, and a
  rewritten base is refused when resuming, sampling or exporting.
  """
  import shutil

  import orbax.checkpoint as ocp

  base_dir = tmp_path / "base"
  shutil.copytree(pretrained, base_dir)
  config = lora_config(base_dir)
  trainer = loop.Trainer(config, one_device_mesh)
  state, _ = trainer.init_state()
  trainable_names = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
      state["params"])}
  assert trainable_names and all("_lora/lora_" in n for n in trainable_names)
  assert len(trainable_names) == 14
  base = disk_base(base_dir, one_device_mesh)
  shifted = dict(base, embed=base["embed"].at[0, 0].add(1.0))

  run_dir = tmp_path / "run"
  seen = watch_frozen(monkeypatch)
  config.train.steps = 4
  loop.train(config, str(run_dir), mesh=one_device_mesh, show_progress=False)
  pin = weights.read_pin(str(run_dir))
  assert pin["path"] == str(base_dir) and pin["step"] == 4 and pin["fingerprint"] == weights.fingerprint(base)
  # The base run goes on training: its newer step 8 is not this run's base; the pinned step 4 still is.
  ckpt = base_dir / "checkpoints"
  ocp.PyTreeCheckpointer().save(str(ckpt / "8" / "state"), {"params": shifted})
  config.train.steps = 6
  final = loop.train(config, str(run_dir), mesh=one_device_mesh, show_progress=False)  # resumes at 4
  assert len(seen) == 6
  for frozen in seen:  # the base each step saw: the stored one, bit for bit, never an updated copy
    assert_same_tree(frozen, base)
  rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  assert final["loss"] < rows[0]["loss"]
  saved = saved_tree(run_dir, 6)
  leaves = jax.tree_util.tree_leaves_with_path(saved["params"])
  assert all("lora" in jax.tree_util.keystr(p) for p, _ in leaves)  # adapter-only checkpoint
  assert max(float(np.abs(x).max()) for p, x in leaves if "lora_b" in jax.tree_util.keystr(p)) > 0  # trained
  assert sum(x.nbytes for _, x in leaves) < 0.5 * sum(x.nbytes for x in jax.tree.leaves(base))
  assert weights.load_weights(str(run_dir), mesh=one_device_mesh).step == 6

  # The pinned step rewritten with one element changed: resuming, sampling and export refuse it.
  shutil.rmtree(ckpt / "4")
  ocp.PyTreeCheckpointer().save(str(ckpt / "4" / "state"), {"params": shifted})
  config.train.steps = 8
  with pytest.raises(weights.BaseChangedError, match=r"base.json: this LoRA run's base has changed.*"
                                                     r"files were rewritten"):
    loop.train(config, str(run_dir), mesh=one_device_mesh, show_progress=False)
  with pytest.raises(weights.BaseChangedError, match=str(base_dir)):
    weights.load_weights(str(run_dir), mesh=one_device_mesh)
  with pytest.raises(weights.BaseChangedError):
    weights.main(["export", str(run_dir), str(tmp_path / "export")])
  shutil.rmtree(ckpt / "4")  # the pinned step gone
  with pytest.raises(weights.BaseChangedError, match=r"pinned to step 4 of .*base'.*no longer there"):
    weights.load_weights(str(run_dir), mesh=one_device_mesh)


def test_lora_with_dropout_resumes_exactly(tmp_path, pretrained, one_device_mesh):
  config = lora_config(pretrained, dropout=0.1)
  config.train.update(schedule="constant", warmup_steps=0)  # stopping at 4 of 6 must not change the lr
  loop.train(config, str(tmp_path / "straight"), mesh=one_device_mesh, show_progress=False)
  config.train.steps = 4
  loop.train(config, str(tmp_path / "resumed"), mesh=one_device_mesh, show_progress=False)
  config.train.steps = 6
  loop.train(config, str(tmp_path / "resumed"), mesh=one_device_mesh, show_progress=False)
  a = [json.loads(l)["loss"] for l in open(tmp_path / "straight" / "metrics.jsonl")]
  b = [json.loads(l)["loss"] for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert a == b


def test_full_finetuning_from_a_checkpoint_starts_from_its_weights(tmp_path, pretrained, one_device_mesh):
  config = tiny_config(steps=1, lr=0.0, warmup_steps=0)
  config.init.checkpoint = str(pretrained)
  trainer = loop.Trainer(config, one_device_mesh)
  state, frozen = trainer.init_state()
  assert frozen == {}
  base = saved_tree(pretrained, 4)["params"]
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, y)
  assert not os.path.exists(tmp_path / weights.BASE_FILE)  # only a LoRA run pins its base


def test_bad_init_checkpoint_and_lora_target(tmp_path, pretrained, one_device_mesh):
  config = tiny_config()
  config.init.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"config.init.checkpoint='.*nowhere': not an emjax run"):
    loop.Trainer(config, one_device_mesh).init_state()
  (tmp_path / "empty" / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
  config.init.checkpoint = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"config.init.checkpoint: no complete checkpoint step in .*empty/"
                                              r"checkpoints; only incomplete saves \(3.orbax-checkpoint-tmp-1\)"):
    loop.Trainer(config, one_device_mesh).init_state()
  config = lora_config(pretrained, targets="q,attention")
  with pytest.raises(ValueError, match=r"config.lora.targets: \['attention'\] matches no projection"):
    loop.Trainer(config, one_device_mesh)
  config = lora_config(pretrained)
  config.model.d_model = 48  # not the shape the base was trained with
  with pytest.raises(ValueError, match=r"config.init.checkpoint: config.model.d_model=48, but the model there has "
                                       r"d_model=32"):
    loop.Trainer(config, one_device_mesh).init_state()


def test_packed_batch_gives_the_same_loss_as_unpacked_examples():
  """Segment ids isolate packed conversations: the token-mean loss is the same packed or one per row."""
  import grain
  import jax.numpy as jnp
  from flax import nnx
  from emjax.data import packing
  from emjax.models import transformer as T
  from emjax.train import objectives

  cfg = T.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
  model = T.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  examples = []
  for n in (7, 12, 5, 9, 3):
    ids = rng.integers(3, 64, n + 1).astype(np.int32)
    mask = (np.arange(n) >= n // 2).astype(np.float32)  # "assistant" tokens: the second half
    examples.append({"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask})

  def loss(one_per_row):
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(packing.PackedRowsIterDataset(ds, 16, split_across_rows=False, one_example_per_row=one_per_row))
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    out = objectives.cross_entropy(logits, batch)
    return len(rows), float(out.loss_sum) / float(out.weight)

  rows_packed, packed = loss(False)
  rows_unpacked, unpacked = loss(True)
  assert rows_packed < rows_unpacked == 5
  np.testing.assert_allclose(packed, unpacked, rtol=1e-5)


def test_sample_job_samples_a_lora_run_with_its_adapters(tmp_path, pretrained, one_device_mesh):
  """`sample.checkpoint=<LoRA run>` merges the run's adapters into its base (`config.init`): its greedy
  samples equal argmax decoding, by full forward passes, of the *unmerged* LoRA model (base + adapters)."""
  import importlib.util

  import jax.numpy as jnp
  from flax import nnx
  from emjax.data import tokenizers
  from emjax.models import lora as lora_lib
  from emjax.sample import run

  config = lora_config(pretrained)
  run_dir = tmp_path / "lora_run"
  loop.train(config, str(run_dir), mesh=one_device_mesh, show_progress=False)
  adapters = saved_tree(run_dir, 6)["params"]
  assert max(float(np.abs(x).max()) for p, x in jax.tree_util.tree_leaves_with_path(adapters)
             if "lora_b" in jax.tree_util.keystr(p)) > 0  # trained: the merge has something to add

  prompts = tmp_path / "prompts.jsonl"
  texts = {"a": "12+7=", "b": "sort 3 1 2:"}
  prompts.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in texts.items()))
  spec = importlib.util.spec_from_file_location("sample_config", os.path.join(os.path.dirname(__file__), "..",
                                                                               "configs", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sample_cfg = module.get_config("greedy")
  sample_cfg.prompts = str(prompts)
  sample_cfg.sample.update(checkpoint=str(run_dir), max_new_tokens=6, n=1, batch_size=2, max_prompt_length=32)
  summary = run.run_sampling(sample_cfg, str(tmp_path / "samples"), mesh=one_device_mesh)
  assert summary["sampled"] == 2 and summary["checkpoint_step"] == 6
  rows = {r["id"]: r for r in map(json.loads, open(tmp_path / "samples" / "samples.jsonl"))}

  trainer = loop.Trainer(config, one_device_mesh)
  _, frozen = trainer.init_state()  # = the pretrained base
  model = nnx.merge(trainer.layout.graphdef, lora_lib.merge_trees(frozen, adapters))
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  for key, text in texts.items():
    tokens, new, logprobs = [tokenizer.bos_id] + list(tokenizer.encode(text)), [], []
    while len(new) < 6 and (not new or new[-1] != tokenizer.eos_id):
      log_p = jax.nn.log_softmax(model(jnp.asarray([tokens + new]))[0, -1])
      new.append(int(jnp.argmax(log_p)))
      logprobs.append(float(log_p[new[-1]]))
    assert rows[key]["tokens"] == new, key
    # Log-probabilities pin the weights down where greedy tokens cannot (base and adapted may agree).
    np.testing.assert_allclose(rows[key]["logprobs"], logprobs, atol=1e-4)
