"""The one place weights are loaded: Hugging Face models, emjax runs and checkpoints, LoRA runs on their base.

    w = weights.load_weights("runs/sft", mesh=mesh)                   # newest step; a LoRA run merged into its base
    w = weights.load_weights("runs/sft", step=400, dtype="bfloat16")
    w = weights.load_weights("runs/sft/checkpoints/400")                # one step directory
    w = weights.load_weights("Qwen/Qwen2.5-0.5B-Instruct", mesh=mesh)   # a Hugging Face directory or hub id
    w = weights.load_weights("adapters/em-organism", mesh=mesh)          # a PEFT LoRA adapter, merged into its base
    w.params, w.model_cfg, w.step, w.source.tokenizer

    python -m emjax.weights import SRC_HF_DIR_OR_HUB_ID DST_EMJAX_DIR   # then config.init.checkpoint=DST
    python -m emjax.weights export SRC DST_HF_DIR [--step N] [--tokenizer DIR] [--dtype bfloat16]
    python -m emjax.weights export LORA_RUN DST_ADAPTER_DIR --peft      # its adapters as a PEFT adapter

What a path is (`resolve`), tried in this order:
  - a directory with `checkpoints/` or an emjax `config.json`: a run's workdir;
  - a numbered directory holding `state/`: one step of RUN/checkpoints/;
  - a directory named `checkpoints` or holding numbered steps: RUN/checkpoints/;
  - anything else: a Hugging Face model directory (config.json + safetensors) or hub id, or a PEFT
    LoRA adapter (adapter_config.json + adapter_model.safetensors; emjax.models.peft).
An emjax checkpoint's architecture is its run's RUN/config.json. Its steps are the numbered
directories (orbax gives a step its number only once the step is complete); the newest is used
unless a step is asked for. A step whose files cannot be read is reported and the next older one
used (never when a step was asked for); parameters that do not match the model are an error that
names the parameter, and nothing is moved or deleted.

`dtype` is the dtype of the returned parameters (`param_dtype`; default: the source's). Parameters
are created directly in their shardings on `mesh` (default: all devices, fsdp).

A PEFT adapter's weights are its LoRA merged into its base: `base=` (config keys
`init.peft_base`, `teacher.peft_base`, `sample.peft_base`) or else the adapter's own
`base_model_name_or_path`, resolved as any path is (a hub id from the local Hugging Face cache).
Its Source is kind "hf" (it is given where a Hugging Face model is) with `adapter` set. A LoRA run
whose `config.init.hf` is an adapter goes on training that adapter: its base is the adapter's base,
its adapters start as the adapter's (`init_adapters`), and config.lora must be the adapter's.

LoRA runs (`config.lora.enabled`) checkpoint their adapters alone: their weights are the adapters
merged into the run's base (`config.init`: a Hugging Face model or any emjax checkpoint, LoRA run
included). The base is pinned. When a LoRA run starts, the trainer records in RUN/base.json what its
base resolved to: the path, the step (an emjax base), the dtype of each parameter, and a fingerprint
of the parameters (`fingerprint`: exact, the same on any mesh). Resuming, sampling, exporting or
comparing the run then loads that step again and refuses a base whose fingerprint has changed, with
an error that names the path and what changed. A run without base.json (made before pinning) is
loaded with a warning.

Layering: this module reads models/ (architecture, Hugging Face files, LoRA trees), data/ (the
default data block) and orbax, and imports nothing from train/, so the trainer, the sample job,
export and experiments load weights the same way; models/ never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emjax import config as config_lib
from emjax import paths
from emjax import sharding as shd
from emjax.data import pipeline
from emjax.models import hf
from emjax.models import lora as lora_lib
from emjax.models import peft as peft_lib
from emjax.models import transformer

log = logging.getLogger(__name__)

# Model config keys that change how the weights run, not what they are: a sampling config, an
# import or `config.init.hf` may set them; every other key is the architecture, fixed by the weights.
RUNTIME_MODEL_KEYS = ("param_dtype", "dtype", "remat", "scan_layers", "attention", "matmul_precision", "init_std")
ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(transformer.TransformerConfig)
                          if f.name not in RUNTIME_MODEL_KEYS)
BASE_FILE = "base.json"
DEFAULT_MESH = dict(data=1, fsdp=-1, tensor=1)


class BaseChangedError(ValueError):
  """A LoRA run's base is not the one its adapters were trained on (RUN/base.json)."""


# ============================================================================ what a path is


@dataclasses.dataclass(frozen=True)
class Source:
  """Where weights come from, resolved without reading any parameter."""

  path: str  # as given
  kind: str  # "hf" | "emjax"
  directory: str  # hf: the local model (or PEFT adapter) directory; emjax: the run's workdir (its config.json)
  checkpoints: str = ""  # emjax: the directory of numbered steps
  step: int | None = None  # emjax: the step asked for (a step directory, or step=); None = the newest
  config: Any = None  # emjax: the run's saved config (None without RUN/config.json)
  model_cfg: transformer.TransformerConfig | None = None  # None: an emjax checkpoint without config.json
  adapter: "Adapter | None" = None  # a PEFT LoRA adapter (kind "hf"): its LoRA and its base

  @property
  def lora(self) -> lora_lib.LoRAConfig | None:
    """The run's LoRA settings when it is a LoRA run (its checkpoints hold adapters only)."""
    block = self.config.get("lora") if self.config is not None else None
    return lora_lib.LoRAConfig.from_config(block) if block and block.get("enabled", False) else None

  @property
  def tokenizer(self) -> dict | None:
    """The tokenizer config that goes with these weights (None: unknown)."""
    if self.adapter is not None:  # hub adapters often ship their tokenizer; else it is the base's
      has_own = any(os.path.isfile(os.path.join(self.directory, x)) for x in hf.TOKENIZER_FILES
                    if x.startswith("tokenizer"))
      return {"kind": "hf", "path": self.directory} if has_own else self.adapter.base.tokenizer
    if self.kind == "hf":
      return {"kind": "hf", "path": self.directory}
    if self.config is None or "data" not in self.config:
      return None
    return dict(self.config.data.tokenizer)

  def steps(self) -> list[int]:
    return complete_steps(self.checkpoints) if self.kind == "emjax" else []


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A PEFT LoRA adapter: its settings in emjax's terms, and the base it applies to."""

  lora: lora_lib.LoRAConfig
  base: Source
  base_name: str  # the base as named (base= or base_model_name_or_path): what an export of it names
  where: str  # its adapter_config.json


def _label(key: str, path: str) -> str:
  return f"{key}={path!r}" if key else repr(path)


def _is_emjax_config(path) -> bool:
  path = paths.path(path)
  if not path.is_file():
    return False
  try:
    c = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return isinstance(c, dict) and isinstance(c.get("model"), dict) and "model_type" not in c


def complete_steps(checkpoints: str) -> list[int]:
  """The steps orbax has finalised in a checkpoints directory, ascending; [] if none (or no directory).

  Orbax's own predicate decides (`orbax.checkpoint.utils.checkpoint_steps_paths`): on a local disk a
  step is written under a temporary name and renamed when complete, so a numbered directory is final;
  in a bucket a step is written in place under its number and is final only once orbax has written
  its `commit_success.txt`, so a step still being saved (or cut short by a kill) is not listed.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  d = paths.path(checkpoints)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in ocp.utils.checkpoint_steps_paths(d) if p.name.isdigit())


def _unfinished_saves(checkpoints: str) -> list[str]:
  """The names of saves in `checkpoints` orbax has not finalised: `<step>.orbax-checkpoint-tmp-*`
  directories (a disk) and numbered steps without their commit file (a bucket)."""
  d = paths.path(checkpoints)
  if not d.is_dir():
    return []
  final = set(complete_steps(checkpoints))
  return sorted(p.name for p in d.iterdir()
                if "tmp" in p.name or (p.name.isdigit() and int(p.name) not in final and p.is_dir()))


def resolve(path: str, *, step: int | None = None, key: str = "", base: str = "", base_key: str = "") -> Source:
  """What `path` is (see the module docstring); `key` (e.g. 'config.init.checkpoint') names it in errors.

  `base` (named `base_key` in errors, e.g. 'config.teacher.peft_base'): the base of a PEFT adapter
  at `path`, instead of its adapter_config.json's base_model_name_or_path.
  """
  label = _label(key, path)
  if not path:
    raise ValueError(f"{key or 'weights'}: no path given (a Hugging Face model, a PEFT adapter, an emjax run, its "
                     "checkpoints/ directory or one step directory)")
  p = paths.absolute(path)  # an emjax run may be in a bucket (gs://...); a Hugging Face model is local
  run = ckpts = None
  given_step = None
  if p.is_dir():
    if (p / "checkpoints").is_dir() or _is_emjax_config(p / "config.json"):
      run, ckpts = p, p / "checkpoints"
    elif p.name.isdigit() and (p / "state").is_dir():
      ckpts = p.parent
      run, given_step = ckpts.parent, int(p.name)
    elif p.name == "checkpoints" or complete_steps(p):
      run, ckpts = p.parent, p
  if run is None:
    try:
      directory = hf.resolve_hf_path(path)
      adapter = peft_lib.is_adapter_dir(directory)
      model_cfg = None if adapter else hf.config_from_hf(directory)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{label}: not an emjax run (config.json + checkpoints/), checkpoints/ or step "
                              f"directory, nor a Hugging Face model or PEFT adapter ({e})") from None
    if step is not None:
      raise ValueError(f"{label} is a Hugging Face {'PEFT adapter' if adapter else 'model'}, which has no steps "
                       f"(step={step} was asked for)")
    if adapter:
      return _resolve_adapter(os.fspath(path), directory, label, base, base_key)
  if base:
    raise ValueError(f"{base_key or 'base'}={base!r} is set, but {label} is not a PEFT adapter (no "
                     f"{peft_lib.CONFIG_NAME}): only an adapter has a base to give")
  if run is None:
    return Source(path=os.fspath(path), kind="hf", directory=directory, model_cfg=model_cfg)
  if step is not None and given_step is not None and int(step) != given_step:
    raise ValueError(f"{label} is step {given_step}, but step {step} was asked for")
  step = given_step if step is None else int(step)
  config = config_lib.load_config_json(run) if (run / "config.json").is_file() else None
  model_cfg = transformer.TransformerConfig.from_config(config.model) if config is not None else None
  return Source(path=os.fspath(path), kind="emjax", directory=os.fspath(run), checkpoints=os.fspath(ckpts), step=step,
                config=config, model_cfg=model_cfg)


def _resolve_adapter(path: str, directory: str, label: str, base: str, base_key: str) -> Source:
  """The Source of the PEFT adapter in `directory`: its LoRA settings checked against its resolved base."""
  config, where = peft_lib.read_adapter_config(directory)
  name = base or config.get("base_model_name_or_path") or ""
  named_by = f"{base_key or 'base'}={base!r}" if base else f"base_model_name_or_path in {where}"
  hint = f"give the base with {base_key}" if base_key else "give the base explicitly (base=)"
  if not name:
    raise ValueError(f"{label}: the PEFT adapter names no base (no base_model_name_or_path in {where}); {hint}")
  try:
    base_src = resolve(name, key=base_key)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{label}: the PEFT adapter's base {name!r} ({named_by}) is not here ({e}); "
                            f"{hint}") from None
  if base_src.adapter is not None:
    raise ValueError(f"{label}: the PEFT adapter's base {name!r} ({named_by}) is itself a PEFT adapter; its base "
                     "must be a model")
  if base_src.model_cfg is None:
    raise FileNotFoundError(f"{label}: the PEFT adapter's base {name!r} has no config.json in "
                            f"{base_src.directory} to take its architecture from")
  if config.get("revision"):
    log.warning("%s: the adapter asks for revision %r of its base %s; emjax loads %s as it is", where,
                config["revision"], name, base_src.directory)
  lora = peft_lib.lora_config(config, base_src.model_cfg, where)
  return Source(path=path, kind="hf", directory=directory, model_cfg=base_src.model_cfg,
                adapter=Adapter(lora=lora, base=base_src, base_name=name, where=where))


def model_config(path: str, *, key: str = "", base: str = "", base_key: str = "") -> transformer.TransformerConfig:
  """The model config of the weights at `path` (nothing but config files read; a PEFT adapter: its base's)."""
  src = resolve(path, key=key, base=base, base_key=base_key)
  if src.model_cfg is None:
    raise FileNotFoundError(f"{_label(key, path)}: no config.json in {src.directory} to take the model's "
                            "architecture from")
  return src.model_cfg


# ============================================================================ model configs


def with_overrides(model_cfg: transformer.TransformerConfig, overrides: Mapping[str, Any], *, where: str,
                   what: str = "the checkpoint's") -> transformer.TransformerConfig:
  """`model_cfg` with `overrides` (keys of config.model; None = not set) applied.

  A runtime key (RUNTIME_MODEL_KEYS) always wins, even when set to its default. An architecture
  key must agree with `model_cfg` (the weights fix it): otherwise a ValueError names the key.
  """
  values = dataclasses.asdict(model_cfg)
  for k, v in overrides.items():
    if v is None:
      continue
    if k not in values:
      raise ValueError(f"config.model.{k}: unknown key; known keys: {sorted(values)}")
    if k in RUNTIME_MODEL_KEYS:
      if values[k] != v:
        log.info("config.model.%s=%r overrides %s %r", k, v, what, values[k])
      values[k] = v
    elif values[k] != v:
      raise ValueError(f"config.model.{k}={v!r} disagrees with {what} {values[k]!r} ({where}); the architecture "
                       f"comes from the weights: leave config.model.{k} unset (only "
                       f"{', '.join(RUNTIME_MODEL_KEYS)} may be overridden)")
  return transformer.TransformerConfig(**values)


def _check_architecture(known: transformer.TransformerConfig | None, wanted: transformer.TransformerConfig,
                        label: str, where: str) -> None:
  if known is None:
    return
  for k in ARCHITECTURE_KEYS:
    if getattr(known, k) != getattr(wanted, k):
      raise ValueError(f"{label}: config.model.{k}={getattr(wanted, k)!r}, but the model there has "
                       f"{k}={getattr(known, k)!r} ({where}); the architectures must agree")


def _where_config(src: Source) -> str:
  if src.adapter is not None:  # the architecture is the base's
    return _where_config(src.adapter.base)
  return os.path.join(src.directory, "config.json")


def abstract_params(model_cfg: transformer.TransformerConfig, mesh, dtypes: Any = None) -> dict:
  """ShapeDtypeStructs of the model's parameters with their shardings on `mesh`.

  dtype: `model_cfg.param_dtype`, or `dtypes` (one dtype, or a {'layers/attn/q_proj': dtype} map).
  """
  model = transformer.abstract_model(model_cfg)
  _, abstract = transformer.split_model(model)
  shardings = shd.tree_shardings(transformer.param_logical_axes(model), abstract, mesh)

  def leaf(path, a, s):
    dt = a.dtype
    if isinstance(dtypes, Mapping):
      dt = dtypes.get(_path_name(path), dt)
    elif dtypes:
      dt = dtypes
    return jax.ShapeDtypeStruct(a.shape, jnp.dtype(dt), sharding=s)

  return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: not isinstance(x, Mapping))[0]
  return {_path_name(p): x for p, x in leaves}


# ============================================================================ emjax checkpoints


def _saved_params(state_dir: str) -> dict:
  """{name: metadata (shape, dtype)} of the `params` a step's `state` holds (reads metadata only)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  meta = getattr(meta, "item_metadata", meta)
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, Mapping):
    raise ValueError(f"{state_dir}: unexpected checkpoint metadata {type(tree).__name__}")
  if "params" not in tree:
    raise _Mismatch(f"{state_dir}: the checkpoint has no 'params' (it holds {sorted(tree)})")
  return _flat(tree["params"])


class _Mismatch(ValueError):
  pass


def _check_structure(saved: dict, abstract: dict, where: str) -> None:
  want = _flat(abstract)
  missing = [k for k in want if k not in saved]
  unexpected = [k for k in saved if k not in want]
  shapes = [f"{k} is {list(saved[k].shape)} there, {list(want[k].shape)} for the model" for k in want
            if k in saved and tuple(saved[k].shape) != tuple(want[k].shape)]
  if not (missing or unexpected or shapes):
    return

  def some(names):
    return ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")

  parts = ([f"missing {some(missing)}"] if missing else []) + ([f"unexpected {some(unexpected)}"] if unexpected
                                                               else []) + shapes[:3]
  hint = ""
  if missing and all("_lora/" in k for k in unexpected) and unexpected:
    hint = " (it holds LoRA adapters: load the LoRA run itself, which merges them into its base)"
  elif missing and all("_lora/" in k for k in missing):
    hint = " (the model expects LoRA adapters: is config.lora the run's?)"
  raise _Mismatch(f"{where}: the checkpoint's parameters do not match the model: {'; '.join(parts)}{hint}")


def read_params(checkpoints: str, abstract: dict, *, step: int | None = None, label: str = "",
                saved_dtypes: bool = False) -> tuple[int, dict]:
  """(step, params) from `checkpoints` (the newest readable step, or `step`), laid out as `abstract`.

  Only `state/params` is read. `saved_dtypes`: keep each parameter's dtype in the checkpoint
  instead of `abstract`'s. A mismatch of names or shapes is a ValueError naming the parameter;
  an unreadable step (files missing or truncated) is skipped for an older one unless `step` is given.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  label = label or checkpoints
  steps = complete_steps(checkpoints)
  if step is not None:
    if step not in steps:
      unfinished = " (it was not finalised: a save still under way, or cut short)" \
          if str(step) in _unfinished_saves(checkpoints) else ""
      raise FileNotFoundError(f"{label}: no step {step} in {checkpoints}{unfinished} (steps there: {steps or 'none'})")
    candidates = [step]
  else:
    if not steps:
      exists = paths.path(checkpoints).is_dir()
      partial = _unfinished_saves(checkpoints)
      why = (f"; only incomplete saves ({', '.join(partial)}) of a run stopped while writing" if partial
             else "" if exists else "; the directory does not exist")
      raise FileNotFoundError(f"{label}: no complete checkpoint step in {checkpoints}{why}")
    candidates = list(reversed(steps))
  for s in candidates:
    state_dir = os.path.join(checkpoints, str(s), "state")
    try:
      saved = _saved_params(state_dir)
      _check_structure(saved, abstract, state_dir)
      target = abstract
      if saved_dtypes:
        target = jax.tree_util.tree_map_with_path(
            lambda p, a: jax.ShapeDtypeStruct(a.shape, saved[_path_name(p)].dtype, sharding=a.sharding), abstract)
      item = {"params": target}
      restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    except _Mismatch as e:
      raise ValueError(f"{label}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- unreadable: say which step and why
      first = str(e).splitlines()[0] if str(e) else ""
      if step is not None:
        raise FileNotFoundError(f"{label}: step {s} ({state_dir}) cannot be read ({type(e).__name__}: {first})") from e
      log.error("checkpoint: step %d in %s is unreadable (%s: %s); trying an older one", s, checkpoints,
                type(e).__name__, first)
      continue
    return s, restored["params"]
  raise FileNotFoundError(f"{label}: no readable checkpoint step in {checkpoints} (tried {candidates})")


def save_emjax_checkpoint(params: Mapping[str, Any], model_cfg: transformer.TransformerConfig, dst: str,
                          tokenizer_dir: str | None = None, source: str = "") -> str:
  """An emjax directory that `config.init.checkpoint=DST`, the sample job and `load_weights` read.

  DST/checkpoints/0/state holds `{"params": params}` (orbax). DST/config.json holds the blocks that
  describe these weights, which is what every reader of an emjax directory's config.json takes from
  one: `model`, and `data` with its default settings, the tokenizer ({kind: hf, path} given
  `tokenizer_dir`, else the default) and no sources, since the weights were not trained on emjax data
  (an audit of a run started from DST lists none). No `init` or `lora`: readers take their absence
  as "not a LoRA run, no base".
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  dst = os.path.abspath(dst)
  ckpt_dir = os.path.join(dst, "checkpoints")
  if complete_steps(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} already holds a checkpoint; choose a new destination")
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=True),
                                  item_names=("state",))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
  manager.wait_until_finished()
  manager.close()
  data = pipeline.default_data_config()
  data.sources = {}
  if tokenizer_dir:
    data.tokenizer.kind = "hf"
    data.tokenizer.path = os.path.abspath(tokenizer_dir)
  config = ml_collections.ConfigDict(dict(model=dataclasses.asdict(model_cfg), data=data))
  if jax.process_index() == 0:
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if source:
      with open(os.path.join(dst, "hf_source.json"), "w", encoding="utf-8") as f:
        json.dump({"source": source}, f, indent=2)
  return dst


# ============================================================================ fingerprints and pinned bases


def _fmix32(h):
  # murmur3's finaliser: a bijection of uint32 that spreads consecutive indices over all bits.
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_digest(x) -> jax.Array:
  """Two wrapping uint32 sums of bits[i] * odd(i): exact integer sums, the same in any reduction order."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    if x.dtype.itemsize > 4:
      raise ValueError(f"fingerprint: {x.dtype} parameters are not supported")
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)  # exact for bf16/f16/f32
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    bits = x.astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
    stride *= x.shape[d]
  # An odd multiplier is invertible mod 2**32: changing any one element always changes each sum.
  m1 = _fmix32(index) | jnp.uint32(1)
  m2 = _fmix32(index ^ jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
  return jnp.stack([jnp.sum(bits * m1, dtype=jnp.uint32), jnp.sum(bits * m2, dtype=jnp.uint32)])


_digests = jax.jit(lambda flat: {k: _leaf_digest(v) for k, v in flat.items()})  # compiled once per layout


def fingerprint(params: Any) -> str:
  """A digest of a parameter tree's exact values, names, shapes and dtypes, identical on any mesh.

  Every process of a multi-process job must call it (it runs a jitted reduction over the global arrays).
  """
  flat = _flat(params)
  digests = jax.device_get(_digests(flat))
  h = hashlib.sha256()
  for name in sorted(flat):
    x = flat[name]
    d = np.asarray(digests[name], np.uint32)
    h.update(f"{name}|{tuple(x.shape)}|{jnp.dtype(x.dtype).name}|{int(d[0]):08x}{int(d[1]):08x}\n".encode())
  return "sha256:" + h.hexdigest()[:32]


def _dtypes(params: Any) -> str | dict:
  names = {k: jnp.dtype(v.dtype).name for k, v in _flat(params).items()}
  kinds = set(names.values())
  return kinds.pop() if len(kinds) == 1 else dict(sorted(names.items()))


def read_pin(run_dir: str) -> dict | None:
  """What RUN/base.json records about a LoRA run's base, or None when the run has none."""
  path = paths.path(run_dir) / BASE_FILE
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); it records this LoRA run's base") from None


def _write_pin(run_dir: str, record: dict) -> None:
  if jax.process_index() != 0:
    return
  paths.path(run_dir).mkdir(parents=True, exist_ok=True)
  path = paths.path(run_dir) / BASE_FILE
  paths.write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
  log.info("LoRA base pinned in %s: %s (step %s, %s)", path, record["path"], record["step"], record["fingerprint"])


def _check_pin(run_dir: str, pinned: dict, record: dict) -> None:
  path = os.path.join(run_dir, BASE_FILE)
  if pinned.get("fingerprint") == record["fingerprint"]:
    if (pinned.get("path"), pinned.get("step")) != (record["path"], record["step"]):
      log.info("LoRA base: %s (step %s) has the pinned parameters of %s (step %s)", record["path"],
               record["step"], pinned.get("path"), pinned.get("step"))
    return
  changed = [f"{k} {pinned.get(k)!r} -> {record.get(k)!r}" for k in ("init", "path", "resolved", "step", "dtype")
             if pinned.get(k) != record.get(k)]
  if not changed:
    changed = ["its parameters (same path, step and dtype: the files were rewritten)"]
  raise BaseChangedError(
      f"{path}: this LoRA run's base has changed since the run started, so its adapters do not apply to it. "
      f"Pinned: config.init.{pinned.get('init')}={pinned.get('path')!r} (step {pinned.get('step')}, "
      f"fingerprint {pinned.get('fingerprint')}); now: config.init.{record['init']}={record['path']!r} (step "
      f"{record['step']}, fingerprint {record['fingerprint']}); changed: {'; '.join(changed)}. Point config.init "
      "back at the pinned base, or train the new base in a new workdir.")


def load_init_params(init: Any, model_cfg: transformer.TransformerConfig, abstract_params: Any, mesh=None, *,
                     pin: str | None = None, write_pin: bool = True,
                     lora: lora_lib.LoRAConfig | None = None) -> Any:
  """The base weights a config's `init` block names, laid out as `abstract_params`, or None (random init).

  `init.checkpoint`: any emjax run or checkpoint (a LoRA run: its merged weights); `init.hf`: a
  Hugging Face directory or hub id (read one tensor at a time onto `mesh`), or a PEFT adapter
  (base: `init.peft_base` or its own): merged into its base, unless `lora` (the run's config.lora)
  is given: then the run goes on training the adapter, and its base is the adapter's base.

  `pin` (a LoRA run's workdir): the base is checked against PIN/base.json, whose step is the one
  loaded (not a newer step of a base that kept training); a changed base is a BaseChangedError.
  Without base.json the base is recorded there (process 0) when `write_pin`, else a warning says
  it cannot be checked. The fingerprint is taken before the caller consumes the parameters.
  """
  loaded = _load_init(init, model_cfg, abstract_params, mesh, pin=pin, write_pin=write_pin, lora=lora)
  return None if loaded is None else loaded[0]


def _init_source(init: Any) -> tuple[str, str, Source] | None:
  """(which: 'checkpoint' | 'hf', the path given, its Source) of an `init` block; None when it names nothing."""
  checkpoint, hf_path = init.get("checkpoint", ""), init.get("hf", "")
  if checkpoint and hf_path:
    raise ValueError("config.init: set either init.checkpoint or init.hf, not both")
  if not (checkpoint or hf_path):
    if init.get("peft_base", ""):
      raise ValueError(f"config.init.peft_base={init['peft_base']!r} is set, but config.init.hf names no PEFT "
                       "adapter")
    return None
  which, given = ("checkpoint", checkpoint) if checkpoint else ("hf", hf_path)
  key = f"config.init.{which}"
  src = resolve(given, key=key, base=init.get("peft_base", ""), base_key="config.init.peft_base")
  if which == "checkpoint" and src.kind != "emjax":
    what = "a PEFT adapter" if src.adapter is not None else "a Hugging Face model"
    raise ValueError(f"{key}={given!r} is {what} ({src.directory}); set config.init.hf instead")
  if which == "hf" and src.kind != "hf":
    raise ValueError(f"{key}={given!r} is an emjax checkpoint ({src.directory}); set config.init.checkpoint "
                     "instead")
  return which, given, src


def _load_init(init, model_cfg, abstract_params, mesh, *, pin, write_pin,
               lora=None) -> tuple[dict, Source, int | None] | None:
  """(params, the base's Source, the step read) for load_init_params."""
  named = _init_source(init)
  if named is None:
    return None
  which, given, src = named
  key = f"config.init.{which}"
  pinned = read_pin(pin) if pin else None
  step = None
  if pinned and pinned.get("init") == which and pinned.get("path") == given and pinned.get("step") is not None:
    step = int(pinned["step"])
  if step is not None:
    if step not in src.steps():
      raise BaseChangedError(
          f"{os.path.join(pin, BASE_FILE)}: this LoRA run's base is pinned to step {step} of {given!r}, which is "
          f"no longer there (steps in {src.checkpoints}: {src.steps() or 'none'}); its adapters were trained on "
          "that step")
    src = dataclasses.replace(src, step=step)
  dtypes = {a.dtype for a in jax.tree.leaves(abstract_params)}
  load_cfg = dataclasses.replace(model_cfg, param_dtype=jnp.dtype(dtypes.pop()).name) if len(dtypes) == 1 \
      else model_cfg
  loaded_step = None
  if src.adapter is not None:
    if lora is None:  # its weights: the adapter merged into its base
      w = load_weights(src, mesh=mesh, model_cfg=load_cfg, key=key)
    else:  # the run trains the adapter itself (init_adapters), on the adapter's base
      peft_lib.check_continues(src.adapter.lora, lora, key, src.adapter.where, model_cfg.n_layers)
      w = load_weights(src.adapter.base, mesh=mesh, model_cfg=load_cfg, key=f"{key} (the PEFT adapter's base)")
    # No step is pinned: an adapter names its base by path (a changed base fails the fingerprint).
    params = cast_like(w.params, abstract_params)
  elif src.kind == "hf":
    _check_architecture(src.model_cfg, model_cfg, key, os.path.join(src.directory, "config.json"))
    params = cast_like(hf.load_hf_params(src.directory, load_cfg, mesh=mesh), abstract_params)
  elif src.lora is not None:
    w = load_weights(src, mesh=mesh, model_cfg=load_cfg, key=key)
    params, loaded_step = cast_like(w.params, abstract_params), w.step
  else:
    _check_architecture(src.model_cfg, model_cfg, key, _where_config(src))
    loaded_step, params = read_params(src.checkpoints, abstract_params, step=src.step, label=key)
  if pin and pinned is None and not write_pin:
    log.warning("%s: no %s (the run predates pinned bases): its base %s cannot be checked", pin, BASE_FILE, given)
  elif pin:
    record = {"init": which, "path": given, "resolved": src.directory if src.kind == "hf" else src.checkpoints,
              "step": loaded_step, "dtype": _dtypes(params), "fingerprint": fingerprint(params)}
    if pinned is not None:
      _check_pin(pin, pinned, record)
    else:
      if complete_steps(os.path.join(pin, "checkpoints")):
        log.warning("%s: no %s although the run has checkpoints (it predates pinned bases, or the file was "
                    "removed): pinning the base found now, %s, which cannot be checked against the one those "
                    "checkpoints were trained on", pin, BASE_FILE, given)
      _write_pin(pin, record)
  return params, src, loaded_step


def init_adapters(init: Any, lora: lora_lib.LoRAConfig | None, abstract: Any) -> dict | None:
  """The adapters a LoRA run starts from when `init.hf` is a PEFT adapter (else None: fresh ones).

  Laid out as `abstract` (the train state's `params`: dtypes and shardings); config.lora must be
  the adapter's (load_init_params loads its base).
  """
  named = _init_source(init) if lora is not None else None
  if named is None or named[2].adapter is None:
    return None
  _, _, src = named
  peft_lib.check_continues(src.adapter.lora, lora, "config.init.hf", src.adapter.where, src.model_cfg.n_layers)
  adapters = peft_lib.read_adapters(src.directory, src.model_cfg, src.adapter.lora)
  return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), adapters, abstract)


def cast_like(params: dict, abstract: dict) -> dict:
  """`params` in `abstract`'s dtypes (and shardings, where it has them), one leaf at a time.

  Each converted source leaf is freed as soon as its copy exists, so a tree is
  never held twice; do not use `params` afterwards.
  """
  def cast(x, a):
    sharding = getattr(a, "sharding", None)
    if x.dtype == a.dtype and (sharding is None or getattr(x, "sharding", None) == sharding):
      return x
    if sharding is None:
      y = x.astype(a.dtype)
    else:
      y = jax.jit(lambda v: v.astype(a.dtype), out_shardings=sharding)(x)
    if isinstance(x, jax.Array):
      x.delete()
    return y
  return jax.tree.map(cast, params, abstract)


def _cast_to(params: dict, dtype) -> dict:
  dt = jnp.dtype(dtype)
  return cast_like(params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params))


# ============================================================================ load_weights


@dataclasses.dataclass
class Weights:
  params: dict  # the model's parameters (a nested dict matching transformer.split_model), on the mesh
  model_cfg: transformer.TransformerConfig
  source: Source
  step: int | None  # the emjax step read (a LoRA run: its adapters' step); None for a Hugging Face model

  def describe(self) -> str:
    if self.source.adapter is not None:
      return f"{self.source.path} (a PEFT adapter merged into {self.source.adapter.base_name})"
    if self.source.kind == "hf":
      return f"{self.source.path} (Hugging Face)"
    what = "LoRA adapters merged into their base, " if self.source.lora is not None else ""
    return f"{what}step {self.step} of {self.source.checkpoints}"


def load_weights(path: str | Source, *, mesh=None, dtype: str | None = None, step: int | None = None,
                 model_cfg: transformer.TransformerConfig | None = None, key: str = "", base: str = "",
                 base_key: str = "") -> Weights:
  """The weights at `path`: a Hugging Face directory / hub id, a PEFT adapter (merged into its base:
  `base`, or the one it names), an emjax run, checkpoints/ or step directory.

  `step`: an emjax step (default: the newest readable; a step directory names its own). `dtype`:
  the parameters' dtype (default: the source's `param_dtype`). `model_cfg`: the model to load them
  into; its architecture must be the source's (runtime keys are free); needed for a checkpoint
  without RUN/config.json. A LoRA run's adapters are merged into its pinned base (module docstring).
  `key` names the path in errors (e.g. 'config.sample.checkpoint').
  """
  if isinstance(path, Source):
    src = path if step is None else dataclasses.replace(path, step=int(step))
  else:
    src = resolve(path, step=step, key=key, base=base, base_key=base_key)
  label = _label(key, src.path)
  mesh = mesh if mesh is not None else shd.make_mesh(DEFAULT_MESH)
  if model_cfg is None:
    if src.model_cfg is None:
      raise FileNotFoundError(f"{label}: no config.json in {src.directory} to take the model's architecture from "
                              "(give the model config)")
    cfg = src.model_cfg
  else:
    _check_architecture(src.model_cfg, model_cfg, label, _where_config(src))
    cfg = model_cfg
  if dtype:
    cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)
  if src.adapter is not None:
    base_w = load_weights(src.adapter.base, mesh=mesh, model_cfg=cfg, key=f"{label} (the PEFT adapter's base)")
    adapters = peft_lib.read_adapters(src.directory, cfg, src.adapter.lora)
    rep = shd.replicated(mesh)
    adapters = jax.tree.map(lambda x: jax.device_put(x, rep), adapters)
    params = _merged(base_w.params, adapters, src.adapter.lora, cfg.param_dtype)
    log.info("PEFT adapter %s merged into its base %s", src.directory, base_w.describe())
    return Weights(params, cfg, src, None)
  if src.kind == "hf":
    return Weights(hf.load_hf_params(src.directory, cfg, mesh=mesh), cfg, src, None)
  lora = src.lora
  if lora is None:
    s, params = read_params(src.checkpoints, abstract_params(cfg, mesh), step=src.step, label=label)
    return Weights(params, cfg, src, s)
  # A LoRA run: its checkpoints hold the adapters; the base is its config.init, as pinned.
  run_cfg = src.model_cfg
  base = load_base(src, mesh=mesh)
  s, adapters = read_params(src.checkpoints, lora_lib.adapter_abstract(run_cfg, lora, mesh), step=src.step,
                            label=label, saved_dtypes=True)
  params = _merged(base.params, adapters, lora, cfg.param_dtype)
  log.info("LoRA run %s: adapters of step %d merged into its base %s", src.directory, s, base.describe())
  return Weights(params, cfg, src, s)


def _merged(base: dict, adapters: dict, lora: lora_lib.LoRAConfig, dtype) -> dict:
  """`adapters` merged into `base`, returned in `dtype`."""
  # Merge in the wider of the base's and the requested dtype, so the small update is not rounded away.
  if jnp.dtype(dtype).itemsize >= max(x.dtype.itemsize for x in jax.tree.leaves(base)):
    base = _cast_to(base, dtype)
  return _cast_to(lora_lib.merge_adapters(base, adapters, lora), dtype)


def load_base(path: str | Source, *, mesh=None, dtype: str | None = None) -> Weights:
  """The base an emjax run started from (its `config.init`); a LoRA run's is checked against its pin.

  The base is read in the dtypes the run trained it in (base.json's, else the run's param_dtype),
  so that its fingerprint can be checked, then converted to `dtype` if given.
  """
  src = path if isinstance(path, Source) else resolve(path)
  if src.kind != "emjax" or src.config is None:
    raise ValueError(f"{src.path!r}: only an emjax run (with its config.json) has a base (config.init)")
  init = src.config.get("init", {})
  if not (init.get("checkpoint") or init.get("hf")):
    raise ValueError(f"{src.directory}: the run has neither config.init.checkpoint nor config.init.hf: its base "
                     "weights were random and are not saved, so there is no base to load"
                     + (" (nor anything to merge its LoRA adapters into)" if src.lora is not None else ""))
  mesh = mesh if mesh is not None else shd.make_mesh(DEFAULT_MESH)
  lora = src.lora
  pinned = read_pin(src.directory) if lora is not None else None
  run_cfg = src.model_cfg
  # The dtypes the run held its base in: the pinned ones, else its config's (lora.base_dtype).
  held = pinned.get("dtype") if pinned else (src.config.lora.get("base_dtype") or None) if lora is not None else None
  abstract = abstract_params(run_cfg, mesh, dtypes=held)
  params, base_src, step = _load_init(init, run_cfg, abstract, mesh,
                                      pin=src.directory if lora is not None else None, write_pin=False, lora=lora)
  cfg = run_cfg
  if dtype:
    cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)
    params = _cast_to(params, dtype)
  return Weights(params, cfg, base_src, step)


# ============================================================================ the import / export CLI


def _parse_size(text: str) -> int:
  units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  s = text.strip().upper()
  num = s.rstrip("KMGIB")
  try:
    return int(float(num) * units[s[len(num):]])
  except (ValueError, KeyError):
    raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB, 2GiB, 1000000)") from None


def _copy_tokenizer(src: str, dst: str) -> str | None:
  present = [x for x in hf.TOKENIZER_FILES if os.path.isfile(os.path.join(src, x))]
  if not any(x.startswith("tokenizer") for x in present):
    return None
  os.makedirs(dst, exist_ok=True)
  for x in present + ["config.json"]:
    if os.path.isfile(os.path.join(src, x)):
      shutil.copyfile(os.path.join(src, x), os.path.join(dst, x))
  return dst


def peft_base_name(src: Source) -> str:
  """The base a LoRA run's adapters apply to, as an exported adapter's base_model_name_or_path names it.

  `config.init.hf` as given (a PEFT adapter there: that adapter's base); an emjax checkpoint imported
  from Hugging Face (`import`): what it was imported from; any other emjax base: its path, with a
  warning, since PEFT cannot load it (export it with `export` and name that).
  """
  init = src.config.get("init", {}) if src.config is not None else {}
  named = _init_source(init)
  if named is None:
    raise ValueError(f"{src.directory}: the run has neither config.init.checkpoint nor config.init.hf: its base "
                     "weights were random and are not saved, so its adapters apply to nothing PEFT can load")
  which, given, base = named
  if base.adapter is not None:
    return base.adapter.base_name
  if which == "hf":
    return given
  imported = os.path.join(base.directory, "hf_source.json")
  if base.lora is None and os.path.isfile(imported):
    with open(imported, encoding="utf-8") as f:
      return json.load(f)["source"]
  log.warning("export: the run's base %s is an emjax checkpoint, which PEFT cannot load; base_model_name_or_path "
              "names it as it is (export that base with `python -m emjax.weights export` and give "
              "--base_model_name_or_path)", given)
  return given


def export_peft(path: str | Source, dst: str, *, step: int | None = None, mesh=None, dtype: str | None = None,
                base_model_name_or_path: str = "", tokenizer_dir: str | None = None) -> tuple[str, int]:
  """(DST, the step written): a LoRA run's adapters as a PEFT adapter directory.

  The run's pinned base is loaded and checked first (a changed base is a BaseChangedError), so the
  adapter names the base it was trained on: `base_model_name_or_path`, default `peft_base_name`.
  The tokenizer files of `tokenizer_dir` are copied beside it.
  """
  src = path if isinstance(path, Source) else resolve(path, step=step)
  if step is not None and src.step != step:
    src = dataclasses.replace(src, step=int(step))
  lora = src.lora
  if src.kind != "emjax" or lora is None:
    raise ValueError(f"export --peft: {src.path!r} is not a LoRA run (config.lora.enabled): it holds whole weights, "
                     "not adapters; export it without --peft")
  name = base_model_name_or_path or peft_base_name(src)
  mesh = mesh if mesh is not None else shd.make_mesh(DEFAULT_MESH)
  del load_base(src, mesh=mesh).params  # refuses a base that is not the pinned one
  s, adapters = read_params(src.checkpoints, lora_lib.adapter_abstract(src.model_cfg, lora, mesh), step=src.step,
                            label=src.path, saved_dtypes=True)
  out = peft_lib.export_adapters(adapters, src.model_cfg, lora, dst, base_model_name_or_path=name, dtype=dtype)
  if tokenizer_dir is not None and jax.process_index() == 0:
    for x in hf.TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer_dir, x)):
        shutil.copyfile(os.path.join(tokenizer_dir, x), os.path.join(out, x))
  return out, s


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m emjax.weights",
                                   description="Convert between Hugging Face and emjax checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF directory (or hub id) -> emjax checkpoint (for config.init.checkpoint)")
  imp.add_argument("src", help="Hugging Face model directory or hub id, or a PEFT adapter (merged into its base)")
  imp.add_argument("--peft_base", default="",
                   help="a PEFT adapter's base (default: its adapter_config.json's base_model_name_or_path)")
  imp.add_argument("dst", help="new emjax directory")
  imp.add_argument("--param_dtype", default="float32", help="dtype the parameters are stored in")
  imp.add_argument("--dtype", default="float32", help="compute dtype written to config.model.dtype")
  exp = sub.add_parser("export", help="emjax run, checkpoints/ or step directory -> HF directory (LoRA merged)")
  exp.add_argument("src", help="emjax workdir (config.json + checkpoints/), its checkpoints/ or a step directory")
  exp.add_argument("dst", help="output Hugging Face directory")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
  exp.add_argument("--tokenizer", default=None,
                   help="directory whose tokenizer files to copy (default: the run's data.tokenizer.path if kind=hf)")
  exp.add_argument("--dtype", default=None, help="dtype of the written tensors (default: the parameters')")
  exp.add_argument("--max_shard_size", type=_parse_size, default=hf.DEFAULT_MAX_SHARD_BYTES,
                   help="largest shard, e.g. 5GB or 2GiB")
  exp.add_argument("--peft", action="store_true",
                   help="a LoRA run's adapters alone, as a PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) on the run's base")
  exp.add_argument("--base_model_name_or_path", default="",
                   help="--peft: the base the adapter names (default: the run's config.init.hf, or what its "
                        "emjax base was imported from)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  mesh = shd.make_mesh(DEFAULT_MESH)
  if args.command == "import":
    src = hf.resolve_hf_path(args.src)
    if peft_lib.is_adapter_dir(src):
      w = load_weights(args.src, mesh=mesh, dtype=args.param_dtype, base=args.peft_base, base_key="--peft_base")
      cfg, params = dataclasses.replace(w.model_cfg, dtype=args.dtype), w.params
      tok_cfg = w.source.tokenizer or {}  # the adapter's tokenizer files, else its base's
      src = tok_cfg.get("path") if tok_cfg.get("kind") == "hf" else None
    else:
      if args.peft_base:
        raise ValueError(f"--peft_base={args.peft_base!r} is set, but {args.src} is not a PEFT adapter")
      cfg = hf.config_from_hf(src, param_dtype=args.param_dtype, dtype=args.dtype)
      params = hf.load_hf_params(src, cfg, mesh)
    tokenizer = _copy_tokenizer(src, os.path.join(os.path.abspath(args.dst), "hf")) if src else None
    dst = save_emjax_checkpoint(params, cfg, args.dst, tokenizer_dir=tokenizer, source=args.src)
    print(f"imported {args.src} ({cfg.family}, {cfg.num_params() / 1e6:.1f}M parameters) -> {dst}; "
          f"fine-tune with --config.init.checkpoint={dst}")
    return 0
  if args.base_model_name_or_path and not args.peft:
    raise ValueError("--base_model_name_or_path names the base of a PEFT adapter: it needs --peft")
  source = resolve(args.src, step=args.step)
  tokenizer = args.tokenizer
  if tokenizer is None:
    tok_cfg = source.tokenizer or {}
    if tok_cfg.get("kind") == "hf" and tok_cfg.get("path") and os.path.isdir(tok_cfg["path"]):
      tokenizer = tok_cfg["path"]
    else:
      log.warning("export: no tokenizer directory (give --tokenizer DIR); the output has no tokenizer files")
  if args.peft:
    out, step = export_peft(source, args.dst, mesh=mesh, dtype=args.dtype,
                            base_model_name_or_path=args.base_model_name_or_path, tokenizer_dir=tokenizer)
    print(f"exported the LoRA adapters of step {step} of {source.checkpoints} as a PEFT adapter -> {out}")
    return 0
  w = load_weights(source, mesh=mesh)
  out = hf.export_hf(w.params, w.model_cfg, args.dst, tokenizer, max_shard_bytes=args.max_shard_size,
                     dtype=args.dtype)
  print(f"exported {w.describe()} ({w.model_cfg.family}) -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
