"""The `sample` job: a checkpoint or a Hugging Face model + a JSONL file of prompts -> samples.jsonl.

    python -m emjax.main --config=configs/sample.py --workdir=DIR \\
        --config.sample.checkpoint=TRAIN_WORKDIR --config.prompts=FILE.jsonl
    python -m emjax.main --config=configs/sample.py --workdir=DIR \\
        --config.sample.hf=HF_DIR_OR_HUB_ID --config.sample.chat_template=True --config.prompts=FILE.jsonl

A LoRA run (`config.lora.enabled`) is sampled with its adapters merged into its base
(the run's `config.init`). With `sample.hf`, architecture and tokenizer come from the
Hugging Face directory; `config.model` may only set runtime keys (dtype, ...).

Model and tokenizer: the architecture comes from the checkpoint's workdir
(`TRAIN_WORKDIR/config.json`), so `config.model` need not repeat it. Keys of
`config.model` left at their defaults are taken from the checkpoint; keys set
here may change how the model runs (`RUNTIME_MODEL_KEYS`: dtype, param_dtype,
attention, ...) but an architecture key that disagrees with the checkpoint is
an error. Likewise `config.data.tokenizer`, if left at its default, is the
checkpoint's. Without a `config.json` next to the checkpoint, `config.model`
and `config.data.tokenizer` are used as given.

Output: one JSON line per (prompt id, sample index) with the text, the tokens
(a final stop token included; the text leaves it out), the log-probability of
each token under the model (`logprobs`) and under the distribution sampled
from (`sampled_logprobs`), and the finish reason ('stop' | 'length').

Resumable: every prompt is checked before anything is sampled (bad input fails
early); the lines of each batch are appended, flushed and fsynced together; a
rerun skips prompts whose samples are all written. A line cut by a kill, and
the lines of a prompt with only some samples written, are moved to
`samples.jsonl.incomplete` (kept, never deleted) and that prompt is sampled
again. A prompt's random stream is keyed by its id, so resuming gives the same
samples as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from emjax import config as config_lib
from emjax import sharding as shd
from emjax.models import transformer
from emjax.sample import sampler as sampler_lib

log = logging.getLogger(__name__)

# Model keys that change how the weights are run, not their shapes: a sampling config may set them.
RUNTIME_MODEL_KEYS = ("dtype", "param_dtype", "attention", "scan_layers", "remat")


@dataclasses.dataclass
class Prompt:
  id: Any  # as given in the prompts file
  key: str  # canonical JSON of the id (1 and "1" are different prompts)
  tokens: list[int]

  @property
  def seed(self) -> int:
    return zlib.crc32(self.key.encode())


# ----------------------------------------------------------------------------- checkpoint and model


def resolve_checkpoint(path: str) -> tuple[str, str, int | None]:
  """(checkpoints dir, the training run's workdir, step or None) for a workdir, checkpoints dir or step dir."""
  if not path:
    raise ValueError("config.sample.checkpoint (a training workdir, its checkpoints/ directory, or one step "
                     "directory) or config.sample.hf (a Hugging Face model) is required")
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.sample.checkpoint={path!r} does not exist")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), path, None
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
    ckpt_dir = os.path.dirname(path)
    return ckpt_dir, os.path.dirname(ckpt_dir), int(os.path.basename(path))
  return path, os.path.dirname(path), None


def resolve_model_config(config, run_dir: str) -> tuple[transformer.TransformerConfig, dict]:
  """The model config and tokenizer config: the checkpoint's, with this config's runtime overrides."""
  defaults = dataclasses.asdict(transformer.TransformerConfig())
  default_tokenizer = dict(config_lib.base_config().data.tokenizer)
  given_model, given_tokenizer = dict(config.model), dict(config.data.tokenizer)
  saved_path = os.path.join(run_dir, "config.json")
  if not os.path.exists(saved_path):
    log.warning("no config.json next to the checkpoint (%s): using config.model and config.data.tokenizer "
                "as given", saved_path)
    return transformer.TransformerConfig.from_config(given_model), given_tokenizer
  saved = config_lib.load_config_json(run_dir)
  model = dict(saved.model)
  for key, value in given_model.items():
    if value == defaults.get(key) or model.get(key) == value:
      continue
    if key not in RUNTIME_MODEL_KEYS:
      raise ValueError(f"config.model.{key}={value!r} disagrees with the checkpoint's {model.get(key)!r} "
                       f"({saved_path}); the architecture comes from the checkpoint: leave config.model.{key} "
                       f"unset (only {', '.join(RUNTIME_MODEL_KEYS)} may be overridden)")
    log.info("config.model.%s=%r overrides the checkpoint's %r", key, value, model.get(key))
    model[key] = value
  tokenizer = given_tokenizer if given_tokenizer != default_tokenizer else dict(saved.data.tokenizer)
  return transformer.TransformerConfig.from_config(model), tokenizer


def _step_dirs(ckpt_dir: str) -> list[int]:
  # Orbax names finished steps by their number; a save cut by a kill is a *.orbax-checkpoint-tmp-* dir.
  return sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()), reverse=True)


def abstract_params(model_cfg: transformer.TransformerConfig, mesh) -> dict:
  """ShapeDtypeStructs of the model's parameters, with their shardings on `mesh`."""
  model = transformer.abstract_model(model_cfg)
  _, abstract = transformer.split_model(model)
  shardings = shd.tree_shardings(transformer.param_logical_axes(model), abstract, mesh)
  # dtype from the config: a float32 checkpoint restores as bfloat16 when param_dtype says so.
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_params(ckpt_dir: str, step: int | None, abstract: Any) -> tuple[int, Any]:
  """(step, params) from the newest readable step (or `step`), shaped and laid out as `abstract`.

  Only `state/params` is read (an adapter-only tree for a LoRA run).
  """
  import orbax.checkpoint as ocp

  steps = _step_dirs(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"checkpoint step {step} not found in {ckpt_dir} (steps there: {sorted(steps)})")
    steps = [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint steps in {ckpt_dir}")
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  checkpointer = ocp.PyTreeCheckpointer()
  for s in steps:
    path = os.path.join(ckpt_dir, str(s), "state")
    try:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True))
    except Exception as e:  # noqa: BLE001 -- unreadable: say so, try an older step
      if step is not None:
        raise
      log.error("checkpoint: step %d in %s is unreadable (%s: %s); trying an older one", s, ckpt_dir,
                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      continue
    return s, restored["params"]
  raise FileNotFoundError(f"no readable checkpoint step in {ckpt_dir} (tried {steps})")


def load_run_weights(ckpt_dir: str, run_dir: str, step: int | None, model_cfg: transformer.TransformerConfig,
                     mesh) -> tuple[int, dict]:
  """(step, params) of a training run; a LoRA run's adapters are merged into its base weights.

  A LoRA run checkpoints its adapters only: the base is the run's `config.init` (an emjax
  checkpoint or a Hugging Face model), read with `model_cfg` (runtime overrides included).
  """
  abstract = abstract_params(model_cfg, mesh)
  saved = config_lib.load_config_json(run_dir) if os.path.isfile(os.path.join(run_dir, "config.json")) else None
  lora_saved = saved.get("lora") if saved is not None else None
  if not lora_saved or not lora_saved.get("enabled", False):
    return restore_params(ckpt_dir, step, abstract)
  from emjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from emjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from emjax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  lora_cfg = lora_lib.LoRAConfig.from_config(lora_saved)
  restored_step, adapters = restore_params(ckpt_dir, step, state_lib.adapter_abstract(model_cfg, lora_cfg, mesh))
  init = saved.get("init", {})
  base = ckpt_lib.load_init_params(init, model_cfg, abstract, mesh)
  if base is None:
    raise ValueError(f"{run_dir}: a LoRA run without config.init.checkpoint or config.init.hf: its base "
                     "weights were random and are not saved, so there is nothing to sample from")
  log.info("LoRA run: adapters of step %d merged into the base from %s", restored_step,
           init.get("checkpoint", "") or init.get("hf", ""))
  return restored_step, lora_lib.merge_lora(state_lib.merge_trees(base, adapters), lora_cfg)


def resolve_hf_model(config) -> tuple[transformer.TransformerConfig, dict]:
  """Model and tokenizer configs for `config.sample.hf` (a Hugging Face directory or hub id)."""
  from emjax.models import hf as hf_lib  # pylint: disable=g-import-not-at-top

  path = config.sample.hf
  defaults = dataclasses.asdict(transformer.TransformerConfig())
  overrides = {k: v for k, v in dict(config.model).items() if v != defaults.get(k)}
  not_runtime = sorted(set(overrides) - set(hf_lib.RUNTIME_KEYS))
  if not_runtime:
    raise ValueError(f"config.model.{not_runtime[0]} is set, but with config.sample.hf the architecture comes "
                     f"from {path}/config.json; only {', '.join(hf_lib.RUNTIME_KEYS)} may be overridden")
  model_cfg = hf_lib.config_from_hf(path, **overrides)
  tokenizer = dict(config.data.tokenizer)
  if tokenizer == dict(config_lib.base_config().data.tokenizer):  # left at its default: the model's own
    tokenizer.update(kind="hf", path=path)
  return model_cfg, tokenizer


# ----------------------------------------------------------------------------- prompts


def _encode_record(record: Mapping, tokenizer, sc, where: str) -> list[int]:
  if "messages" in record:
    messages = record["messages"]
    if not sc.chat_template:
      raise ValueError(f"{where}: has 'messages' but config.sample.chat_template is False")
    if not messages:
      raise ValueError(f"{where}: 'messages' is empty")
    return apply_chat_template(tokenizer, messages)
  if "prompt" not in record:
    raise ValueError(f"{where}: needs a 'prompt' (text) or 'messages' (chat) field")
  text = record["prompt"]
  if not isinstance(text, str):
    raise ValueError(f"{where}: 'prompt' must be a string, got {type(text).__name__}")
  if not text:
    raise ValueError(f"{where}: the prompt is empty")
  if sc.chat_template:
    return apply_chat_template(tokenizer, [{"role": "user", "content": text}])
  return ([tokenizer.bos_id] if sc.add_bos else []) + list(tokenizer.encode(text))


def apply_chat_template(tokenizer, messages) -> list[int]:
  """Token ids of `messages` + the assistant turn's opening, via the HF tokenizer's chat template."""
  hf = getattr(tokenizer, "hf_tokenizer", None)
  if hf is None:
    raise ValueError(f"config.sample.chat_template=True needs a Hugging Face tokenizer "
                     f"(data.tokenizer.kind='hf'); this one is {tokenizer!r}")
  if not getattr(hf, "chat_template", None):
    raise ValueError(f"config.sample.chat_template=True but the tokenizer {tokenizer!r} has no chat template")
  ids = hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
  if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
    ids = ids["input_ids"]
  return [int(i) for i in ids]


def read_prompts(path: str, tokenizer, sc, max_length: int) -> list[Prompt]:
  """Every prompt of the file, tokenized and checked (empty, too long, duplicate ids: errors)."""
  if not path:
    raise ValueError("config.prompts is required: a JSONL file with {\"id\": ..., \"prompt\": ...} per line")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.prompts={path!r} does not exist")
  prompts, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or "id" not in record:
        raise ValueError(f"{where}: each line must be a JSON object with an 'id'")
      key = json.dumps(record["id"], sort_keys=True)
      if key in seen:
        raise ValueError(f"{where}: duplicate prompt id {record['id']!r} (first on line {seen[key]})")
      seen[key] = lineno
      where = f"{where} (id {record['id']!r})"
      tokens = _encode_record(record, tokenizer, sc, where)
      if not tokens:
        raise ValueError(f"{where}: the prompt is empty after tokenization")
      if len(tokens) > max_length:
        raise ValueError(f"{where}: the prompt has {len(tokens)} tokens, more than the largest prompt bucket "
                         f"({max_length}; config.sample.max_prompt_length / prompt_buckets)")
      prompts.append(Prompt(record["id"], key, tokens))
  if not prompts:
    raise ValueError(f"config.prompts={path!r} has no prompts")
  return prompts


# ----------------------------------------------------------------------------- output file


def recover_output(path: str, n: int) -> set[str]:
  """Keys of prompts whose n samples are all in `path`; anything else there is moved aside.

  Kept: complete lines of prompts with samples 0..n-1 all present (first copy of each). Moved to
  `path + ".incomplete"`: a last line cut by a kill, unparsable lines, and the lines of prompts with
  only some of their samples (they are sampled again, identically).
  """
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  chunks = data.split(b"\n")
  tail = chunks.pop()  # b"" when the file ends with a newline; otherwise a line cut by a kill
  parsed, bad = [], [tail + b"\n"] if tail else []
  for raw in chunks:
    try:
      row = json.loads(raw)
      parsed.append((json.dumps(row["id"], sort_keys=True), int(row["sample"]), raw))
    except (ValueError, KeyError, TypeError):
      bad.append(raw + b"\n")
  have: dict[str, set[int]] = {}
  for key, j, _ in parsed:
    have.setdefault(key, set()).add(j)
  complete = {key for key, js in have.items() if set(range(n)) <= js}
  keep, seen = [], set()
  for key, j, raw in parsed:
    if key in complete and (key, j) not in seen:
      seen.add((key, j))
      keep.append(raw + b"\n")
    else:
      bad.append(raw + b"\n")
  if bad:
    with open(path + ".incomplete", "ab") as f:
      f.writelines(bad)
      f.flush()
      os.fsync(f.fileno())
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    log.warning("%s: moved %d incomplete or cut line(s) to %s.incomplete; those prompts are sampled again",
                path, len(bad), path)
  return complete


def output_lines(batch: list[Prompt], out: sampler_lib.SampleOutput, tokenizer) -> list[str]:
  lines = []
  for i, prompt in enumerate(batch):
    for j in range(out.lengths.shape[1]):
      row = out.sample(i, j)
      text_tokens = row["tokens"][:-1] if row["finish_reason"] == sampler_lib.FINISH_STOP else row["tokens"]
      record = {"id": prompt.id, "sample": j, "text": tokenizer.decode(text_tokens),
                "finish_reason": row.pop("finish_reason"), "prompt_tokens": len(prompt.tokens), **row}
      lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  return lines


# ----------------------------------------------------------------------------- the job


def sampling_params(sc, tokenizer) -> sampler_lib.SamplingParams:
  stop = [int(t) for t in sc.stop_token_ids]
  if sc.stop_at_eos and tokenizer.eos_id not in stop:
    stop.append(int(tokenizer.eos_id))
  return sampler_lib.SamplingParams(
      max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature), top_k=int(sc.top_k),
      top_p=float(sc.top_p), min_p=float(sc.min_p), n=int(sc.n), seed=int(sc.seed), stop_token_ids=tuple(stop))


def run_sampling(config, workdir: str, *, mesh=None) -> dict:
  """Sample every prompt of `config.prompts` not yet in WORKDIR/`config.sample.output`; returns a summary."""
  from emjax.data import tokenizers

  sc = config.sample
  config_lib.validate(config)
  for key in ("batch_size", "n", "max_new_tokens"):
    if int(sc[key]) < 1:
      raise ValueError(f"config.sample.{key} must be >= 1, got {sc[key]}")
  if sc.hf and sc.checkpoint:
    raise ValueError("config.sample.hf and config.sample.checkpoint are both set: sample from one of them")
  if sc.hf:
    model_cfg, tokenizer_cfg = resolve_hf_model(config)
  else:
    ckpt_dir, run_dir, step = resolve_checkpoint(sc.checkpoint)
    if os.path.abspath(workdir) == run_dir:
      raise ValueError(f"--workdir must not be the checkpoint's own workdir ({run_dir}): its config.json "
                       "describes the training run; pick another directory for the samples")
    if int(sc.step) >= 0:
      step = int(sc.step)
    model_cfg, tokenizer_cfg = resolve_model_config(config, run_dir)
  tokenizer = tokenizers.load_tokenizer(tokenizer_cfg)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                     f"({model_cfg.vocab_size})")
  buckets = tuple(sc.prompt_buckets) or sampler_lib.make_buckets(int(sc.max_prompt_length))
  sampling = sampling_params(sc, tokenizer)
  cap = int(sc.max_new_tokens_cap) or sampling.max_new_tokens
  sampling.validate(model_cfg.vocab_size, cap)  # bad stop ids etc. fail before any work
  prompts = read_prompts(config.prompts, tokenizer, sc, max(buckets))

  os.makedirs(workdir, exist_ok=True)
  config_lib.write_config(config, workdir)
  out_path = os.path.join(workdir, sc.output)
  done = recover_output(out_path, sampling.n)
  pending = [p for p in prompts if p.key not in done]
  summary = {"prompts": len(prompts), "already_written": len(prompts) - len(pending), "sampled": 0,
             "new_tokens": 0, "output": out_path}
  if not pending:
    log.info("all %d prompts already in %s", len(prompts), out_path)
    return summary

  mesh = mesh or shd.make_mesh(config.mesh)
  sampler = sampler_lib.Sampler(model_cfg, mesh=mesh, prompt_buckets=buckets, max_new_tokens_cap=cap,
                                prefill_chunk=int(sc.prefill_chunk), top_logprobs=int(sc.top_logprobs),
                                unroll_layers=bool(sc.unroll_layers))
  if sc.hf:
    from emjax.models import hf as hf_lib  # pylint: disable=g-import-not-at-top
    restored_step, params, source = None, hf_lib.load_hf_params(sc.hf, model_cfg, mesh=mesh), sc.hf
  else:
    restored_step, params = load_run_weights(ckpt_dir, run_dir, step, model_cfg, mesh)
    source = f"step {restored_step} of {ckpt_dir}"
  log.info("sampling %d prompts (%d already written) with %s", len(pending), len(done), source)
  weights = sampler.prepare_weights(params)
  del params  # only the sampling layout is needed from here on

  # Batches of prompts sharing a bucket, so each batch pads to the smallest shape that holds it.
  by_bucket: dict[int, list[Prompt]] = {}
  for p in pending:
    by_bucket.setdefault(sampler.bucket_for(len(p.tokens)), []).append(p)
  batch_size, t0 = int(sc.batch_size), time.perf_counter()
  with open(out_path, "a", encoding="utf-8") as f:
    for bucket in sorted(by_bucket):
      group = by_bucket[bucket]
      for start in range(0, len(group), batch_size):
        batch = group[start:start + batch_size]
        out = sampler.generate(weights, [p.tokens for p in batch], sampling, prompt_seeds=[p.seed for p in batch],
                               pad_batch_to=batch_size)
        if jax.process_index() == 0:
          f.write("".join(output_lines(batch, out, tokenizer)))
          f.flush()
          os.fsync(f.fileno())
        summary["sampled"] += len(batch)
        summary["new_tokens"] += int(np.sum(out.lengths))
        elapsed = time.perf_counter() - t0
        log.info("sampled %d/%d prompts (%.0f new tokens/s)", summary["sampled"], len(pending),
                 summary["new_tokens"] / elapsed)
  summary["seconds"] = time.perf_counter() - t0
  summary["checkpoint_step"] = restored_step
  summary["model"] = source
  log.info("done: %s", summary)
  return summary
