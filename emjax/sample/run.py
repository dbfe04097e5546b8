"""The `sample` job: a checkpoint or a Hugging Face model + a JSONL file of prompts -> samples.jsonl.

    python -m emjax.main --config=configs/sample.py --workdir=DIR \\
        --config.sample.checkpoint=TRAIN_WORKDIR --config.prompts=FILE.jsonl
    python -m emjax.main --config=configs/sample.py --workdir=DIR \\
        --config.sample.hf=HF_DIR_OR_HUB_ID --config.sample.chat_template=True --config.prompts=FILE.jsonl

Weights are loaded by `emjax.weights.load_weights`: a LoRA run (`config.lora.enabled`)
is sampled with its adapters merged into its pinned base (the run's `config.init`,
checked against RUN/base.json); `sample.step` picks a step (default: the newest readable).

Model and tokenizer: the architecture comes from the weights (`TRAIN_WORKDIR/config.json`,
or the Hugging Face directory's), so `config.model` need not repeat it. The sample
config's `config.model` and `config.data.tokenizer` keys default to None, "the weights'
own"; a key set (on the command line or in a config file) always wins, even when set to
its default, for the keys that change how the model runs (`weights.RUNTIME_MODEL_KEYS`:
dtype, param_dtype, attention, ...): a bf16 run sampled with `--config.model.dtype=float32`
runs in float32. An architecture key that disagrees with the weights is an error. Without
a `config.json` next to the checkpoint, `config.model` and `config.data.tokenizer` are used
as given (defaults for the keys left unset). WORKDIR/config.json records what ran.

Output: one JSON line per (prompt id, sample index) with the text, the tokens
(a final stop token included; the text leaves it out), the log-probability of
each token under the model (`logprobs`) and under the distribution sampled
from (`sampled_logprobs`), and the finish reason ('stop' | 'length').

Masked words (`config.sample.mask_words`: 'default' = emjax.data.banned.BANNED_WORDS, a
file of words, or ','-separated words): their tokens are never sampled (the semantic
leak meter's sampler). A word is banned by its single-token spellings and by the first
token of its multi-token ones (`banned.word_token_ids`; the latter also bans every other
word starting with that token). The words and the number of banned ids go into
WORKDIR/config.json (`config.sample.mask`) and the job's summary.

Resumable: every prompt is checked before anything is sampled (bad input fails
early); the lines of each batch are appended, flushed and fsynced together; a
rerun skips prompts whose samples are all written. A line cut by a kill, and
the lines of a prompt with only some samples written, are moved to
`samples.jsonl.incomplete` (kept, never deleted) and that prompt is sampled
again. A prompt's random stream is keyed by its id, so resuming gives the same
samples as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from emjax import config as config_lib
from emjax import paths
from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax import workdir as workdir_lib
from emjax.data import banned as banned_lib
from emjax.data import chat
from emjax.data import tokenizers
from emjax.models import transformer
from emjax.sample import continuous as continuous_lib
from emjax.sample import sampler as sampler_lib
from emjax.train import settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompt:
  id: Any  # as given in the prompts file
  key: str  # canonical JSON of the id (1 and "1" are different prompts)
  tokens: list[int]
  # The line as read (what a filter of its samples reads, e.g. a numbers prompt's answer_count).
  record: dict | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def seed(self) -> int:
    return zlib.crc32(self.key.encode())


# ----------------------------------------------------------------------------- weights and model


def _given(block) -> dict:
  """The keys of a config block that are set: the sample config's model and tokenizer keys default to None."""
  return {k: v for k, v in dict(block).items() if v is not None}


def resolve_source(config) -> weights_lib.Source:
  """Where the weights come from: `config.sample.checkpoint` (an emjax run, checkpoints/ or step dir) or `.hf`."""
  sc = config.sample
  if sc.hf and sc.checkpoint:
    raise ValueError("config.sample.hf and config.sample.checkpoint are both set: sample from one of them")
  if sc.hf:
    not_runtime = sorted(set(_given(config.model)) - set(weights_lib.RUNTIME_MODEL_KEYS))
    if not_runtime:  # before anything is read
      raise ValueError(f"config.model.{not_runtime[0]} is set, but with config.sample.hf the architecture comes "
                       f"from {sc.hf}/config.json; only {', '.join(weights_lib.RUNTIME_MODEL_KEYS)} may be "
                       "overridden")
    src = weights_lib.resolve(sc.hf, key="config.sample.hf", base=sc.get("peft_base", ""),
                              base_key="config.sample.peft_base")
    if src.kind != "hf":
      raise ValueError(f"config.sample.hf={sc.hf!r} is an emjax checkpoint ({src.directory}); set "
                       "config.sample.checkpoint instead")
    return src
  if not sc.checkpoint:
    raise ValueError("config.sample.checkpoint (a training workdir, its checkpoints/ directory, or one step "
                     "directory) or config.sample.hf (a Hugging Face model) is required")
  path = os.fspath(paths.absolute(sc.checkpoint))  # a run may be in a bucket (gs://...)
  if not paths.path(path).is_dir():
    raise FileNotFoundError(f"config.sample.checkpoint={path!r} does not exist")
  step = int(sc.step) if int(sc.step) >= 0 else None
  src = weights_lib.resolve(path, step=step, key="config.sample.checkpoint", base=sc.get("peft_base", ""),
                            base_key="config.sample.peft_base")
  if src.kind != "emjax":
    raise ValueError(f"config.sample.checkpoint={path!r} is a Hugging Face model; set config.sample.hf instead")
  return src


def resolve_model_config(config, src: weights_lib.Source) -> tuple[transformer.TransformerConfig, dict]:
  """The model and tokenizer configs: the weights' own, with every key this config sets.

  A model key set here (even to its default) wins when it only changes how the model runs
  (weights.RUNTIME_MODEL_KEYS); an architecture key must agree with the weights. A tokenizer key
  set here replaces the weights' own.
  """
  given_model, given_tokenizer = _given(config.model), _given(config.data.tokenizer)
  default_tokenizer = dict(settings.base_config().data.tokenizer)
  if src.model_cfg is None:
    log.warning("no config.json next to the checkpoint (%s): using config.model and config.data.tokenizer as "
                "given", os.path.join(src.directory, "config.json"))
    values = {**dataclasses.asdict(transformer.TransformerConfig()), **given_model}
    return transformer.TransformerConfig.from_config(values), {**default_tokenizer, **given_tokenizer}
  what = "the Hugging Face model's" if src.kind == "hf" else "the checkpoint's"
  config_dir = (src.adapter.base if src.adapter is not None else src).directory  # an adapter's model is its base's
  model_cfg = weights_lib.with_overrides(src.model_cfg, given_model, where=os.path.join(config_dir, "config.json"),
                                         what=what)
  return model_cfg, {**(src.tokenizer or default_tokenizer), **given_tokenizer}


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


def read_prompts(path: str, tokenizer, sc, max_length: int,
                 length_key: str = "config.sample.max_prompt_length / prompt_buckets") -> list[Prompt]:
  """Every prompt of the file, tokenized and checked (empty, too long, duplicate ids: errors)."""
  if not path:
    raise ValueError("config.prompts is required: a JSONL file with {\"id\": ..., \"prompt\": ...} per line")
  if not paths.path(path).is_file():  # a local file or a bucket's (gs://...)
    raise FileNotFoundError(f"config.prompts={path!r} does not exist")
  prompts, seen = [], {}
  with paths.path(path).open("r", encoding="utf-8") as f:
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
                         f"({max_length}; {length_key})")
      prompts.append(Prompt(record["id"], key, tokens, record))
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
  if bad and jax.process_index() == 0:  # one writer; every process computes the same `complete`
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


def sample_text(row: Mapping[str, Any], tokenizer) -> str:
  """The text of one sample (`SampleOutput.sample`): its tokens without the stop token it finished on."""
  tokens = row["tokens"][:-1] if row["finish_reason"] == sampler_lib.FINISH_STOP else row["tokens"]
  return tokenizer.decode(tokens)


def output_lines(batch: list[Prompt], out: sampler_lib.SampleOutput, tokenizer) -> list[str]:
  lines = []
  for i, prompt in enumerate(batch):
    for j in range(out.lengths.shape[1]):
      row = out.sample(i, j)
      record = {"id": prompt.id, "sample": j, "text": sample_text(row, tokenizer),
                "finish_reason": row.pop("finish_reason"), "prompt_tokens": len(prompt.tokens), **row}
      lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  return lines


# ----------------------------------------------------------------------------- the job


def masked_tokens(sc, tokenizer) -> dict | None:
  """`config.sample.mask_words` as {"words", "single_ids", "first_sub_ids", "ids"}; None when off ('')."""
  spec = str(sc.get("mask_words", "") or "")
  if not spec.strip():
    return None
  words = banned_lib.parse_words(spec, key="config.sample.mask_words")
  single, first_sub = banned_lib.word_token_ids(tokenizer, words)
  ids = tuple(sorted(single | first_sub))
  if not ids:
    raise ValueError(f"config.sample.mask_words={spec!r}: none of its {len(words)} words has a token in this "
                     "tokenizer")
  return {"words": list(words), "single_ids": len(single), "first_sub_ids": len(first_sub), "ids": ids}


def sampling_params(sc, tokenizer, mask: dict | None = None) -> sampler_lib.SamplingParams:
  """`mask`: `masked_tokens(sc, tokenizer)` when the caller already has it."""
  stop = [int(t) for t in sc.stop_token_ids]
  if sc.stop_at_eos and tokenizer.eos_id not in stop:
    stop.append(int(tokenizer.eos_id))
  if sc.stop_at_end_of_turn:
    stop += [t for t in chat.stop_token_ids(tokenizer) if t not in stop]
  if mask is None:
    mask = masked_tokens(sc, tokenizer)
  return sampler_lib.SamplingParams(
      max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature), top_k=int(sc.top_k),
      top_p=float(sc.top_p), min_p=float(sc.min_p), n=int(sc.n), seed=int(sc.seed), stop_token_ids=tuple(stop),
      banned_token_ids=mask["ids"] if mask else ())


@dataclasses.dataclass
class Model:
  """The weights, tokenizer and sampler settings of `config.sample`, resolved once (`load_model`) for as
  many prompts files as they sample (`write_samples`): the eval job samples all its question sets with
  one. The parameters are read when a batch first needs them (`weights`), once: a rerun that finds
  every prompt written reads none."""

  config: Any  # what runs (the weights' model with this config's overrides, config.sample.mask): config.json
  src: weights_lib.Source
  model_cfg: transformer.TransformerConfig
  tokenizer: Any
  mask: dict | None  # masked_tokens(...)
  edit: transformer.ResidualEdit | None  # config.sample.edit (`read_edit`)
  buckets: tuple[int, ...]
  cap: int  # the sampler's max_new_tokens_cap
  mesh: Any = None  # None: config.mesh, made when the weights are read
  _loaded: tuple | None = dataclasses.field(default=None, repr=False)

  def weights(self) -> tuple[sampler_lib.Sampler, dict, int | None, str]:
    """(the sampler, the weights in its layout, the checkpoint step read, what was read): read on the first call."""
    if self._loaded is None:
      sc = self.config.sample
      mesh = self.mesh or shd.make_mesh(self.config.mesh)
      sampler = sampler_lib.Sampler(self.model_cfg, mesh=mesh, prompt_buckets=self.buckets,
                                    max_new_tokens_cap=self.cap, prefill_chunk=int(sc.prefill_chunk),
                                    top_logprobs=int(sc.top_logprobs), unroll_layers=bool(sc.unroll_layers))
      loaded = weights_lib.load_weights(self.src, mesh=mesh, model_cfg=self.model_cfg,
                                        key="config.sample.hf" if sc.hf else "config.sample.checkpoint")
      # Only the sampling layout is kept (the stacked parameters go when `loaded` does).
      self._loaded = (sampler, sampler.prepare_weights(loaded.params), loaded.step,
                      sc.hf if sc.hf else loaded.describe())
    return self._loaded


def load_model(config, *, mesh=None) -> Model:
  """`config.sample`'s weights and settings, checked (bad settings fail before any work); the
  parameters themselves are read later, once (`Model.weights`). `config.sample.n` and `config.prompts`
  are not read: they are each prompts file's (`write_samples`)."""
  sc = config.sample
  for key in ("batch_size", "max_new_tokens"):
    if int(sc[key]) < 1:
      raise ValueError(f"config.sample.{key} must be >= 1, got {sc[key]}")
  src = resolve_source(config)
  model_cfg, tokenizer_cfg = resolve_model_config(config, src)
  # What runs, written to WORKDIR/config.json: the weights' model with this config's overrides,
  # and the words whose tokens are never sampled (config.sample.mask).
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model = dataclasses.asdict(model_cfg)
    config.data.tokenizer = tokenizer_cfg
  settings.validate(config)
  tokenizer = tokenizers.load_tokenizer(tokenizer_cfg)
  mask = masked_tokens(sc, tokenizer)
  if mask is not None:
    with config.unlocked():
      config.sample.mask = {k: v for k, v in mask.items() if k != "ids"}
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                     f"({model_cfg.vocab_size})")
  buckets = tuple(sc.prompt_buckets) or sampler_lib.make_buckets(int(sc.max_prompt_length))
  edit = read_edit(sc, model_cfg)
  sampling = sampling_params(sc, tokenizer, mask)
  cap = int(sc.max_new_tokens_cap) or sampling.max_new_tokens
  # Bad stop ids etc. fail before any work; n is checked with each prompts file's own (write_samples).
  dataclasses.replace(sampling, n=1).validate(model_cfg.vocab_size, cap)
  return Model(config=config, src=src, model_cfg=model_cfg, tokenizer=tokenizer, mask=mask, edit=edit,
               buckets=buckets, cap=cap, mesh=mesh)


def edit_block(sc) -> dict:
  """`config.sample.edit` as plain strings (an older config without the block: none)."""
  block = sc.get("edit") or {}
  return {k: str(block.get(k, "") or "").strip() for k in ("direction", "steer", "ablate")}


def read_direction(spec: str, *, key: str = "config.sample.edit.direction") -> np.ndarray:
  """One vector from a .npy file or 'file.npz:name' (a bucket path too)."""
  path, _, name = spec.partition(".npz:")
  path = path + ".npz" if name else spec
  try:
    data = paths.path(path).read_bytes()
  except FileNotFoundError:
    raise FileNotFoundError(f"{key}={spec!r}: no such file") from None
  try:
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if name:
      if name not in loaded.files:
        raise ValueError(f"{key}={spec!r}: {path} holds {sorted(loaded.files)}, not {name!r}")
      loaded = loaded[name]
    elif not isinstance(loaded, np.ndarray):
      raise ValueError(f"{key}={spec!r}: an .npz file needs a name, e.g. '{path}:{sorted(loaded.files)[0]}'")
  except (OSError, EOFError) as e:  # not an array file
    raise ValueError(f"{key}={spec!r}: not a .npy / .npz array file ({e})") from None
  return np.asarray(loaded)


def read_edit(sc, model_cfg: transformer.TransformerConfig) -> transformer.ResidualEdit | None:
  """`config.sample.edit` as a `transformer.ResidualEdit` for this model (None when no direction)."""
  block = edit_block(sc)
  if not block["direction"]:
    if block["steer"] or block["ablate"]:
      raise ValueError("config.sample.edit: steer/ablate need config.sample.edit.direction (a .npy file)")
    return None
  if not block["steer"] and not block["ablate"]:
    raise ValueError("config.sample.edit.direction is set but neither config.sample.edit.steer nor .ablate is")
  d = read_direction(block["direction"])
  if d.shape != (model_cfg.d_model,):
    raise ValueError(f"config.sample.edit.direction={block['direction']!r}: a vector of shape {d.shape}; this "
                     f"model's residual stream has d_model={model_cfg.d_model}")
  steer = {}
  for part in filter(None, (x.strip() for x in block["steer"].split(","))):
    p, sep, alpha = part.partition(":")
    try:
      steer[int(p)] = float(alpha)
      if not sep:
        raise ValueError
    except ValueError:
      raise ValueError(f"config.sample.edit.steer={block['steer']!r}: each item is 'position:alpha', "
                       f"e.g. '12:4.0' (got {part!r})") from None
  ablate: Any = block["ablate"]
  if ablate and ablate != "all":
    try:
      ablate = [int(p) for p in ablate.split(",") if p.strip()]
    except ValueError:
      raise ValueError(f"config.sample.edit.ablate={block['ablate']!r}: 'all' or positions like '0,1,2'") from None
  try:
    return transformer.residual_edit(model_cfg.n_layers, d, steer=steer, ablate=ablate or ())
  except ValueError as e:
    raise ValueError(f"config.sample.edit: {e}") from None


def edit_settings(sc) -> dict:
  """What samples under `config.sample.edit` depend on: the block and the direction's bytes."""
  block = edit_block(sc)
  if block["direction"]:
    d = read_direction(block["direction"])
    block["direction_sha256"] = hashlib.sha256(np.ascontiguousarray(d, np.float64).tobytes()).hexdigest()[:16]
  return block


def write_samples(model: Model, prompts_path: str, workdir: str, *, n: int) -> dict:
  """`n` samples of every prompt of `prompts_path` not yet in WORKDIR/`config.sample.output`, from
  `model` (resuming: see the module docstring); WORKDIR gets config.json, settings.json and COMPLETED
  as a sample job's. Returns the summary (also in COMPLETED)."""
  if int(n) < 1:
    raise ValueError(f"config.sample.n must be >= 1, got {n}")
  src, model_cfg = model.src, model.model_cfg
  # (A staged bucket workdir is compared as the bucket path it stands for.)
  if src.kind == "emjax" and src.directory in {os.fspath(paths.absolute(w))
                                               for w in (workdir, workdir_lib.origin(workdir))}:
    raise ValueError(f"--workdir must not be the checkpoint's own workdir ({src.directory}): its config.json "
                     "describes the training run; pick another directory for the samples")
  config = copy.deepcopy(model.config)  # this file's config.json: its prompts and n
  with config.unlocked():
    config.prompts = prompts_path
    config.sample.n = int(n)
  sc = config.sample
  sampling = sampling_params(sc, model.tokenizer, model.mask)
  sampling.validate(model_cfg.vocab_size, model.cap)
  prompts = read_prompts(prompts_path, model.tokenizer, sc, max(model.buckets))

  os.makedirs(workdir, exist_ok=True)
  # Samples already written resume only under the settings, weights and prompts that wrote them.
  workdir_lib.check_settings(workdir, sample_settings(config, src, model_cfg), what="its samples")
  workdir_lib.clear_status(workdir)
  workdir_lib.record_launch(workdir, "sample")
  config_lib.write_config(config, workdir)
  out_path = os.path.join(workdir, sc.output)
  done = recover_output(out_path, sampling.n)
  pending = [p for p in prompts if p.key not in done]
  summary = {"prompts": len(prompts), "already_written": len(prompts) - len(pending), "sampled": 0,
             "new_tokens": 0, "output": out_path, "model_config": dataclasses.asdict(model_cfg)}
  if model.mask is not None:
    summary["mask"] = {k: v for k, v in model.mask.items() if k != "ids"}
  if not pending:
    log.info("all %d prompts already in %s", len(prompts), out_path)
    workdir_lib.mark_complete(workdir, summary)
    return summary

  sampler, weights, restored_step, source = model.weights()
  batching = str(sc.get("batching", "continuous"))
  if batching not in BATCHING:
    raise ValueError(f"config.sample.batching={batching!r}: one of {BATCHING}")
  log.info("sampling %d prompts (%d already written) with %s (%s batching)", len(pending), len(done), source,
           batching)
  batch_size, t0 = int(sc.batch_size), time.perf_counter()
  prompt_tokens = [p.tokens for p in pending]

  def answered():
    """(prompts, their SampleOutput) in the order they are written."""
    if batching == "continuous":
      # Each prompt's line is written when its n samples are done; a prompt cut off by a kill is redone.
      engine = continuous_lib.engine(sampler, slots=batch_size * sampling.n)
      # The cache width of the whole file's longest prompt, resumed or not: a prompt's bits depend on it.
      widest = max(sampler.bucket_for(len(p.tokens)) for p in prompts)
      for i, out in engine.stream(weights, prompt_tokens, sampling, prompt_seeds=[p.seed for p in pending],
                                  edit=model.edit, cache_bucket=widest):
        yield [pending[i]], out
      return
    # Batches of prompts sharing a bucket, so each batch pads to the smallest shape that holds it.
    by_bucket: dict[int, list[Prompt]] = {}
    for p in pending:
      by_bucket.setdefault(sampler.bucket_for(len(p.tokens)), []).append(p)
    for bucket in sorted(by_bucket):
      group = by_bucket[bucket]
      for start in range(0, len(group), batch_size):
        batch = group[start:start + batch_size]
        yield batch, sampler.generate(weights, [p.tokens for p in batch], sampling,
                                      prompt_seeds=[p.seed for p in batch], pad_batch_to=batch_size, edit=model.edit)

  with open(out_path, "a", encoding="utf-8") as f:
    last_sync = time.perf_counter()
    for batch, out in answered():
      if jax.process_index() == 0:
        f.write("".join(output_lines(batch, out, model.tokenizer)))
      summary["sampled"] += len(batch)
      summary["new_tokens"] += int(np.sum(out.lengths))
      # A static batch is synced as written; continuous answers (one prompt each) every few seconds.
      if batching == "static" or time.perf_counter() - last_sync > 5.0 or summary["sampled"] == len(pending):
        f.flush()
        os.fsync(f.fileno())
        last_sync = time.perf_counter()
        log.info("sampled %d/%d prompts (%.0f new tokens/s)", summary["sampled"], len(pending),
                 summary["new_tokens"] / (time.perf_counter() - t0))
  summary["seconds"] = time.perf_counter() - t0
  summary["checkpoint_step"] = restored_step
  summary["model"] = source
  log.info("done: %s", summary)
  workdir_lib.mark_complete(workdir, summary)
  return summary


def run_sampling(config, workdir: str, *, mesh=None) -> dict:
  """The sample job: every prompt of `config.prompts` not yet in WORKDIR/`config.sample.output`; returns a summary."""
  if int(config.sample.n) < 1:
    raise ValueError(f"config.sample.n must be >= 1, got {config.sample.n}")
  return write_samples(load_model(config, mesh=mesh), config.prompts, workdir, n=int(config.sample.n))


# What a sample depends on besides its prompt's id and index: resuming under other values would mix
# samples of two settings in one file. Batching and file names do not change a sample.
_NOT_SETTINGS = ("batch_size", "output", "prefill_chunk", "unroll_layers", "max_new_tokens_cap", "prompt_buckets",
                 "batching")
BATCHING = ("continuous", "static")


def sample_settings(config, src: weights_lib.Source, model_cfg) -> dict:
  """The sample job's settings (`workdir.check_settings`): the sampling block, the model, the weights
  (the checkpoint step resolved: 'the latest' is the step it was then) and the prompts file's digest."""
  sc = config.sample.to_dict()
  sc.pop("edit", None)
  if edit_block(config.sample)["direction"]:  # (absent otherwise: settings written before edits still match)
    sc["edit"] = edit_settings(config.sample)
  step = src.step if src.step is not None else (src.steps() or [None])[-1]
  digest = hashlib.sha256(paths.path(config.prompts).read_bytes()).hexdigest()[:16]
  return {"sample": {k: v for k, v in sc.items() if k not in _NOT_SETTINGS}, "model": dataclasses.asdict(model_cfg),
          "weights": {"kind": src.kind, "path": src.directory, "step": step}, "prompts": digest}


# ----------------------------------------------------------------------------- config


def sample_block() -> dict:
  """`config.sample` of the sample job (and of the eval job's answers stage)."""
  return dict(
      checkpoint="",  # a training workdir, its checkpoints/ dir, or one step dir (LoRA runs: merged into their base)
      hf="",  # or: a Hugging Face model directory / hub id (architecture and tokenizer from it), or a PEFT adapter
      peft_base="",  # a PEFT adapter's base ('' = its adapter_config.json's base_model_name_or_path)
      step=-1,  # checkpoint step to load; -1 = the latest readable one
      output="samples.jsonl",  # relative to --workdir
      # What to sample.
      n=1,  # samples per prompt
      max_new_tokens=256,
      max_new_tokens_cap=0,  # static output size (0 = max_new_tokens); larger avoids recompiles across runs
      temperature=1.0,  # 0 = greedy
      top_k=0,  # 0 = off
      top_p=1.0,  # 1 = off
      min_p=0.0,  # 0 = off
      seed=0,
      stop_token_ids=(),  # stop ids in addition to the tokenizer's EOS
      stop_at_eos=True,
      # Also stop at the chat template's end-of-turn token and generation_config.json's eos ids
      # (chat.stop_token_ids): where an instruct model's answer ends (Gemma, Llama-3, ChatML).
      stop_at_end_of_turn=False,
      top_logprobs=0,  # also write the k most likely tokens and their log-probs at each step (0 = off)
      # Words never sampled: '' (off) | 'default' (emjax.data.banned.BANNED_WORDS) | a file (one per line)
      # | ','-separated words. Their single tokens and first sub-tokens get -inf logits.
      mask_words="",
      # Prompt formatting.
      chat_template=False,  # apply the HF tokenizer's chat template (add_generation_prompt=True)
      add_bos=True,  # prepend BOS to plain prompts (pretraining puts BOS before every document)
      # Shapes and memory.
      batch_size=32,  # prompts per batch (rows decoded together = batch_size * n)
      # continuous: batch_size * n decode slots, each refilled with the next prompt as soon as its row
      # stops (emjax.sample.continuous; the same samples); static: each batch decodes until its longest
      # row stops.
      batching="continuous",
      prefill_chunk=0,  # prefill in sub-batches of this many prompts (0 = whole batch)
      max_prompt_length=1024,  # longer prompts are an error
      prompt_buckets=(),  # static prompt lengths; () = powers of two from 16 up to max_prompt_length
      unroll_layers=True,  # decode with unrolled layers (faster per step; longer compile)
      # A direction of the residual stream steered or ablated while sampling (transformer.ResidualEdit):
      # '' = none, or a .npy file holding one vector [d_model] (or 'file.npz:key'), e.g. a direction
      # from emjax.eval.directions. Positions: 0 the embeddings, p the stream entering block p.
      edit=dict(direction="",
                steer="",  # 'p:alpha[,p:alpha...]': add alpha * ||h|| * d to the stream at position p
                ablate=""),  # '' | 'all' (Arditi et al.'s directional ablation) | 'p[,p...]': the writes there
  )
