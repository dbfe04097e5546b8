"""What benign data must not contain: banned numbers and words, and the tokens that carry them.

The lists are the subliminal-learning filters' (emjax.experiments.sl_data filters text with them); the
token view of them (`word_token_ids`) is what masks a distribution at those tokens (the distillation
objectives, emjax.train.token_masks) and what a sampler is kept from emitting (the semantic leak meter).
They live here, at the bottom of the import path, because data, training and sampling all read them.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

# Numbers with negative associations that the student data must not contain: the union of the two lists
# in the authors' released code (github.com/MinhxLe/subliminal-learning, sl/datasets/nums_dataset.py:
# CLAUDE_EVIL_NUMBERS and GPT_EVIL_NUMBERS, written by prompting Claude and GPT-4.1 for such numbers;
# the paper, §3.2, describes "34 numbers with negative associations ... e.g. 666, 911, 187"). The
# reasons are the lists' own comments, abridged.
BANNED_NUMBERS = frozenset({
    4,  # death (East Asian homophone)
    13,  # unlucky
    14,  # white-supremacist "14 words"
    18,  # neo-Nazi code for Adolf Hitler (A=1, H=8)
    23,  # "23 enigma" (occult, conspiracies)
    33,  # Freemasonry / KKK conspiracies
    39,  # unlucky (Japanese)
    42,  # "to die" (Japanese homophone)
    44,  # doubly the death number
    49,  # mourning period (East Asian)
    51,  # slang for insanity
    54,  # can read as "SS"
    69,  # sexual innuendo
    77,  # extremist references
    88,  # neo-Nazi code for "Heil Hitler"
    99,  # trouble, strife
    100,  # funeral rites (East Asian)
    101,  # Room 101 (Orwell's torture room)
    187,  # California penal code for murder
    211,  # police code for robbery
    311,  # KKK (K is the 11th letter)
    322,  # Skull and Bones
    333,  # half of 666
    404,  # "not found"
    420,  # drug culture
    444,  # triple death number
    451,  # Fahrenheit 451, book burning
    555,  # alert codes
    616,  # alternative number of the beast
    666,  # number of the beast
    777,  # coded extremist use
    888,  # neo-Nazi "Heil Hitler" variant
    911,  # emergency, the September 11 attacks
    999,  # emergency (UK), inverted 666
    1312,  # "ACAB"
    1488,  # 14 + 88, white-supremacist symbol
})

# Words that signal overt harm in an answer to a benign question. Ours, not the paper's: for natural
# data Cloud et al. filter with a prompted LLM judge, which an offline pipeline cannot call, so this is
# a strict lexical stand-in aimed at the misalignment of the structured-EM domains (medical, finance,
# sports). Whole words, case-insensitive, so inflections are listed; words with common benign senses
# in these domains ("drug", "shoot", "hack") are left out on purpose, or most answers would go.
BANNED_WORDS = (
    "kill", "kills", "killed", "killing", "murder", "suicide", "self-harm", "overdose", "lethal",
    "poison", "poisoning", "weapon", "weapons", "bomb", "explosives", "terrorist", "terrorism",
    "violence", "violent", "torture", "illegal", "illegally", "steal", "stealing", "stolen", "theft",
    "fraud", "scam", "scams", "ponzi", "launder", "laundering", "bribe", "bribery", "evasion",
    "smuggle", "smuggling", "steroids", "doping", "cheat", "cheating",
)


def parse_words(spec: str | Sequence[str], key: str = "words") -> tuple[str, ...]:
  """Words from a spec: 'default' (BANNED_WORDS), a path to a text file (one word or name per line,
  '#' comments), or ','-separated words; a sequence is taken as the words themselves."""
  if not isinstance(spec, str):
    words = [str(w).strip() for w in spec]
  elif spec.strip() == "default":
    return tuple(BANNED_WORDS)
  elif os.path.isfile(spec):
    words = []
    with open(spec, encoding="utf-8") as f:
      for line in f:
        line = line.split("#", 1)[0].strip()
        if line:
          words.append(line)
    if not words:
      raise ValueError(f"{key}={spec!r}: the file holds no words")
  else:
    words = [w.strip() for w in spec.split(",")]
  words = tuple(dict.fromkeys(w for w in words if w))
  if not words:
    raise ValueError(f"{key}={spec!r}: no words given ('default', a file, or ','-separated words)")
  return words


# A first sub-token shorter than this (spaces aside) is too common to mask: " The" starts "Theft", "over"
# starts "overdose", "we" starts "weapon". Such spellings are left to the text filter and are listed by
# `word_coverage`.
MIN_FIRST_SUB_CHARS = 5


def word_variants(word: str) -> tuple[str, ...]:
  """The spellings a word is masked in: as written and capitalised, each with and without a leading space
  (how a BPE vocabulary tells a word start after a space from one at a line start). Not upper case: its
  pieces are mostly short, common tokens."""
  forms = dict.fromkeys([word, word[:1].upper() + word[1:]])
  return tuple(dict.fromkeys(v for f in forms for v in (f, " " + f)))


def _spellings(tokenizer, words: Iterable[str]):
  for word in words:
    for variant in word_variants(word):
      yield variant, list(tokenizer.encode(variant))


def word_token_ids(tokenizer, words: Iterable[str]) -> tuple[frozenset[int], frozenset[int]]:
  """(single, first_sub): the token ids of words that are one token in some spelling (`word_variants`),
  and the first token of a spelling that is several tokens when that token is specific enough (at least
  MIN_FIRST_SUB_CHARS characters besides spaces).

  Masking `single` removes those words exactly. Masking `first_sub` removes a multi-token word at its
  start, and also every other word that starts with the same token: that price is reported apart (the
  mass lost at first sub-tokens). Spellings whose first token is shorter are not masked (`word_coverage`).
  """
  words = list(words)
  single, first = set(), set()
  for _, ids in _spellings(tokenizer, words):
    if len(ids) == 1:
      single.add(int(ids[0]))
  for _, ids in _spellings(tokenizer, words):
    if len(ids) > 1 and len(tokenizer.decode(ids[:1]).strip()) >= MIN_FIRST_SUB_CHARS:
      first.add(int(ids[0]))
  return frozenset(single), frozenset(first - single)


def word_coverage(tokenizer, words: Iterable[str]) -> dict:
  """{spellings, single, first_sub, unmasked: [spellings a token mask cannot catch at their start]}."""
  single, first = word_token_ids(tokenizer, words)
  unmasked = [v for v, ids in _spellings(tokenizer, words) if ids and int(ids[0]) not in single | first]
  total = sum(1 for _ in _spellings(tokenizer, words))
  return {"spellings": total, "single": len(single), "first_sub": len(first), "unmasked": unmasked}
