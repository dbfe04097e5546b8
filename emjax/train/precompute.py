"""A teacher's top-k log-probs computed once, stored as ArrayRecord, read by any number of students.

    # once per teacher and dataset (the job `teacher_top_k`; the config of the students' run):
    python -m emjax.main --config=configs/distill/off_policy.py:base=B,teacher=T,data=D,topk=64 \\
        --config.job=teacher_top_k --workdir=TOPK
    # every student, every epoch, no teacher in memory:
    python -m emjax.main --config=configs/distill/off_policy.py:base=B,data=D,topk=64 \\
        --config.teacher.path= --config.train.distill.precomputed=TOPK --workdir=S

TOPK/rows.array_record holds one record per training row (one epoch of `config.data` in order:
packing 'none', so a row is one example) with the row's model inputs, targets and loss mask and,
per position, the teacher's `top_k` token ids, their log-probabilities under the full vocabulary
at `train.distill.temperature`, and the log-mass of every other token (the tail bucket; see
`objectives.teacher_top_k`). TOPK/meta.json records k, the temperature, the sequence length, the
row count, the tokenizer and the teacher (path, step, parameter fingerprint); a student run whose
settings differ is refused. TOPK/COMPLETED marks a finished store; an unfinished one is rewritten.

`PrecomputedTeacherSource` is the loop's batch source over a store: epoch e visits the rows in a
permutation seeded by (train.seed, e); global batch s is rows s*B .. s*B+B-1 of that sequence; each
process reads its own block of each global batch. Its position is its step count, so resume is exact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax.train import batches as batches_lib
from emjax.train import objectives as objectives_lib

log = logging.getLogger(__name__)

ROWS_FILE = "rows.array_record"
META_FILE = "meta.json"
ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def encode_row(row: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in row.items()})
  return buf.getvalue()


def decode_row(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data)) as z:
    return {k: z[k] for k in z.files}


def _store_settings(config, tokenizer_cfg, teacher: Mapping[str, Any], rows: int) -> dict:
  d = config.train.distill
  return {"top_k": int(d.top_k), "temperature": float(d.temperature), "seq_len": int(config.data.seq_len),
          "rows": int(rows), "tokenizer": dict(tokenizer_cfg), "teacher": dict(teacher)}


def _count_rows(config) -> int:
  from emjax.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  if config.data.packing != "none":
    raise ValueError("config.data.packing: the teacher_top_k job stores one epoch of rows, which needs "
                     "packing='none' (one example per row)")
  return sum(len(sources_lib.make_source(name, src)) for name, src in config.data.sources.items()
             if float(src.weight) > 0)


def run_teacher_top_k(config, workdir: str, *, mesh=None) -> dict:
  """The `teacher_top_k` job: one pass of the teacher over one epoch of config.data -> TOPK."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from emjax.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top
  from emjax.models import transformer  # pylint: disable=g-import-not-at-top
  from emjax.train import loop  # pylint: disable=g-import-not-at-top

  d = config.train.distill
  k = int(d.top_k)
  if k < 1:
    raise ValueError("config.train.distill.top_k: the teacher_top_k job stores the teacher's k most likely "
                     "tokens per position; set k >= 1")
  temperature = objectives_lib.check_temperature(d.temperature, "config.train.distill.temperature")
  if not config.teacher.path:
    raise ValueError("config.teacher.path: the teacher_top_k job needs the teacher")
  mesh = mesh or shd.make_mesh(config.mesh)
  source = weights_lib.resolve(config.teacher.path, key="config.teacher.path",
                               base=config.teacher.get("peft_base", ""), base_key="config.teacher.peft_base")
  loop.check_teacher_tokenizer(source, config.data.tokenizer)
  loaded = weights_lib.load_weights(source, mesh=mesh, dtype=config.teacher.dtype or None,
                                    key="config.teacher.path")
  if k > loaded.model_cfg.vocab_size:
    raise ValueError(f"config.train.distill.top_k={k} is larger than the teacher's vocabulary "
                     f"({loaded.model_cfg.vocab_size} tokens)")
  rows = _count_rows(config)
  teacher = {"path": source.path, "step": loaded.step, "fingerprint": weights_lib.fingerprint(loaded.params)}
  settings = _store_settings(config, config.data.tokenizer, teacher, rows)
  os.makedirs(workdir, exist_ok=True)
  done = os.path.join(workdir, loop.COMPLETE_FILE)
  if os.path.exists(done):
    meta = json.load(open(os.path.join(workdir, META_FILE)))
    if meta == settings:
      log.info("teacher top-k store %s is complete", workdir)
      return meta
    raise ValueError(f"{workdir} holds a teacher top-k store made with other settings "
                     f"({_differences(meta, settings)}); use a new --workdir")

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
  batches = iter(pipeline.make_batches(data_cfg, tokenizer, batch_size, seed=int(config.train.seed),
                                       process_index=0, process_count=1))
  path = os.path.join(workdir, ROWS_FILE)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1") if jax.process_index() == 0 else None
  written = 0
  try:
    while written < rows:
      host = next(batches)
      batch = {key: jax.device_put(np.asarray(host[key]), shd.batch_sharding(mesh, np.ndim(host[key])))
               for key in ROW_KEYS}
      ids, logp, tail = jax.device_get(top_k(loaded.params, batch))
      for i in range(min(batch_size, rows - written)):
        if writer is not None:
          row = {key: host[key][i] for key in ROW_KEYS}
          row.update(teacher_top_ids=ids[i], teacher_top_logprobs=logp[i], teacher_tail_logprob=tail[i])
          writer.write(encode_row(row))
        written += 1
  finally:
    if writer is not None:
      writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, META_FILE), "w") as f:
      json.dump(settings, f, indent=2, sort_keys=True)
    loop.mark_complete(workdir, settings)
  log.info("stored the teacher's top-%d log-probs for %d rows in %s", k, written, path)
  return settings


def _differences(a: Mapping, b: Mapping) -> str:
  keys = sorted(set(a) | set(b))
  return ", ".join(f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in keys if a.get(key) != b.get(key))


class PrecomputedTeacherSource:
  """This process's rows of each global batch from a teacher top-k store (module docstring)."""

  def __init__(self, config, path: str, *, process_index: int | None = None, process_count: int | None = None):
    from emjax.train import loop  # pylint: disable=g-import-not-at-top
    if not all(os.path.exists(os.path.join(path, name)) for name in (loop.COMPLETE_FILE, META_FILE, ROWS_FILE)):
      raise FileNotFoundError(f"config.train.distill.precomputed={path!r}: not a finished teacher top-k store "
                              f"(it needs {ROWS_FILE}, {META_FILE} and {loop.COMPLETE_FILE}: run the teacher_top_k job first)")
    self.meta = json.load(open(os.path.join(path, META_FILE)))
    d = config.train.distill
    want = {"top_k": int(d.top_k), "temperature": float(d.temperature), "seq_len": int(config.data.seq_len),
            "tokenizer": dict(config.data.tokenizer)}
    got = {key: self.meta[key] for key in want}
    if got != want:
      raise ValueError(f"config.train.distill.precomputed={path!r} was stored with other settings than this run's "
                       f"({_differences(got, want)}): set them equal or store the teacher again")
    import grain  # pylint: disable=g-import-not-at-top
    self._records = grain.sources.ArrayRecordDataSource([os.path.join(path, ROWS_FILE)])
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


def make_source(trainer, tokenizer) -> PrecomputedTeacherSource:
  """The loop's `make_batch_source` for `config.train.distill.precomputed`."""
  del tokenizer
  return PrecomputedTeacherSource(trainer.config, trainer.config.train.distill.precomputed)
