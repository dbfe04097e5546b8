"""Config-file helpers: typed variant arguments, writing a run's config.json and reading it back.

Variants follow big_vision: `--config=configs/pretrain/tiny.py:mix=grammar_heavy,steps=50` calls
`get_config("mix=grammar_heavy,steps=50")`; `parse_arg` turns that string into a ConfigDict of typed
values. The full default config and its checks are `emjax.train.settings`; this module stays below
every other emjax module (it needs only `emjax.paths`), so anything may read or write a config.json.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from emjax import paths


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'a=1,b=x,c' -> ConfigDict(a=1, b='x', c=True), typed like `defaults` (unknown names are errors)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config variant: unknown option {key!r} in {arg!r}; options: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def write_config(config, workdir: str) -> None:
  """The resolved config as JSON; a resumed run with a different config keeps the old one beside it.

  Every write is whole (`paths.write_text`): the old config is copied to `config.json.<n>` first and
  config.json then replaced, so a kill at any point leaves a complete config.json (the old or the new).
  """
  if jax.process_index() != 0:
    return
  path = paths.path(workdir) / "config.json"
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists():
    old = path.read_text()
    if old == text:
      return
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
      n += 1
    # (Unless the newest kept copy is it already: a run killed between the two writes.)
    if n == 1 or path.with_name(f"{path.name}.{n - 1}").read_text() != old:
      paths.write_text(path.with_name(f"{path.name}.{n}"), old)
  paths.write_text(path, text)


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads((paths.path(workdir) / "config.json").read_text()))
