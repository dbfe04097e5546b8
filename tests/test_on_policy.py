"""On-policy distillation through the one loop: rollouts from the student's current weights each step.

A tiny teacher run and a tiny student (byte tokenizer, plain prompts): the row
layout of a rollout, LoRA adapters sampled unmerged (the same tokens as merged
weights), the KL to the teacher on held-out sequences falling under full-vocabulary
reverse KL and under the sampled-token estimator, compilations constant after the
first step, exact resume, GKD's lambda mixing, and the errors raised before
anything compiles.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from emjax import sharding as shd
from emjax.models import lora as lora_lib
from emjax.models import transformer
from emjax.sample import sampler as sampler_lib
from emjax.train import loop
from emjax.train import on_policy
from emjax.train import settings

PROMPT_LEN, NEW_TOKENS = 12, 16


def _mesh(n):
  return shd.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny run trained a little on the synthetic mixture: a teacher unlike a random student."""
  path = str(tmp_path_factory.mktemp("teacher") / "run")
  config = tiny_config(steps=6, lr=3e-2)
  loop.train(config, path, mesh=_mesh(2), show_progress=False)
  return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  words = ["the cat", "a dog", "12 + 7 =", "sort: c b", "the birds", "3 + 4 =", "sort: z y", "one dog"]
  with open(path, "w") as f:
    for i, w in enumerate(words):
      f.write(json.dumps({"id": f"p{i}", "prompt": w}) + "\n")
  return str(path)


def _config(teacher_dir, prompts_file, **train):
  config = tiny_config(**train)
  config.teacher.update(path=teacher_dir, dtype="float32")
  config.on_policy.update(enabled=True, prompts=prompts_file, chat_template=False, max_prompt_length=PROMPT_LEN,
                          max_new_tokens=NEW_TOKENS, stop_at_end_of_turn=False)
  config.train.update(objective="reverse_kl", loss_chunk_len=0)
  config.eval.update(every_steps=100, batches=1)
  return config


def _train(config, workdir, mesh):
  return loop.train(config, workdir, mesh=mesh, show_progress=False, make_batch_source=on_policy.make_source)


def _rows(path, name="metrics.jsonl"):
  return [json.loads(line) for line in open(os.path.join(path, name))]


# ----------------------------------------------------------------------------- rows from a rollout


def test_rollout_rows_put_the_loss_on_completion_tokens_only():
  prompt = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], np.int32)  # left-padded, lengths 3 and 5
  completion = np.array([[20, 21, 22, 0], [30, 31, 32, 33]], np.int32)  # lengths 3 and 4
  lp = np.array([[-1.0, -2.0, -3.0, 0.0], [-4.0, -5.0, -6.0, -7.0]], np.float32)
  out = jax.device_get(on_policy.assemble_rows(prompt, np.array([3, 5]), completion, np.array([3, 4]), lp,
                                               seq_len=10))
  # Row 0: [pad pad 5 6 7 20 21 22 pad pad pad]: inputs are the first 10, targets the last 10.
  np.testing.assert_array_equal(out["inputs"][0], [0, 0, 5, 6, 7, 20, 21, 22, 0, 0])
  np.testing.assert_array_equal(out["targets"][0], [0, 5, 6, 7, 20, 21, 22, 0, 0, 0])
  np.testing.assert_array_equal(out["segment_ids"][0], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["positions"][0, 2:8], np.arange(6))
  np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["sample_logprobs"][0, 4:7], [-1.0, -2.0, -3.0])
  np.testing.assert_array_equal(out["loss_mask"][1], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["targets"][1, 4:8], [30, 31, 32, 33])
  np.testing.assert_array_equal(out["positions"][1, :9], np.arange(9))


def test_lora_adapters_are_sampled_unmerged_with_the_merged_models_tokens():
  cfg = transformer.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  lcfg = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), layers=(1,))
  from flax import nnx
  model = lora_lib.add_lora(transformer.Transformer(cfg, rngs=nnx.Rngs(0)), lcfg, rngs=nnx.Rngs(1))
  _, adapters, base = lora_lib.split_trainable(model, lcfg)
  adapters = jax.tree.map(lambda a: a + 0.3 * jnp.sign(a + 1e-3), adapters)  # B != 0: the adapters matter
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  for unroll in (False, True):
    kwargs = dict(prompt_buckets=(8,), max_new_tokens_cap=6, unroll_layers=unroll)
    applied = sampler_lib.Sampler(cfg, lora=lcfg, **kwargs).generate(
        lora_lib.merge_trees(base, adapters), prompts, temperature=0.0, max_new_tokens=6)
    merged = sampler_lib.Sampler(cfg, **kwargs).generate(
        lora_lib.merge_adapters(base, adapters, lcfg), prompts, temperature=0.0, max_new_tokens=6)
    np.testing.assert_array_equal(applied.tokens, merged.tokens)
    np.testing.assert_allclose(applied.logprobs, merged.logprobs, atol=1e-5)
    without = sampler_lib.Sampler(cfg, **kwargs).generate(base, prompts, temperature=0.0, max_new_tokens=6)
    assert not np.allclose(without.logprobs, merged.logprobs, atol=1e-3)


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def straight_run(teacher_dir, prompts_file, tmp_path_factory):
  """8 on-policy reverse-KL steps on 2 devices, compilations counted per step."""
  mesh = _mesh(2)
  config = _config(teacher_dir, prompts_file, steps=8, lr=3e-2, warmup_steps=0)
  config.checkpoint.every_steps = 4
  workdir = str(tmp_path_factory.mktemp("onpolicy") / "straight")
  counts = []
  real_make = on_policy.make_source

  def make(trainer, tokenizer):
    source = real_make(trainer, tokenizer)
    original = source.__next__

    class Counting(type(source)):
      def __next__(self):
        batch = original()
        counts.append((dict(source.sampler.trace_counts), source._assemble._cache_size()))  # pylint: disable=protected-access
        return batch

    source.__class__ = Counting
    return source

  loop.train(config, workdir, mesh=mesh, show_progress=False, make_batch_source=make)
  return config, workdir, counts


def test_on_policy_reverse_kl_moves_the_student_toward_the_teacher(straight_run):
  _, workdir, _ = straight_run
  rows, evals = _rows(workdir), _rows(workdir, "eval.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert all(np.isfinite(r["loss"]) and r["loss_tokens"] > 0 for r in rows)
  # Held-out sequences (the data's eval split), reverse KL to the teacher: falls.
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 8
  assert evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"], evals


def test_compilations_are_constant_after_the_first_on_policy_step(straight_run):
  _, _, counts = straight_run
  assert len(counts) == 8
  first = counts[0]
  assert first[0]["prefill"] == 1 and first[0]["decode"] == 1 and first[1] == 1
  assert all(c == first for c in counts[1:]), counts


class _Killed(Exception):
  pass


def test_a_run_killed_mid_way_resumes_to_the_same_losses(straight_run, tmp_path):
  """Stopped while drawing step 6's rollouts (after the step-4 checkpoint), then rerun: the same 8 losses."""
  config, workdir, _ = straight_run
  resumed = str(tmp_path / "resumed")

  def dies_at_step_6(trainer, tokenizer):
    source = on_policy.make_source(trainer, tokenizer)
    original = source.__next__

    class Dying(type(source)):
      def __next__(self):
        if source.step == 5:
          raise _Killed()
        return original()

    source.__class__ = Dying
    return source

  with pytest.raises(_Killed):
    loop.train(config, resumed, mesh=_mesh(2), show_progress=False, make_batch_source=dies_at_step_6)
  assert not os.path.exists(os.path.join(resumed, "COMPLETED"))
  _train(config, resumed, _mesh(2))
  want = [r["loss"] for r in _rows(workdir)]
  got = [r["loss"] for r in _rows(resumed)]
  assert len(got) == 8
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sampled_token_estimator_lowers_the_held_out_reverse_kl(teacher_dir, prompts_file, tmp_path):
  config = _config(teacher_dir, prompts_file, steps=8, lr=3e-2, warmup_steps=0)
  config.train.objective = "sampled_reverse_kl"
  config.on_policy.unroll_layers = True  # the other decode layout
  workdir = str(tmp_path / "sampled")
  _train(config, workdir, _mesh(1))
  rows, evals = _rows(workdir), _rows(workdir, "eval.jsonl")
  # Sampled from the weights being trained: the importance ratio is 1 on every token.
  np.testing.assert_allclose([r["importance_ratio"] for r in rows], 1.0, rtol=1e-4)
  assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"], evals


def test_lambda_mixes_on_policy_and_fixed_batches_by_a_seeded_coin(teacher_dir, prompts_file):
  config = _config(teacher_dir, prompts_file)
  config.on_policy.mix_lambda = 0.5
  trainer = loop.Trainer(config, _mesh(1))
  from emjax.data import tokenizers
  source = on_policy.make_source(trainer, tokenizers.load_tokenizer(config.data.tokenizer))
  kinds = [source._is_on_policy(s) for s in range(40)]  # pylint: disable=protected-access
  assert 10 < sum(kinds) < 30
  assert kinds == [source._is_on_policy(s) for s in range(40)]  # pylint: disable=protected-access
  state, frozen = trainer.init_state()
  seen = []
  for _ in range(4):
    source.set_weights(state["params"], frozen)
    batch = source.__next__()
    seen.append(source.last_kind)
    assert set(trainer.batch_keys) <= set(batch)
  assert seen == ["on_policy" if k else "fixed" for k in kinds[:4]]
  saved = source.get_state()
  assert saved["step"] == 4 and "fixed" in saved
  source.close()


# ----------------------------------------------------------------------------- errors before compiling


def _raises_before_compiling(config, match, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("compiled before the error")
  monkeypatch.setattr(loop.Trainer, "compile", no_compile)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    config.job = "train"
    settings.validate(config)
    loop.Trainer(config, _mesh(1))


def test_a_rollout_longer_than_the_training_row_is_refused(teacher_dir, prompts_file, monkeypatch):
  config = _config(teacher_dir, prompts_file)
  config.on_policy.max_new_tokens = 40  # 12 + 40 > 32 + 1
  _raises_before_compiling(config, r"rollout of max_prompt_length \+ max_new_tokens = 12 \+ 40 = 52 tokens", monkeypatch)


@pytest.mark.parametrize("key,value,match", [
    ("mix_lambda", 1.5, r"mix_lambda=1.5: must be in \[0, 1\]"),
    ("prompts", "", r"config.on_policy.prompts: a JSONL file"),
    ("temperature", 0.0, r"config.on_policy.temperature=0.0"),
])
def test_bad_on_policy_settings_are_refused(teacher_dir, prompts_file, monkeypatch, key, value, match):
  config = _config(teacher_dir, prompts_file)
  config.on_policy[key] = value
  _raises_before_compiling(config, match, monkeypatch)


def test_sampled_estimator_with_fixed_batches_is_refused(teacher_dir, prompts_file, monkeypatch):
  config = _config(teacher_dir, prompts_file)
  config.train.objective = "sampled_reverse_kl"
  config.on_policy.mix_lambda = 0.5
  _raises_before_compiling(config, r"fixed sequences .* have none", monkeypatch)


def test_bad_distillation_settings_are_refused_before_compiling(teacher_dir, prompts_file, monkeypatch):
  config = _config(teacher_dir, prompts_file)
  config.train.update(objective="jsd")
  config.train.distill.beta = 1.2
  _raises_before_compiling(config, r"config.train.distill.beta=1.2", monkeypatch)
  config.train.distill.update(beta=0.5, top_k=300)
  _raises_before_compiling(config, r"top_k=300 is larger than the vocabulary \(288 tokens\)", monkeypatch)


def test_a_teacher_with_another_vocabulary_is_refused(teacher_dir, prompts_file, monkeypatch, tmp_path):
  # The teacher run's config.json with a larger vocabulary: refused from its config, before any weight is read.
  fake = tmp_path / "teacher"
  fake.mkdir()
  cfg = json.load(open(os.path.join(teacher_dir, "config.json")))
  cfg["model"]["vocab_size"] = 320
  (fake / "config.json").write_text(json.dumps(cfg))
  os.symlink(os.path.join(teacher_dir, "checkpoints"), fake / "checkpoints")
  _raises_before_compiling(_config(str(fake), prompts_file), r"teacher's vocabulary \(320\) differs from the "
                           r"student's \(288\)", monkeypatch)


def test_a_teacher_with_another_tokenizer_is_refused(teacher_dir, prompts_file, monkeypatch, tmp_path):
  # The same run with its recorded tokenizer changed to a SentencePiece model of the same size.
  from emjax.data import tokenizers
  spm = tokenizers.train_sentencepiece(["the cat sat on the mat " * 20, "a dog ran " * 30], str(tmp_path / "spm"),
                                       vocab_size=300)
  fake = tmp_path / "teacher"
  fake.mkdir()
  cfg = json.load(open(os.path.join(teacher_dir, "config.json")))
  cfg["data"]["tokenizer"] = {"kind": "sentencepiece", "path": spm}
  (fake / "config.json").write_text(json.dumps(cfg))
  os.symlink(os.path.join(teacher_dir, "checkpoints"), fake / "checkpoints")
  _raises_before_compiling(_config(str(fake), prompts_file),
                           r"the teacher \(config.teacher.path\) and student \(config.data.tokenizer\) tokenizers "
                           r"differ: SentencePieceTokenizer vs ByteTokenizer", monkeypatch)


@pytest.mark.slow  # two processes with jax.distributed
def test_two_processes_draw_the_rollouts_of_one_process_with_eight_devices(teacher_dir, prompts_file, tmp_path):
  """launch/multiprocess.sh, 2 processes x 4 devices, mesh 2x2x2: every process builds the same global
  prompt batch and samples its own rows; the losses equal one process's on 8 devices (to float32
  reduction order)."""
  import importlib.util
  import subprocess
  from conftest import ROOT, subprocess_env
  overrides = {"train.steps": 3, "model.vocab_size": 288, "teacher.path": teacher_dir, "teacher.dtype": "float32", "train.objective": "reverse_kl",
               "on_policy.enabled": True, "on_policy.prompts": prompts_file, "on_policy.chat_template": False,
               "on_policy.max_prompt_length": PROMPT_LEN, "on_policy.max_new_tokens": NEW_TOKENS,
               "on_policy.stop_at_end_of_turn": False, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
               "data.shards": 2, "checkpoint.every_steps": 3, "checkpoint.async_save": False}
  env = subprocess_env(4)
  env["EMJAX_LOG_DIR"] = str(tmp_path / "logs")
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  run = subprocess.run(["bash", os.path.join(ROOT, "launch", "multiprocess.sh"), "2", "4",
                        "--config=configs/pretrain/tiny.py:smoke", f"--workdir={tmp_path / 'two'}", "--noprogress",
                        *flags], cwd=ROOT, env=env, timeout=600)
  assert run.returncode == 0, [(p, (tmp_path / "logs" / p).read_text()[-2000:]) for p in os.listdir(tmp_path / "logs")]
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "pretrain", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  for key, value in overrides.items():
    block, name = key.split(".")
    config[block][name] = value
  one = str(tmp_path / "one")
  _train(config, one, shd.make_mesh(dict(data=2, fsdp=2, tensor=2), devices=jax.devices()[:8]))
  np.testing.assert_allclose([r["loss"] for r in _rows(str(tmp_path / "two"))], [r["loss"] for r in _rows(one)],
                             rtol=1e-4)
