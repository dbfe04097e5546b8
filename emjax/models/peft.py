"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors`.

    config, where = peft.read_adapter_config(ADAPTER_DIR)
    lora_cfg = peft.lora_config(config, model_cfg, where)        # rank, alpha, rsLoRA, targets, layers
    adapters = peft.read_adapters(ADAPTER_DIR, model_cfg, lora_cfg)  # emjax's adapter tree (numpy)
    peft.export_adapters(adapters, model_cfg, lora_cfg, OUT_DIR, base_model_name_or_path="Qwen/...")

A path to an adapter directory works wherever emjax reads weights (`emjax.weights.resolve`
finds its base and merges it; a LoRA run can start from it and go on training it); the CLI is
`python -m emjax.weights export RUN DST --peft` and `python -m emjax.weights import ADAPTER DST`.
This module knows the files only, like `hf.py`, whose tensor names and [out, in] layouts it reuses.

What maps. PEFT adds `scale * B @ A` to a torch `nn.Linear` weight [out, in] with
`lora_A.weight` [r, in] and `lora_B.weight` [out, r], scale = lora_alpha / r, or
lora_alpha / sqrt(r) with `use_rslora`: emjax's `LoRAConfig(rank, alpha, rslora)` with the
same formula. emjax's A is [in..., r] and B [r, out...] on its own weight layout, which is
the HF matrix transposed with heads flattened head-major (hf.py), so A = A_hf.T and
B = B_hf.T, reshaped. `target_modules` (names, a regex, or "all-linear"), `exclude_modules`,
`layers_to_transform` / `layers_pattern` select modules as PEFT does; every selected module
must be one of the seven projections, and every target the same set of layers. The tensors
in the file must be exactly those of the selected modules, with the config's rank.
`rank_pattern` / `alpha_pattern` are accepted when they give every selected module the same
rank and alpha (emjax has one of each), and refused otherwise.

Refused by name (no silent approximation): any `peft_type` but LORA (IA3, LOHA, LOKR, ...),
DoRA (`use_dora`), `bias` other than "none", `lora_bias`, `modules_to_save`,
`fan_in_fan_out`, targets emjax has no adapter for (lm_head, embed_tokens), initialisations
that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA: their adapter applies
to a base that is not the published one), the LoRA variants and extras PEFT switches on with
their own keys, and any other key this module does not know that is set. Options that only
shape the initialisation of a new adapter (`init_lora_weights` True / False / gaussian /
eva / orthogonal, their `*_config`s) do not matter once it is trained, and are ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from emjax.models import hf
from emjax.models import lora as lora_lib
from emjax.models import transformer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps the transformers model: its state-dict names start with this.
PREFIX = "base_model.model."

# Keys whose truthy value changes what the adapter computes in a way emjax does not: refused by name.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA: a learned magnitude per output)",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained copies of whole modules",
    "fan_in_fan_out": "Conv1D-style [in, out] weights (GPT-2), which emjax's models do not have",
    "target_parameters": "LoRA on nn.Parameters (MoE experts)",
    "trainable_token_indices": "trained rows of the embedding",
    "layer_replication": "replicated layers",
    "use_qalora": "QA-LoRA (quantization-aware pooling of the input)",
    "alora_invocation_tokens": "activated LoRA (applied only after its invocation tokens)",
    "arrow_config": "Arrow routing between several adapters",
    "megatron_config": "Megatron tensor-parallel layers",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "use_bdlora": "BD-LoRA",
}
# Keys read here.
_HANDLED = ("peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "use_rslora",
            "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "rank_pattern", "alpha_pattern", "bias", "init_lora_weights")
# Bookkeeping, and options that only shape a new adapter's initialisation or how PEFT runs it.
_IGNORED = ("auto_mapping", "peft_version", "inference_mode", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying")
# init_lora_weights values after which the saved A and B apply to the unchanged base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# PEFT's targets for a config that names none (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
# PEFT's defaults per model_type (peft.utils.constants, checked with 0.21).
_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"]}
# The HF modules outside the decoder's projections that PEFT could put LoRA on.
_OTHER_MODULES = ("model.embed_tokens", "lm_head")


class PeftFormatError(ValueError):
  """A PEFT adapter that emjax cannot load (the message names the file and the key or tensor)."""


def is_adapter_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_NAME))


def read_adapter_config(directory: str) -> tuple[dict, str]:
  """(adapter_config.json as a dict, its path for messages)."""
  where = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(where):
    raise FileNotFoundError(f"no PEFT {CONFIG_NAME} in {directory}")
  with open(where, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise PeftFormatError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise PeftFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
  return config, where


# ============================================================================ which modules


def _projection_specs(model_cfg: transformer.TransformerConfig) -> dict[str, Any]:
  """LoRA target ('q', ..., 'down') -> hf.tensor_specs' entry for its weight (HF name and [out, in] shape)."""
  by_path = {s.path: s for s in hf.tensor_specs(model_cfg) if s.path is not None}
  return {t: by_path[("layers", sub, weight)] for t, (sub, weight) in lora_lib.TARGETS.items()}


def _module_name(spec, layer: int) -> str:
  return spec.name(layer).removesuffix(".weight")


def _matches(config: Mapping, key: str) -> bool:
  """Whether PEFT puts an adapter on the module `key` (peft.tuners.tuners_utils.check_target_module_exists)."""
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, key):
        return False
    elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
      return False
  targets = config["target_modules"]
  if isinstance(targets, str):
    return targets.lower() == "all-linear" or re.fullmatch(targets, key) is not None
  if key in targets:  # a full module name: PEFT applies no layer filter to it
    return True
  if not any(key.endswith(f".{t}") for t in targets):
    return False
  layers = config.get("layers_to_transform")
  if layers is None or (isinstance(layers, list) and not layers):
    return True
  patterns = config.get("layers_pattern")
  match = None
  if not patterns:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  else:
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
      match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
      if match is not None:
        break
  if match is None:
    return False
  index = int(match.group("idx"))
  return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(pattern: Mapping, key: str, default):
  """rank_pattern / alpha_pattern lookup as PEFT does it (peft.utils.other.get_pattern_key)."""
  for p in pattern:
    if re.match(rf"(.*\.)?({p})$", key):
      return pattern[p]
  return default


def lora_config(config: Mapping, model_cfg: transformer.TransformerConfig, where: str) -> lora_lib.LoRAConfig:
  """emjax's LoRAConfig for a PEFT adapter_config.json on a base of `model_cfg` (refusals: module docstring)."""
  peft_type = config.get("peft_type")
  if peft_type != "LORA":
    raise PeftFormatError(f"{where}: peft_type {peft_type!r} is not supported; emjax loads LoRA adapters "
                          "(peft_type 'LORA') only")
  for key, what in _REFUSED.items():
    if config.get(key):
      raise PeftFormatError(f"{where}: {key}={config[key]!r} ({what}) is not supported; emjax loads plain LoRA "
                            "adapters")
  if config.get("bias", "none") != "none":
    raise PeftFormatError(f"{where}: bias={config['bias']!r} (trained biases) is not supported; emjax loads LoRA "
                          "adapters with bias='none'")
  unknown = sorted(k for k, v in config.items() if k not in _HANDLED + _IGNORED and v)
  if unknown:
    raise PeftFormatError(f"{where}: {', '.join(f'{k}={config[k]!r}' for k in unknown)}: emjax does not know what "
                          f"{'this key does' if len(unknown) == 1 else 'these keys do'}, so it refuses to guess")
  init = config.get("init_lora_weights", True)
  if init not in _PLAIN_INITS:
    raise PeftFormatError(
        f"{where}: init_lora_weights={init!r} rewrites the base weights when the adapter is created, so this "
        "adapter applies to that rewritten base, not to base_model_name_or_path; convert it to a plain LoRA first "
        "(PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...))")
  task = config.get("task_type")
  if task not in (None, "CAUSAL_LM"):
    raise PeftFormatError(f"{where}: task_type {task!r} is not supported; emjax's models are causal LMs "
                          "(task_type 'CAUSAL_LM')")
  r, alpha = config.get("r"), config.get("lora_alpha")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise PeftFormatError(f"{where}: r={r!r} must be a positive integer")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise PeftFormatError(f"{where}: lora_alpha={alpha!r} must be a number")
  rslora = config.get("use_rslora", False)
  if not isinstance(rslora, bool):
    raise PeftFormatError(f"{where}: use_rslora={rslora!r} must be true or false")
  dropout = float(config.get("lora_dropout") or 0.0)

  config = dict(config)
  targets = config.get("target_modules")
  if targets is None:
    if model_cfg.family not in _DEFAULT_TARGETS:
      raise PeftFormatError(f"{where}: target_modules is not set, and PEFT has no default targets for "
                            f"{model_cfg.family}")
    targets = config["target_modules"] = list(_DEFAULT_TARGETS[model_cfg.family])
  if isinstance(targets, str):
    if config.get("layers_to_transform") is not None:
      raise PeftFormatError(f"{where}: layers_to_transform cannot be used with target_modules given as one string "
                            f"({targets!r}); PEFT refuses this config too")
  elif not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
    raise PeftFormatError(f"{where}: target_modules={targets!r} must be a list of module names or one string")
  # "all-linear" leaves out the output layer (and an embedding is not linear).
  all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
  lacking = [] if all_linear else [m for m in _OTHER_MODULES if _matches(config, m)]
  if lacking:
    raise PeftFormatError(f"{where}: target_modules {targets!r} selects {', '.join(lacking)}; emjax has LoRA on the "
                          f"decoder's projections only ({', '.join(w for _, w in lora_lib.TARGETS.values())})")

  specs = _projection_specs(model_cfg)
  selected = {(t, i) for t, spec in specs.items() for i in range(model_cfg.n_layers)
              if _matches(config, _module_name(spec, i))}
  if not selected:
    raise PeftFormatError(f"{where}: target_modules={targets!r}, layers_to_transform="
                          f"{config.get('layers_to_transform')!r} select none of the base's "
                          f"{model_cfg.n_layers}-layer {model_cfg.family} projections")
  chosen_targets = tuple(t for t in lora_lib.TARGETS if any((t, i) in selected for i in range(model_cfg.n_layers)))
  chosen_layers = tuple(i for i in range(model_cfg.n_layers) if any((t, i) in selected for t in chosen_targets))
  if len(selected) != len(chosen_targets) * len(chosen_layers):
    per_target = {lora_lib.TARGETS[t][1]: [i for i in chosen_layers if (t, i) in selected] for t in chosen_targets}
    raise PeftFormatError(f"{where}: the adapter puts LoRA on different layers for different modules "
                          f"({per_target}); emjax adapts the same layers for every target module")

  rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
  if rank_pattern or alpha_pattern:
    per_module = {_module_name(specs[t], i): (_pattern_value(rank_pattern, _module_name(specs[t], i), r),
                                              _pattern_value(alpha_pattern, _module_name(specs[t], i), alpha))
                  for t, i in sorted(selected, key=lambda x: (x[1], x[0]))}
    values = sorted(set(per_module.values()))
    if len(values) > 1:
      examples = {v: next(m for m, w in per_module.items() if w == v) for v in values}
      raise PeftFormatError(
          f"{where}: rank_pattern / alpha_pattern give modules different ranks and alphas ("
          + "; ".join(f"{m}: r={v[0]}, lora_alpha={v[1]}" for v, m in examples.items())
          + "); emjax's LoRA has one rank and one alpha for every adapted projection")
    r, alpha = values[0]
  layers = () if len(chosen_layers) == model_cfg.n_layers else chosen_layers
  return lora_lib.LoRAConfig(rank=int(r), alpha=float(alpha), rslora=rslora, dropout=dropout,
                             targets=chosen_targets, layers=layers)


def module_names(model_cfg: transformer.TransformerConfig, lora_cfg: lora_lib.LoRAConfig) -> list[tuple[str, str, int]]:
  """(PEFT module name, target, layer) of every adapted module, layer by layer in TARGETS order."""
  specs = _projection_specs(model_cfg)
  layers = lora_cfg.layers or tuple(range(model_cfg.n_layers))
  return [(_module_name(specs[t], i), t, i) for i in sorted(layers) for t in lora_lib.TARGETS
          if t in lora_cfg.targets]


# ============================================================================ tensors


def _adapter_shapes(model_cfg, lora_cfg) -> dict:
  """{target: (A's emjax shape [n_layers, in..., r], B's [n_layers, r, out...])}."""
  _, adapters, _ = lora_lib.split_trainable(lora_lib.abstract_model(model_cfg, lora_cfg), lora_cfg)
  out = {}
  for t in lora_cfg.targets:
    sub, weight = lora_lib.TARGETS[t]
    leaf = adapters["layers"][sub][f"{weight}_lora"]
    out[t] = (tuple(leaf["lora_a"].shape), tuple(leaf["lora_b"].shape))
  return out


def read_adapters(directory: str, model_cfg: transformer.TransformerConfig, lora_cfg: lora_lib.LoRAConfig,
                  dtype="float32") -> dict:
  """The adapter tree `lora.adapter_abstract` describes (numpy, `dtype`) from DIR/adapter_model.safetensors.

  Layers the adapter does not transform hold zeros (the layer mask keeps them out of the model).
  The names and shapes in the file must be exactly the adapter's; anything else is an error
  naming the tensor.
  """
  path = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(path):
    pickles = [x for x in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(directory, x))]
    if pickles:
      raise PeftFormatError(f"{directory} holds the adapter as a PyTorch pickle ({pickles[0]}); emjax reads "
                            "safetensors only and never unpickles files. Convert it once where you trust the file: "
                            "PeftModel.from_pretrained(...).save_pretrained(out, safe_serialization=True)")
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (the adapter's weights)")
  ckpt = hf.SafetensorsCheckpoint(path)
  specs = _projection_specs(model_cfg)
  modules = module_names(model_cfg, lora_cfg)
  expected = {f"{PREFIX}{m}.lora_{ab}.weight": (m, t, i, ab) for m, t, i in modules for ab in "AB"}
  have = set(ckpt.names())
  unexpected, missing = sorted(have - set(expected)), sorted(set(expected) - have)
  if unexpected or missing:
    def some(names):
      return ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
    parts = ([f"tensors {some(unexpected)} that emjax's LoRA has no place for"] if unexpected else []) + \
        ([f"no {some(missing)}, which {CONFIG_NAME} selects"] if missing else [])
    raise PeftFormatError(f"{path}: {'; and '.join(parts)} (adapted modules per {CONFIG_NAME}: "
                          f"{', '.join(sorted({t for _, t, _ in modules}, key=list(lora_lib.TARGETS).index))} on "
                          f"layers {sorted({i for _, _, i in modules})})")
  shapes = _adapter_shapes(model_cfg, lora_cfg)
  np_dtype = np.dtype(jnp.dtype(dtype))
  stacked = {t: (np.zeros(a, np_dtype), np.zeros(b, np_dtype)) for t, (a, b) in shapes.items()}
  r = lora_cfg.rank
  try:
    for name, (_, t, i, ab) in sorted(expected.items()):
      out_features, in_features = specs[t].hf_shape
      want = (r, in_features) if ab == "A" else (out_features, r)
      if ckpt.shape(name) != want:
        raise PeftFormatError(
            f"{path}: {name} has shape {list(ckpt.shape(name))}, but rank {r} on this base's {t} projection "
            f"([out, in] = [{out_features}, {in_features}]) means {list(want)}: the adapter's r is not "
            f"{CONFIG_NAME}'s, or it was trained on another base")
      x = np.asarray(ckpt.read(name), np.float32 if np_dtype.itemsize <= 4 else np_dtype)
      a, b = stacked[t]
      if ab == "A":  # [r, in] -> [in..., r]
        a[i] = x.T.reshape(a.shape[1:])
      else:  # [out, r] -> [r, out...]
        b[i] = x.T.reshape(b.shape[1:])
  finally:
    ckpt.close()
  tree: dict = {"layers": {}}
  for t, (a, b) in stacked.items():
    sub, weight = lora_lib.TARGETS[t]
    tree["layers"].setdefault(sub, {})[f"{weight}_lora"] = {"lora_a": a, "lora_b": b}
  return tree


def _peft_tensor(adapters: Mapping, t: str, layer: int, ab: str, dtype: np.dtype) -> np.ndarray:
  sub, weight = lora_lib.TARGETS[t]
  leaf = adapters["layers"][sub][f"{weight}_lora"]["lora_a" if ab == "A" else "lora_b"]
  x = hf._to_host(leaf[layer])  # pylint: disable=protected-access
  if ab == "A":  # [in..., r] -> [r, in]
    x = x.reshape(-1, x.shape[-1]).T
  else:  # [r, out...] -> [out, r]
    x = x.reshape(x.shape[0], -1).T
  return np.ascontiguousarray(x).astype(dtype)


def adapter_config_dict(model_cfg: transformer.TransformerConfig, lora_cfg: lora_lib.LoRAConfig,
                        base_model_name_or_path: str) -> dict:
  """The adapter_config.json PEFT reads for these adapters (its keys, its spelling)."""
  alpha = lora_cfg.alpha
  family = model_cfg.family
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
      "revision": None, "inference_mode": True,
      "auto_mapping": {"base_model_class": hf.ARCHITECTURES[family],
                       "parent_library": f"transformers.models.{family}.modeling_{family}"},
      "r": lora_cfg.rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "use_rslora": lora_cfg.rslora, "lora_dropout": lora_cfg.dropout,
      "target_modules": [lora_lib.TARGETS[t][1] for t in lora_lib.TARGETS if t in lora_cfg.targets],
      "layers_to_transform": sorted(lora_cfg.layers) if lora_cfg.layers else None, "layers_pattern": None,
      "exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
      "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False, "init_lora_weights": True,
  }


def export_adapters(adapters: Mapping, model_cfg: transformer.TransformerConfig, lora_cfg: lora_lib.LoRAConfig,
                    out_dir: str, *, base_model_name_or_path: str, dtype: str | None = None) -> str:
  """Writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors); returns it.

  `adapters`: a LoRA run's checkpointed `params` (`lora.adapter_abstract`'s tree). Only the
  layers the adapter transforms are written. `dtype` (default: the adapters' own) is the dtype
  of the tensors. In a multi-process job every process must call this (it gathers); process 0 writes.
  """
  _, abstract, _ = lora_lib.split_trainable(lora_lib.abstract_model(model_cfg, lora_cfg), lora_cfg)
  if jax.tree.structure(adapters) != jax.tree.structure(abstract):
    raise ValueError("export: the adapters do not match the LoRA config (config.lora targets) of the model")
  bad = [(jax.tree_util.keystr(p), tuple(x.shape), a.shape)
         for (p, x), a in zip(jax.tree_util.tree_flatten_with_path(adapters)[0], jax.tree.leaves(abstract))
         if tuple(x.shape) != a.shape]
  if bad:
    raise ValueError(f"export: adapter {bad[0][0]} has shape {bad[0][1]}, the LoRA config implies {bad[0][2]}")
  leaves = jax.tree.leaves(adapters)
  out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(jnp.dtype(leaves[0].dtype))
  if out_dtype.name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"export: dtype {out_dtype} cannot be written (use float32, bfloat16 or float16)")
  specs = _projection_specs(model_cfg)
  tensors, fetch = [], {}
  for module, t, i in module_names(model_cfg, lora_cfg):
    out_features, in_features = specs[t].hf_shape
    for ab, shape in (("A", (lora_cfg.rank, in_features)), ("B", (out_features, lora_cfg.rank))):
      name = f"{PREFIX}{module}.lora_{ab}.weight"
      tensors.append((name, shape, out_dtype))
      fetch[name] = (t, i, ab)
  writer = jax.process_index() == 0
  if not writer:
    for name, _, _ in tensors:
      _peft_tensor(adapters, *fetch[name], out_dtype)  # take part in the gathers
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  hf._write_safetensors(os.path.join(out_dir, WEIGHTS_NAME), tensors,  # pylint: disable=protected-access
                        lambda name: _peft_tensor(adapters, *fetch[name], out_dtype))
  with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(adapter_config_dict(model_cfg, lora_cfg, base_model_name_or_path), f, indent=2, sort_keys=True)
    f.write("\n")
  return out_dir


def check_continues(adapter: lora_lib.LoRAConfig, run: lora_lib.LoRAConfig, key: str, where: str,
                    n_layers: int) -> None:
  """Refuses a LoRA run that would go on training `adapter` with other settings (config.lora is the run's)."""
  def layers(cfg):
    return tuple(sorted(cfg.layers)) if cfg.layers else tuple(range(n_layers))

  want = {"rank": adapter.rank, "alpha": adapter.alpha, "rslora": adapter.rslora,
          "targets": ",".join(adapter.targets), "layers": ",".join(str(i) for i in adapter.layers)}
  have = {"rank": run.rank, "alpha": run.alpha, "rslora": run.rslora,
          "targets": ",".join(t for t in lora_lib.TARGETS if t in run.targets),
          "layers": ",".join(str(i) for i in run.layers)}
  differ = [k for k in want if (layers(adapter) != layers(run) if k == "layers" else want[k] != have[k])]
  if differ:
    what = ", ".join(f"lora.{k}={have[k]!r} (adapter: {want[k]!r})" for k in differ)
    raise ValueError(
        f"{key}: a LoRA run from a PEFT adapter goes on training that adapter, so config.lora must be the "
        f"adapter's ({where}); it differs in {what}. Set {' '.join(f'--config.lora.{k}={want[k]}' for k in want)}; or, to train a new adapter on the "
        "adapted model, import it first (python -m emjax.weights import ADAPTER DST) and set "
        "config.init.checkpoint=DST")
