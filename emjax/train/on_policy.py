"""On-policy batches: every step the student samples completions from its current weights.

    loop: set_weights(params, frozen) -> next(source) -> step(teacher scores the same tokens)
    source: this step's prompts -> sampler (student's weights, on device) -> training rows (on device)

The source implements the loop's batch-source protocol (`emjax.train.batches`):
the loop hands it the train state's parameters right before each batch, it
samples with them through the jitted sampler (LoRA adapters applied, not merged;
one compilation, since every shape is static), and assembles the training rows
from the rollout without leaving the devices:

    row = [left padding | prompt | completion | right padding]   (P + T tokens)
    inputs = row[:-1], targets = row[1:], loss_mask = 1 on completion targets,
    sample_logprobs = the log-probability each completion token was sampled with.

The teacher scores those rows inside the train step (it is a step argument), so
an objective on them is the student's divergence to the teacher on the
student's own prefixes: `reverse_kl` / `jsd` over the full vocabulary, or
`sampled_reverse_kl` (the sampled-token estimator, which reads sample_logprobs).

Determinism and resume: step s (the s-th batch of the run) takes prompts
s*B .. s*B+B-1 of a sequence of seeded permutations of the prompt file (one per
epoch), and samples them with the seed (config.on_policy.seed, s); the student's
weights at step s are the checkpoint's, so a resumed run draws the same rollouts
and reaches the same losses as an uninterrupted one. The source's position is
its step count (and, with lambda < 1, the fixed-sequence source's position).

The `config.on_policy` block and its checks live in `emjax.train.settings` (`on_policy_block`,
`check_on_policy`), not here: this module samples through `emjax.sample.run`, which validates the
sample job's config with `settings`, so `settings` must not import this module.

GKD's lambda (`config.on_policy.mix_lambda`): each step is on-policy with
probability lambda (a seeded coin per step), else a batch of fixed sequences
from `config.data` (e.g. teacher samples or a dataset's answers) comes instead.

Every process builds the same global batch of prompts (they are few, and the
sampler takes global arrays); each device samples and trains on its own rows.

Filtered rollouts (`rollout_filter(prompt_record, text, finish_reason) -> None | reason`,
e.g. the subliminal-learning filters of emjax.experiments.sl_data, which this module
cannot import): the rollouts come to the host (gathered from every process), each is
decoded (up to, not including, the stop token it ended on; finish_reason 'stop' or
'length' as in the sample job) and judged on process 0 alone (a judge may be an API
or random; a filter with `collective = True`, e.g. a judge model on the global mesh, runs
on every process, and one with a `batch(records, texts, finish_reasons)` method judges
the step's rollouts in one call), whose verdicts every process receives; a rejected rollout's loss_mask is
zeroed on the devices, so it adds nothing to the loss or its token count (a batch of
rejects has loss 0: the step divides by max(tokens, 1)). The cumulative counts
{"total", "kept", "rejected": {reason: n}} of on-policy rollouts are part of the
source's state (a resumed run continues them) and, with `stats_path`, are rewritten
atomically after every on-policy step by process 0. Without a filter nothing leaves
the devices.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from emjax.models import lora as lora_lib
from emjax.sample import run as sample_run
from emjax.sample import sampler as sampler_lib
from emjax.train import batches as batches_lib
from emjax.train import settings

log = logging.getLogger(__name__)

# (prompt record as in the prompts file, completion text, 'stop' | 'length') -> None (kept) or why not.
RolloutFilter = Callable[[dict, str, str], "str | None"]


def assemble_rows(prompt_BxP: jax.Array, prompt_len_B: jax.Array, completion_BxT: jax.Array,
                  completion_len_B: jax.Array, sampled_lp_BxT: jax.Array, seq_len: int) -> dict[str, jax.Array]:
  """Training rows from left-padded prompts and their completions (see the module docstring)."""
  b, p = prompt_BxP.shape
  t = completion_BxT.shape[1]
  row = jnp.concatenate([prompt_BxP, completion_BxT], axis=1)  # [B, P + T]
  slot = jnp.arange(p + t)[None]
  first = p - prompt_len_B[:, None]  # the slot of each row's first prompt token
  real = (slot >= first) & (slot < p + completion_len_B[:, None])
  lp_row = jnp.concatenate([jnp.zeros((b, p), jnp.float32), sampled_lp_BxT.astype(jnp.float32)], axis=1)
  width = seq_len + 1
  pad = width - (p + t)

  def widen(x):
    return jnp.pad(x, [(0, 0), (0, pad)])

  row, real, lp_row = widen(row), widen(real), widen(lp_row)
  slot = jnp.arange(width)[None]
  is_completion = (slot >= p) & real
  positions = jnp.where(real, slot - first, 0)
  return {
      "inputs": jnp.where(real, row, 0)[:, :-1].astype(jnp.int32),
      "positions": positions[:, :-1].astype(jnp.int32),
      "segment_ids": real[:, :-1].astype(jnp.int32),
      "targets": jnp.where(real, row, 0)[:, 1:].astype(jnp.int32),
      "loss_mask": is_completion[:, 1:].astype(jnp.float32),
      "sample_logprobs": lp_row[:, 1:],
  }


class OnPolicySource:
  """The loop's batches sampled from the student each step (module docstring)."""

  def __init__(self, trainer, tokenizer, *, fixed: batches_lib.BatchSource | None = None,
               rollout_filter: RolloutFilter | None = None, stats_path: str = ""):
    config = trainer.config
    settings.check_on_policy(config)
    oc = config.on_policy
    self.config, self.oc = config, oc
    self.batch_size = int(config.train.batch_size)
    self.seq_len = int(config.data.seq_len)
    self.mix_lambda = float(oc.mix_lambda)
    if self.mix_lambda < 1.0 and fixed is None:
      raise ValueError("config.on_policy.mix_lambda < 1 mixes in fixed sequences: config.data must give them")
    self.fixed = fixed
    self.prompt_len, self.new_tokens = int(oc.max_prompt_length), int(oc.max_new_tokens)
    prompts_path = os.path.abspath(os.path.expanduser(oc.prompts))
    if not os.path.isfile(prompts_path):
      raise FileNotFoundError(f"config.on_policy.prompts={oc.prompts!r} does not exist")
    sc = ml_collections.ConfigDict(dict(chat_template=bool(oc.chat_template), add_bos=bool(oc.add_bos)))
    self.prompts = sample_run.read_prompts(prompts_path, tokenizer, sc, self.prompt_len,
                                          "config.on_policy.max_prompt_length")
    vocab = trainer.model_cfg.vocab_size
    self.sampling = sample_run.sampling_params(ml_collections.ConfigDict(dict(
        stop_token_ids=(), stop_at_eos=bool(oc.stop_at_eos), stop_at_end_of_turn=bool(oc.stop_at_end_of_turn),
        max_new_tokens=self.new_tokens, temperature=float(oc.temperature), top_k=int(oc.top_k),
        top_p=float(oc.top_p), min_p=0.0, n=1, seed=int(oc.seed))), tokenizer)
    self.sampler = sampler_lib.Sampler(
        dataclasses.replace(trainer.model_cfg, remat="none"), mesh=trainer.mesh,
        prompt_buckets=(self.prompt_len,), max_new_tokens_cap=self.new_tokens,
        unroll_layers=bool(oc.unroll_layers), lora=trainer.lora_cfg)
    self.sampling.validate(vocab, self.new_tokens)
    shardings = {k: v for k, v in trainer.batch_shardings.items()}
    if rollout_filter is not None and "loss_mask" not in shardings:
      raise ValueError(f"a rollout filter zeroes rejected rollouts' loss_mask, which config.train.objective="
                       f"{config.train.objective!r} does not read")
    self.rollout_filter, self.stats_path, self.tokenizer = rollout_filter, stats_path, tokenizer
    self.counts = _no_counts()

    def assemble(prompt_BxP, prompt_len_B, completion_BxT, completion_len_B, sampled_lp_BxT, keep_B=None):
      rows = assemble_rows(prompt_BxP, prompt_len_B, completion_BxT, completion_len_B, sampled_lp_BxT,
                           seq_len=self.seq_len)
      if keep_B is not None:  # a rejected rollout: no target of its row counts
        rows["loss_mask"] = rows["loss_mask"] * keep_B[:, None]
      return _select(rows, tuple(shardings))

    self._assemble = jax.jit(assemble, out_shardings=shardings)
    self._keys = tuple(shardings)
    self.step = 0
    self._weights: tuple[Any, Any] | None = None
    self._frozen_src = self._frozen_prepared = None
    self.last_kind = ""  # 'on_policy' | 'fixed': what the latest batch was
    log.info("on-policy batches: %d prompts from %s, %d new tokens each, lambda=%s", len(self.prompts),
             prompts_path, self.new_tokens, self.mix_lambda)

  # --------------------------------------------------------------------------- the protocol

  def __iter__(self):
    return self

  def set_weights(self, params, frozen) -> None:
    self._weights = (params, frozen)

  def __next__(self) -> dict:
    step, self.step = self.step, self.step + 1
    if not self._is_on_policy(step):
      self.last_kind = "fixed"
      return next(self.fixed)
    if self._weights is None:
      raise RuntimeError("OnPolicySource: set_weights(params, frozen) must be called before every batch")
    params, frozen = self._weights
    self._weights = None  # the step that follows donates them
    tokens_BxP, lengths_B, seeds_B = self._prompt_batch(step)
    sampling = dataclasses.replace(self.sampling, seed=self._rollout_seed(step))
    out = self.sampler.sample_on_device(self._sampling_weights(params, frozen), tokens_BxP, lengths_B, seeds_B,
                                        sampling)
    self.last_kind = "on_policy"
    put = self.sampler._put_batch  # pylint: disable=protected-access
    rows = (put(tokens_BxP), put(lengths_B), out["tokens"], out["lengths"], out["sampled_logprobs"])
    if self.rollout_filter is None:
      return self._assemble(*rows)
    keep_B = self._judge_rollouts(step, out)
    batch = self._assemble(*rows, put(keep_B))
    self._write_stats()
    return batch

  def order(self) -> dict[str, Any]:
    """What fixes the sequence of rollouts besides the weights: compared on resume."""
    digest = hashlib.sha256()
    for p in self.prompts:
      digest.update(f"{p.key}\t{','.join(map(str, p.tokens))}\n".encode())
    return {"prompts": digest.hexdigest()[:16], "num_prompts": len(self.prompts), "seed": int(self.oc.seed),
            "batch_size": self.batch_size, "mix_lambda": self.mix_lambda,
            "sampling": [self.sampling.temperature, self.sampling.top_k, self.sampling.top_p, self.new_tokens,
                         self.prompt_len, list(self.sampling.stop_token_ids)]}

  def get_state(self) -> dict[str, Any]:
    state = {"step": self.step, "order": self.order()}
    if self.fixed is not None:
      state["fixed"] = self.fixed.get_state()
    if self.rollout_filter is not None:
      state["rollouts"] = copy.deepcopy(self.counts)
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "step" not in state or "order" not in state:
      raise ValueError("the checkpoint's data position is not an on-policy source's (it was written by a run "
                       "without config.on_policy.enabled): resume it as it was, or start a new workdir")
    saved, now = dict(state["order"]), self.order()
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
      raise ValueError(f"the checkpoint's on-policy position was saved with other {', '.join(changed)} "
                       f"({', '.join(f'{k}: {saved.get(k)!r} vs {now[k]!r}' for k in changed)}; config.on_policy.* / "
                       "config.train.batch_size): resuming would silently change the rollouts; start a new workdir")
    # Adding or dropping the filter mid-run would change what trains on silently, as a new order would.
    if self.rollout_filter is not None and "rollouts" not in state and int(state["step"]) > 0:
      raise ValueError("the checkpoint's on-policy position was saved without a rollout filter, and this run "
                       "filters rollouts: resuming would change the training data mid-run; start a new workdir")
    if self.rollout_filter is None and "rollouts" in state:
      raise ValueError("the checkpoint's on-policy position was saved with a rollout filter, and this run has "
                       "none: resuming would change the training data mid-run; pass the same filter")
    self.step = int(state["step"])
    if self.fixed is not None and "fixed" in state:
      self.fixed.set_state(state["fixed"])
    if self.rollout_filter is not None:
      saved = state.get("rollouts") or _no_counts()
      self.counts = {"total": int(saved["total"]), "kept": int(saved["kept"]),
                     "rejected": {str(k): int(v) for k, v in saved["rejected"].items()}}

  def close(self) -> None:
    if self.fixed is not None:
      self.fixed.close()

  # --------------------------------------------------------------------------- pieces

  def _is_on_policy(self, step: int) -> bool:
    if self.mix_lambda >= 1.0:
      return True
    if self.mix_lambda <= 0.0:
      return False
    return bool(np.random.default_rng([int(self.oc.seed), 1, step]).random() < self.mix_lambda)

  def _rollout_seed(self, step: int) -> int:
    return int(np.random.default_rng([int(self.oc.seed), 2, step]).integers(0, 2**31))

  def prompt_indices(self, step: int) -> np.ndarray:
    """The prompts of step `step`: consecutive positions in one seeded permutation per epoch."""
    return batches_lib.epoch_rows(step, self.batch_size, len(self.prompts), (int(self.oc.seed), 3))

  def _prompt_batch(self, step: int):
    idx = self.prompt_indices(step)
    tokens = np.zeros((len(idx), self.prompt_len), np.int32)
    lengths = np.zeros((len(idx),), np.int32)
    seeds = np.zeros((len(idx),), np.uint32)
    for r, i in enumerate(idx):
      p = self.prompts[i]
      tokens[r, self.prompt_len - len(p.tokens):] = p.tokens
      lengths[r] = len(p.tokens)
      seeds[r] = zlib.crc32(f"{p.key}#{step}#{r}".encode())
    return tokens, lengths, seeds

  def _judge_rollouts(self, step: int, out: Mapping[str, jax.Array]) -> np.ndarray:
    """[B] float32, 1 = kept: every rollout decoded and judged by `rollout_filter` on process 0."""
    fields = {k: out[k] for k in ("tokens", "lengths", "stopped")}
    if jax.process_count() > 1:  # every process's rows, on every process
      host = multihost_utils.process_allgather(fields, tiled=True)
    else:
      host = jax.device_get(fields)
    idx = self.prompt_indices(step)
    reasons: list[str | None] = []
    # A filter whose judge is a collective (a model on the global mesh) runs on every process.
    collective = bool(getattr(self.rollout_filter, "collective", False))
    if jax.process_index() == 0 or collective:
      records, texts, finishes = [], [], []
      for r, i in enumerate(idx):
        stopped = bool(host["stopped"][r])
        tokens = np.asarray(host["tokens"][r, :int(host["lengths"][r])])
        records.append(self.prompts[i].record)
        texts.append(self.tokenizer.decode((tokens[:-1] if stopped else tokens).tolist()))
        finishes.append(sampler_lib.FINISH_STOP if stopped else sampler_lib.FINISH_LENGTH)
      batch = getattr(self.rollout_filter, "batch", None)  # one judge call for the step's rollouts
      verdicts = (batch(records, texts, finishes) if batch is not None else
                  [self.rollout_filter(rec, t, f) for rec, t, f in zip(records, texts, finishes)])
      if jax.process_index() == 0:
        reasons = [None if v is None else (str(v) or "rejected") for v in verdicts]
    reasons = _from_process_0(reasons)
    if len(reasons) != len(idx):
      raise RuntimeError(f"rollout filter: {len(reasons)} verdicts for {len(idx)} rollouts")
    self.counts["total"] += len(reasons)
    self.counts["kept"] += sum(r is None for r in reasons)
    for r in reasons:
      if r is not None:
        self.counts["rejected"][r] = self.counts["rejected"].get(r, 0) + 1
    return np.asarray([r is None for r in reasons], np.float32)

  def _write_stats(self) -> None:
    if not self.stats_path or jax.process_index() != 0:
      return
    path = os.path.abspath(os.path.expanduser(self.stats_path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"step": self.step, **self.counts}, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # a reader never sees half a file

  def _sampling_weights(self, params, frozen):
    """Base + adapters (or the full parameters) in the sampler's layout, without merging adapters."""
    if not self.sampler.unroll_layers:
      return lora_lib.merge_trees(frozen, params) if frozen else params
    # Unrolled decode takes per-layer weights: the frozen base is laid out once and kept,
    # the (small, changing) adapters every step.
    if not frozen:
      return self.sampler.prepare_weights(params)
    if self._frozen_src is not frozen:
      self._frozen_src, self._frozen_prepared = frozen, self.sampler.prepare_weights(frozen)
    adapters = self.sampler.prepare_weights(params)
    base = self._frozen_prepared
    layers = [lora_lib.merge_trees(b, a) for b, a in zip(base["layers"], adapters["layers"])]
    return dict(lora_lib.merge_trees(base, {k: v for k, v in adapters.items() if k != "layers"}), layers=layers)


def _no_counts() -> dict[str, Any]:
  return {"total": 0, "kept": 0, "rejected": {}}


def _from_process_0(reasons: list[str | None]) -> list[str | None]:
  """Process 0's verdicts on every process (others pass []): JSON bytes, their length broadcast first."""
  if jax.process_count() == 1:
    return reasons
  payload = np.frombuffer(json.dumps(reasons).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if payload is None else payload.size)))
  buf = multihost_utils.broadcast_one_to_all(payload if payload is not None else np.zeros((size,), np.uint8))
  return json.loads(np.asarray(buf, np.uint8).tobytes().decode())


def _select(batch: dict, keys: tuple[str, ...]) -> dict:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"the step (config.train.objective) reads batch keys {missing} that on-policy rollouts do "
                     f"not give (they give {sorted(batch)})")
  return {k: batch[k] for k in keys}


def make_source(trainer, tokenizer, *, rollout_filter: RolloutFilter | None = None,
                stats_path: str = "") -> OnPolicySource:
  """The loop's `make_batch_source` for `config.on_policy.enabled` (bind the keywords with functools.partial)."""
  config = trainer.config
  fixed = None
  if float(config.on_policy.mix_lambda) < 1.0:
    fixed = batches_lib.GrainBatchSource(config.data, tokenizer, config.train.batch_size, seed=config.train.seed)
  return OnPolicySource(trainer, tokenizer, fixed=fixed, rollout_filter=rollout_filter, stats_path=stats_path)
