"""Continuous batching: a fixed number of decode slots over one preallocated KV cache, each slot
refilled with the next prompt as soon as its row stops.

The static sampler (`Sampler.generate`) decodes a batch until its longest row finishes, so rows that
stop early idle. Here every slot is a row of a cache of (bucket - 1) + max_new_tokens_cap columns,
for the bucket of the longest prompt (the static sampler's widest batch), laid out as the static
sampler lays a row out: the prompt, left-padded to its own bucket, in the first columns, then the
answer; each row writes its next token at its own
column (`transformer.write_cache` with a per-row index), so a row's numbers do not depend on when it
entered or on the other slots. Refilling a slot prefills the new prompts with the static sampler's
prefill (grouped by bucket) and empties the rest of the slot (segment id 0: never attended to).

Prompts are yielded in the static sampler's order (by bucket, then as given), so a job's file reads
the same whichever batching wrote it. What a row draws is the static sampler's: the same row keys (the prompt's seed and the sample's
index) folded with the row's own step, the same `sample_logits`, stop ids and limits, so greedy
answers are the static ones token for token (up to float ties, since attention sums over another
cache length) and sampled ones too; and a prompt's answer is the same bits whatever else was in the
batch (for one cache width, slot count and refill size), so a resumed job writes what the
uninterrupted one would have. The decode runs in chunks of
up to `chunk_steps` steps inside one `lax.while_loop`, ending early when enough slots are free for a
refill while prompts wait; the host then refills the free slots (prefills of a fixed number of rows, so the compiled
programs are one per bucket, not per run length).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from emjax import sharding as shd
from emjax.models import transformer
from emjax.sample import sampler as sampler_lib


@dataclasses.dataclass
class _Job:
  prompt: int  # index of the prompt
  sample: int  # index of the sample (0 .. n-1)


class ContinuousSampler:
  """Continuous batching over a `Sampler`'s compiled prefill and model (its buckets, cap, mesh, LoRA).

  Args:
    sampler: the static sampler whose architecture, buckets and cap are used.
    slots: decode rows (a multiple of the data-parallel size).
    chunk_steps: most decode steps between two visits of the host.
    refill_rows: prompts prefilled together (0 = slots // 8, 1 to 16): a chunk ends once this many
      slots are free (or every waiting prompt fits), and every prefill has exactly this many rows, so
      a prompt's numbers never depend on how many were refilled beside it (XLA's results for a row
      can change with the batch's shape, not with the other rows).
  """

  def __init__(self, sampler: sampler_lib.Sampler, *, slots: int = 32, chunk_steps: int = 16, refill_rows: int = 0):
    if slots < 1 or slots % sampler.data_parallel:
      raise ValueError(f"slots={slots}: a positive multiple of the data-parallel size ({sampler.data_parallel})")
    if chunk_steps < 1:
      raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    if refill_rows < 0 or refill_rows > slots:
      raise ValueError(f"refill_rows={refill_rows}: 0 (automatic) or at most slots={slots}")
    self.sampler = sampler
    self.slots = int(slots)
    refill = int(refill_rows) or min(max(slots // 8, 1), 16)
    multiple = sampler.data_parallel
    if sampler.prefill_chunk and refill > sampler.prefill_chunk:  # chunked prefills take whole chunks
      multiple = math.lcm(multiple, sampler.prefill_chunk)
    self.refill_rows = -(-refill // multiple) * multiple
    self.stats = {"decode_steps": 0, "prefills": 0}  # over this engine's life: what a benchmark reads
    self.chunk_steps = int(chunk_steps)
    self.trace_counts = sampler.trace_counts  # one counter: prefill is the sampler's own
    self.init_fn = jax.jit(self._init, static_argnames=("columns",))
    self.insert_fn = jax.jit(self._insert, donate_argnames=("state",))
    self.decode_fn = jax.jit(self._decode_chunk, static_argnames=("rules",), donate_argnames=("state",),
                             compiler_options=sampler_lib.decode_compiler_options(sampler.mesh))

  # --------------------------------------------------------------------------- device functions

  def _outputs(self, rows: int) -> dict:
    cap, k_top = self.sampler.max_new_tokens_cap, self.sampler.top_logprobs
    out = {"tokens": jnp.zeros((rows, cap), jnp.int32), "logprobs": jnp.zeros((rows, cap), jnp.float32),
           "sampled_logprobs": jnp.zeros((rows, cap), jnp.float32)}
    if k_top:
      out["top_ids"] = jnp.zeros((rows, cap, k_top), jnp.int32)
      out["top_logprobs"] = jnp.zeros((rows, cap, k_top), jnp.float32)
    return out

  def _init(self, *, columns: int) -> dict:
    """Every slot empty and finished, over `columns` cache columns."""
    self.trace_counts["continuous_init"] += 1
    s, cfg = self.slots, self.sampler.model_cfg
    with shd.activation_sharding(self.sampler.mesh):
      cache = transformer.init_cache(cfg, s, columns, self.sampler.cache_dtype)
      cache = self.sampler._constrain_cache(self.sampler._unstack_cache(cache))
      zeros = jnp.zeros((s,), jnp.int32)
      return {"cache": cache, "steps": jnp.zeros((), jnp.int32), "column": zeros, "token": zeros, "position": zeros, "length": zeros, "limit": zeros,
              "live": jnp.zeros((s,), bool), "stopped": jnp.zeros((s,), bool),
              "keys": jnp.zeros((s, 2), jnp.uint32), "outputs": self._outputs(s)}

  def _insert(self, state, rows_R, small, last_tokens_R, prompt_lengths_R, keys_Rx2, limits_R, bucket_cols):
    """Slots `rows_R` (== slots: padding, dropped) take the prefilled rows of `small` (a prefill cache
    whose first `bucket_cols` columns hold the prompts); the rest of each slot is emptied."""
    self.trace_counts["continuous_insert"] += 1

    columns = state["cache"]["positions"].shape[1]

    def widen(x, axis):  # a prefill cache's columns -> all of a slot's
      pad = [(0, 0)] * x.ndim
      pad[axis] = (0, columns - x.shape[axis])
      return jnp.pad(x, pad)

    def put(buf, x):
      return buf.at[rows_R].set(x.astype(buf.dtype), mode="drop")

    with shd.activation_sharding(self.sampler.mesh):
      cache = dict(state["cache"])
      for name in ("k", "v"):
        axis = transformer.CACHE_LOGICAL_AXES[name].index("length") - 1  # per layer: no layers axis
        layers = small[name] if isinstance(small[name], (list, tuple)) else list(small[name])
        new = [put(buf, widen(x, axis)) for buf, x in zip(cache[name], layers)]
        cache[name] = new if isinstance(cache[name], (list, tuple)) else jnp.stack(new)
      cache["positions"] = put(cache["positions"], widen(small["positions"], 1))
      cache["segment_ids"] = put(cache["segment_ids"], widen(small["segment_ids"], 1))
      r = rows_R.shape[0]
      out = {k: put(v, jnp.zeros((r, *v.shape[1:]), v.dtype)) for k, v in state["outputs"].items()}
      return dict(state, cache=self.sampler._constrain_cache(cache), outputs=out,
                  column=put(state["column"], jnp.full((r,), bucket_cols, jnp.int32)),
                  token=put(state["token"], last_tokens_R), position=put(state["position"], prompt_lengths_R - 1),
                  length=put(state["length"], jnp.zeros_like(rows_R)), limit=put(state["limit"], limits_R),
                  live=put(state["live"], jnp.ones(r, bool)),
                  stopped=put(state["stopped"], jnp.zeros(r, bool)), keys=put(state["keys"], keys_Rx2))

  def _decode_chunk(self, weights, state, stop_ids_S, knobs, refill_at, edit=None, *,
                    rules: sampler_lib.SamplingRules):
    """Up to `chunk_steps` decode steps of every live slot; ends early once `refill_at` (> 0) slots are free."""
    self.trace_counts["continuous_decode"] += 1
    sampler, cap, k_top = self.sampler, self.sampler.max_new_tokens_cap, self.sampler.top_logprobs
    max_new = knobs["max_new_tokens"]
    rows = self.slots
    columns = state["cache"]["positions"].shape[1]
    ones_Bx1 = jnp.ones((rows, 1), jnp.int32)
    slot_ids = jnp.arange(rows)

    def cond(c):
      live = c["state"]["live"]
      free = rows - jnp.sum(live.astype(jnp.int32))
      return (c["i"] < self.chunk_steps) & jnp.any(live) & ~((refill_at > 0) & (free >= refill_at))

    def body(c):
      s = c["state"]
      live_B = s["live"]
      model = sampler._model(weights, sampler.decode_graphdef)
      logits_Bx1xV, cache = model(s["token"][:, None], s["position"][:, None], ones_Bx1,
                                  cache=sampler._stack_cache(s["cache"]), cache_index=s["column"], edit=edit)
      cache = sampler._unstack_cache(cache)
      logits_BxV = logits_Bx1xV[:, 0].astype(jnp.float32)
      step_B = s["length"]
      keys_Bx2 = jax.vmap(jax.random.fold_in)(s["keys"], step_B)
      token_B, raw_lp_B, sampled_lp_B, lse_B = sampler_lib.sample_logits(logits_BxV, keys_Bx2, knobs, rules,
                                                                         sampler.sort_candidates)
      token_B = jnp.where(live_B, token_B, 0)
      col_B = jnp.where(live_B, jnp.minimum(step_B, cap - 1), cap)  # finished rows write nowhere
      out = dict(s["outputs"])
      write = lambda buf, x: buf.at[slot_ids, col_B].set(x, mode="drop")  # noqa: E731
      out["tokens"] = write(out["tokens"], token_B)
      out["logprobs"] = write(out["logprobs"], raw_lp_B)
      out["sampled_logprobs"] = write(out["sampled_logprobs"], sampled_lp_B)
      if k_top:
        top_vals_BxK, top_ids_BxK = jax.lax.top_k(logits_BxV, k_top)
        out["top_ids"] = write(out["top_ids"], top_ids_BxK)
        out["top_logprobs"] = write(out["top_logprobs"], top_vals_BxK - lse_B[:, None])
      hit_stop_B = live_B & jnp.any(token_B[:, None] == stop_ids_S[None, :], axis=-1)
      done_B = live_B & (hit_stop_B | (step_B + 1 >= jnp.minimum(s["limit"], max_new)))
      # A finished row's column stops at its last one (within the slot) until it is refilled.
      new = dict(s, cache=sampler._constrain_cache(cache), steps=s["steps"] + 1, column=jnp.minimum(s["column"] + live_B, columns - 1),
                 token=jnp.where(live_B, token_B, s["token"]),
                 position=s["position"] + live_B, length=s["length"] + live_B, live=live_B & ~done_B,
                 stopped=s["stopped"] | hit_stop_B, outputs=out)
      return {"i": c["i"] + 1, "state": new}

    with shd.activation_sharding(sampler.mesh):
      final = jax.lax.while_loop(cond, body, {"i": jnp.zeros((), jnp.int32), "state": state})
    return final["state"]

  # --------------------------------------------------------------------------- host API

  def generate(self, params: dict, prompts: Sequence[Sequence[int]],
               sampling: sampler_lib.SamplingParams | None = None, *, prompt_seeds: Sequence[int] | None = None,
               edit: transformer.ResidualEdit | None = None, max_new_tokens_per_prompt: Sequence[int] | None = None,
               **overrides) -> sampler_lib.SampleOutput:
    """`Sampler.generate`'s contract (the same outputs, row for row), decoded by continuous batching."""
    parts = dict(self.stream(params, prompts, sampling, prompt_seeds=prompt_seeds, edit=edit,
                             max_new_tokens_per_prompt=max_new_tokens_per_prompt, **overrides))
    first = next(iter(parts.values()))
    cat = lambda name: (None if getattr(first, name) is None  # noqa: E731
                        else np.concatenate([getattr(parts[i], name) for i in range(len(prompts))]))
    return sampler_lib.SampleOutput(**{f.name: cat(f.name) for f in dataclasses.fields(sampler_lib.SampleOutput)})

  def stream(self, params: dict, prompts: Sequence[Sequence[int]], sampling: sampler_lib.SamplingParams | None = None,
             *, prompt_seeds: Sequence[int] | None = None, edit: transformer.ResidualEdit | None = None,
             max_new_tokens_per_prompt: Sequence[int] | None = None, cache_bucket: int = 0,
             **overrides) -> Iterator[tuple[int, sampler_lib.SampleOutput]]:
    """(prompt index, its `SampleOutput` of one prompt) as prompts complete, in the static sampler's
    order (by bucket, then as given; what a job writes as it goes). The cache is as wide as the
    `cache_bucket` (0: the bucket of the longest prompt here) needs: a job passes the bucket of its
    whole prompts file, so that a resumed run, with fewer prompts left, uses the same width (and
    writes the same bits)."""
    sampler = self.sampler
    sampling = dataclasses.replace(sampling or sampler_lib.SamplingParams(), **overrides)
    prompts = sampler.check_inputs(prompts, sampling, prompt_seeds)
    seeds = np.asarray(prompt_seeds if prompt_seeds is not None else np.arange(len(prompts)), np.int64) % 2**32
    n, steps = sampling.n, sampling.max_new_tokens
    limits = (np.full((len(prompts),), steps, np.int32) if max_new_tokens_per_prompt is None
              else sampler_lib.check_limits(max_new_tokens_per_prompt, len(prompts), steps))
    weights = sampler.prepare_weights(params)
    if edit is not None:
      edit = transformer.ResidualEdit(*(sampler._put_replicated(np.asarray(x, np.float32)) for x in edit))
    stop_ids_S, knobs = sampler_lib.decode_inputs(sampling, sampler.model_cfg.vocab_size)
    knobs = {k: sampler._put_replicated(v) for k, v in knobs.items()}
    stop_ids_S = sampler._put_replicated(stop_ids_S)
    base_key = jax.random.PRNGKey(np.uint32(sampling.seed % 2**32))
    k_top = sampler.top_logprobs

    # The static sampler's order: by bucket, then as given. Jobs are fed and answers yielded in it.
    order = sorted(range(len(prompts)), key=lambda i: (sampler.bucket_for(len(prompts[i])), i))
    widest = max(sampler.bucket_for(len(p)) for p in prompts)
    if cache_bucket:
      if cache_bucket not in sampler.buckets or cache_bucket < widest:
        raise ValueError(f"cache_bucket={cache_bucket}: one of the sampler's buckets {sampler.buckets} holding "
                         f"every prompt (the longest needs {widest})")
      widest = cache_bucket

    def empty():
      out = {"tokens": np.zeros((1, n, steps), np.int32), "lengths": np.zeros((1, n), np.int32),
             "logprobs": np.zeros((1, n, steps), np.float32), "sampled_logprobs": np.zeros((1, n, steps), np.float32),
             "stopped": np.zeros((1, n), bool)}
      if k_top:
        out["top_ids"] = np.zeros((1, n, steps, k_top), np.int32)
        out["top_logprobs"] = np.zeros((1, n, steps, k_top), np.float32)
      return out

    pending = [_Job(i, j) for i in order for j in range(n)]
    pending.reverse()  # pop() from the end
    occupant: list[_Job | None] = [None] * self.slots
    partial: dict[int, dict[str, np.ndarray]] = {}
    left = {i: n for i in order}
    finished: dict[int, sampler_lib.SampleOutput] = {}
    next_out = 0  # order[next_out] is the next prompt to yield
    state = self.init_fn(columns=sampler.cache_length(widest))
    while pending or any(o is not None for o in occupant):
      free = [r for r, o in enumerate(occupant) if o is None]
      if pending and len(free) >= min(self.refill_rows, len(pending)):
        jobs = [pending.pop() for _ in range(min(len(free), len(pending)))]
        state = self._refill(weights, state, free[:len(jobs)], jobs, prompts, seeds, limits, base_key, edit)
        for r, job in zip(free, jobs):
          occupant[r] = job
      refill_at = min(self.refill_rows, len(pending)) if pending else 0
      state = self.decode_fn(weights, state, stop_ids_S, knobs, sampler._put_replicated(np.int32(refill_at)),
                             edit, rules=sampling.rules)
      live = np.asarray(_host(state["live"]))
      done = [r for r, o in enumerate(occupant) if o is not None and not live[r]]
      if not done:
        continue
      host = _host({"length": state["length"], "stopped": state["stopped"], **state["outputs"]})
      for r in done:
        job, m = occupant[r], int(host["length"][r])
        occupant[r] = None
        out = partial.setdefault(job.prompt, empty())
        for name in ("tokens", "logprobs", "sampled_logprobs", *(("top_ids", "top_logprobs") if k_top else ())):
          out[name][0, job.sample, :m] = host[name][r, :m]
        out["lengths"][0, job.sample] = m
        out["stopped"][0, job.sample] = bool(host["stopped"][r])
        left[job.prompt] -= 1
        if not left[job.prompt]:
          out = partial.pop(job.prompt)
          stopped = out.pop("stopped")
          finished[job.prompt] = sampler_lib.SampleOutput(
              finish_reasons=np.where(stopped, sampler_lib.FINISH_STOP, sampler_lib.FINISH_LENGTH),
              prompt_lengths=np.asarray([len(prompts[job.prompt])], np.int32),
              **{k: out.get(k) for k in ("tokens", "lengths", "logprobs", "sampled_logprobs", "top_ids",
                                         "top_logprobs")})
      while next_out < len(order) and order[next_out] in finished:
        yield order[next_out], finished.pop(order[next_out])
        next_out += 1
    self.stats["decode_steps"] += int(_host(state["steps"]))

  def _refill(self, weights, state, rows: list[int], jobs: list[_Job], prompts, seeds, limits, base_key, edit):
    """Prefill `jobs` into slots `rows`, per prompt bucket (a prompt is always prefilled in its own
    bucket, as the static sampler does) in prefills of exactly `refill_rows` rows."""
    groups: dict[int, list[tuple[int, _Job]]] = {}
    for r, job in zip(rows, jobs):
      groups.setdefault(self.sampler.bucket_for(len(prompts[job.prompt])), []).append((r, job))
    for bucket, whole in sorted(groups.items()):
      for start in range(0, len(whole), self.refill_rows):
        state = self._prefill_into(weights, state, bucket, whole[start:start + self.refill_rows], prompts, seeds,
                                   limits, base_key, edit)
    return state

  def _prefill_into(self, weights, state, bucket: int, group: list[tuple[int, _Job]], prompts, seeds, limits,
                    base_key, edit):
    sampler, count = self.sampler, self.refill_rows
    tokens_RxP = np.zeros((count, bucket), np.int32)
    lengths_R = np.ones((count,), np.int32)
    rows_R = np.full((count,), self.slots, np.int32)  # padding rows are dropped by the insertion
    prompt_seed_R, sample_R = np.zeros((count,), np.uint32), np.zeros((count,), np.uint32)
    limits_R = np.ones((count,), np.int32)
    for i, (r, job) in enumerate(group):
      p = prompts[job.prompt]
      tokens_RxP[i, bucket - len(p):] = p
      lengths_R[i], rows_R[i], limits_R[i] = len(p), r, limits[job.prompt]
      prompt_seed_R[i], sample_R[i] = seeds[job.prompt], job.sample
    fold = jax.vmap(jax.random.fold_in, (0, 0))
    keys_Rx2 = fold(fold(jnp.broadcast_to(base_key, (count, *base_key.shape)), jnp.asarray(prompt_seed_R)),
                    jnp.asarray(sample_R))
    self.stats["prefills"] += 1
    small = sampler.prefill_fn(weights, sampler._put_batch(tokens_RxP), sampler._put_batch(lengths_R), edit, n=1)
    return self.insert_fn(state, sampler._put_batch(rows_R), small, sampler._put_batch(tokens_RxP[:, -1]),
                          sampler._put_batch(lengths_R), sampler._put_batch(np.asarray(keys_Rx2)),
                          sampler._put_batch(limits_R), jnp.int32(bucket - 1))


def _host(tree):
  """Global arrays on the host of every process (across processes the slots are sharded)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def engine(sampler: sampler_lib.Sampler, *, slots: int, chunk_steps: int = 16) -> ContinuousSampler:
  """One `ContinuousSampler` per (sampler, slots, chunk_steps), kept on the sampler (and gone with it),
  so its compiled programs are reused by every job that samples with that sampler (an eval job's
  sets, a curve's steps)."""
  slots = -(-max(int(slots), 1) // sampler.data_parallel) * sampler.data_parallel
  per = sampler.__dict__.setdefault("_continuous_engines", {})
  if (slots, chunk_steps) not in per:
    per[(slots, chunk_steps)] = ContinuousSampler(sampler, slots=slots, chunk_steps=chunk_steps)
  return per[(slots, chunk_steps)]
