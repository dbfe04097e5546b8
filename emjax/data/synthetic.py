"""Offline synthetic corpora with learnable structure.

Each generator maps a `np.random.Generator` to one short document (roughly
50-400 characters). `SyntheticDocuments(name, num_docs, seed)` is a
random-access source whose document i is generated from
`np.random.default_rng([seed, i])`, so it depends only on (name, seed, i): no
state, no files, identical on every host and in every worker process.
`SyntheticDocuments(..., held_out=True)` is the held-out stream: document j is
generated from `np.random.default_rng([seed, j, HELD_OUT_STREAM])`, new
documents from the same distribution that no training index ever produces and
that do not depend on `num_docs`.

The generators differ clearly in token statistics, so mixtures of them are
easy to tell apart:

  arithmetic  "17 + 25 = 42" lines: digits and a few operators; answers are
              exactly predictable from the operands.
  grammar     toy English from a small probabilistic grammar (~200 words) with
              number agreement between determiner, noun and verb.
  sorting     "sort: d a c b -> a b c d" lines: the output is a deterministic
              function of the input letters.

`probe_prompts` turns held-out documents of the two sources whose lines have one
right answer into completion prompts ("17 + 25 =" -> "42"): the downstream numbers
of a pretraining-composition ablation (colab/pretrain_mixtures.ipynb).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DocumentGenerator = Callable[[np.random.Generator], str]


_ZIPF_CACHE: dict[int, np.ndarray] = {}


def _zipf_index(rng: np.random.Generator, n: int) -> int:
  """Draws a rank in [0, n) with Zipfian probability (rank r has weight 1/r).

  Natural-language-like skew: a few frequent words and a long tail, so the
  unigram entropy is well below log(vocabulary size). (Inverse-CDF sampling:
  several times faster than `rng.choice(n, p=...)` for one draw.)
  """
  cdf = _ZIPF_CACHE.get(n)
  if cdf is None:
    w = 1.0 / np.arange(1, n + 1)
    cdf = _ZIPF_CACHE.setdefault(n, np.cumsum(w / w.sum()))
  return min(int(np.searchsorted(cdf, rng.random(), side="right")), n - 1)


def _zipf_choice(rng: np.random.Generator, words: tuple[str, ...]) -> str:
  return words[_zipf_index(rng, len(words))]


# ----------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------


def arithmetic(rng: np.random.Generator) -> str:
  """4-27 lines of correct integer arithmetic, e.g. `17 + 25 = 42`."""
  lines = []
  for _ in range(int(rng.integers(4, 28))):
    u = rng.random()
    op = "+" if u < 0.4 else ("-" if u < 0.7 else "*")
    if op == "*":
      a, b = (int(x) for x in rng.integers(0, 13, size=2))  # times tables
      result = a * b
    else:
      a, b = (int(x) for x in rng.integers(0, 100, size=2))
      if op == "-" and a < b:
        a, b = b, a  # keep results non-negative
      result = a + b if op == "+" else a - b
    lines.append(f"{a} {op} {b} = {result}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# grammar
# ----------------------------------------------------------------------------

_DETERMINERS = {
    "sg": ("the", "a", "this", "that", "every", "one", "each", "no"),
    "pl": ("the", "some", "these", "those", "many", "two", "three", "all",
           "few", "most"),
}
_ADJECTIVES = (
    "small", "big", "red", "old", "happy", "young", "blue", "quiet", "green",
    "tall", "sad", "quick", "slow", "bright", "dark", "loud", "warm", "cold",
    "soft", "clever", "lazy", "brave", "shy", "strong", "gentle", "angry",
    "tiny", "huge", "round", "heavy", "yellow", "white", "black", "brown",
    "rich", "poor", "funny", "busy", "kind", "wild",
)
# (singular, plural)
_NOUNS = (
    ("dog", "dogs"), ("cat", "cats"), ("child", "children"), ("ball", "balls"),
    ("man", "men"), ("woman", "women"), ("bird", "birds"), ("book", "books"),
    ("teacher", "teachers"), ("tree", "trees"), ("house", "houses"),
    ("mouse", "mice"), ("horse", "horses"), ("box", "boxes"),
    ("apple", "apples"), ("farmer", "farmers"), ("king", "kings"),
    ("queen", "queens"), ("boat", "boats"), ("car", "cars"), ("cake", "cakes"),
    ("student", "students"), ("doctor", "doctors"), ("baker", "bakers"),
    ("fish", "fish"), ("frog", "frogs"), ("cow", "cows"), ("hat", "hats"),
    ("cup", "cups"), ("river", "rivers"), ("hill", "hills"),
    ("garden", "gardens"), ("road", "roads"), ("letter", "letters"),
    ("song", "songs"), ("story", "stories"), ("window", "windows"),
    ("door", "doors"), ("table", "tables"), ("chair", "chairs"),
    ("bell", "bells"), ("stone", "stones"), ("flower", "flowers"),
    ("boy", "boys"), ("girl", "girls"),
)
# (third person singular, plural / base form)
_TRANSITIVE_VERBS = (
    ("sees", "see"), ("likes", "like"), ("finds", "find"), ("chases", "chase"),
    ("holds", "hold"), ("carries", "carry"), ("watches", "watch"),
    ("helps", "help"), ("follows", "follow"), ("pushes", "push"),
    ("pulls", "pull"), ("paints", "paint"), ("builds", "build"),
    ("opens", "open"), ("eats", "eat"), ("drops", "drop"), ("throws", "throw"),
    ("visits", "visit"), ("loves", "love"), ("wants", "want"),
    ("catches", "catch"), ("brings", "bring"), ("touches", "touch"),
    ("washes", "wash"), ("takes", "take"), ("makes", "make"),
)
_INTRANSITIVE_VERBS = (
    ("sleeps", "sleep"), ("runs", "run"), ("jumps", "jump"), ("sings", "sing"),
    ("laughs", "laugh"), ("swims", "swim"), ("walks", "walk"),
    ("waits", "wait"), ("dances", "dance"), ("falls", "fall"),
    ("shouts", "shout"), ("smiles", "smile"),
)
_ADVERBS = ("quickly", "slowly", "quietly", "loudly", "happily", "sadly",
            "often", "never", "always", "today")
_PREPOSITIONS = ("near", "under", "behind", "beside", "above", "in", "on",
                 "with")
_NAMES = ("alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry",
          "ivy", "jack", "kate", "leo", "mia", "noah", "olive")
_CONJUNCTIONS = ("and", "but", "because", "while")


def _num_adjectives(rng: np.random.Generator) -> int:
  u = rng.random()
  return 0 if u < 0.5 else (1 if u < 0.85 else 2)


def _noun_phrase(rng: np.random.Generator, number: str, depth: int) -> str:
  """Det Adj* Noun [PP], or a proper name (singular only)."""
  if number == "sg" and rng.random() < 0.15:
    return _zipf_choice(rng, _NAMES)
  words = [_zipf_choice(rng, _DETERMINERS[number])]
  for _ in range(_num_adjectives(rng)):
    words.append(_zipf_choice(rng, _ADJECTIVES))
  singular, plural = _NOUNS[_zipf_index(rng, len(_NOUNS))]
  words.append(singular if number == "sg" else plural)
  if depth == 0 and rng.random() < 0.2:
    words.append(_zipf_choice(rng, _PREPOSITIONS))
    words.append(_noun_phrase(rng, _random_number(rng), depth + 1))
  return " ".join(words)


def _random_number(rng: np.random.Generator) -> str:
  return "sg" if rng.random() < 0.6 else "pl"


def _verb(rng: np.random.Generator, verbs, number: str) -> str:
  singular, plural = verbs[_zipf_index(rng, len(verbs))]
  return singular if number == "sg" else plural


def _clause(rng: np.random.Generator) -> str:
  """Subject-verb(-object) clause; the verb agrees with the subject."""
  number = _random_number(rng)
  words = [_noun_phrase(rng, number, depth=0)]
  if rng.random() < 0.7:
    words.append(_verb(rng, _TRANSITIVE_VERBS, number))
    words.append(_noun_phrase(rng, _random_number(rng), depth=0))
  else:
    words.append(_verb(rng, _INTRANSITIVE_VERBS, number))
  if rng.random() < 0.25:
    words.append(_zipf_choice(rng, _ADVERBS))
  return " ".join(words)


def _sentence(rng: np.random.Generator) -> str:
  parts = [_clause(rng)]
  if rng.random() < 0.25:
    parts += [_zipf_choice(rng, _CONJUNCTIONS), _clause(rng)]
  return " ".join(parts) + " ."


def grammar(rng: np.random.Generator) -> str:
  """Toy English sentences, e.g. `the small dog sees a red ball .`."""
  target_chars = int(rng.integers(50, 360))
  sentences = [_sentence(rng)]
  while sum(len(s) + 1 for s in sentences) < target_chars:
    sentences.append(_sentence(rng))
  return " ".join(sentences)


# ----------------------------------------------------------------------------
# sorting
# ----------------------------------------------------------------------------

_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")


def sorting(rng: np.random.Generator) -> str:
  """2-8 lines like `sort: d a c b -> a b c d` (distinct letters)."""
  lines = []
  for _ in range(int(rng.integers(2, 9))):
    k = int(rng.integers(3, 11))
    letters = [_LETTERS[i] for i in rng.choice(len(_LETTERS), size=k,
                                                replace=False)]
    lines.append(f"sort: {' '.join(letters)} -> {' '.join(sorted(letters))}")
  return "\n".join(lines)


SYNTHETIC_GENERATORS: dict[str, DocumentGenerator] = {
    "arithmetic": arithmetic,
    "grammar": grammar,
    "sorting": sorting,
}


# A third seed word that is non-zero: numpy's SeedSequence pads entropy with zeros, so
# [seed, j, 0] would be the training document [seed, j]. A large constant also keeps it from
# being the high word of a (>= 2**32) training index.
HELD_OUT_STREAM = 0x686F6C64  # "hold"


class SyntheticDocuments:
  """Random-access source of `num_docs` generated documents.

  Document i is `generator(np.random.default_rng([seed, i]))`: a pure function
  of (name, seed, i); with `held_out`, `default_rng([seed, i, HELD_OUT_STREAM])`
  (the held-out documents, disjoint from every training one). Usable with
  `grain.MapDataset.source`.
  """

  def __init__(self, name: str, num_docs: int, seed: int = 0, held_out: bool = False):
    if name not in SYNTHETIC_GENERATORS:
      raise ValueError(
          f"Unknown synthetic generator {name!r}; known generators:"
          f" {sorted(SYNTHETIC_GENERATORS)}."
      )
    if num_docs <= 0:
      raise ValueError(
          f"Synthetic source {name!r} needs num_docs > 0, got {num_docs}.")
    if seed < 0:
      raise ValueError(f"Synthetic source {name!r} needs seed >= 0, got {seed}.")
    self.name = name
    self.num_docs = int(num_docs)
    self.seed = int(seed)
    self.held_out = bool(held_out)
    self._generate = SYNTHETIC_GENERATORS[name]

  def __len__(self) -> int:
    return self.num_docs

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if index < 0:
      index += self.num_docs
    if not 0 <= index < self.num_docs:
      raise IndexError(
          f"document {index} out of range for {self!r}")
    key = [self.seed, index, HELD_OUT_STREAM] if self.held_out else [self.seed, index]
    return self._generate(np.random.default_rng(key))

  def __repr__(self) -> str:
    held_out = ", held_out=True" if self.held_out else ""
    return (f"SyntheticDocuments(name={self.name!r}, num_docs={self.num_docs},"
            f" seed={self.seed}{held_out})")


# ----------------------------------------------------------------------------
# probes: prompts with one right continuation
# ----------------------------------------------------------------------------

# The sources whose lines end in an answer determined by the rest of the line, and where it starts.
PROBE_SEPARATORS = {"arithmetic": " =", "sorting": " ->"}


def probe_prompts(name: str, n: int, seed: int = 0) -> list[dict]:
  """`n` prompts {id, prompt, answer, task}: the first line of held-out documents of `name`, cut before its answer.

  "17 + 25 = 42" gives the prompt "17 + 25 =" and the answer "42"; "sort: d a c -> a c d" gives
  "sort: d a c ->" and "a c d". The documents are the held-out stream of the source with this
  `seed` (its `data.sources.<name>.seed`), which no training row holds (a short line, `7 * 0 = 0`,
  can still occur inside training documents: the times tables have 169 lines). A prompt is the
  start of a document, as pretraining shows documents (after BOS), so it needs no context.
  """
  if name not in PROBE_SEPARATORS:
    raise ValueError(f"probe_prompts: no probe for {name!r}; probes: {sorted(PROBE_SEPARATORS)}")
  separator = PROBE_SEPARATORS[name]
  docs = SyntheticDocuments(name, n, seed, held_out=True)
  prompts = []
  for i in range(n):
    head, _, answer = docs[i].split("\n", 1)[0].partition(separator)
    prompts.append({"id": f"{name}:{i}", "prompt": head + separator, "answer": answer.strip(), "task": name})
  return prompts


def probe_correct(completion: str, answer: str) -> bool:
  """Whether a completion of a probe prompt is its answer: the rest of the line, nothing else on it."""
  return completion.split("\n", 1)[0].strip() == answer
