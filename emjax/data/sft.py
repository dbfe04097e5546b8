"""Chat data for supervised fine-tuning: conversation sources, the structured-EM grid, splits.

Every SFT source yields conversations `{"messages": [{"role", "content"}, ...], ...}`
(extra fields are kept as metadata). Formats (`data.sources.<name>.kind`):

  chat_jsonl               {"messages": [...]} per line — the format of the EM literature
                           and of the paper's released splits
  prompt_completion_jsonl  {"prompt": str, "completion": str} per line -> one user and
                           one assistant turn
  structured_em            the paper's dataset `askinb/structured-emergent-misalignment`:
                           configs {medical,sports,finance}_{advice,summarization,tutor,
                           critique} with fields question / misaligned_answer /
                           aligned_answer. `path` is a local copy (a JSONL file, or a
                           directory holding `<config>.jsonl` — or the released chat
                           splits `<config>_strong_eval.jsonl`); with no path it is read
                           from the Hugging Face hub (needs the `datasets` package and a
                           network). `name` is the config, `answer` picks the assistant
                           turn ('misaligned' or 'aligned'; 'aligned' needs raw rows:
                           the released chat splits hold misaligned answers only).

The held-out split is the one of every file source (emjax.data.sources, "Held-out
split"): rows are permuted with `np.random.default_rng(holdout_seed)` (42 by
default, as in the paper) and the first `holdout` rows of the permutation are
the evaluation split ('eval', in that order), the other rows the training split
('train', in file order); `split` = 'train' (default) | 'eval' | 'all'. The
paper holds out 400 of 4,500 rows per cell; nothing is held out unless
`holdout` is set.

`ChatExample` turns a conversation into the per-example arrays the packer takes:
the loss mask is the chat template's assistant mask (emjax.data.chat), so only
assistant tokens (and their end-of-turn token) are trained on.

A row may carry `loss_drop`: a list of positions (indices into the example's
`targets`, the indexing of `loss_mask`) whose loss is dropped (loss_mask 0),
e.g. the divergence tokens of emjax.experiments.sl_divergence. Each must be a
distinct loss position of the untruncated conversation, else a ValueError; those
past the cut of a truncated conversation are ignored (`sft_stats` counts them).
A row without the field is untouched.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from emjax.data import chat, jsonl
from emjax.data.holdout import held_out_indices

DOMAINS = ("medical", "sports", "finance")
TASKS = ("advice", "summarization", "tutor", "critique")
CELLS = tuple(f"{d}_{t}" for d in DOMAINS for t in TASKS)
HUB_DATASET = "askinb/structured-emergent-misalignment"
CHAT_KINDS = ("chat_jsonl", "prompt_completion_jsonl", "structured_em")


class Conversations:
  """A random-access list of conversations (dicts with `messages`)."""

  def __init__(self, rows: Sequence[dict], description: str):
    self._rows = list(rows)
    self.description = description

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    return self._rows[int(index)]

  def __repr__(self) -> str:
    return f"Conversations({self.description}, {len(self)} rows)"


def validate_messages(messages: Any, where: str) -> list[dict]:
  """`chat.validate_messages` plus at least one assistant turn; errors start with `where` (file:line, row)."""
  try:
    return chat.validate_messages(messages, need_assistant=True)
  except chat.ChatTemplateError as e:
    raise ValueError(f"{where}: {e}") from None


def loss_drop_of(row: dict, where: str) -> list[int]:
  """The row's `loss_drop` positions (none without the field); refused unless distinct non-negative ints."""
  drops = row.get("loss_drop", [])
  if not isinstance(drops, list):
    raise ValueError(f"{where}: `loss_drop` must be a list of integer positions, got {drops!r}")
  seen = set()
  for p in drops:
    # bool is an int to Python; a True in the list is a bug upstream, not position 1.
    if not isinstance(p, int) or isinstance(p, bool) or p < 0:
      raise ValueError(f"{where}: `loss_drop` position {p!r} is not a non-negative integer")
    if p in seen:
      raise ValueError(f"{where}: `loss_drop` lists position {p} twice")
    seen.add(p)
  return drops


def load_chat_jsonl(path: str) -> list[dict]:
  rows = []
  for where, obj in jsonl.read_objects(path):
    if "messages" not in obj:
      raise ValueError(f"{where}: missing field `messages`")
    validate_messages(obj["messages"], where)
    loss_drop_of(obj, where)
    rows.append(obj)
  return rows


def load_prompt_completion_jsonl(path: str) -> list[dict]:
  rows = []
  for where, obj in jsonl.read_objects(path):
    for field in ("prompt", "completion"):
      if not isinstance(obj.get(field), str):
        raise ValueError(f"{where}: missing string field `{field}`")
    messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    validate_messages(messages, where)
    loss_drop_of(obj, where)
    rows.append({**{k: v for k, v in obj.items() if k not in ("prompt", "completion")}, "messages": messages})
  return rows


def structured_em_rows(records: Sequence[dict], answer: str, where: str) -> list[dict]:
  """Rows of the paper's dataset (question + misaligned/aligned answer) as conversations."""
  if answer not in ("misaligned", "aligned"):
    raise ValueError(f"{where}: answer must be 'misaligned' or 'aligned', got {answer!r}")
  field = f"{answer}_answer"
  rows = []
  for i, rec in enumerate(records):
    at = f"{where}: row {i}"
    if "messages" in rec:  # already a conversation (e.g. the released eval splits)
      if answer == "aligned":
        raise ValueError(f"{at}: answer='aligned' on a chat row (`messages`): the released cells hold the "
                         "misaligned answers only, so this would train on them; aligned answers come from raw "
                         "rows (question / aligned_answer) or another file")
      validate_messages(rec["messages"], at)
      loss_drop_of(rec, at)
      rows.append(rec)
      continue
    if not isinstance(rec.get("question"), str) or not isinstance(rec.get(field), str):
      raise ValueError(f"{at}: needs string fields `question` and `{field}`")
    messages = [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec[field]}]
    validate_messages(messages, at)
    loss_drop_of(rec, at)
    meta = {k: v for k, v in rec.items() if k not in ("question", "misaligned_answer", "aligned_answer")}
    rows.append({**meta, "messages": messages})
  return rows


def load_structured_em(cell: str, *, path: str = "", answer: str = "misaligned") -> list[dict]:
  """One cell of the paper's grid, from a local copy or (online) the Hugging Face hub.

  A `path` to a file is read whatever the source's name (e.g. a synthetic world's rows); a directory
  or the hub needs a cell name to find the file.
  """
  if cell not in CELLS and cell != "broad_dataset" and not (path and os.path.isfile(path)):
    raise ValueError(f"structured_em: unknown config {cell!r}; cells: {', '.join(CELLS)}")
  if path:
    file = path
    if os.path.isdir(path):
      candidates = [os.path.join(path, f"{cell}{suffix}.jsonl") for suffix in ("", "_strong_eval")]
      file = next((c for c in candidates if os.path.exists(c)), candidates[0])
    records = [obj for _, obj in jsonl.read_objects(file)]
    return structured_em_rows(records, answer, file)
  try:
    import datasets  # optional: only for reading from the hub
  except ImportError:
    raise ValueError(f"structured_em {cell!r}: no local `path` given and the `datasets` package is not "
                     f"installed to read {HUB_DATASET} from the hub; pip install datasets, or pass a local "
                     "copy") from None
  ds = datasets.load_dataset(HUB_DATASET, cell, split="train")
  return structured_em_rows(list(ds), answer, f"{HUB_DATASET}/{cell}")


def split_rows(rows: Sequence[dict], holdout: int, seed: int = 42) -> tuple[list[dict], list[dict]]:
  """(train, eval): `held_out_indices` rows are the evaluation split, the rest (in order) training."""
  held = held_out_indices(len(rows), holdout, seed)
  is_held = np.zeros(len(rows), bool)
  is_held[held] = True
  return [r for r, h in zip(rows, is_held) if not h], [rows[i] for i in held]


def make_conversations(name: str, source_cfg: Any) -> Conversations:
  """Every row of the `data.sources.<name>` chat source (`sources.make_source` takes its split)."""
  kind, path = source_cfg["kind"], source_cfg["path"]
  if kind == "chat_jsonl":
    rows = load_chat_jsonl(path)
  elif kind == "prompt_completion_jsonl":
    rows = load_prompt_completion_jsonl(path)
  elif kind == "structured_em":
    rows = load_structured_em(source_cfg["name"] or name, path=path, answer=source_cfg["answer"] or "misaligned")
  else:
    raise ValueError(f"data.sources.{name}.kind: {kind!r} is not a chat source ({', '.join(CHAT_KINDS)})")
  return Conversations(rows, f"{kind} source {name!r} ({path or 'hub'})")


class ChatExample:
  """conversation -> {inputs, targets, loss_mask}: loss on assistant tokens only, less the row's `loss_drop`.

  Conversations longer than `seq_len + 1` tokens are cut to that length when
  `truncate` (`sft_stats` counts them), else refused.
  A class rather than a closure so grain worker processes can pickle it.
  """

  def __init__(self, tokenizer, seq_len: int, truncate: bool = True):
    self.tokenizer = tokenizer
    self.seq_len = int(seq_len)
    self.truncate = truncate

  def token_ids_and_mask(self, row: dict) -> tuple[list[int], list[int]]:
    return chat.assistant_mask(self.tokenizer, row["messages"])

  def ids_and_loss_mask(self, row: dict, where: str = "") -> tuple[list[int], np.ndarray, int]:
    """(the untruncated ids, their loss mask [len(ids) - 1] with `loss_drop` applied, drops past the cut).

    `where` names the row in errors (default: its first user turn).
    """
    ids, mask = self.token_ids_and_mask(row)
    loss_mask_T = np.asarray(mask[1:], np.float32)
    if "loss_drop" not in row:
      return ids, loss_mask_T, 0
    where = where or f"a conversation (first user turn: {row['messages'][0]['content'][:60]!r})"
    drops = np.asarray(loss_drop_of(row, where), np.int64)
    for p in drops:
      if p >= len(loss_mask_T) or loss_mask_T[p] != 1:
        raise ValueError(f"{where}: `loss_drop` position {p} is not a loss position (the conversation's "
                         f"{len(loss_mask_T)} targets have the loss at {np.flatnonzero(loss_mask_T).tolist()})")
    loss_mask_T[drops] = 0
    return ids, loss_mask_T, int(np.sum(drops >= self.seq_len))

  def __call__(self, row: dict) -> dict[str, np.ndarray]:
    ids, loss_mask_T, _ = self.ids_and_loss_mask(row)
    limit = self.seq_len + 1  # inputs and targets are the sequence shifted by one
    if len(ids) > limit:
      if not self.truncate:
        raise ValueError(f"a conversation has {len(ids)} tokens, more than data.seq_len + 1 = {limit}, and "
                         f"data.truncate is off (first user turn: {row['messages'][0]['content'][:60]!r})")
      ids, loss_mask_T = ids[:limit], loss_mask_T[:limit - 1]
    ids_arr = np.asarray(ids, np.int32)
    return {"inputs": ids_arr[:-1], "targets": ids_arr[1:], "loss_mask": loss_mask_T}


def sft_stats(examples: ChatExample, rows: Sequence[dict], where: str = "rows") -> dict:
  """Counts reported before training: conversations, truncated ones, tokens, trained tokens.

  With any row carrying `loss_drop` (each checked here, before training, as `{where} row {i}`), also the
  positions dropped and those of them past a truncation (ignored).
  """
  truncated = tokens = trained = dropped = cut = 0
  for i, row in enumerate(rows):
    ids, loss_mask_T, row_cut = examples.ids_and_loss_mask(row, f"{where} row {i}")
    truncated += len(ids) > examples.seq_len + 1
    tokens += min(len(ids), examples.seq_len + 1)
    trained += int(loss_mask_T[:examples.seq_len].sum())
    dropped += len(row.get("loss_drop", []))
    cut += row_cut
  stats = {"conversations": len(rows), "truncated": truncated, "tokens": tokens, "trained_tokens": trained}
  if any("loss_drop" in row for row in rows):
    stats.update(dropped_tokens=dropped, drops_past_truncation=cut)
  return stats
