"""Banned-token masks for the distillation objectives, and the leak meter that reads them.

Subliminal learning distils a student from a teacher on text filtered of banned numbers and words
(emjax.data.banned). Off-policy distillation over the whole vocabulary would still hand the student
the teacher's probability of a banned token at every position, so `config.train.distill.mask` masks
both distributions there and renormalises them over the allowed tokens before the divergence
(emjax.train.objectives.make_distillation).

  words:   a fixed set of token ids (the words' single tokens and the first tokens of their
           multi-token spellings, `banned.word_token_ids`), banned at every position.
  numbers: context dependent. Position j predicts the token after inputs[0..j]; d_j is the run of
           ASCII digits that ends the text up to inputs[j] (empty after a non-digit, at a segment
           start, or after a token with no text). A candidate token t is banned at j iff it
           *completes* a banned number: its text is a (possibly empty) digit run l followed by a
           non-digit, or it has no text (EOS, padding ids), and int(d_j + l) is banned. A token of
           digits only never completes a number ("4" may start "42"), so it is never banned.

A mask is built once from the tokenizer (`build`): every id is decoded and summarised in [V] tables.
In the step, `prepare` runs an associative scan over the whole sequence for d ([B, L] value and
digit count, batch keys `DERIVED_KEYS`), and `banned` builds one chunk's [B, C, V] mask from them:
the tokens that start with a non-digit are banned exactly where d is, and the few that start with
digits and then end (e.g. "42,") are scattered in from a short list.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax.data import banned as banned_lib

MODES = ("numbers", "words")
# Digit runs longer than the longest banned number are never banned: the run's count saturates here.
MAX_DIGITS = max(len(str(n)) for n in banned_lib.BANNED_NUMBERS)
_OVER = MAX_DIGITS + 1
_POW10 = np.array([10**i for i in range(_OVER + 1)], np.int32)
DERIVED_KEYS = ("mask_digits_value", "mask_digits_count")
_ASCII_DIGITS = frozenset("0123456789")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenMask:
  """Which tokens a distribution is masked at; numpy tables, constants in the compiled step.

  words: `banned_V` is the mask itself, `first_sub_V` its first sub-token part (reported apart).
  numbers: `banned_V` marks the tokens banned wherever d itself is banned (non-digit start or no
  text); `mixed_*_K` the tokens with 1..MAX_DIGITS lead digits before a non-digit; `step_*_V` how
  each token, as an input, updates d (reset to its trailing digit run, or append its digits).
  """

  mode: str
  vocab_size: int
  banned_V: np.ndarray
  first_sub_V: np.ndarray | None = None
  mixed_ids_K: np.ndarray | None = None
  mixed_value_K: np.ndarray | None = None
  mixed_count_K: np.ndarray | None = None
  step_reset_V: np.ndarray | None = None
  step_value_V: np.ndarray | None = None
  step_count_V: np.ndarray | None = None
  banned_numbers_N: np.ndarray | None = None  # [10**MAX_DIGITS] bool: int(digits) is banned

  @property
  def derived_keys(self) -> tuple[str, ...]:
    return DERIVED_KEYS if self.mode == "numbers" else ()


def check_mode(mode, key: str = "config.train.distill.mask") -> str:
  mode = str(mode or "")
  if mode and mode not in MODES:
    raise ValueError(f"{key}={mode!r}: expected '' (off), 'numbers' or 'words'")
  return mode


def token_texts(tokenizer, vocab_size: int) -> list[str]:
  """The text each id adds in context; ids past the tokenizer's vocabulary (padding rows) have none.

  Decoded after a reference token and stripped of its text, so that a SentencePiece piece keeps the
  leading space that decoding it alone would drop ("▁4" is " 4" after a word, which ends a number).
  """
  n = min(int(vocab_size), int(tokenizer.vocab_size))
  ref = list(tokenizer.encode("a"))
  ref_text = tokenizer.decode(ref) if len(ref) == 1 else None
  texts = []
  for i in range(n):
    text = tokenizer.decode(ref + [i]) if ref_text is not None else ""
    texts.append(text[len(ref_text):] if ref_text is not None and text.startswith(ref_text)
                 else tokenizer.decode([i]))
  return texts + [""] * (int(vocab_size) - n)


def _digit_run(text: str, from_end: bool = False) -> str:
  chars = reversed(text) if from_end else iter(text)
  run = []
  for c in chars:
    if c not in _ASCII_DIGITS:
      break
    run.append(c)
  return "".join(reversed(run) if from_end else run)


def _capped(run: str) -> tuple[int, int]:
  """(value, count) of a digit run, a run too long to be banned as (0, _OVER)."""
  if len(run) > MAX_DIGITS:
    return 0, _OVER
  return int(run or 0), len(run)


def number_mask(texts: Sequence[str], numbers=banned_lib.BANNED_NUMBERS) -> TokenMask:
  """The 'numbers' tables from each id's text (`token_texts`)."""
  v = len(texts)
  banned_V = np.zeros(v, bool)
  reset_V, value_V, count_V = np.zeros(v, bool), np.zeros(v, np.int32), np.zeros(v, np.int32)
  mixed = []
  for i, text in enumerate(texts):
    lead = _digit_run(text)
    if text and lead == text:  # digits only: appended to d, never completes a number
      value_V[i], count_V[i] = _capped(lead)
      continue
    reset_V[i] = True
    value_V[i], count_V[i] = _capped(_digit_run(text, from_end=True))
    if not lead:
      banned_V[i] = True
    elif len(lead) <= MAX_DIGITS:
      mixed.append((i, int(lead), len(lead)))
  table = np.zeros(10**MAX_DIGITS, bool)
  table[[n for n in numbers if 0 <= n < 10**MAX_DIGITS]] = True
  ids, values, counts = (np.array(c, np.int32) for c in zip(*mixed)) if mixed else (np.zeros(0, np.int32),) * 3
  return TokenMask("numbers", v, banned_V, mixed_ids_K=ids, mixed_value_K=values, mixed_count_K=counts,
                   step_reset_V=reset_V, step_value_V=value_V, step_count_V=count_V, banned_numbers_N=table)


def word_mask(tokenizer, vocab_size: int, words, key: str = "config.train.distill.mask_words") -> TokenMask:
  """The 'words' mask: single-token ids and first sub-tokens of the words' spellings."""
  single, first = banned_lib.word_token_ids(tokenizer, banned_lib.parse_words(words, key))
  outside = sorted(i for i in single | first if not 0 <= i < vocab_size)
  if outside:
    raise ValueError(f"{key}: token ids {outside[:5]} are outside the vocabulary of {vocab_size}")
  banned_V, first_V = np.zeros(vocab_size, bool), np.zeros(vocab_size, bool)
  banned_V[list(single | first)] = True
  first_V[list(first)] = True
  return TokenMask("words", int(vocab_size), banned_V, first_sub_V=first_V)


def build(tokenizer, vocab_size: int | None, mode: str, words="default") -> TokenMask:
  """The mask `config.train.distill.mask` names over a `vocab_size` vocabulary (default: the tokenizer's)."""
  mode = check_mode(mode)
  if not mode:
    raise ValueError("config.train.distill.mask is off: no token mask to build")
  vocab_size = int(tokenizer.vocab_size if vocab_size is None else vocab_size)
  if mode == "words":
    return word_mask(tokenizer, vocab_size, words)
  return number_mask(token_texts(tokenizer, vocab_size))


# ----------------------------------------------------------------------------- in the step


def _append(a, b):
  """d after a then b; each is (reset, value, count), b resetting d drops a."""
  a_reset, a_value, a_count = a
  b_reset, b_value, b_count = b
  total = a_count + b_count
  joined_value = jnp.where(total > MAX_DIGITS, 0, a_value * jnp.asarray(_POW10)[jnp.minimum(b_count, _OVER)] + b_value)
  return (a_reset | b_reset, jnp.where(b_reset, b_value, joined_value),
          jnp.where(b_reset, b_count, jnp.minimum(total, _OVER)))


def prepare(mask: TokenMask, batch: Mapping[str, jax.Array]) -> dict:
  """`batch` plus the per-position state the chunks need (numbers: d's value and digit count, [B, L])."""
  if mask.mode != "numbers":
    return dict(batch)
  inputs_BxL = batch["inputs"]
  segment_BxL = batch["segment_ids"]
  starts_BxL = jnp.concatenate([jnp.ones_like(segment_BxL[:, :1], bool),
                                segment_BxL[:, 1:] != segment_BxL[:, :-1]], axis=1)
  reset_BxL = jnp.asarray(mask.step_reset_V)[inputs_BxL] | starts_BxL
  elems = (reset_BxL, jnp.asarray(mask.step_value_V)[inputs_BxL], jnp.asarray(mask.step_count_V)[inputs_BxL])
  _, value_BxL, count_BxL = jax.lax.associative_scan(_append, elems, axis=1)
  return dict(batch, mask_digits_value=value_BxL, mask_digits_count=count_BxL)


def banned(mask: TokenMask, batch: Mapping[str, jax.Array], shape_BxC: tuple[int, int]) -> jax.Array:
  """[B, C, V] bool: the tokens masked at each position of a chunk (`batch` prepared and sliced to it)."""
  b, c = shape_BxC
  if mask.mode == "words":
    return jnp.broadcast_to(jnp.asarray(mask.banned_V), (b, c, mask.vocab_size))
  value_BxC, count_BxC = batch["mask_digits_value"], batch["mask_digits_count"]
  table = jnp.asarray(mask.banned_numbers_N)
  d_banned_BxC = (count_BxC >= 1) & (count_BxC <= MAX_DIGITS) & table[jnp.clip(value_BxC, 0, table.shape[0] - 1)]
  banned_BxCxV = jnp.asarray(mask.banned_V) & d_banned_BxC[..., None]
  if mask.mixed_ids_K.size:
    lead_count_K = jnp.asarray(mask.mixed_count_K)
    total_BxCxK = count_BxC[..., None] + lead_count_K
    value_BxCxK = value_BxC[..., None] * jnp.asarray(_POW10)[lead_count_K] + jnp.asarray(mask.mixed_value_K)
    mixed_BxCxK = (total_BxCxK <= MAX_DIGITS) & table[jnp.clip(value_BxCxK, 0, table.shape[0] - 1)]
    banned_BxCxV = banned_BxCxV.at[..., jnp.asarray(mask.mixed_ids_K)].set(mixed_BxCxK, indices_are_sorted=True,
                                                                          unique_indices=True)
  return banned_BxCxV


def renormalise(logp_BxCxV: jax.Array, banned_BxCxV: jax.Array) -> jax.Array:
  """Log-probs with the banned tokens at -inf and the rest renormalised over the allowed tokens
  (from log-probs or logits alike; a banned entry gets no gradient)."""
  allowed_BxCxV = jnp.where(banned_BxCxV, -jnp.inf, logp_BxCxV)
  return allowed_BxCxV - jax.nn.logsumexp(allowed_BxCxV, axis=-1, keepdims=True)


def mass(logp_BxCxV: jax.Array, where_BxCxV: jax.Array) -> jax.Array:
  """[B, C]: the probability of the marked tokens (summed directly, not 1 - the rest)."""
  return jnp.sum(jnp.where(where_BxCxV, jnp.exp(jax.lax.stop_gradient(logp_BxCxV)), 0.0), axis=-1)


def banned_mass(mask: TokenMask, logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array],
                temperature: float = 1.0) -> jax.Array:
  """[B, L]: a model's probability of the banned tokens on fixed rows (`batch`: inputs, segment_ids).

  For measuring a teacher outside training, e.g. on the SL pipeline's filtered rows; the same
  mask and temperature as the objective's `banned_mass_teacher`.
  """
  b, l, _ = logits_BxLxV.shape
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32) / float(temperature), axis=-1)
  return mass(logp_BxLxV, banned(mask, prepare(mask, batch), (b, l)))
