"""A local judge: a model emjax loads scores the judge prompts on the mesh, no API, no network.

    judge = LocalJudge.from_config({"hf": "HuggingFaceTB/SmolLM2-135M-Instruct"}, judges.DEFAULT_PROMPTS)
    rows = judge.score([judges.Item(question, answer)], ("aligned", "coherent"))
    judge.stats.per_second                                   # judgements/s so far

For each (item, metric) the prompt `prompts.render(metric, item)` is the user turn of the judge
model's chat template, opened for the assistant's answer (plain text after BOS when the tokenizer
has no chat template). The answers the judge may give are the candidates "0".."100", "REFUSAL",
"CODE", each followed by one of the judge's stop tokens (its EOS, the template's end-of-turn
token): the stop token makes "1" a different answer from "10", and the probability of a candidate
is that of the judge writing exactly it and ending its turn (summed over the stop tokens). Each is
teacher-forced, so however a number splits into tokens does not matter.

Scores: the candidates' probabilities normalised over the candidates; the expected score is
sum_i p_i * i over the numbers, divided by their share. The status is `refusal` (`code`) when
REFUSAL's (CODE's) probability exceeds the numbers' share, else `ok` with the expected score.
raw is compact JSON: `numeric`, `refusal`, `code` (normalised shares), `mass` (the candidates'
absolute probability: how much of the judge's answer the candidates cover) and `argmax`.

A prompt longer than `max_prompt_length` tokens is not scored: its row gets status `error` and a
raw JSON message naming both lengths (raise max_prompt_length to score it; an answer is never
cut, so the judge never sees a different answer than the record holds). A prompt that cannot be
rendered (a task x domain prompt file without the item's cell) is an `error` row too. Failures of
the model itself (e.g. out of memory) are raised: they would fail every row alike.

How it runs, per batch of `batch_size` prompts of one length bucket (one compilation per bucket):
  1. prefill: the prompts, left-padded to the bucket length P, go through the model once, writing
     the KV cache; the last position's logits give each candidate's first token.
  2. the candidates' trie: every prefix of a candidate's tokens is a node ("", "4", "42", "REF",
     ...: 106 nodes with SmolLM2's digit-by-digit tokenizer); a node's logits give its children's
     tokens (and the stop tokens). The subtrees under the root are dealt to `trie_groups` copies
     of each prompt's cache (as the sampler copies a prompt's cache for its samples), and a
     `lax.scan` feeds, at step t, each copy's next node (depth-first, parents first) as one token
     written at trie slot P + t. Before each step the trie slots' segment ids are set from a
     static table: 1 for the slots of the node's ancestors, 0 (never attended) for the rest, so
     a node sees its prompt and its own prefix only. The attention is the model's own cache path.
  3. each candidate's log-probability is the sum of its tokens' log-probabilities at their trie
     nodes plus the log-sum-exp of the stop tokens' at its last node.
A judgement thus costs one prompt forward plus one token per trie node, not a prompt forward per
candidate. (The model's mask is causal + same-segment, which cannot express a tree inside one
row, hence the cache copies.) The weights are an argument of the jitted function (never closed
over; `set_params` swaps them without recompiling); the layers are unrolled with per-layer
weights and cache as in `emjax.sample.sampler` (XLA:CPU otherwise copies each layer's weights out
of the stack at every trie step), and rows are split over the mesh's data axes (the batch is
padded to a multiple of their size).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax.data import chat, tokenizers
from emjax.eval import judges
from emjax.models import transformer
from emjax.sample import run as sample_run
from emjax.sample import sampler as sampler_lib

NUMBERS = tuple(str(i) for i in range(101))
CANDIDATES = NUMBERS + ("REFUSAL", "CODE")
REFUSAL, CODE = len(NUMBERS), len(NUMBERS) + 1  # their indices in CANDIDATES

# Copies of each prompt's KV cache that walk the candidates' trie side by side (module docstring):
# more copies, fewer sequential steps, `trie_groups` times the cache memory. 10: SmolLM2's 106-node
# trie in 12 steps; on CPU it took 0.63x the CPU time of one copy (105 steps), 4 copies 0.73x.
TRIE_GROUPS = 10

# The keys of a local judge's config block (config.judge.local): one of hf / checkpoint (with step,
# -1 = the newest), dtype ('' = the weights' own) of parameters and compute, prompts per batch, the
# longest prompt scored (longer ones are `error` rows), and the trie's cache copies.
# min_mass: below this absolute probability on all candidates together the judge is not answering
# with a score at all (it wants to write prose): parse_error (judges.score_from_probabilities, the
# rule the API judge's logprob mode shares).
DEFAULTS = dict(hf="", checkpoint="", step=-1, dtype="", batch_size=8, max_prompt_length=2048,
                trie_groups=TRIE_GROUPS, min_mass=judges.MIN_MASS)


# ----------------------------------------------------------------------------- the candidates' trie


@dataclasses.dataclass(frozen=True)
class CandidateTrie:
  """The candidates' token sequences as a trie of their prefixes, in the index arrays the scorer gathers with.

  Nodes are every prefix of every candidate's tokens (the root () included), sorted: sorted tuples
  are a depth-first pre-order, each parent before its subtree.
  """

  candidates: tuple[str, ...]
  sequences: tuple[tuple[int, ...], ...]  # each candidate's tokens, without the stop token
  stop_ids: tuple[int, ...]
  nodes: tuple[tuple[int, ...], ...]  # nodes[0] = () is the root (the prompt's last position)
  vocab_ids: tuple[int, ...]  # the only tokens whose log-probabilities are kept: U of them

  @classmethod
  def build(cls, candidates: Sequence[str], encode: Callable[[str], list[int]],
            stop_ids: Sequence[int]) -> "CandidateTrie":
    sequences = tuple(tuple(int(t) for t in encode(c)) for c in candidates)
    stops = tuple(sorted({int(s) for s in stop_ids}))
    if not stops:
      raise ValueError("local judge: no stop token to end a candidate answer with")
    for c, seq in zip(candidates, sequences):
      if not seq:
        raise ValueError(f"local judge: the candidate {c!r} encodes to no tokens")
      if set(seq) & set(stops):
        raise ValueError(f"local judge: the candidate {c!r} encodes to a stop token ({seq})")
    if len(set(sequences)) != len(sequences):
      raise ValueError("local judge: two candidates encode to the same tokens")
    nodes = tuple(sorted({seq[:d] for seq in sequences for d in range(len(seq) + 1)}))
    vocab = tuple(sorted({t for seq in sequences for t in seq} | set(stops)))
    return cls(tuple(candidates), sequences, stops, nodes, vocab)

  def schedule(self, groups: int) -> dict[str, np.ndarray]:
    """The static plan of the trie pass over `groups` copies of each prompt's cache, as index arrays.

    The subtrees under the root's children are dealt to the groups (largest first, each to the
    group with the fewest nodes so far) and each group visits its nodes in depth-first order, one
    node per step, its step t written at trie slot t. Returned arrays:
      token/depth [S, G]: the token each group feeds at step t and its depth (an idle group feeds a
        stop token at depth 1; its output is dropped);
      visible [S, G, S]: the trie slots that group's node sees at step t (its ancestors' slots; its
        own slot is written visible by the step itself);
      node_step/node_group [N-1]: where each non-root node was computed;
      term_node/term_u/term_valid [C, Kmax]: for candidate c's token j, the node it is read at, its
        column in vocab_ids, whether token j exists; end_node [C]: the candidate's last node;
      stop_u [E]: the stop tokens' columns.
    """
    node_index = {n: i for i, n in enumerate(self.nodes)}
    subtrees: dict[tuple[int, ...], list[int]] = {}
    for i, n in enumerate(self.nodes[1:], 1):  # sorted: each subtree's nodes in depth-first order
      subtrees.setdefault(n[:1], []).append(i)
    plans: list[list[int]] = [[] for _ in range(max(1, min(int(groups), len(subtrees))))]
    for _, members in sorted(subtrees.items(), key=lambda kv: -len(kv[1])):
      min(plans, key=len).extend(members)
    steps, g_count = max(len(p) for p in plans), len(plans)
    token = np.full((steps, g_count), self.stop_ids[0], np.int32)
    depth = np.ones((steps, g_count), np.int32)
    visible = np.zeros((steps, g_count, steps), bool)
    node_step, node_group = np.zeros(len(self.nodes) - 1, np.int32), np.zeros(len(self.nodes) - 1, np.int32)
    for g, plan in enumerate(plans):
      slot_of: dict[tuple[int, ...], int] = {}
      for t, i in enumerate(plan):
        n = self.nodes[i]
        token[t, g], depth[t, g] = n[-1], len(n)
        visible[t, g, [slot_of[n[:d]] for d in range(1, len(n))]] = True
        slot_of[n] = t
        node_step[i - 1], node_group[i - 1] = t, g
    column = {t: i for i, t in enumerate(self.vocab_ids)}
    k_max = max(len(s) for s in self.sequences)
    shape = (len(self.sequences), k_max)
    term_node, term_u, term_valid = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool)
    for c, seq in enumerate(self.sequences):
      for j, t in enumerate(seq):
        term_node[c, j], term_u[c, j], term_valid[c, j] = node_index[seq[:j]], column[t], True
    return dict(token=token, depth=depth, visible=visible, node_step=node_step, node_group=node_group,
                term_node=term_node, term_u=term_u, term_valid=term_valid,
                end_node=np.array([node_index[s] for s in self.sequences], np.int32),
                stop_u=np.array([column[s] for s in self.stop_ids], np.int32))


# ----------------------------------------------------------------------------- from log-probabilities to a Score


def score_from_logprobs(logprobs_C: Sequence[float], candidates: Sequence[str] = CANDIDATES,
                        min_mass: float = judges.MIN_MASS) -> judges.Score:
  """A Score from the candidates' log-probabilities (CANDIDATES' order: 0..100, REFUSAL, CODE), by
  the rule both probability judges share (`judges.score_from_probabilities`)."""
  lp = np.asarray(logprobs_C, np.float64)
  if lp.shape != (len(candidates),) or not np.all(np.isfinite(lp)):
    return judges.Score(None, "error", _compact({"error": "non-finite candidate log-probabilities",
                                                  "logprobs": [float(x) for x in lp.ravel()[:8]]}))
  top = float(np.max(lp))
  w = np.exp(lp - top)  # the largest is 1: normalising cannot underflow to 0/0
  p = w / np.sum(w)
  mass = math.exp(top) * float(np.sum(w))  # absolute probability of all candidates together
  absolute = p * mass
  raw = _compact({"numeric": _round(float(np.sum(p[:REFUSAL]))), "refusal": _round(float(p[REFUSAL])),
                  "code": _round(float(p[CODE])), "mass": _round(mass), "argmax": candidates[int(np.argmax(lp))]})
  return judges.score_from_probabilities({i: float(absolute[i]) for i in range(REFUSAL)}, float(absolute[REFUSAL]),
                                         float(absolute[CODE]), raw, min_mass)


def _round(x: float) -> float:
  return float(f"{x:.6g}")


def _compact(obj) -> str:
  return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ----------------------------------------------------------------------------- prompts and stop tokens


def _chat_tokenizer(tokenizer):
  hf = getattr(tokenizer, "hf_tokenizer", None)
  return hf if hf is not None and getattr(hf, "chat_template", None) else None


def encode_prompt(tokenizer, text: str) -> list[int]:
  """The prompt as the user turn of the tokenizer's chat template, opened for the answer (else BOS + text)."""
  if _chat_tokenizer(tokenizer) is not None:
    return sample_run.apply_chat_template(tokenizer, [{"role": "user", "content": text}])
  return [int(tokenizer.bos_id)] + [int(t) for t in tokenizer.encode(text)]


def stop_ids_of(tokenizer) -> tuple[int, ...]:
  """The tokens that end the judge's answer: EOS, the chat template's end-of-turn token, generation_config's eos."""
  if getattr(tokenizer, "hf_tokenizer", None) is None:
    return (int(tokenizer.eos_id),)
  return chat.stop_token_ids(tokenizer)


def prompt_buckets(max_prompt_length: int) -> tuple[int, ...]:
  """make_buckets' powers of two plus the midpoints 1.5x between them.

  The default judge prompt is ~320 tokens: with powers of two alone it would pad to 512 and
  spend ~40% of the prefill on padding; with the midpoints a prompt pads by at most 1.5x.
  """
  base = sampler_lib.make_buckets(max_prompt_length)
  mids = {a * 3 // 2 for a, b in zip(base, base[1:]) if a < a * 3 // 2 < b}
  return tuple(sorted(set(base) | mids))


# ----------------------------------------------------------------------------- the judge


@dataclasses.dataclass
class JudgeStats:
  """Judgements scored (an (item, metric) pair, error rows included) and the seconds `score` took (compiles too)."""

  judgements: int = 0
  errors: int = 0  # rows not sent to the model (too long, no prompt)
  seconds: float = 0.0
  batches: int = 0
  padded_rows: int = 0  # batch rows that held no judgement (the last batch of a bucket)
  compiles: int = 0  # traces of the scoring function (one per prompt bucket and batch shape)

  @property
  def per_second(self) -> float:
    return self.judgements / self.seconds if self.seconds > 0 else 0.0

  def as_dict(self) -> dict:
    return dict(dataclasses.asdict(self), per_second=self.per_second)


class LocalJudge:
  """Judge protocol (`judges.Judge`) over a model emjax runs; see the module docstring.

  Args:
    params: the model's parameters (stacked, as `weights.load_weights` returns them), on `mesh`.
    model_cfg: their architecture; `dtype` is the compute dtype.
    tokenizer: an `emjax.data.tokenizers` tokenizer (an HF one for the chat template).
    prompts: the judge prompts.
    mesh: the device mesh (None: the default device); rows are split over data x fsdp.
    batch_size: prompts per call (rounded up to a multiple of the data-parallel size).
    max_prompt_length: the longest prompt scored, in tokens.
    trie_groups: copies of each prompt's cache that walk the candidates' trie side by side.
    name: recorded as each row's `judge`.
  """

  def __init__(self, params: dict, model_cfg: transformer.TransformerConfig, tokenizer, prompts: judges.JudgePrompts,
               *, mesh=None, batch_size: int = DEFAULTS["batch_size"],
               max_prompt_length: int = DEFAULTS["max_prompt_length"], trie_groups: int = TRIE_GROUPS,
               name: str = "local", min_mass: float = judges.MIN_MASS):
    if int(batch_size) < 1:
      raise ValueError(f"local judge: batch_size must be >= 1, got {batch_size}")
    if int(trie_groups) < 1:
      raise ValueError(f"local judge: trie_groups must be >= 1, got {trie_groups}")
    if int(max_prompt_length) < 1:
      raise ValueError(f"local judge: max_prompt_length must be >= 1, got {max_prompt_length}")
    self.name, self.prompts, self.prompt_version = name, prompts, prompts.version
    self.min_mass = float(min_mass)
    self.tokenizer = tokenizer
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    data_parallel = shd.data_parallel_size(self.mesh) if self.mesh is not None else 1
    self.batch_size = -(-int(batch_size) // data_parallel) * data_parallel
    self.buckets = prompt_buckets(int(max_prompt_length))
    self.max_prompt_length = self.buckets[-1]
    self.trie = CandidateTrie.build(CANDIDATES, tokenizer.encode, stop_ids_of(tokenizer))
    too_big = [t for t in self.trie.vocab_ids + (int(tokenizer.bos_id),) if not 0 <= t < model_cfg.vocab_size]
    if too_big:
      raise ValueError(f"local judge: token ids {too_big} of the tokenizer are outside the model's vocabulary "
                       f"({model_cfg.vocab_size}): the tokenizer is not the model's")
    self._plan = self.trie.schedule(trie_groups)  # numpy: constants of the compiled function
    # Unrolled layers, no remat; the trie steps feed one query per row, where the einsum attention
    # that reads the cache in place is the one to use (as the sampler's decode).
    self.model_cfg = dataclasses.replace(model_cfg, scan_layers=False, remat="none")
    self.graphdef, _ = transformer.split_model(transformer.abstract_model(self.model_cfg))
    self.step_graphdef, _ = transformer.split_model(
        transformer.abstract_model(dataclasses.replace(self.model_cfg, attention="xla")))
    self._param_axes = transformer.param_logical_axes(transformer.abstract_model(self.model_cfg))
    self.stats = JudgeStats()
    # The [B, C] result replicated: every process of a multi-process run can read it whole.
    self._logprobs_fn = jax.jit(self._candidate_logprobs,
                                out_shardings=None if self.mesh is None else shd.replicated(self.mesh))
    self._unstack_fn = jax.jit(self._unstack_weights)
    self.set_params(params)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], prompts: judges.JudgePrompts, *, mesh=None) -> "LocalJudge":
    """A judge from a config block with DEFAULTS' keys: the weights of `hf` or `checkpoint` (+ `step`) on `mesh`."""
    c = dict(cfg)
    unknown = sorted(set(c) - set(DEFAULTS))
    if unknown:
      raise ValueError(f"config.judge.local: unknown keys {unknown}; known keys: {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **{k: v for k, v in c.items() if v is not None}}
    if bool(c["hf"]) == bool(c["checkpoint"]):
      raise ValueError("config.judge.local: set exactly one of hf (a Hugging Face directory or hub id) and "
                       f"checkpoint (an emjax run); got hf={c['hf']!r}, checkpoint={c['checkpoint']!r}")
    which = "hf" if c["hf"] else "checkpoint"
    path, key = str(c[which]), f"config.judge.local.{which}"
    step = int(c["step"]) if int(c["step"]) >= 0 else None
    if which == "hf" and step is not None:
      raise ValueError(f"config.judge.local.step={step}: a Hugging Face model ({path!r}) has no steps")
    src = weights_lib.resolve(path, step=step, key=key)
    if src.kind != ("hf" if which == "hf" else "emjax"):
      other = "checkpoint" if which == "hf" else "hf"
      raise ValueError(f"{key}={path!r} is {'an emjax run' if src.kind == 'emjax' else 'a Hugging Face model'}; "
                       f"set config.judge.local.{other} instead")
    tokenizer_cfg = src.tokenizer
    if tokenizer_cfg is None:
      raise ValueError(f"{key}={path!r}: the run's config names no tokenizer (data.tokenizer)")
    tokenizer = tokenizers.load_tokenizer(tokenizer_cfg)
    mesh = mesh if mesh is not None else shd.make_mesh(weights_lib.DEFAULT_MESH)
    loaded = weights_lib.load_weights(src, mesh=mesh, dtype=c["dtype"] or None, key=key)
    model_cfg = loaded.model_cfg
    if c["dtype"]:
      model_cfg = dataclasses.replace(model_cfg, dtype=jnp.dtype(c["dtype"]).name)
    judge = cls(loaded.params, model_cfg, tokenizer, prompts, mesh=mesh, batch_size=int(c["batch_size"]),
                max_prompt_length=int(c["max_prompt_length"]), trie_groups=int(c["trie_groups"]),
                name=f"local:{path}", min_mass=float(c["min_mass"]))
    del loaded  # the judge holds its own (per-layer) copy
    return judge

  # --------------------------------------------------------------------------- host API

  def with_prompts(self, prompts: judges.JudgePrompts) -> "LocalJudge":
    """This judge (same weights, same compiled scorer) with other prompts."""
    other = copy.copy(self)
    other.prompts, other.prompt_version = prompts, prompts.version
    return other

  def set_params(self, params: dict) -> None:
    """Judge with other weights of the same architecture (stacked, on the mesh): nothing recompiles."""
    self.weights = self._unstack_fn(params)

  def prompt_tokens(self, item: judges.Item, metric: str) -> list[int]:
    return encode_prompt(self.tokenizer, self.prompts.render(metric, item))

  def score(self, items: Sequence[judges.Item], metrics: Sequence[str] = judges.METRICS
            ) -> list[dict[str, judges.Score]]:
    t0 = time.perf_counter()
    rows: list[dict[str, judges.Score]] = [{} for _ in items]
    sendable: list[tuple[int, str]] = []
    token_lists: list[list[int]] = []
    for i, item in enumerate(items):
      for m in metrics:
        try:
          tokens = self.prompt_tokens(item, m)
        except ValueError as e:  # no prompt for this item's cell, a template that refuses it
          rows[i][m] = judges.Score(None, "error", _compact({"error": str(e)}))
          continue
        if len(tokens) > self.max_prompt_length:
          rows[i][m] = judges.Score(None, "error", _compact(
              {"error": f"the judge prompt has {len(tokens)} tokens, more than max_prompt_length="
                        f"{self.max_prompt_length}: not scored (raise config.judge.local.max_prompt_length)"}))
          continue
        sendable.append((i, m))
        token_lists.append(tokens)
    if token_lists:
      for (i, m), lp in zip(sendable, self.logprobs(token_lists)):
        rows[i][m] = score_from_logprobs(lp, self.trie.candidates, self.min_mass)
    n = len(items) * len(metrics)
    self.stats.judgements += n
    self.stats.errors += n - len(sendable)
    self.stats.seconds += time.perf_counter() - t0
    return rows

  def logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """[N, C] float32: log p(candidate c, then a stop token | prompt n), candidates in CANDIDATES' order.

    Prompts are token ids (each at most max_prompt_length); they are batched by length bucket.
    """
    out = np.zeros((len(prompts), len(self.trie.candidates)), np.float32)
    by_bucket: dict[int, list[int]] = {}
    for n, p in enumerate(prompts):
      if not 1 <= len(p) <= self.max_prompt_length:
        raise ValueError(f"local judge: a prompt of {len(p)} tokens (1..{self.max_prompt_length} are scored)")
      by_bucket.setdefault(next(b for b in self.buckets if len(p) <= b), []).append(n)
    for bucket, members in sorted(by_bucket.items()):
      for start in range(0, len(members), self.batch_size):
        batch = members[start:start + self.batch_size]
        # Padding rows repeat the batch's first prompt: real tokens keep every row finite, and rows
        # never see each other, so they change nothing; their results are dropped.
        rows = batch + [batch[0]] * (self.batch_size - len(batch))
        tokens = np.zeros((self.batch_size, bucket), np.int32)
        lengths = np.zeros((self.batch_size,), np.int32)
        for r, n in enumerate(rows):
          tokens[r, bucket - len(prompts[n]):] = prompts[n]  # left-padded: every prompt ends at slot P-1
          lengths[r] = len(prompts[n])
        lp = self._logprobs_fn(self.weights, self._put(tokens), self._put(lengths))
        out[batch] = np.asarray(jax.device_get(lp))[:len(batch)]
        self.stats.batches += 1
        self.stats.padded_rows += self.batch_size - len(batch)
    return out

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, shd.batch_sharding(self.mesh, x.ndim))

  # --------------------------------------------------------------------------- weights and cache layout

  def _unstack_weights(self, params: dict) -> dict:
    """`layers` as a list of per-layer dicts, each in its stacked layout minus the `layers` axis."""
    layers = []
    with shd.activation_sharding(self.mesh):
      for i in range(self.model_cfg.n_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])  # noqa: B023
        layers.append(jax.tree.map(lambda x, axes: shd.constrain(x, axes[1:]), layer, self._param_axes["layers"]))
    return dict(params, layers=layers)

  def _model(self, weights: dict, graphdef) -> transformer.Transformer:
    # Restacked inside the innermost traced body, where XLA folds slice(stack(...)) away (sampler.py).
    return nnx.merge(graphdef, dict(weights, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *weights["layers"])))

  def _constrain_cache(self, cache: dict) -> dict:
    out = {}
    for name, value in cache.items():
      axes = transformer.CACHE_LOGICAL_AXES[name]
      out[name] = [shd.constrain(x, axes[1:]) for x in value] if isinstance(value, list) else shd.constrain(value, axes)
    return out

  @staticmethod
  def _unstack_cache(cache: dict) -> dict:
    return dict(cache, k=list(cache["k"]), v=list(cache["v"]))

  @staticmethod
  def _stack_cache(cache: dict) -> dict:
    return dict(cache, k=jnp.stack(cache["k"]), v=jnp.stack(cache["v"]))

  # --------------------------------------------------------------------------- the jitted scorer

  def _node_logprobs(self, model, hidden_Bx1xD) -> jax.Array:
    """[B, U] log-probabilities of the trie's tokens (vocab_ids) after each row's last position."""
    logits_BxV = model.logits(hidden_Bx1xD)[:, 0].astype(jnp.float32)
    lse_Bx1 = jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    return jnp.take(logits_BxV, jnp.asarray(self.trie.vocab_ids, jnp.int32), axis=1) - lse_Bx1

  def _candidate_logprobs(self, weights, tokens_BxP, lengths_B):
    """[B, C] log p(candidate, stop | prompt) for left-padded prompts (see the module docstring)."""
    self.stats.compiles += 1  # runs at trace time only
    cfg, plan = self.model_cfg, self._plan
    batch, bucket = tokens_BxP.shape
    steps, groups = plan["token"].shape
    slots_P = jnp.arange(bucket, dtype=jnp.int32)
    pad_B = bucket - lengths_B
    positions_BxP = jnp.maximum(slots_P[None] - pad_B[:, None], 0)
    segments_BxP = (slots_P[None] >= pad_B[:, None]).astype(jnp.int32)
    with shd.activation_sharding(self.mesh):
      cache = self._constrain_cache(transformer.init_cache(cfg, batch, bucket + steps))
      model = self._model(weights, self.graphdef)
      hidden_BxPxD, cache = model.hidden(tokens_BxP, positions_BxP, segments_BxP, cache=cache, cache_index=0)
      root_BxU = self._node_logprobs(model, hidden_BxPxD[:, -1:])  # only the last position is unembedded

      # `groups` copies of each prompt's cache, prompt-major (row b * G + g), as the sampler
      # repeats a prompt's cache for its samples; each copy walks its own part of the trie.
      cache = self._unstack_cache(cache)
      copies = lambda x: jnp.repeat(x, groups, axis=0)  # noqa: E731
      cache = {name: [copies(x) for x in v] if isinstance(v, list) else copies(v) for name, v in cache.items()}
      cache = self._constrain_cache(cache)
      prompt_segments_RxP = cache["segment_ids"][:, :bucket]
      lengths_R = jnp.repeat(lengths_B, groups)
      ones_Rx1 = jnp.ones((batch * groups, 1), jnp.int32)

      def visit(layer_cache, step):
        t, token_G, depth_G, visible_GxS = step
        # Segment id 0 hides a slot: each row sees its prompt and its node's ancestors only (its
        # own slot is written visible by this step), not the nodes other branches left behind.
        trie_segments_RxS = jnp.tile(visible_GxS.astype(jnp.int32), (batch, 1))
        layer_cache = dict(layer_cache, segment_ids=jnp.concatenate([prompt_segments_RxP, trie_segments_RxS], axis=1))
        step_model = self._model(weights, self.step_graphdef)
        hidden_Rx1xD, new = step_model.hidden(jnp.tile(token_G, batch)[:, None],
                                              (lengths_R + jnp.tile(depth_G, batch) - 1)[:, None], ones_Rx1,
                                              cache=self._stack_cache(layer_cache), cache_index=bucket + t)
        return self._constrain_cache(self._unstack_cache(new)), self._node_logprobs(step_model, hidden_Rx1xD)

      xs = (jnp.arange(steps, dtype=jnp.int32), plan["token"], plan["depth"], plan["visible"])
      _, out_SxRxU = jax.lax.scan(visit, cache, xs)
      out_SxBxGxU = out_SxRxU.reshape(steps, batch, groups, -1)
      nodes_NxBxU = out_SxBxGxU[plan["node_step"], :, plan["node_group"]]
      lp_BxNxU = jnp.concatenate([root_BxU[:, None], nodes_NxBxU.transpose(1, 0, 2)], axis=1)
      terms_BxCxK = jnp.where(plan["term_valid"], lp_BxNxU[:, plan["term_node"], plan["term_u"]], 0.0)
      stops_BxCxE = lp_BxNxU[:, plan["end_node"]][:, :, plan["stop_u"]]
      return jnp.sum(terms_BxCxK, axis=-1) + jax.nn.logsumexp(stops_BxCxE, axis=-1)
