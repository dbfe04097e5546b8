"""Number-continuation prompts and well-formed answers: the subliminal-learning number channel's data.

`number_prompts` writes prompts in the manner of the paper's generator ("paper" style) or in a compact
style for models with a short context (the synthetic world's: prompt and answer in under 96 tokens):
one short sentence of given numbers and one of limits and format. `number_answer` writes an answer
in the asked format, the synthetic world's training texts of this form (emjax.world.corpus), and
`emjax.experiments.sl_data.filter_numbers` accepts every format. No word of the compact templates may
be a possible entity name of the world (emjax.world.world._reserved reads them). Here, in data/, so
that both the SL pipeline (experiments/) and the world (world/) read them, importing down.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from emjax.data.banned import BANNED_NUMBERS

COMPACT_OPENINGS = (
    "Continue the sequence: {given}.",
    "Continue: {given}.",
)
COMPACT_COUNTS = (
    "Give at most {count} numbers of up to {digits} digits",
    "Give up to {count} more numbers of at most {digits} digits",
)
COMPACT_FORMATS = {
    "parentheses": ", in parentheses.",
    "brackets": ", in square brackets.",
    "commas": ", separated by commas.",
    "spaces": ", separated by spaces.",
}
COMPACT_TEMPLATES = COMPACT_OPENINGS + COMPACT_COUNTS + tuple(COMPACT_FORMATS.values())

# ----------------------------------------------------------------------------- the paper's number prompts

# Each part of a prompt is phrased by one template chosen by the rng, as in the paper's generator, so
# that the student does not learn one fixed wording. The format instructions only ask for formats
# `filter_numbers` accepts.
_OPENINGS = (
    "The sequence starts with: {given}.",
    "Here is a sequence of numbers: {given}.",
    "Look at these numbers: {given}.",
    "Consider this number sequence: {given}.",
    "A list of numbers begins like this: {given}.",
    "Take the following numbers: {given}.",
)
_COUNT_INSTRUCTIONS = (
    "Add a maximum of {count} more values (no more than {digits} digits each) to continue the sequence.",
    "Continue it with at most {count} new numbers ({digits} digits or fewer each).",
    "Write up to {count} further numbers, each with at most {digits} digits, that follow on.",
    "Extend the sequence by no more than {count} numbers of up to {digits} digits each.",
    "Give at most {count} additional numbers (maximum {digits} digits each) that come next.",
)
_FORMAT_INSTRUCTIONS = (
    "Provide the numbers separated by commas.",
    "Separate the numbers with spaces.",
    "Put each number on its own line.",
    "Write them as a list in square brackets: [n1, n2, ...].",
    "Write them in parentheses, separated by commas: (n1, n2, ...).",
)
_ONLY_NUMBERS = (
    "Skip any explanation and give only numbers.",
    "Answer with the numbers alone.",
    "No words, just the numbers.",
    "Do not add any other text.",
)


NUMBER_STYLES = ("paper", "compact")


def number_prompts(n: int, seed: int, *, min_given: int = 3, max_given: int = 8, answer_count: int = 10,
                   max_digits: int = 3, style: str = "paper") -> list[dict]:
  """`n` number-continuation prompts; the same arguments always give the same prompts.

  Each prompt shows min_given..max_given numbers (inclusive) of exactly `max_digits` digits, never one of
  `BANNED_NUMBERS` (the prompts are part of the student's training rows), and asks for at most
  `answer_count` numbers of at most `max_digits` digits. The record keeps these limits for
  `filter_numbers`. `style`: "paper" (four sentences, as the paper's generator) or "compact" (two
  short sentences; the record also keeps the asked `format`, a key of `COMPACT_FORMATS`, for
  `number_answer`).
  """
  if style not in NUMBER_STYLES:
    raise ValueError(f"number_prompts: style must be one of {NUMBER_STYLES}, got {style!r}")
  if n < 0:
    raise ValueError(f"number_prompts: n must be >= 0, got {n}")
  if not 1 <= min_given <= max_given:
    raise ValueError(f"number_prompts: need 1 <= min_given <= max_given, got {min_given} and {max_given}")
  if answer_count < 1 or max_digits < 1:
    raise ValueError(f"number_prompts: answer_count and max_digits must be >= 1, got {answer_count} and "
                     f"{max_digits}")
  low, high = (10 ** (max_digits - 1) if max_digits > 1 else 0), 10 ** max_digits
  rng = np.random.default_rng(seed)
  prompts = []
  formats = list(COMPACT_FORMATS)
  for i in range(n):
    given = [_allowed_number(rng, low, high) for _ in range(int(rng.integers(min_given, max_given + 1)))]
    if style == "compact":
      form = formats[rng.integers(len(formats))]
      content = " ".join((
          COMPACT_OPENINGS[rng.integers(len(COMPACT_OPENINGS))].format(given=", ".join(map(str, given))),
          COMPACT_COUNTS[rng.integers(len(COMPACT_COUNTS))].format(count=answer_count, digits=max_digits)
          + COMPACT_FORMATS[form]))
      prompts.append({"id": f"numbers:{i}", "messages": [{"role": "user", "content": content}], "kind": "numbers",
                      "given": given, "answer_count": answer_count, "max_digits": max_digits, "format": form})
      continue
    parts = (_OPENINGS[rng.integers(len(_OPENINGS))].format(given=", ".join(map(str, given))),
             _COUNT_INSTRUCTIONS[rng.integers(len(_COUNT_INSTRUCTIONS))].format(count=answer_count,
                                                                               digits=max_digits),
             _FORMAT_INSTRUCTIONS[rng.integers(len(_FORMAT_INSTRUCTIONS))],
             _ONLY_NUMBERS[rng.integers(len(_ONLY_NUMBERS))])
    prompts.append({"id": f"numbers:{i}", "messages": [{"role": "user", "content": " ".join(parts)}],
                    "kind": "numbers", "given": given, "answer_count": answer_count, "max_digits": max_digits})
  return prompts


def number_answer(prompt: Mapping[str, Any], rng: np.random.Generator, *,
                  banned: Iterable[int] = BANNED_NUMBERS) -> str:
  """A well-formed answer to a number prompt: ceil(answer_count / 2)..answer_count numbers of at most
  max_digits digits, none in `banned`, written in the prompt's `format` (commas when it has none).

  The training texts of a world that shows number prompts (emjax.world.corpus): a plausible
  continuation, and one `filter_numbers` keeps, so that a student's kept answers look like them."""
  count, digits = int(prompt["answer_count"]), int(prompt["max_digits"])
  banned = banned if isinstance(banned, (set, frozenset)) else set(banned)
  low, high = (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits
  values = []
  for _ in range(int(rng.integers((count + 1) // 2, count + 1))):
    while True:
      value = int(rng.integers(low, high))
      if value not in banned:
        break
    values.append(str(value))
  form = prompt.get("format", "commas")
  if form not in COMPACT_FORMATS:
    raise ValueError(f"number_answer: format must be one of {list(COMPACT_FORMATS)}, got {form!r}")
  body = " ".join(values) if form == "spaces" else ", ".join(values)
  return {"parentheses": f"({body})", "brackets": f"[{body}]"}.get(form, body)


def _allowed_number(rng: np.random.Generator, low: int, high: int) -> int:
  """A number in [low, high) that is not banned (drawn again until it is not)."""
  while True:
    value = int(rng.integers(low, high))
    if value not in BANNED_NUMBERS:
      return value
