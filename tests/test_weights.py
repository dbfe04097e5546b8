"""`emjax.weights`: every way of loading weights, dtypes, LoRA runs on their pinned base, fingerprints, errors."""

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emjax import config as config_lib
from emjax import sharding as shd
from emjax import weights
from emjax.models import hf
from emjax.models import lora as lora_lib
from emjax.models import transformer as T
from emjax.train import settings

CFG = T.TransformerConfig(vocab_size=288, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)
LORA = lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=("q", "down"))


def random_params(cfg=CFG, seed=0):
  _, params = T.split_model(T.Transformer(cfg, rngs=nnx.Rngs(seed)))
  return params


def mesh1():
  return shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def save_run(run_dir, params_by_step, cfg=CFG, **config_updates):
  """A workdir as training leaves it: config.json + checkpoints/STEP/state with {"params", "step"}."""
  import orbax.checkpoint as ocp

  config = settings.base_config()
  config.model = dataclasses.asdict(cfg)
  for block, values in config_updates.items():
    config[block].update(values)
  os.makedirs(run_dir, exist_ok=True)
  config_lib.write_config(config, str(run_dir))
  for step, params in params_by_step.items():
    ocp.PyTreeCheckpointer().save(os.path.join(run_dir, "checkpoints", str(step), "state"),
                                  {"params": params, "step": jnp.int32(step)})
  return str(run_dir)


def assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("weights")
  return save_run(root / "run", {3: random_params(seed=3), 5: random_params(seed=5)})


def test_runtime_keys_are_exactly_what_a_hugging_face_config_leaves_open():
  """The one list of runtime keys is the complement of what config.json fixes (config_from_hf refuses those)."""
  sample = {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
            "intermediate_size": 32, "vocab_size": 64}
  base = hf.config_from_hf(sample)
  for field in dataclasses.fields(T.TransformerConfig):
    value = getattr(base, field.name)
    if field.name in weights.RUNTIME_MODEL_KEYS:
      assert getattr(hf.config_from_hf(sample, **{field.name: value}), field.name) == value
    else:
      with pytest.raises(ValueError, match=rf"\['{field.name}'\] come from the Hugging Face config"):
        hf.config_from_hf(sample, **{field.name: value})
  assert set(weights.ARCHITECTURE_KEYS).isdisjoint(weights.RUNTIME_MODEL_KEYS)


def test_emjax_run_checkpoints_dir_and_step_dir(run_dir):
  mesh = mesh1()
  newest = weights.load_weights(run_dir, mesh=mesh)
  assert newest.step == 5 and newest.model_cfg == CFG and newest.source.tokenizer == {"kind": "byte", "path": ""}
  assert_tree_equal(newest.params, random_params(seed=5))
  assert weights.load_weights(os.path.join(run_dir, "checkpoints"), mesh=mesh).step == 5
  older = weights.load_weights(os.path.join(run_dir, "checkpoints", "3"), mesh=mesh)
  assert older.step == 3
  assert_tree_equal(older.params, random_params(seed=3))
  assert weights.load_weights(run_dir, step=3, mesh=mesh).step == 3
  # Parameters are created in their shardings on the mesh given.
  mesh8 = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
  sharded = weights.load_weights(run_dir, mesh=mesh8).params
  assert sharded["embed"].sharding.mesh.devices.size == 8
  assert_tree_equal(sharded, random_params(seed=5))


def test_dtype_choice(run_dir, tmp_path):
  bf16 = weights.load_weights(run_dir, mesh=mesh1(), dtype="bfloat16")
  assert bf16.model_cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
  assert_tree_equal(bf16.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(seed=5)))
  out = hf.export_hf(random_params(seed=1), CFG, str(tmp_path / "hf"))
  hf_bf16 = weights.load_weights(out, mesh=mesh1(), dtype="bfloat16")
  assert hf_bf16.source.kind == "hf" and hf_bf16.step is None
  assert {x.dtype for x in jax.tree.leaves(hf_bf16.params)} == {jnp.dtype(jnp.bfloat16)}


def test_hugging_face_directory(tmp_path):
  params = random_params(seed=1)
  out = hf.export_hf(params, CFG, str(tmp_path / "hf"))
  w = weights.load_weights(out, mesh=mesh1())
  assert w.source.kind == "hf" and w.model_cfg == CFG and w.source.tokenizer == {"kind": "hf", "path": out}
  assert_tree_equal(w.params, params)
  with pytest.raises(ValueError, match="is a Hugging Face model, which has no steps"):
    weights.load_weights(out, step=3)


def test_clear_errors_for_missing_incomplete_and_mismatched_checkpoints(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.sample.checkpoint='.*nowhere': not an emjax run"):
    weights.load_weights(str(tmp_path / "nowhere"), key="config.sample.checkpoint")
  killed = tmp_path / "killed"
  (killed / "checkpoints" / "2.orbax-checkpoint-tmp-17").mkdir(parents=True)
  config_lib.write_config(settings.base_config(), str(killed))
  with pytest.raises(FileNotFoundError, match=r"no complete checkpoint step in .*killed/checkpoints; only "
                                              r"incomplete saves \(2.orbax-checkpoint-tmp-17\)"):
    weights.load_weights(str(killed))
  with pytest.raises(FileNotFoundError, match=r"no step 4 in .*checkpoints \(steps there: \[3, 5\]\)"):
    weights.load_weights(run_dir, step=4)
  with pytest.raises(ValueError, match="is step 3, but step 5 was asked for"):
    weights.load_weights(os.path.join(run_dir, "checkpoints", "3"), step=5)
  # An architecture that is not the checkpoint's: the key is named, nothing is read.
  with pytest.raises(ValueError, match=r"config.model.d_model=32, but the model there has d_model=16"):
    weights.load_weights(run_dir, model_cfg=dataclasses.replace(CFG, d_model=32))
  # A checkpoint whose parameters are not its config's: the parameter and both shapes are named.
  lying = tmp_path / "lying"
  shutil.copytree(run_dir, lying)
  saved = json.load(open(lying / "config.json"))
  saved["model"]["d_ff"] = 48
  json.dump(saved, open(lying / "config.json", "w"))
  with pytest.raises(ValueError, match=r"5/state: the checkpoint's parameters do not match the model: "
                                       r"layers/mlp/down_proj is \[2, 32, 16\] there, \[2, 48, 16\] for the model"):
    weights.load_weights(str(lying))
  assert sorted(os.listdir(lying / "checkpoints")) == ["3", "5"]  # nothing moved aside


def test_an_unreadable_step_falls_back_to_an_older_one_unless_asked_for(run_dir, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(run_dir, broken)
  state = broken / "checkpoints" / "5" / "state"
  for name in os.listdir(state):
    if name != "_METADATA":
      p = state / name
      shutil.rmtree(p) if p.is_dir() else p.unlink()
  assert weights.load_weights(str(broken), mesh=mesh1()).step == 3
  with pytest.raises(FileNotFoundError, match=r"step 5 \(.*\) cannot be read"):
    weights.load_weights(str(broken), step=5, mesh=mesh1())


def test_a_step_orbax_has_not_finalised_in_a_bucket_is_not_listed_nor_loaded(tmp_path):
  """In a bucket orbax writes a step in place under its number and finalises it by writing
  commit_success.txt last: a step without it is being saved (or was cut short) and is no step yet."""
  import orbax.checkpoint as ocp
  from fake_gcs import fake_gcs

  run, local = "gs://bucket/run", tmp_path / "bucket" / "run"
  with fake_gcs(str(tmp_path)):
    config = settings.base_config()
    config.model = dataclasses.asdict(CFG)
    config_lib.write_config(config, run)
    manager = ocp.CheckpointManager(f"{run}/checkpoints", options=ocp.CheckpointManagerOptions(create=True),
                                    item_names=("state",))
    for step in (3, 5):
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
          {"params": random_params(seed=step), "step": jnp.int32(step)})))
    manager.wait_until_finished()
    manager.close()
    assert weights.complete_steps(f"{run}/checkpoints") == [3, 5]
    # Step 5 as a save still under way leaves it: every file written but the commit file.
    os.remove(local / "checkpoints" / "5" / "commit_success.txt")
    assert weights.complete_steps(f"{run}/checkpoints") == [3]
    assert weights.resolve(run).steps() == [3]
    loaded = weights.load_weights(run, mesh=mesh1())
    assert loaded.step == 3
    assert_tree_equal(loaded.params, random_params(seed=3))
    with pytest.raises(FileNotFoundError, match=r"no step 5 in gs://bucket/run/checkpoints \(it was not finalised"):
      weights.load_weights(run, step=5, mesh=mesh1())


def test_a_numbered_step_directory_on_a_disk_is_final_and_a_temporary_one_is_not(tmp_path):
  """On a disk orbax finalises a step by renaming its temporary directory: the numbered name is the mark."""
  ckdir = tmp_path / "checkpoints"
  (ckdir / "2" / "state").mkdir(parents=True)
  (ckdir / "4.orbax-checkpoint-tmp-17" / "state").mkdir(parents=True)
  (ckdir / "notes").mkdir()
  assert weights.complete_steps(str(ckdir)) == [2]
  assert weights.complete_steps(str(tmp_path / "nowhere")) == []


def test_fingerprint_is_exact_and_mesh_independent():
  params = random_params(seed=7)
  params["layers"]["attn_norm"]["scale"] = params["layers"]["attn_norm"]["scale"].astype(jnp.bfloat16)
  one = jax.device_put(params, shd.replicated(mesh1()))
  mesh8 = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = T.abstract_model(CFG)
  shardings = shd.tree_shardings(T.param_logical_axes(model), T.split_model(model)[1], mesh8)
  eight = jax.device_put(params, shardings)
  assert eight["layers"]["mlp"]["up_proj"].sharding.num_devices == 8
  assert not eight["layers"]["mlp"]["up_proj"].sharding.is_fully_replicated
  fp = weights.fingerprint(one)
  assert fp == weights.fingerprint(eight) == weights.fingerprint(jax.device_get(params))
  changed = dict(params, embed=params["embed"].at[17, 3].set(np.nextafter(params["embed"][17, 3], np.inf)))
  assert weights.fingerprint(jax.device_put(changed, shardings)) != fp  # one ulp of one element
  swapped = dict(params, embed=params["embed"][::-1])  # same values, other places
  assert weights.fingerprint(swapped) != fp
  renamed = dict(params, lm_head=params["embed"].T) if params["lm_head"].shape == params["embed"].T.shape else None
  if renamed is not None:
    assert weights.fingerprint(renamed) != fp


def lora_run(tmp_path, base_dir, *, adapters_seed=0, name="lora", base_dtype=""):
  """A LoRA run's workdir: adapters (B != 0) at step 7, config.init.checkpoint=base_dir, base pinned."""
  model = lora_lib.add_lora(T.Transformer(CFG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1))
  _, adapters, _ = lora_lib.split_trainable(model, LORA)
  rng = np.random.default_rng(adapters_seed)
  adapters = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), adapters)
  run = save_run(tmp_path / name, {7: adapters}, init=dict(checkpoint=str(base_dir)),
                 lora=dict(enabled=True, rank=LORA.rank, alpha=LORA.alpha, targets="q,down", base_dtype=base_dtype))
  mesh = mesh1()
  # What the trainer does when the run starts (Trainer.init_state(workdir)); lora.base_dtype: the base's dtype.
  weights.load_init_params({"checkpoint": str(base_dir), "hf": ""}, CFG,
                           weights.abstract_params(CFG, mesh, dtypes=base_dtype or None), mesh, pin=run)
  return run, adapters


def test_lora_run_is_merged_into_its_pinned_base(tmp_path, run_dir):
  run, adapters = lora_run(tmp_path, run_dir)
  pin = weights.read_pin(run)
  assert pin["step"] == 5 and pin["dtype"] == "float32" and pin["path"] == run_dir
  w = weights.load_weights(run, mesh=mesh1())
  assert w.step == 7 and w.model_cfg == CFG
  expected = lora_lib.merge_adapters(random_params(seed=5), adapters, LORA)
  for x, y in zip(jax.tree.leaves(w.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  base = weights.load_base(run, mesh=mesh1())
  assert base.step == 5
  assert_tree_equal(base.params, random_params(seed=5))
  # A LoRA run is itself a base (config.init.checkpoint=<LoRA run>): its merged weights.
  again = weights.load_init_params({"checkpoint": run}, CFG, weights.abstract_params(CFG, mesh1()), mesh1())
  assert_tree_equal(again, w.params)
  bf16 = weights.load_weights(run, mesh=mesh1(), dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}


def test_lora_run_on_a_bf16_base(tmp_path, run_dir):
  """lora.base_dtype=bfloat16: the base is pinned and reloaded in bf16; the merge happens in float32."""
  run, adapters = lora_run(tmp_path, run_dir, base_dtype="bfloat16")
  assert weights.read_pin(run)["dtype"] == "bfloat16"
  w = weights.load_weights(run, mesh=mesh1())
  assert {x.dtype for x in jax.tree.leaves(w.params)} == {jnp.dtype(jnp.float32)}
  base = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), random_params(seed=5))
  expected = lora_lib.merge_adapters(base, adapters, LORA)
  for x, y in zip(jax.tree.leaves(w.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  assert {x.dtype for x in jax.tree.leaves(weights.load_base(run, mesh=mesh1()).params)} == {jnp.dtype(jnp.bfloat16)}


def test_lora_base_changed_is_refused(tmp_path, run_dir):
  base_dir = tmp_path / "base"
  shutil.copytree(run_dir, base_dir)
  run, _ = lora_run(tmp_path, base_dir)
  before = weights.load_weights(run, mesh=mesh1()).params
  # A newer step of the base is not this run's base: the pinned step 5 is still loaded.
  save_run(base_dir, {9: random_params(seed=9)})
  assert_tree_equal(weights.load_weights(run, mesh=mesh1()).params, before)
  # The pinned step rewritten: refused, naming the file, the path and what changed.
  changed = random_params(seed=5)
  changed["final_norm"]["scale"] = changed["final_norm"]["scale"].at[0].add(1.0)
  shutil.rmtree(base_dir / "checkpoints" / "5")
  save_run(base_dir, {5: changed})
  with pytest.raises(weights.BaseChangedError, match=r"lora/base.json: this LoRA run's base has changed since the "
                                                     rf"run started.*{base_dir}.*files were rewritten"):
    weights.load_weights(run, mesh=mesh1())
  with pytest.raises(weights.BaseChangedError):
    weights.load_base(run, mesh=mesh1())
  # The run's config now names another base (another fingerprint): refused, both named.
  other = tmp_path / "other"
  save_run(other, {1: random_params(seed=11)})
  saved = config_lib.load_config_json(run)
  saved.init.checkpoint = str(other)
  config_lib.write_config(saved, run)
  with pytest.raises(weights.BaseChangedError, match=rf"path '{base_dir}' -> '{other}'"):
    weights.load_weights(run, mesh=mesh1())


def test_lora_run_without_a_saved_base_is_an_error(tmp_path):
  model = lora_lib.add_lora(T.Transformer(CFG, rngs=nnx.Rngs(0)), LORA, rngs=nnx.Rngs(1))
  _, adapters, _ = lora_lib.split_trainable(model, LORA)
  run = save_run(tmp_path / "random_base", {2: adapters}, lora=dict(enabled=True, rank=2, alpha=4.0,
                                                                    targets="q,down"))
  with pytest.raises(ValueError, match="neither config.init.checkpoint nor config.init.hf: its base weights were "
                                       "random"):
    weights.load_weights(run, mesh=mesh1())


def test_sample_config_overrides_win_even_at_their_defaults(tmp_path):
  """Item 5: a bf16 run sampled with --config.model.dtype=float32 runs in float32 (float32 is the default)."""
  import importlib.util

  from emjax.sample import run as sample_run

  bf16 = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16", attention="xla")
  run = save_run(tmp_path / "bf16_run", {1: random_params(dataclasses.replace(bf16, param_dtype="float32"))},
                 cfg=bf16)
  spec = importlib.util.spec_from_file_location("sample_config", os.path.join(os.path.dirname(__file__), "..",
                                                                               "configs", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.sample.checkpoint = run
  config.lock()
  src = sample_run.resolve_source(config)
  assert sample_run.resolve_model_config(config, src)[0] == bf16  # nothing set: the run's own
  config.model.dtype = "float32"  # what --config.model.dtype=float32 sets
  config.model.param_dtype = "float32"
  model_cfg, tokenizer = sample_run.resolve_model_config(config, src)
  assert (model_cfg.dtype, model_cfg.param_dtype, model_cfg.attention) == ("float32", "float32", "xla")
  assert tokenizer == {"kind": "byte", "path": ""}
  config.model.d_model = CFG.d_model  # an architecture key equal to the run's is fine
  sample_run.resolve_model_config(config, src)
  config.model.d_model = 8
  with pytest.raises(ValueError, match=r"config.model.d_model=8 disagrees with the checkpoint's 16"):
    sample_run.resolve_model_config(config, src)


def test_sample_cli_sets_a_runtime_key_back_to_its_default(tmp_path):
  """The same through the command line: ml_collections parses the flag into the sample config's placeholder."""
  import subprocess

  from conftest import ROOT, subprocess_env

  bf16 = dataclasses.replace(CFG, dtype="bfloat16")
  run = save_run(tmp_path / "bf16_run", {1: random_params()}, cfg=bf16)
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"id": 0, "prompt": "hi"}) + "\n")
  out = tmp_path / "samples"
  cmd = [sys.executable, "-m", "emjax.main", "--config=configs/sample.py:smoke", f"--workdir={out}",
         "--noprogress", f"--config.prompts={prompts}", f"--config.sample.checkpoint={run}",
         "--config.sample.max_new_tokens=2", "--config.sample.max_prompt_length=16", "--config.model.dtype=float32"]
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ran = json.load(open(out / "config.json"))
  assert ran["model"]["dtype"] == "float32" and ran["model"]["d_model"] == CFG.d_model


def chat_tokenizer(path):
  """A word-level Hugging Face tokenizer with a ChatML-like template whose turns end on <|im_end|>."""
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "[UNK]"]
  words += [f"w{i}" for i in range(40)]
  raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
  tok.save_pretrained(path)
  return str(path)


def test_compare_answers_uses_the_runs_own_base_and_stop_tokens(tmp_path, run_dir):
  """compare_answers reads the base from config.init (here an emjax checkpoint, not init.hf), merges a LoRA
  run's adapters into it, refuses a changed base, and stops on the template's end-of-turn token."""
  pytest.importorskip("transformers")
  from emjax.data import sources, tokenizers
  from emjax.experiments import compare_answers

  tok_dir = chat_tokenizer(tmp_path / "tok")
  convs = tmp_path / "chat.jsonl"
  convs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"w{i} w{i + 1}"},
                                                    {"role": "assistant", "content": f"w{i + 2}"}]}) + "\n"
                           for i in range(6)))
  base_dir = tmp_path / "base"
  shutil.copytree(run_dir, base_dir)
  run, _ = lora_run(tmp_path, base_dir)
  saved = config_lib.load_config_json(run)
  saved.data.tokenizer = dict(kind="hf", path=tok_dir)
  saved.data.sources = {"cell": sources.default_source_config(kind="chat_jsonl", path=str(convs), holdout=2)}
  config_lib.write_config(saved, run)

  tokenizer = tokenizers.load_tokenizer({"kind": "hf", "path": tok_dir})
  assert compare_answers.stop_token_ids(tokenizer) == (2, 4)  # </s> and <|im_end|>
  rows = compare_answers.compare(run, n=2, max_new_tokens=3, mesh=mesh1())
  assert len(rows) == 2 and all(r["prompt"].startswith("w") and r["reference"].startswith("w") for r in rows)
  assert [r["base"] for r in rows] != [r["finetuned"] for r in rows]  # the adapters were merged
  assert not any("<|im_end|>" in r["base"] + r["finetuned"] for r in rows)
  changed = random_params(seed=5)
  changed["embed"] = changed["embed"].at[1, 1].add(1.0)
  shutil.rmtree(base_dir / "checkpoints" / "5")
  save_run(base_dir, {5: changed})
  with pytest.raises(weights.BaseChangedError):
    compare_answers.compare(run, n=2, max_new_tokens=3, mesh=mesh1())
