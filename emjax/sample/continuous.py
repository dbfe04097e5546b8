"""Continuous batching: a fixed number of decode slots over one preallocated KV cache, each slot refilled
with the next prompt as soon as its row stops.

The static sampler (`Sampler.generate`) decodes a batch until its longest row finishes, so rows that
stop early idle. Here every slot is a row of a cache of (bucket - 1) + max_new_tokens_cap columns, for
the bucket of the longest prompt (the static sampler's widest batch), laid out as the static sampler
lays a row out: the prompt, left-padded to its own bucket, in the first columns, then the answer; each
row writes its next token at its own column (`transformer.write_cache` with a per-row index), so a row's
numbers do not depend on when it entered or on the other slots. Refilling a slot copies a prompt's
prefilled row (the static sampler's prefill, in the prompt's own bucket) into it and empties the rest of
the slot (segment id 0: never attended to).

Prompts are yielded in the static sampler's order (by bucket, then as given), so a job's file reads the
same whichever batching wrote it. What a row draws is the static sampler's: the same row keys (the
prompt's seed and the sample's index) folded with the row's own step, the same `sample_logits`, stop ids
and limits, so greedy answers are the static ones token for token (up to float ties, since attention
sums over another cache length) and sampled ones too; and a prompt's answer is the same bits whatever
else was in the batch (for one cache width, slot count and prefill size), so a resumed job writes what
the uninterrupted one would have. The decode runs in chunks of up to `chunk_steps` steps inside one
`lax.while_loop`, ending early once `refill_at` slots (one by default) are free while prompts wait; the
host then refills the free slots from the staged prefill: the prompts at the head of the queue are
prefilled `prefill_rows` at a time (a fixed shape, so the compiled programs are one per bucket, not per
run length, and the weights are read once for several prompts), and each waits there for a free slot;
the n samples of a prompt share its prefilled row. `Batch` is a batch in progress that prompts join
between chunks (the server's).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from emjax import sharding as shd
from emjax.models import transformer
from emjax.sample import sampler as sampler_lib


@dataclasses.dataclass
class _Job:
  key: Any  # the prompt's key (a job's index, a server's request)
  sample: int  # index of the sample (0 .. n-1)
  tokens: list[int]
  seed: int
  limit: int


class ContinuousSampler:
  """Continuous batching over a `Sampler`'s compiled prefill and model (its buckets, cap, mesh, LoRA).

  Args:
    sampler: the static sampler whose architecture, buckets and cap are used.
    slots: decode rows (a multiple of the data-parallel size).
    chunk_steps: most decode steps between two visits of the host.
    prefill_rows: prompts prefilled together (0 = slots // 8 and at most 16, else 1 to slots; rounded up
      to a multiple of the data-parallel size): every prefill has exactly this many rows, so a prompt's
      numbers never depend on how many were prefilled beside it (XLA's results for a row can change
      with the batch's shape, not with the other rows). The prefilled rows wait (staged) for free
      slots, so a prefill reads the weights once for several prompts while slots are still refilled
      one at a time.
    refill_at: a chunk ends once this many slots are free while samples wait (1 to slots).
  """

  def __init__(self, sampler: sampler_lib.Sampler, *, slots: int = 32, chunk_steps: int = 16, prefill_rows: int = 0,
               refill_at: int = 1):
    if slots < 1 or slots % sampler.data_parallel:
      raise ValueError(f"slots={slots}: a positive multiple of the data-parallel size ({sampler.data_parallel})")
    if chunk_steps < 1:
      raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    if prefill_rows < 0:
      raise ValueError(f"prefill_rows={prefill_rows}: 0 (automatic) or at most slots={slots}")
    if not 1 <= refill_at <= slots:
      raise ValueError(f"refill_at={refill_at}: 1 .. slots={slots}")
    self.sampler = sampler
    self.slots = int(slots)
    rows = int(prefill_rows) or min(max(slots // 8, 1), 16)
    multiple = sampler.data_parallel
    if sampler.prefill_chunk and rows > sampler.prefill_chunk:  # chunked prefills take whole chunks
      multiple = math.lcm(multiple, sampler.prefill_chunk)
    self.prefill_rows = -(-rows // multiple) * multiple
    if self.prefill_rows > slots:
      raise ValueError(f"prefill_rows={prefill_rows}: {self.prefill_rows} once a multiple of the data-parallel size "
                       f"and the sampler's prefill_chunk, more than slots={slots}")
    self.refill_at = int(refill_at)
    self.insert_rows = sampler.data_parallel  # slots filled per insertion (the batch axis is split that way)
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
      return {"cache": cache, "steps": jnp.zeros((), jnp.int32), "column": zeros, "token": zeros,
              "position": zeros, "length": zeros, "limit": zeros,
              "live": jnp.zeros((s,), bool), "stopped": jnp.zeros((s,), bool),
              "keys": jnp.zeros((s, 2), jnp.uint32), "outputs": self._outputs(s)}

  def _insert(self, state, rows_I, source_I, small, last_tokens_I, prompt_lengths_I, base_key, prompt_seeds_I,
              samples_I, limits_I, bucket_cols):
    """Slots `rows_I` (== slots: padding, dropped) take row `source_I` of `small` (a prefill cache whose
    first `bucket_cols` columns hold the prompts; one prefilled row may fill the slots of several
    samples); the rest of each slot is emptied."""
    self.trace_counts["continuous_insert"] += 1

    columns = state["cache"]["positions"].shape[1]

    def widen(x, axis):  # a prefill cache's columns -> all of a slot's
      pad = [(0, 0)] * x.ndim
      pad[axis] = (0, columns - x.shape[axis])
      return jnp.pad(x, pad)

    def put(buf, x):
      return buf.at[rows_I].set(x.astype(buf.dtype), mode="drop")

    fold = jax.vmap(jax.random.fold_in, (0, 0))  # the static sampler's row keys
    keys_Ix2 = fold(fold(jnp.broadcast_to(base_key, (*rows_I.shape, *base_key.shape)), prompt_seeds_I), samples_I)
    with shd.activation_sharding(self.sampler.mesh):
      cache = dict(state["cache"])
      for name in ("k", "v"):
        axis = transformer.CACHE_LOGICAL_AXES[name].index("length") - 1  # per layer: no layers axis
        layers = small[name] if isinstance(small[name], (list, tuple)) else list(small[name])
        new = [put(buf, widen(x[source_I], axis)) for buf, x in zip(cache[name], layers)]
        cache[name] = new if isinstance(cache[name], (list, tuple)) else jnp.stack(new)
      cache["positions"] = put(cache["positions"], widen(small["positions"][source_I], 1))
      cache["segment_ids"] = put(cache["segment_ids"], widen(small["segment_ids"][source_I], 1))
      r = rows_I.shape[0]
      out = {k: put(v, jnp.zeros((r, *v.shape[1:]), v.dtype)) for k, v in state["outputs"].items()}
      return dict(state, cache=self.sampler._constrain_cache(cache), outputs=out,
                  column=put(state["column"], jnp.full((r,), bucket_cols, jnp.int32)),
                  token=put(state["token"], last_tokens_I), position=put(state["position"], prompt_lengths_I - 1),
                  length=put(state["length"], jnp.zeros_like(rows_I)), limit=put(state["limit"], limits_I),
                  live=put(state["live"], jnp.ones(r, bool)),
                  stopped=put(state["stopped"], jnp.zeros(r, bool)), keys=put(state["keys"], keys_Ix2))

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
      new = dict(s, cache=sampler._constrain_cache(cache), steps=s["steps"] + 1,
                 column=jnp.minimum(s["column"] + live_B, columns - 1),
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
    limits = (np.full((len(prompts),), sampling.max_new_tokens, np.int32) if max_new_tokens_per_prompt is None
              else sampler_lib.check_limits(max_new_tokens_per_prompt, len(prompts), sampling.max_new_tokens))
    # The static sampler's order: by bucket, then as given. Prompts join and answers are yielded in it.
    order = sorted(range(len(prompts)), key=lambda i: (sampler.bucket_for(len(prompts[i])), i))
    widest = max(sampler.bucket_for(len(p)) for p in prompts)
    if cache_bucket:
      if cache_bucket not in sampler.buckets or cache_bucket < widest:
        raise ValueError(f"cache_bucket={cache_bucket}: one of the sampler's buckets {sampler.buckets} holding "
                         f"every prompt (the longest needs {widest})")
      widest = cache_bucket
    batch = Batch(self, params, sampling, cache_bucket=widest, edit=edit)
    for i in order:
      batch.add(i, prompts[i], int(seeds[i]), int(limits[i]))
    finished: dict[int, sampler_lib.SampleOutput] = {}
    next_out = 0  # order[next_out] is the next prompt to yield
    while not batch.idle:
      finished.update(batch.step())
      while next_out < len(order) and order[next_out] in finished:
        yield order[next_out], finished.pop(order[next_out])
        next_out += 1


class Batch:
  """A continuous batch in progress: prompts join (`add`) at any time, and each `step` refills the free
  slots with waiting ones and decodes a chunk; what a server keeps open while requests arrive.

  Every prompt of one `Batch` shares its sampling rule and knobs, its weights, its edit and its cache
  width (`cache_bucket`: the widest prompt bucket it takes); a prompt's answer depends on its own
  tokens, seed and limit, not on when it joined or on what else was decoded beside it.
  """

  def __init__(self, engine: ContinuousSampler, params: dict, sampling: sampler_lib.SamplingParams, *,
               cache_bucket: int, edit: transformer.ResidualEdit | None = None):
    sampler = engine.sampler
    if cache_bucket not in sampler.buckets:
      raise ValueError(f"cache_bucket={cache_bucket}: one of the sampler's buckets {sampler.buckets}")
    sampling.validate(sampler.model_cfg.vocab_size, sampler.max_new_tokens_cap)
    self.engine, self.sampling, self.cache_bucket = engine, sampling, int(cache_bucket)
    self.weights = sampler.prepare_weights(params)
    self.edit = None if edit is None else transformer.ResidualEdit(
        *(sampler._put_replicated(np.asarray(x, np.float32)) for x in edit))
    stop_ids_S, knobs = sampler_lib.decode_inputs(sampling, sampler.model_cfg.vocab_size)
    self.knobs = {k: sampler._put_replicated(v) for k, v in knobs.items()}
    self.stop_ids_S = sampler._put_replicated(stop_ids_S)
    self.base_key = sampler._put_replicated(np.asarray(jax.random.PRNGKey(np.uint32(sampling.seed % 2**32))))
    self.pending: collections.deque[_Job] = collections.deque()
    self.occupant: list[_Job | None] = [None] * engine.slots
    self.partial: dict[Any, dict[str, np.ndarray]] = {}
    self.left: dict[Any, int] = {}
    self.steps_counted = 0  # decode steps already added to the engine's stats
    self.stage: dict | None = None  # the prefill being inserted: its cache, bucket and {key: (row, tokens)}
    self.cancelled: set = set()  # prompts with dropped samples whose other rows still decode
    self.state = engine.init_fn(columns=sampler.cache_length(self.cache_bucket))

  @property
  def idle(self) -> bool:
    """Nothing waiting and nothing decoding."""
    return not self.pending and all(o is None for o in self.occupant)

  def fits(self, tokens: Sequence[int]) -> bool:
    """Whether a prompt of these tokens can join (its bucket within this batch's cache width)."""
    return 0 < len(tokens) and self.engine.sampler.bucket_for(len(tokens)) <= self.cache_bucket

  def add(self, key, tokens: Sequence[int], seed: int, limit: int) -> None:
    """Queue `n` samples of one prompt under `key` (returned by `step` with its answer); `limit`: its
    most new tokens (at most the sampling's)."""
    if key in self.left:
      raise ValueError(f"prompt key {key!r} is already in this batch")
    if not self.fits(tokens):
      raise ValueError(f"a prompt of {len(tokens)} tokens does not fit this batch's cache (bucket "
                       f"{self.cache_bucket})")
    if not 1 <= limit <= self.sampling.max_new_tokens:
      raise ValueError(f"limit={limit}: 1 .. max_new_tokens={self.sampling.max_new_tokens}")
    self.left[key] = self.sampling.n
    tokens = list(tokens)  # one copy, shared by the prompt's samples (and what the stage checks them by)
    self.pending.extend(_Job(key, j, tokens, int(seed) % 2**32, int(limit)) for j in range(self.sampling.n))

  def cancel(self, drop) -> int:
    """Drop the waiting samples of the prompts whose key `drop(key)` is true (rows already decoding
    finish); returns how many were dropped. A prompt with dropped samples is never returned, and its
    key may be added again once none of its rows decode."""
    kept: collections.deque[_Job] = collections.deque()
    dropped = collections.Counter()
    for job in self.pending:
      if drop(job.key):
        dropped[job.key] += 1
      else:
        kept.append(job)
    self.pending = kept
    for key, count in dropped.items():
      self.left[key] -= count
      if self.left[key]:
        self.cancelled.add(key)  # its decoding rows finish, unreturned
      else:
        del self.left[key]
        self.partial.pop(key, None)
    self._release_used_stage()
    return sum(dropped.values())

  def step(self) -> dict[Any, sampler_lib.SampleOutput]:
    """Refill free slots, decode one chunk; the prompts completed by it (every sample done)."""
    engine, sampler = self.engine, self.engine.sampler
    free = [r for r, o in enumerate(self.occupant) if o is None]
    if self.pending and len(free) >= min(engine.refill_at, len(self.pending)):
      self._refill(free)
    if all(o is None for o in self.occupant):
      return {}
    refill_at = min(engine.refill_at, len(self.pending)) if self.pending else 0
    self.state = engine.decode_fn(self.weights, self.state, self.stop_ids_S, self.knobs,
                                  sampler._put_replicated(np.int32(refill_at)), self.edit,
                                  rules=self.sampling.rules)
    small = _host({"live": self.state["live"], "steps": self.state["steps"]})
    engine.stats["decode_steps"] += int(small["steps"]) - self.steps_counted
    self.steps_counted = int(small["steps"])
    done = [r for r, o in enumerate(self.occupant) if o is not None and not small["live"][r]]
    if not done:
      return {}
    k_top = sampler.top_logprobs
    host = _host({"length": self.state["length"], "stopped": self.state["stopped"], **self.state["outputs"]})
    finished = {}
    for r in done:
      job, m = self.occupant[r], int(host["length"][r])
      self.occupant[r] = None
      out = self.partial.setdefault(job.key, self._empty())
      for name in ("tokens", "logprobs", "sampled_logprobs", *(("top_ids", "top_logprobs") if k_top else ())):
        out[name][0, job.sample, :m] = host[name][r, :m]
      out["lengths"][0, job.sample] = m
      out["stopped"][0, job.sample] = bool(host["stopped"][r])
      self.left[job.key] -= 1
      if not self.left[job.key]:
        del self.left[job.key]
        out = self.partial.pop(job.key)
        if job.key in self.cancelled:
          self.cancelled.discard(job.key)
          continue
        stopped = out.pop("stopped")
        finished[job.key] = sampler_lib.SampleOutput(
            finish_reasons=np.where(stopped, sampler_lib.FINISH_STOP, sampler_lib.FINISH_LENGTH),
            prompt_lengths=np.asarray([len(job.tokens)], np.int32),
            **{k: out.get(k) for k in ("tokens", "lengths", "logprobs", "sampled_logprobs", "top_ids", "top_logprobs")})
    return finished

  def _empty(self) -> dict[str, np.ndarray]:
    n, steps, k_top = self.sampling.n, self.sampling.max_new_tokens, self.engine.sampler.top_logprobs
    out = {"tokens": np.zeros((1, n, steps), np.int32), "lengths": np.zeros((1, n), np.int32),
           "logprobs": np.zeros((1, n, steps), np.float32), "sampled_logprobs": np.zeros((1, n, steps), np.float32),
           "stopped": np.zeros((1, n), bool)}
    if k_top:
      out["top_ids"] = np.zeros((1, n, steps, k_top), np.int32)
      out["top_logprobs"] = np.zeros((1, n, steps, k_top), np.float32)
    return out

  def _refill(self, free: list[int]) -> None:
    """Waiting samples, in order, into the `free` slots: from the staged prefill, and when the next
    sample's prompt is not staged, from a new prefill of the prompts at the head of the queue."""
    engine, sampler = self.engine, self.engine.sampler
    free = list(free)
    while free and self.pending:
      if self._staged_row(self.pending[0]) is None:
        self._prefill_stage()
      take = []  # (slot, job, staged row), at most one insertion's worth, all from this stage
      while free and self.pending and len(take) < engine.insert_rows:
        row = self._staged_row(self.pending[0])
        if row is None:
          break
        take.append((free.pop(0), self.pending.popleft(), row))
      count = engine.insert_rows
      rows_I = np.full((count,), engine.slots, np.int32)  # padding insertions are dropped
      source_I, limits_I, lengths_I, last_I = (np.zeros((count,), np.int32) for _ in range(4))
      prompt_seed_I, sample_I = np.zeros((count,), np.uint32), np.zeros((count,), np.uint32)
      for i, (r, job, source) in enumerate(take):
        rows_I[i], source_I[i], limits_I[i] = r, source, job.limit
        lengths_I[i], last_I[i] = len(job.tokens), job.tokens[-1]
        prompt_seed_I[i], sample_I[i] = job.seed, job.sample
        self.occupant[r] = job
      put = sampler._put_batch
      self.state = engine.insert_fn(self.state, put(rows_I), put(source_I), self.stage["cache"], put(last_I),
                                    put(lengths_I), self.base_key, put(prompt_seed_I), put(sample_I), put(limits_I),
                                    jnp.int32(self.stage["bucket"] - 1))
    self._release_used_stage()

  def _release_used_stage(self) -> None:
    """Drops the staged prefill once nothing waiting is in it (it covers the head of the queue): its
    cache is not held while decoding."""
    if not self.pending or self._staged_row(self.pending[0]) is None:
      self.stage = None

  def _staged_row(self, job: _Job) -> int | None:
    """The staged prefill's row of `job`'s prompt, if staged: the same key and the same token list (a
    key reused for another prompt, as a server may, is prefilled anew)."""
    entry = None if self.stage is None else self.stage["rows"].get(job.key)
    return entry[0] if entry is not None and entry[1] is job.tokens else None

  def _prefill_stage(self) -> None:
    """One prefill of `prefill_rows` rows: the distinct prompts at the head of the queue that share the
    first one's bucket (a prompt is always prefilled in its own bucket, as the static sampler does),
    then padding; their samples are inserted from it as slots free up, all n sharing its row."""
    engine, sampler, count = self.engine, self.engine.sampler, self.engine.prefill_rows
    bucket = sampler.bucket_for(len(self.pending[0].tokens))
    rows: dict[Any, tuple[int, list[int]]] = {}
    tokens_RxP = np.zeros((count, bucket), np.int32)
    lengths_R = np.ones((count,), np.int32)
    for job in self.pending:
      if job.key in rows:
        continue
      if len(rows) == count or sampler.bucket_for(len(job.tokens)) != bucket:
        break
      tokens_RxP[len(rows), bucket - len(job.tokens):] = job.tokens
      lengths_R[len(rows)] = len(job.tokens)
      rows[job.key] = (len(rows), job.tokens)
    engine.stats["prefills"] += 1
    self.stage = None  # the previous staged cache is freed before the next one is made
    cache = sampler.prefill_fn(self.weights, sampler._put_batch(tokens_RxP), sampler._put_batch(lengths_R), self.edit,
                               n=1)
    self.stage = {"cache": cache, "bucket": bucket, "rows": rows}


def _host(tree):
  """Global arrays on the host of every process (across processes the slots are sharded)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def engine(sampler: sampler_lib.Sampler, *, slots: int, chunk_steps: int = 16,
           prefill_rows: int = 0) -> ContinuousSampler:
  """One `ContinuousSampler` per (sampler, slots, chunk_steps, prefill_rows), kept on the sampler (and
  gone with it), so its compiled programs are reused by every job that samples with that sampler (an
  eval job's sets, a curve's steps)."""
  slots = -(-max(int(slots), 1) // sampler.data_parallel) * sampler.data_parallel
  per = sampler.__dict__.setdefault("_continuous_engines", {})
  key = (slots, chunk_steps, prefill_rows)
  if key not in per:
    per[key] = ContinuousSampler(sampler, slots=slots, chunk_steps=chunk_steps, prefill_rows=prefill_rows)
  return per[key]
