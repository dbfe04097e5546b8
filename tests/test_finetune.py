"""Fine-tuning in the one loop: LoRA adapters on a pretrained base, full-parameter switch."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from emjax.train import checkpoint as ckpt_lib
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


def test_lora_trains_only_adapters_and_leaves_the_base_untouched(tmp_path, pretrained, one_device_mesh):
  config = lora_config(pretrained)
  trainer = loop.Trainer(config, one_device_mesh)
  state, frozen = trainer.init_state()
  base = ckpt_lib.load_params(str(pretrained), trainer.layout.base_abstract)
  # frozen = exactly the pretrained weights; trainable = only the adapters
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, y)
  trainable_names = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(
      state["params"])}
  assert trainable_names and all("_lora/lora_" in n for n in trainable_names)
  assert len(trainable_names) == 14

  final = loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert final["loss"] < rows[0]["loss"]
  saved = saved_tree(tmp_path, 6)
  leaves = jax.tree_util.tree_leaves_with_path(saved["params"])
  assert all("lora" in jax.tree_util.keystr(p) for p, _ in leaves)  # adapter-only checkpoint
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
  assert sum(x.nbytes for _, x in leaves) < 0.5 * base_bytes
  # The base on disk is unchanged and reloading it gives the same weights (checksum).
  again = ckpt_lib.load_params(str(pretrained), trainer.layout.base_abstract)
  assert sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(again)) == \
      sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(base))


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


def test_bad_init_checkpoint_and_lora_target(tmp_path, pretrained, one_device_mesh):
  config = tiny_config()
  config.init.checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.init.checkpoint: no complete checkpoint"):
    loop.Trainer(config, one_device_mesh).init_state()
  config = lora_config(pretrained, targets="q,attention")
  with pytest.raises(ValueError, match=r"config.lora.targets: \['attention'\] matches no projection"):
    loop.Trainer(config, one_device_mesh)
  config = lora_config(pretrained)
  config.model.d_model = 48  # not the shape the base was trained with
  with pytest.raises(ValueError, match="config.init.checkpoint: cannot load parameters"):
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
  from emjax.sample import run
  from emjax.train import state as state_lib

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
  model = nnx.merge(trainer.layout.graphdef, state_lib.merge_trees(frozen, adapters))
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
