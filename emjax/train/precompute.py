"""A teacher's top-k log-probs computed once, stored as ArrayRecord, read by any number of students.

    # once per teacher and dataset (the job `teacher_top_k`; the config of the students' run):
    python -m emjax.main --config=configs/distill/off_policy.py:base=B,teacher=T,data=D,topk=64 \\
        --config.job=teacher_top_k --workdir=TOPK
    # every student, every epoch, no teacher in memory:
    python -m emjax.main --config=configs/distill/off_policy.py:base=B,data=D,topk=64 \\
        --config.teacher.path= --config.train.distill.precomputed=TOPK --workdir=S

TOPK/rows.array_record holds one record per training row (one epoch of `config.data`: every row of
every source of weight > 0 once, source by source in name order; packing 'none', so a row is one
example) with the row's model inputs, targets and loss mask and, per position, the teacher's `top_k`
token ids, their log-probabilities under the full vocabulary at `train.distill.temperature`, and the
log-mass of every other token (the tail bucket; see `objectives.teacher_top_k`). Sources of unequal
weights are refused: an epoch of a store visits every row once, where mixture weights cannot apply.
TOPK/meta.json records k, the temperature, the sequence length, the row count, the tokenizer, the
teacher (path, step, parameter fingerprint) and the data (`data_fingerprint`: a sha256 over
config.data's settings and each source's config and documents); a student run whose settings or
config.data differ is refused, the error naming both. With `eval.every_steps > 0` the job also
stores the held-out rows the loop's evaluator reads (TOPK/eval.array_record: eval.batches x
train.batch_size rows of each source's `eval.split`, with the teacher's top-k), so a student with a
stored teacher measures its held-out loss too (with the same eval.split and eval.batches; not
eval.by_source). TOPK/COMPLETED marks a finished store; an unfinished one is rewritten.

TOPK may be a bucket (gs://...): every file of the store is read and written through emjax.paths, but
ArrayRecord's reader and writer take local paths only, so the job writes each ArrayRecord file in named
scratch (`emjax.workdir.scratch_dir`) and uploads it, and a student downloads them once into scratch on
each machine (kept while the store is the same finished store).

`PrecomputedTeacherSource` is the loop's batch source over a store: epoch e visits the rows in a
permutation seeded by (train.seed, e); global batch s is rows s*B .. s*B+B-1 of that sequence; each
process reads its own block of each global batch. Its position is its step count, so resume is exact.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from flax import nnx

from emjax import paths
from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax import workdir as workdir_lib
from emjax.data import pipeline
from emjax.data import sources as sources_lib
from emjax.data import tokenizers
from emjax.models import transformer
from emjax.train import batches as batches_lib
from emjax.train import loop
from emjax.train import objectives as objectives_lib

log = logging.getLogger(__name__)

ROWS_FILE = "rows.array_record"
EVAL_FILE = "eval.array_record"  # the held-out rows (eval.every_steps > 0): eval.batches x train.batch_size
META_FILE = "meta.json"
# config.data keys that change how rows are read, not which rows: left out of the data fingerprint.
RUNTIME_DATA_KEYS = ("shuffle", "num_workers", "worker_buffer_size", "read_threads", "prefetch", "shards")
ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def encode_row(row: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in row.items()})
  return buf.getvalue()


def decode_row(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data)) as z:
    return {k: z[k] for k in z.files}


def _store_settings(config, tokenizer_cfg, teacher: Mapping[str, Any], data: Mapping[str, Any]) -> dict:
  d = config.train.distill
  out = {"top_k": int(d.top_k), "temperature": float(d.temperature), "seq_len": int(config.data.seq_len),
         "rows": int(sum(src["rows"] for src in data["sources"].values())), "tokenizer": dict(tokenizer_cfg),
         "teacher": dict(teacher), "data": dict(data)}
  if int(config.eval.every_steps) > 0:
    out["eval"] = _eval_settings(config)
  return out


def _eval_settings(config) -> dict:
  return {"split": str(config.eval.split), "rows": int(config.eval.batches) * int(config.train.batch_size)}


def _plain(x):
  return json.loads(json.dumps(x.to_dict() if hasattr(x, "to_dict") else dict(x), sort_keys=True, default=str))


def stored_sources(config) -> list[tuple[str, Any]]:
  """(name, source config) of the sources a store covers, in name order: those of weight > 0.

  A store is one epoch, every row of every source once; mixture weights cannot apply to that, so
  sources of unequal weights are refused rather than silently stored in other proportions.
  """
  if config.data.packing != "none":
    raise ValueError("config.data.packing: a teacher top-k store holds one epoch of rows, which needs "
                     "packing='none' (one example per row)")
  active = [(name, src) for name, src in sorted(config.data.sources.items()) if float(src.weight) > 0]
  if not active:
    raise ValueError("config.data.sources: no source has weight > 0; a teacher top-k store needs rows")
  weights = {name: float(src.weight) for name, src in active}
  if len(set(weights.values())) > 1:
    raise ValueError(f"config.data.sources: weights {weights}: a teacher top-k store holds one epoch, every row of "
                     "every source once, where mixture weights cannot apply; give the sources equal weights (each "
                     "row once per epoch) or weight 0 to leave one out")
  return active


def data_fingerprint(config) -> dict:
  """What a store's rows are made of: {"fingerprint", "settings", "sources"}.

  sha256 over config.data's settings (seq_len, tokenizer, format, truncate, packing; not how rows are
  read) and, per stored source, its config (all but the weight) and a sha256 of its documents in
  order (the files' contents as the source reads them, the held-out split already taken out).
  """
  data = _plain(config.data)
  settings = {k: v for k, v in data.items() if k not in RUNTIME_DATA_KEYS and k != "sources"}
  sources = {}
  for name, src in stored_sources(config):
    documents = sources_lib.make_source(name, src)
    h = hashlib.sha256()
    for i in range(len(documents)):
      h.update(json.dumps(documents[i], sort_keys=True, default=str).encode())
      h.update(b"\n")
    cfg = {k: v for k, v in _plain(src).items() if k != "weight"}
    sources[name] = {"kind": cfg.get("kind"), "path": cfg.get("path"), "rows": len(documents),
                     "documents_sha256": h.hexdigest(), "config": cfg}
  fingerprint = hashlib.sha256(json.dumps({"settings": settings, "sources": sources}, sort_keys=True).encode())
  return {"fingerprint": fingerprint.hexdigest(), "settings": settings, "sources": sources}


def _describe_data(data: Mapping[str, Any]) -> str:
  parts = [f"{name} ({src['kind']} {src['path'] or '-'}, {src['rows']} rows, documents sha256 "
           f"{src['documents_sha256'][:12]})" for name, src in sorted(data["sources"].items())]
  return f"sources {'; '.join(parts)}, fingerprint {data['fingerprint'][:12]}"


def _data_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
  out = [f"data.{k}: {a['settings'].get(k)!r} vs {b['settings'].get(k)!r}"
         for k in sorted(set(a["settings"]) | set(b["settings"])) if a["settings"].get(k) != b["settings"].get(k)]
  for name in sorted(set(a["sources"]) | set(b["sources"])):
    sa, sb = a["sources"].get(name), b["sources"].get(name)
    if sa is None or sb is None:
      out.append(f"source {name}: {'absent' if sa is None else 'present'} vs {'absent' if sb is None else 'present'}")
      continue
    out += [f"data.sources.{name}.{k}: {sa['config'].get(k)!r} vs {sb['config'].get(k)!r}"
            for k in sorted(set(sa["config"]) | set(sb["config"])) if sa["config"].get(k) != sb["config"].get(k)]
    if sa["documents_sha256"] != sb["documents_sha256"] and sa["config"] == sb["config"]:
      out.append(f"source {name}: the same config, other documents (the files changed)")
  return "; ".join(out[:8])


def check_store_data(meta: Mapping[str, Any], config, path: str) -> None:
  """Refuses a store built from other data than `config.data` (naming both)."""
  if "data" not in meta:
    raise ValueError(f"config.train.distill.precomputed={path!r} records no fingerprint of the data it was built "
                     "from (made by an older emjax); store the teacher again")
  mine = data_fingerprint(config)
  if meta["data"]["fingerprint"] != mine["fingerprint"]:
    raise ValueError(f"config.train.distill.precomputed={path!r} was built from other data than this run's "
                     f"config.data: the store's {_describe_data(meta['data'])}; this run's {_describe_data(mine)} "
                     f"({_data_differences(meta['data'], mine)}): point config.data at the store's data or store "
                     "the teacher again")


def run_teacher_top_k(config, workdir: str, *, mesh=None) -> dict:
  """The `teacher_top_k` job: one pass of the teacher over one epoch of config.data -> TOPK."""
  d = config.train.distill
  k = int(d.top_k)
  if k < 1:
    raise ValueError("config.train.distill.top_k: the teacher_top_k job stores the teacher's k most likely "
                     "tokens per position; set k >= 1")
  temperature = objectives_lib.check_temperature(d.temperature, "config.train.distill.temperature")
  if not config.teacher.path:
    raise ValueError("config.teacher.path: the teacher_top_k job needs the teacher")
  # The data first: a mixture the store cannot hold is refused before any weights are read.
  data = data_fingerprint(config)
  mesh = mesh or shd.make_mesh(config.mesh)
  source = weights_lib.resolve(config.teacher.path, key="config.teacher.path",
                               base=config.teacher.get("peft_base", ""), base_key="config.teacher.peft_base")
  loop.check_teacher_tokenizer(source, config.data.tokenizer)
  loaded = weights_lib.load_weights(source, mesh=mesh, dtype=config.teacher.dtype or None,
                                    key="config.teacher.path")
  if k > loaded.model_cfg.vocab_size:
    raise ValueError(f"config.train.distill.top_k={k} is larger than the teacher's vocabulary "
                     f"({loaded.model_cfg.vocab_size} tokens)")
  teacher = {"path": source.path, "step": loaded.step, "fingerprint": weights_lib.fingerprint(loaded.params)}
  settings = _store_settings(config, config.data.tokenizer, teacher, data)
  eval_cfg = None
  if "eval" in settings:
    eval_cfg = loop.held_out_data_config(config)
    if config.eval.by_source:
      raise ValueError("config.eval.by_source: a teacher top-k store holds the held-out batches of the mixture only; "
                       "set config.eval.by_source=False")
  workdir_lib.makedirs(workdir)
  if workdir_lib.is_complete(workdir):  # the bucket's COMPLETED, for a staged copy
    meta = workdir_lib.read_json(paths.path(workdir) / META_FILE)
    if meta == settings:
      log.info("teacher top-k store %s is complete", workdir)
      return meta
    raise workdir_lib.SettingsMismatch(f"{workdir} holds a teacher top-k store made with other settings "
                                       f"({_differences(meta, settings)}); use a new --workdir")
  workdir_lib.clear_status(workdir)  # an unfinished store is rewritten: not complete, not failed, until it ends
  workdir_lib.record_launch(workdir, "teacher_top_k")

  cfg = dataclasses.replace(loaded.model_cfg, dtype=loaded.model_cfg.param_dtype, remat="none")
  graphdef, _ = transformer.split_model(transformer.abstract_model(cfg))
  batch_size = int(config.train.batch_size)
  dp = shd.data_parallel_size(mesh)
  batch_size = -(-batch_size // dp) * dp
  rep = shd.replicated(mesh)
  # A few positions at a time: the [B, C, V] logits of a chunk, never [B, L, V] (train.loss_chunk_len,
  # or derived from train.loss_chunk_bytes as the train step derives it).
  chunk = loop.derive_loss_chunk_len(int(config.train.loss_chunk_len), int(config.train.get("loss_chunk_bytes", 0)),
                                     batch_size // dp, cfg.vocab_size, int(config.data.seq_len))

  @jax.jit
  def top_k(params, batch):
    model = nnx.merge(graphdef, params)
    hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    outs = []
    for start in range(0, hidden.shape[1], chunk):
      outs.append(objectives_lib.teacher_top_k(model.logits(hidden[:, start:start + chunk], "float32"), k,
                                                temperature))
    ids, logp, tail = (jnp.concatenate(parts, axis=1) for parts in zip(*outs))
    return jax.lax.with_sharding_constraint((ids, logp, tail), rep)

  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.shuffle = False
  data_cfg.prefetch = 0
  seed = int(config.train.seed)

  def write(name, streams):
    """Each (batches, n) of `streams`: its first n rows with the teacher's top-k, to the store's file `name`;
    the row count. (The writer takes a local path: a bucket store's file is written in scratch, then uploaded.)"""
    target = paths.path(workdir) / name
    local = os.path.join(_scratch(workdir), name) if paths.is_remote(target) else os.fspath(target)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(local), exist_ok=True)
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1") if jax.process_index() == 0 else None
    written = 0
    try:
      for batches, n in streams:
        count = 0
        while count < n:
          host = next(batches)
          batch = {key: jax.device_put(np.asarray(host[key]), shd.batch_sharding(mesh, np.ndim(host[key])))
                   for key in ROW_KEYS}
          ids, logp, tail = jax.device_get(top_k(loaded.params, batch))
          for i in range(min(batch_size, n - count)):
            if writer is not None:
              row = {key: host[key][i] for key in ROW_KEYS}
              row.update(teacher_top_ids=ids[i], teacher_top_logprobs=logp[i], teacher_tail_logprob=tail[i])
              writer.write(encode_row(row))
            count += 1
        written += count
    finally:
      if writer is not None:
        writer.close()
    if writer is not None and local != os.fspath(target):
      _copy(local, target)
      os.remove(local)
    return written

  def one_source(name, src):
    """Every row of source `name` once, in order (the store's epoch is each source in full)."""
    cfg = copy.deepcopy(data_cfg)
    with cfg.unlocked():
      one = copy.deepcopy(src)
      one.weight = 1.0
      cfg.sources = type(cfg.sources)({name: one})
    return iter(pipeline.make_batches(cfg, tokenizer, batch_size, seed=seed, process_index=0, process_count=1))

  path = paths.path(workdir) / ROWS_FILE
  written = write(ROWS_FILE, [(one_source(name, src), data["sources"][name]["rows"])
                              for name, src in stored_sources(config)])
  if eval_cfg is not None:
    # The held-out batches the loop's evaluator would read (emjax.train.loop._make_evaluator), in order.
    eval_batches = iter(pipeline.make_batches(eval_cfg, tokenizer, batch_size, seed=seed, process_index=0,
                                              process_count=1))
    write(EVAL_FILE, [(eval_batches, settings["eval"]["rows"])])
  if jax.process_index() == 0:
    workdir_lib.write_json(paths.path(workdir) / META_FILE, settings)
    workdir_lib.mark_complete(workdir, settings)
  log.info("stored the teacher's top-%d log-probs for %d rows in %s", k, written, path)
  return settings


def _scratch(store) -> str:
  """Where this machine keeps a bucket store's ArrayRecord files: ArrayRecord's reader and writer take local
  paths only. Named scratch (`emjax.workdir.scratch_dir`), apart from a staged copy of the same workdir."""
  return workdir_lib.scratch_dir(os.fspath(store).rstrip("/") + "/.array_records")


def _copy(src, dst) -> None:
  """The file `src` to `dst` (a local path or a bucket object), streamed: a store's rows may not fit in memory.
  A local `dst` is written aside and renamed, so a kill never leaves half a file under its name."""
  dst = paths.path(dst)
  tmp = dst if paths.is_remote(dst) else dst.parent / f".{dst.name}.{os.getpid()}.tmp"  # an object appears whole
  with paths.path(src).open("rb") as f, tmp.open("wb") as g:
    shutil.copyfileobj(f, g, 16 << 20)
  if tmp != dst:
    tmp.replace(dst)


def _local_records(store: str, name: str) -> str:
  """A local path of the store's ArrayRecord file `name`: the file itself on a disk; a bucket's object
  downloaded once into named scratch (`_scratch`) and reused while the store is the same finished store
  (its COMPLETED, and the object's size and time)."""
  remote = paths.path(store) / name
  if not paths.is_remote(remote):
    return os.fspath(remote)
  st = remote.stat()
  key = {"object": os.fspath(remote), "length": int(st.length), "mtime": st.mtime,
         "completed": (paths.path(store) / workdir_lib.COMPLETE_FILE).read_text()}
  local = os.path.join(_scratch(store), name)
  marker = f"{local}.source.json"
  if os.path.exists(local) and os.path.exists(marker) and workdir_lib.read_json(marker) == json.loads(
      json.dumps(key, default=str)):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  log.info("copying %s (%.1f MiB) to %s: ArrayRecord reads local files", remote, st.length / 2**20, local)
  _copy(remote, local)
  workdir_lib.write_json(marker, key)
  return local


def _differences(a: Mapping, b: Mapping) -> str:
  keys = sorted(set(a) | set(b))
  return ", ".join(f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in keys if a.get(key) != b.get(key))


class PrecomputedTeacherSource:
  """This process's rows of each global batch from a teacher top-k store (module docstring)."""

  def __init__(self, config, path: str, *, process_index: int | None = None, process_count: int | None = None):
    if not all((paths.path(path) / name).exists() for name in (workdir_lib.COMPLETE_FILE, META_FILE, ROWS_FILE)):
      raise FileNotFoundError(f"config.train.distill.precomputed={path!r}: not a finished teacher top-k store "
                              f"(it needs {ROWS_FILE}, {META_FILE} and {workdir_lib.COMPLETE_FILE}: run the teacher_top_k job first)")
    self.meta = workdir_lib.read_json(paths.path(path) / META_FILE)
    d = config.train.distill
    want = {"top_k": int(d.top_k), "temperature": float(d.temperature), "seq_len": int(config.data.seq_len),
            "tokenizer": dict(config.data.tokenizer)}
    got = {key: self.meta[key] for key in want}
    if got != want:
      raise ValueError(f"config.train.distill.precomputed={path!r} was stored with other settings than this run's "
                       f"({_differences(got, want)}): set them equal or store the teacher again")
    check_store_data(self.meta, config, path)
    self.path = path
    if int(config.eval.every_steps) > 0:
      # Checked here, before the step compiles: the evaluator reads the stored held-out rows.
      if config.eval.by_source:
        raise ValueError("config.eval.by_source: with a stored teacher (config.train.distill.precomputed) the "
                         "held-out loss is the mixture's only; set config.eval.by_source=False")
      stored, wanted = self.meta.get("eval"), _eval_settings(config)
      if stored != wanted or not (paths.path(path) / EVAL_FILE).exists():
        raise ValueError(f"config.eval.every_steps={config.eval.every_steps}: the held-out loss with a stored teacher "
                         f"reads the teacher's top-k on the held-out rows from the store, and "
                         f"config.train.distill.precomputed={path!r} holds "
                         f"{'none' if stored is None else stored} where this run needs {wanted} "
                         "(eval.split, eval.batches x train.batch_size rows): store the teacher again with this "
                         "run's config.eval, or set config.eval.every_steps=0")
    self._records = grain.sources.ArrayRecordDataSource([_local_records(path, ROWS_FILE)])
    self.rows = len(self._records)
    if self.rows != int(self.meta["rows"]):
      raise ValueError(f"{path}: {self.rows} records, meta.json says {self.meta['rows']}")
    self.batch_size = int(config.train.batch_size)
    self.seed = int(config.train.seed)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.step = 0

  def __iter__(self):
    return self

  def global_rows(self, step: int) -> np.ndarray:
    return batches_lib.epoch_rows(step, self.batch_size, self.rows, (self.seed, 11))

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.global_rows(self.step)
    self.step += 1
    local = self.batch_size // self.process_count
    mine = rows[self.process_index * local:(self.process_index + 1) * local]
    decoded = [decode_row(self._records[int(i)]) for i in mine]
    return {key: np.stack([r[key] for r in decoded]) for key in decoded[0]}

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "rows": self.rows}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if int(state.get("rows", self.rows)) != self.rows:
      raise ValueError(f"the checkpoint's data position is over a store of {state['rows']} rows, this one has "
                       f"{self.rows}: the batch order would change")
    self.step = int(state["step"])

  def close(self) -> None:
    pass

  def eval_batches(self, batches: int) -> list[dict[str, np.ndarray]]:
    """This process's rows of each stored held-out global batch (the evaluator's fixed batches)."""
    records = grain.sources.ArrayRecordDataSource([_local_records(self.path, EVAL_FILE)])
    local = self.batch_size // self.process_count
    out = []
    for b in range(batches):
      first = b * self.batch_size + self.process_index * local
      decoded = [decode_row(records[i]) for i in range(first, first + local)]
      out.append({key: np.stack([r[key] for r in decoded]) for key in decoded[0]})
    return out


def make_source(trainer, tokenizer) -> PrecomputedTeacherSource:
  """The loop's `make_batch_source` for `config.train.distill.precomputed`."""
  del tokenizer
  return PrecomputedTeacherSource(trainer.config, trainer.config.train.distill.precomputed)
