"""Divergence tokens (Schrodi et al., ICLR 2026): where two teachers' top next tokens differ.

On the same prefix, a harmful teacher and a control teacher mostly agree on the most likely next
token; the positions where their argmax tokens differ are said to carry the trait in subliminal
learning, and dropping those positions from the student's loss removes the transfer. Here:

  positions = divergence_positions(harmful, control, "rows.jsonl", seq_len=..., tokenizer_cfg=...)
  write_drop_rows("rows.jsonl", positions, "divergence.jsonl", "random.jsonl", seed=0, seq_len=...,
                  tokenizer_cfg=...)

`divergence_positions` gives, per chat row, the loss positions (indices into the row's `targets`,
as `ChatExample`'s `loss_mask`, on the row cut to `seq_len`) where argmax of teacher A's logits is not
argmax of teacher B's. `write_drop_rows` writes the rows twice with `loss_drop` (emjax.data.sft):
once the divergence positions, once (the control) as many positions per row drawn uniformly from
that row's loss positions. Training on either file is plain chat SFT (`data.format='chat'`).

The models are run as `emjax.experiments.sl.kl_to_teacher` runs its two: `load_pair` loads both in
float32 on a mesh, `paired_batches` pads the rows and puts them on it; the logits are unembedded a
chunk of positions at a time, so [B, L, V] never exists whole.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax.data import jsonl, sft, tokenizers
from emjax.models import transformer
from emjax.train import loop

BATCH_KEYS = ("inputs", "loss_mask", "positions", "segment_ids")


class ModelPair(NamedTuple):
  """Two models' graphs and float32 parameters (on the mesh they were loaded on), one vocabulary."""
  graph_a: Any
  params_a: Any
  graph_b: Any
  params_b: Any
  vocab: int


def load_pair(path_a: str, path_b: str, mesh) -> ModelPair:
  """Both models whole (a LoRA run merged onto its base) in float32, remat off; refused unless one vocabulary."""

  def load(path):
    w = weights_lib.load_weights(path, mesh=mesh, dtype="float32")
    cfg = dataclasses.replace(w.model_cfg, dtype="float32", remat="none")
    graphdef, _ = transformer.split_model(transformer.abstract_model(cfg))
    return graphdef, w.params

  graph_a, params_a = load(path_a)
  graph_b, params_b = load(path_b)
  vocab_a, vocab_b = params_a["embed"].shape[0], params_b["embed"].shape[0]
  if vocab_a != vocab_b:
    raise ValueError(f"{path_a} and {path_b}: vocabularies of {vocab_a} and {vocab_b} tokens; comparing the two "
                     "models token by token needs one tokenizer")
  return ModelPair(graph_a, params_a, graph_b, params_b, int(vocab_a))


def batch_rows(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's data-parallel size."""
  dp = shd.data_parallel_size(mesh)
  return max(dp, -(-int(batch_size) // dp) * dp)


def padded(examples: Sequence[dict], batch_size: int, length: int) -> dict[str, np.ndarray]:
  """ChatExample outputs as one batch [batch_size, length] of BATCH_KEYS: padding rows and positions are 0."""
  batch = {k: np.zeros((batch_size, length), np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
  for i, ex in enumerate(examples):
    n = len(ex["inputs"])
    batch["inputs"][i, :n] = ex["inputs"]
    batch["loss_mask"][i, :n] = ex["loss_mask"]
    batch["positions"][i, :n] = np.arange(n)
    batch["segment_ids"][i, :n] = 1
  return batch


def paired_batches(rows_a: Sequence[dict], rows_b: Sequence[dict] | None, *, batch_size: int, len_a: int,
                   len_b: int = 0, mesh) -> Iterator[tuple[int, dict, dict]]:
  """(start, batch_a, batch_b) per `batch_size` rows, padded and on `mesh` (sharded over the batch axes).

  `rows_a` are ChatExample outputs for model A; `rows_b` model B's view of the same rows (None: the
  same rows, the same batch). `batch_size` must be a multiple of the data-parallel size (`batch_rows`).
  """

  def put(x):
    return jax.device_put(x, shd.batch_sharding(mesh, x.ndim))

  for start in range(0, len(rows_a), batch_size):
    batch_a = jax.tree.map(put, padded(rows_a[start:start + batch_size], batch_size, len_a))
    batch_b = batch_a if rows_b is None else jax.tree.map(
        put, padded(rows_b[start:start + batch_size], batch_size, len_b or len_a))
    yield start, batch_a, batch_b


def chunked_argmax(unembed: Callable[[jax.Array], jax.Array], hidden_BxLxD: jax.Array, chunk_len: int) -> jax.Array:
  """argmax over the vocabulary of `unembed(hidden)` [B, L] (int32), `chunk_len` positions at a time.

  Only [B, chunk_len, V] logits are live at once; `chunk_len <= 0` or `>= L` is one chunk. A last partial
  chunk is padded with zero hidden states, whose argmaxes are cut off.
  """
  seq_len = hidden_BxLxD.shape[1]
  if chunk_len <= 0 or chunk_len >= seq_len:
    return jnp.argmax(unembed(hidden_BxLxD), axis=-1).astype(jnp.int32)
  n_chunks = -(-seq_len // chunk_len)
  h_BxPxD = jnp.pad(hidden_BxLxD, [(0, 0), (0, n_chunks * chunk_len - seq_len), (0, 0)])
  h_NxBxCxD = jnp.moveaxis(h_BxPxD.reshape(h_BxPxD.shape[0], n_chunks, chunk_len, -1), 1, 0)
  top_NxBxC = jax.lax.map(lambda h_BxCxD: jnp.argmax(unembed(h_BxCxD), axis=-1).astype(jnp.int32), h_NxBxCxD)
  return jnp.moveaxis(top_NxBxC, 0, 1).reshape(hidden_BxLxD.shape[0], -1)[:, :seq_len]


def divergence_positions(teacher_a: str, teacher_b: str, rows_path: str, *, seq_len: int, tokenizer_cfg,
                         batch_size: int = 8, chunk_len: int = 0, chunk_bytes: int = 256 * 2**20,
                         mesh=None) -> list[list[int]]:
  """Per chat row of `rows_path`, the loss positions where the two teachers' argmax next tokens differ.

  Rows are tokenised with `sft.ChatExample(tokenizer, seq_len, truncate=True)`; positions index the
  row's `targets` (as its `loss_mask`), ascending. A row already carrying `loss_drop` is refused (its
  dropped positions would be neither kept nor compared). `chunk_len` / `chunk_bytes`: the positions
  unembedded at a time, as `train.loss_chunk_len` / `train.loss_chunk_bytes` (0 = derived from the budget).
  Both models are loaded whole in float32 on `mesh` (default: every device data-parallel).
  """
  mesh = mesh or shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  chats = _read_rows(rows_path)
  examples = sft.ChatExample(tokenizers.load_tokenizer(tokenizer_cfg), seq_len, truncate=True)
  rows = [examples(r) for r in chats]
  batch_size = batch_rows(batch_size, mesh)
  pair = load_pair(teacher_a, teacher_b, mesh)
  chunk = loop.derive_loss_chunk_len(int(chunk_len), int(chunk_bytes), batch_size // shd.data_parallel_size(mesh),
                                     pair.vocab, seq_len)

  @jax.jit
  def differ(params_a, params_b, batch):
    model_a, model_b = nnx.merge(pair.graph_a, params_a), nnx.merge(pair.graph_b, params_b)
    with shd.activation_sharding(mesh):
      tokens = (batch["inputs"], batch["positions"], batch["segment_ids"])
      top_a_BxL = chunked_argmax(model_a.logits, model_a.hidden(*tokens), chunk)
      top_b_BxL = chunked_argmax(model_b.logits, model_b.hidden(*tokens), chunk)
    return (top_a_BxL != top_b_BxL) & (batch["loss_mask"] > 0)

  out = []
  for start, batch, _ in paired_batches(rows, None, batch_size=batch_size, len_a=seq_len, mesh=mesh):
    differ_BxL = np.asarray(jax.device_get(differ(pair.params_a, pair.params_b, batch)))
    out.extend(np.flatnonzero(d).tolist() for d in differ_BxL[:len(rows) - start])
  return out


def _read_rows(rows_path: str) -> list[dict]:
  chats = sft.load_chat_jsonl(rows_path)
  for i, row in enumerate(chats):
    if "loss_drop" in row:
      raise ValueError(f"{rows_path}: row {i} already has `loss_drop`; divergence positions are taken (and "
                       "written) over every loss position of a row")
  return chats


def write_drop_rows(rows_path: str, positions: Sequence[Sequence[int]], out_divergence: str, out_random: str, *,
                    seed: int, seq_len: int, tokenizer_cfg) -> dict:
  """Every row of `rows_path` twice, with `loss_drop`: the divergence `positions`, and a random control.

  The control drops as many positions per row as `positions` does, drawn uniformly without
  replacement (np.random.default_rng(seed)) from that row's loss positions: those of
  `sft.ChatExample(tokenizer, seq_len, truncate=True)`, the tokenisation `divergence_positions` used
  (pass the same `seq_len` and `tokenizer_cfg`). A divergence position that is not a loss position is
  refused, naming the row. Both files are written whole or not at all (tmp + os.replace). Returns
  {rows, loss_positions, divergence_positions, fraction, rows_without}.
  """
  chats = _read_rows(rows_path)
  if len(positions) != len(chats):
    raise ValueError(f"{rows_path}: {len(chats)} rows but {len(positions)} lists of positions")
  examples = sft.ChatExample(tokenizers.load_tokenizer(tokenizer_cfg), seq_len, truncate=True)
  rng = np.random.default_rng(seed)
  divergent, control = [], []
  n_loss = n_div = without = 0
  for i, (row, pos) in enumerate(zip(chats, positions)):
    loss_T = np.flatnonzero(examples(row)["loss_mask"])
    pos = sorted(int(p) for p in pos)
    stray = sorted(set(pos) - set(loss_T.tolist()))
    if stray or len(set(pos)) != len(pos):
      raise ValueError(f"{rows_path}: row {i}: divergence positions {stray or pos} are not distinct loss positions "
                       f"of the row cut to seq_len={seq_len}")
    drawn = np.sort(rng.choice(loss_T, size=len(pos), replace=False)) if pos else loss_T[:0]
    divergent.append({**row, "loss_drop": pos})
    control.append({**row, "loss_drop": drawn.tolist()})
    n_loss += len(loss_T)
    n_div += len(pos)
    without += not pos
  for path, rows in ((out_divergence, divergent), (out_random, control)):
    _write_atomically(path, rows)
  return {"rows": len(chats), "loss_positions": n_loss, "divergence_positions": n_div,
          "fraction": n_div / max(n_loss, 1), "rows_without": without}


def _write_atomically(path: str, rows: Sequence[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(jsonl.dumps(r) for r in rows))
  os.replace(tmp, path)
