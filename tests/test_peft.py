"""PEFT LoRA adapters in and out (`emjax.models.peft`, through `emjax.weights`), against `peft` itself."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures as F
from conftest import tiny_config
from emjax import sharding as shd
from emjax import weights
from emjax.models import hf
from emjax.models import lora as lora_lib
from emjax.models import peft as peft_lib
from emjax.models import transformer as T

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# The byte tokenizer of tiny_config needs 288 ids, so the continued-training test can use the same base.
VOCAB = 288
PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def mesh1():
  return shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def emjax_logits(cfg, params, tokens):
  graphdef, _ = T.split_model(T.abstract_model(cfg))
  return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens)))


def tokens_batch(seed=0):
  return np.random.default_rng(seed).integers(3, VOCAB, (2, 12)).astype(np.int32)


def base_model(base_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def peft_logits(base_dir, adapter_dir, tokens):
  model = peft.PeftModel.from_pretrained(base_model(base_dir), adapter_dir).eval()
  return F.torch_logits(model, tokens)


def make_peft_adapter(base_dir, out_dir, seed=0, torch_dtype=None, **lora_kwargs):
  """An adapter created and saved by peft, with lora_B drawn at random so that it changes the model."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(base_model(base_dir), peft.LoraConfig(**lora_kwargs))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  if torch_dtype is not None:
    model = model.to(torch_dtype)
  model.save_pretrained(out_dir)
  return out_dir


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  """A tiny random Llama saved by transformers."""
  d = str(tmp_path_factory.mktemp("hf-base"))
  F.build_tiny_hf("llama", d, vocab_size=VOCAB)
  return d


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, hf_base):
  """use_rslora -> a peft-made adapter on q, v and down of layer 1 only (r=4, alpha=8: scales 4 and 2)."""
  root = tmp_path_factory.mktemp("adapters")
  return {rslora: make_peft_adapter(hf_base, str(root / f"rslora_{rslora}"), seed=int(rslora), r=4, lora_alpha=8,
                                    use_rslora=rslora, target_modules=PEFT_TARGETS, layers_to_transform=[1])
          for rslora in (True, False)}


def save_lora_run(run_dir, base_dir, lora_cfg, model_cfg, seed=0):
  """A LoRA run's workdir on an HF base (config.init.hf): random adapters (A and B) at step 3, base pinned."""
  import orbax.checkpoint as ocp

  from emjax import config as config_lib
  from emjax.train import settings

  _, abstract, _ = lora_lib.split_trainable(lora_lib.abstract_model(model_cfg, lora_cfg), lora_cfg)
  rng = np.random.default_rng(seed)
  adapters = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
  config = settings.base_config()
  config.model = dataclasses.asdict(model_cfg)
  config.init.hf = base_dir
  config.lora.update(enabled=True, rank=lora_cfg.rank, alpha=lora_cfg.alpha, rslora=lora_cfg.rslora,
                     targets=",".join(lora_cfg.targets), layers=",".join(str(i) for i in lora_cfg.layers))
  os.makedirs(run_dir)
  config_lib.write_config(config, run_dir)
  ocp.PyTreeCheckpointer().save(os.path.join(run_dir, "checkpoints", "3", "state"),
                                {"params": adapters, "step": jnp.int32(3)})
  mesh = mesh1()  # what the trainer does when the run starts: pin its base
  weights.load_init_params(config.init, model_cfg, weights.abstract_params(model_cfg, mesh), mesh, pin=run_dir)
  return adapters


def read_tensors(path):
  ckpt = hf.SafetensorsCheckpoint(path)
  out = {name: (ckpt.entries[name].dtype, np.array(ckpt.read(name))) for name in ckpt.names()}
  ckpt.close()
  return out


# ----------------------------------------------------------------------------- export


def test_exported_run_applied_by_peft_matches_emjax(tmp_path, hf_base):
  """An emjax LoRA run (k, o, gate, up on layer 0; rsLoRA) -> `export --peft` -> PeftModel.from_pretrained
  on the base emjax exported: the logits are emjax's."""
  cfg = hf.config_from_hf(hf_base)
  base_dir = hf.export_hf(hf.load_hf_params(hf_base, cfg), cfg, str(tmp_path / "base"))
  lora_cfg = lora_lib.LoRAConfig(rank=3, alpha=6.0, rslora=True, targets=("k", "o", "gate", "up"), layers=(0,))
  run = str(tmp_path / "run")
  save_lora_run(run, base_dir, lora_cfg, cfg)
  out = str(tmp_path / "adapter")
  assert weights.main(["export", run, out, "--peft"]) == 0

  config = json.load(open(os.path.join(out, peft_lib.CONFIG_NAME)))
  assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"], config["use_rslora"],
          config["layers_to_transform"]) == (base_dir, 3, 6, True, [0])
  names = set(read_tensors(os.path.join(out, peft_lib.WEIGHTS_NAME)))
  assert len(names) == 8 and "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in names
  assert "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" in names

  tokens = tokens_batch()
  theirs = peft_logits(base_dir, out, tokens)
  w = weights.load_weights(run, mesh=mesh1())
  ours = emjax_logits(w.model_cfg, w.params, tokens)
  base_logits = F.torch_logits(base_model(base_dir), tokens)
  assert np.abs(theirs - base_logits).max() > 0.1  # the adapter matters
  diff = float(np.abs(ours - theirs).max())
  print(f"export: max |emjax - peft| = {diff:.2e} (logits up to {np.abs(theirs).max():.2f})")
  assert diff <= 1e-5


def test_export_refuses_a_run_that_is_not_lora(tmp_path, hf_base):
  cfg = hf.config_from_hf(hf_base)
  src = weights.save_emjax_checkpoint(hf.load_hf_params(hf_base, cfg), cfg, str(tmp_path / "full"),
                                      source="org/tiny-llama")
  with pytest.raises(ValueError, match=r"is not a LoRA run \(config.lora.enabled\).*without --peft"):
    weights.main(["export", src, str(tmp_path / "out"), "--peft"])
  with pytest.raises(ValueError, match="needs --peft"):
    weights.main(["export", src, str(tmp_path / "out"), "--base_model_name_or_path=x"])


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("rslora", [True, False])
def test_peft_adapter_loads_with_peft_logits(adapters, hf_base, rslora):
  """A peft-made adapter (a subset of modules, layers_to_transform=[1]) loaded wherever weights are
  read: its merge onto the base gives PeftModel's logits, with scale alpha/sqrt(r) or alpha/r."""
  d = adapters[rslora]
  src = weights.resolve(d, key="config.teacher.path")
  assert src.kind == "hf" and src.adapter is not None and src.tokenizer == {"kind": "hf", "path": hf_base}
  assert src.adapter.lora == lora_lib.LoRAConfig(rank=4, alpha=8.0, rslora=rslora, targets=("q", "v", "down"),
                                                 layers=(1,))
  assert src.adapter.lora.scale == (4.0 if rslora else 2.0)
  tokens = tokens_batch(1)
  theirs = peft_logits(hf_base, d, tokens)
  w = weights.load_weights(d, mesh=mesh1())
  ours = emjax_logits(w.model_cfg, w.params, tokens)
  assert np.abs(theirs - F.torch_logits(base_model(hf_base), tokens)).max() > 0.1
  diff = float(np.abs(ours - theirs).max())
  print(f"import rslora={rslora}: max |emjax - peft| = {diff:.2e} (logits up to {np.abs(theirs).max():.2f})")
  assert diff <= 1e-5


def test_all_linear_and_an_explicit_base(tmp_path, hf_base):
  """target_modules='all-linear' (saved by peft as full module names) covers the seven projections of
  every layer; a base given by key wins over base_model_name_or_path, which may then be unreachable."""
  d = make_peft_adapter(hf_base, str(tmp_path / "all"), seed=3, r=2, lora_alpha=3, target_modules="all-linear")
  config_path = os.path.join(d, peft_lib.CONFIG_NAME)
  config = json.load(open(config_path))
  assert "model.layers.1.mlp.gate_proj" in config["target_modules"]
  config["base_model_name_or_path"] = str(tmp_path / "moved-away")
  json.dump(config, open(config_path, "w"))
  with pytest.raises(FileNotFoundError, match=r"base .*moved-away' \(base_model_name_or_path in .*adapter_config"
                                              r".json\) is not here.*give the base with config.sample.peft_base"):
    weights.resolve(d, key="config.sample.hf", base_key="config.sample.peft_base")
  src = weights.resolve(d, base=hf_base, base_key="config.sample.peft_base")
  assert src.adapter.lora.targets == tuple(lora_lib.TARGETS) and src.adapter.lora.layers == ()
  tokens = tokens_batch(2)
  w = weights.load_weights(src, mesh=mesh1())
  config["base_model_name_or_path"] = hf_base
  json.dump(config, open(config_path, "w"))
  diff = float(np.abs(emjax_logits(w.model_cfg, w.params, tokens) - peft_logits(hf_base, d, tokens)).max())
  assert diff <= 1e-5
  # The same written as the keyword (as configs made by hand or older PEFT have it).
  json.dump(dict(config, target_modules="all-linear"), open(config_path, "w"))
  assert weights.resolve(d).adapter.lora == src.adapter.lora
  with pytest.raises(ValueError, match=r"base='.*' is set, but .* is not a PEFT adapter"):
    weights.resolve(hf_base, base=hf_base)


def test_import_cli_and_the_sample_job_take_an_adapter(tmp_path, hf_base, adapters):
  """`python -m emjax.weights import ADAPTER DST` writes the merged model; config.sample.hf takes the adapter."""
  import importlib.util

  from emjax.sample import run as sample_run

  d = adapters[False]
  dst = str(tmp_path / "merged")
  assert weights.main(["import", d, dst]) == 0
  merged, direct = weights.load_weights(dst, mesh=mesh1()), weights.load_weights(d, mesh=mesh1())
  assert merged.model_cfg == direct.model_cfg
  for x, y in zip(jax.tree.leaves(merged.params), jax.tree.leaves(direct.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="--peft_base='x' is set, but .* is not a PEFT adapter"):
    weights.main(["import", hf_base, str(tmp_path / "other"), "--peft_base=x"])

  spec = importlib.util.spec_from_file_location("sample_config", os.path.join(os.path.dirname(__file__), "..",
                                                                               "configs", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.sample.hf = d
  src = sample_run.resolve_source(config)
  assert src.adapter is not None and src.adapter.base.directory == hf_base
  assert sample_run.resolve_model_config(config, src)[0] == direct.model_cfg


@pytest.mark.parametrize("torch_dtype", [None, "bfloat16"])
def test_import_export_round_trip_is_bit_identical(tmp_path, hf_base, adapters, torch_dtype):
  if torch_dtype is None:
    d = adapters[True]
  else:
    d = make_peft_adapter(hf_base, str(tmp_path / "bf16"), seed=5, torch_dtype=torch.bfloat16, r=4, lora_alpha=8,
                          use_rslora=True, target_modules=PEFT_TARGETS, layers_to_transform=[1])
  src = weights.resolve(d)
  tree = peft_lib.read_adapters(d, src.model_cfg, src.adapter.lora)
  out = peft_lib.export_adapters(tree, src.model_cfg, src.adapter.lora, str(tmp_path / "again"),
                                 base_model_name_or_path=hf_base, dtype=torch_dtype)
  before = read_tensors(os.path.join(d, peft_lib.WEIGHTS_NAME))
  after = read_tensors(os.path.join(out, peft_lib.WEIGHTS_NAME))
  assert sorted(before) == sorted(after) and len(before) == 6
  for name, (dtype, x) in before.items():
    assert after[name][0] == dtype == ("BF16" if torch_dtype else "F32")
    assert x.tobytes() == after[name][1].tobytes(), name
  a, b = (json.load(open(os.path.join(p, peft_lib.CONFIG_NAME))) for p in (d, out))
  for key in ("r", "lora_alpha", "use_rslora", "layers_to_transform", "base_model_name_or_path", "peft_type"):
    assert a[key] == b[key], key
  assert sorted(a["target_modules"]) == sorted(b["target_modules"])


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("make,match", [
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), r"use_dora=True \(DoRA"),
    (lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
     r"peft_type 'IA3' is not supported; emjax loads LoRA adapters"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], bias="all"), r"bias='all' \(trained biases\)"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), r"selects lm_head; emjax has LoRA on the "
                                                                           r"decoder's projections only"),
    (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), r"modules_to_save="),
])
def test_peft_made_adapters_emjax_cannot_represent_are_refused_by_name(tmp_path, hf_base, make, match):
  model = peft.get_peft_model(base_model(hf_base), make())
  model.save_pretrained(str(tmp_path / "a"))
  with pytest.raises(peft_lib.PeftFormatError, match=match):
    weights.load_weights(str(tmp_path / "a"), mesh=mesh1())


@pytest.mark.parametrize("edit,match", [
    ({"fan_in_fan_out": True}, r"fan_in_fan_out=True \(Conv1D"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' rewrites the base weights"),
    ({"rank_pattern": {"down_proj": 8}}, r"rank_pattern / alpha_pattern give modules different ranks and alphas "
                                         r"\(.*q_proj: r=4.*down_proj: r=8"),
    ({"some_future_variant": {"on": True}}, r"some_future_variant=.*emjax does not know what this key does"),
    ({"layers_to_transform": None, "target_modules": r".*layers\.0\.self_attn\.q_proj|.*layers\.1\.self_attn\.v_proj"},
     r"different layers for different modules \(\{'q_proj': \[0\], 'v_proj': \[1\]\}\)"),
    ({"r": 8}, r"layers.1.mlp.down_proj.lora_A.weight has shape \[4, 48\], but rank 8 on this base's down "
               r"projection \(\[out, in\] = \[32, 48\]\) means \[8, 48\]"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]}, r"no base_model.model.model.layers.1.self_attn"
                                                                      r".k_proj.lora_A.weight.*, which adapter_config"),
])
def test_configs_emjax_cannot_load_faithfully_are_refused(tmp_path, adapters, edit, match):
  d = str(tmp_path / "edited")
  shutil.copytree(adapters[True], d)
  config = json.load(open(os.path.join(d, peft_lib.CONFIG_NAME)))
  config.update(edit)
  json.dump(config, open(os.path.join(d, peft_lib.CONFIG_NAME), "w"))
  with pytest.raises(peft_lib.PeftFormatError, match=match):
    weights.load_weights(d, mesh=mesh1())


# ----------------------------------------------------------------------------- continued training


def test_a_lora_run_goes_on_training_a_peft_adapter(tmp_path, hf_base, adapters):
  """config.init.hf = a PEFT adapter with the adapter's config.lora: the run starts from its A and B on
  its base (the one init path: Trainer.init_state); one step changes the adapter and nothing else, and
  the exported run is a PEFT adapter on the same base whose logits are the run's."""
  from emjax.train import loop

  d = adapters[True]
  config = tiny_config(steps=1, lr=1e-2, warmup_steps=0)
  config.init.hf = d
  config.lora.update(enabled=True, rank=4, alpha=8.0, rslora=True, targets="q,v,down", layers="1")
  config.data.sources.arithmetic.weight = 1.0
  config.data.sources.grammar.weight = 0.0
  config.data.sources.sorting.weight = 0.0
  mesh = mesh1()
  trainer = loop.Trainer(config, mesh)
  state, frozen = trainer.init_state()
  src = weights.resolve(d)
  imported = peft_lib.read_adapters(d, src.model_cfg, src.adapter.lora)
  hf_params = hf.load_hf_params(hf_base, src.model_cfg)
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(imported)):
    np.testing.assert_array_equal(np.asarray(x), y)
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(lora_lib.select_like(hf_params, frozen))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  run = tmp_path / "run"
  loop.train(config, str(run), mesh=mesh, show_progress=False)
  assert weights.read_pin(str(run))["fingerprint"] == weights.fingerprint(hf_params)  # the adapter's base
  trained = weights.read_params(str(run / "checkpoints"), lora_lib.adapter_abstract(src.model_cfg,
                                                                                    src.adapter.lora, mesh))[1]
  changed = [float(np.abs(np.asarray(x) - y).max()) for x, y in zip(jax.tree.leaves(trained),
                                                                     jax.tree.leaves(imported))]
  assert min(changed) > 0  # every adapter matrix moved
  np.testing.assert_array_equal(np.asarray(trained["layers"]["attn"]["q_proj_lora"]["lora_b"][0]), 0)  # layer 0 off
  base = weights.load_base(str(run), mesh=mesh)
  for x, y in zip(jax.tree.leaves(base.params), jax.tree.leaves(hf_params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  out = str(tmp_path / "continued")
  assert weights.main(["export", str(run), out, "--peft"]) == 0
  assert json.load(open(os.path.join(out, peft_lib.CONFIG_NAME)))["base_model_name_or_path"] == hf_base
  tokens = tokens_batch(3)
  w = weights.load_weights(str(run), mesh=mesh)
  diff = float(np.abs(emjax_logits(w.model_cfg, w.params, tokens) - peft_logits(hf_base, out, tokens)).max())
  assert diff <= 1e-5

  config.lora.rank = 8
  with pytest.raises(ValueError, match=r"config.init.hf: a LoRA run from a PEFT adapter goes on training that adapter"
                                       r".*lora.rank=8 \(adapter: 4\).*--config.lora.rank=4 --config.lora.alpha=8.0"):
    loop.Trainer(config, mesh).init_state()
