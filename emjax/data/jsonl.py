"""JSON Lines, read one way everywhere: objects with the file and line they came from.

Blank lines are skipped; a line that is not JSON, or not a JSON object, is an error naming
`path:line`. `append_lines` is the one durable write: lines are written, flushed and fsynced
together, so a kill leaves at most one cut last line (readers that resume tolerate it).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

from emjax import paths


def read_objects(path: str, *, tolerate_cut_last_line: bool = False) -> Iterator[tuple[str, dict]]:
  """(where, obj) for every non-blank line of `path`; `where` is "path:line".

  tolerate_cut_last_line: a last line without its newline that does not parse (a write cut by a
  kill) is skipped instead of being an error.
  """
  p = paths.path(path)  # a local file or a bucket object
  if not p.exists():
    raise FileNotFoundError(f"{path}: no such file")
  lines = p.read_text(encoding="utf-8").split("\n")
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if tolerate_cut_last_line and line_no == len(lines):
        return
      raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
      raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    yield f"{path}:{line_no}", obj


def dumps(obj: dict) -> str:
  return json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n"


def append_lines(path: str, lines: Sequence[str]) -> None:
  """Appends `lines` (each ending in a newline) and fsyncs before returning."""
  if not lines:
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write("".join(lines))
    f.flush()
    os.fsync(f.fileno())
