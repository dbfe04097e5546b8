"""What a study's settings name and where its files lie: its seeds, cells, compositions and contrasts
read from `config.study`, and the layout of its workdir (OUT/world/seed<s>/, OUT/audit/seed<s>.json,
OUT/<stage>/<composition>/seed<s>[/<cell>], OUT/eval/<composition>/seed<s>/<model>/).

The study (emjax.experiments.study), which writes these files, and its report
(emjax.experiments.study_report), which reads them, both take them from here.
"""

from __future__ import annotations

import json
import os

from emjax.data import sft
from emjax.world import judge
from emjax.world import world as world_lib


def split_csv(text: str) -> list[str]:
  return [t.strip() for t in str(text or "").split(",") if t.strip()]


def seeds(config) -> list[int]:
  return [int(config.study.seed) + i for i in range(int(config.study.seeds))]


def cells(config) -> list[str]:
  spec = config.study.cells
  if not split_csv(spec):
    raise ValueError("config.study.cells is empty: name cells ('medical_advice,sports_advice') or 'all'")
  out = list(sft.CELLS) if spec == "all" else split_csv(spec)
  unknown = [c for c in out if c not in sft.CELLS]
  if unknown:
    raise ValueError(f"config.study.cells: unknown cells {unknown}; cells: {', '.join(sft.CELLS)}")
  return out


def sl_compositions(config) -> list[str]:
  spec = config.study.sl_compositions
  names = list(config.study.compositions) if spec == "all" else split_csv(spec)
  unknown = [n for n in names if n not in config.study.compositions]
  if unknown:
    raise ValueError(f"config.study.sl_compositions: unknown {unknown}; compositions: {list(config.study.compositions)}")
  return names


def contrasts(config) -> list[tuple[str, str]]:
  """config.study.contrast as (treatment, reference) pairs."""
  st = config.study
  out = []
  for part in str(st.contrast or "").split(";"):
    pair = split_csv(part)
    if not pair:
      continue
    if len(pair) != 2 or pair[0] == pair[1] or [c for c in pair if c not in st.compositions]:
      raise ValueError(f"config.study.contrast={st.contrast!r}: 'treatment,reference' pairs of two compositions "
                       f"({list(st.compositions)}) separated by ';', or ''")
    out.append((pair[0], pair[1]))
  return out


def direction_question_ids(config) -> str:
  """The ids of the general questions directions are read from (`study.mechanisms.direction_questions`),
  as the directions job's regular expression."""
  spec = config.study.mechanisms.direction_questions
  if spec == "all":
    return ""
  if spec != "out_of_grid":
    raise ValueError(f"config.study.mechanisms.direction_questions={spec!r}: 'out_of_grid' or 'all'")
  outside = [d for d in world_lib.WorldSettings.from_config(config.world).domains if d not in world_lib.CELL_DOMAINS]
  if not outside:
    raise ValueError("config.study.mechanisms.direction_questions='out_of_grid': the world has no domain outside "
                     f"the cells' ({', '.join(world_lib.CELL_DOMAINS)}); add one to config.world.domains or use 'all'")
  return f"(?:{'|'.join(outside)})_.+"


def settings(config) -> dict:
  """What the written stages depend on (everything but `study.stages` and the cache location)."""
  # `mechanisms` neither: its threshold is the report's, and each directions unit checks its own settings.
  study = {k: v for k, v in config.study.to_dict().items() if k not in ("stages", "compile_cache", "mechanisms")}
  # The judge's version too: evaluations scored by another rule are not mixed into one report.
  return json.loads(json.dumps({"world": config.world.to_dict(), "study": study, "model": config.model.to_dict(),
                                "mesh": config.mesh.to_dict(), "judge": judge.JUDGE_VERSION},
                               sort_keys=True, default=str))


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(f"{path}.tmp", "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(f"{path}.tmp", path)


def world_seed(config, seed: int) -> int:
  """The world of replication `seed`: drawn from `world.seed + seed`, so every replication seed has its
  own world (and `world.seed` moves them all to other worlds)."""
  return int(config.world.seed) + seed


def world_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, "world", f"seed{seed}")


def world_paths(workdir: str, seed: int) -> dict[str, str]:
  """{name: path} of replication `seed`'s world files. paths.json holds them relative to the world's
  directory, so a study directory moved or copied (to another disk, a bucket, a colleague) still
  reads; an absolute path (older studies wrote those) is kept as it is."""
  wdir = world_dir(workdir, seed)
  path = os.path.join(wdir, "paths.json")
  try:
    with open(path, encoding="utf-8") as f:
      paths = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: the world of seed {seed} is not written yet; add 'world' to "
                            "config.study.stages") from None
  return {k: os.path.join(wdir, v) for k, v in paths.items()}


def audit_path(workdir: str, seed: int) -> str:
  # Beside the world, not in it: a world's directory holds its corpora and questions only.
  return os.path.join(workdir, "audit", f"seed{seed}.json")


def run_dir(workdir: str, stage: str, comp: str, seed: int, cell: str = "") -> str:
  parts = [workdir, stage, comp, f"seed{seed}"] + ([cell] if cell else [])
  return os.path.join(*parts)


def eval_dir(workdir: str, comp: str, seed: int, cell: str) -> str:
  return os.path.join(workdir, "eval", comp, f"seed{seed}", cell or "base")


RANDOM = "random"  # the control direction's name beside the cells' (OUT/directions/<comp>/seed<s>/random)


def mechanism_dir(workdir: str, stage: str, comp: str, seed: int, *names: str) -> str:
  """OUT/<curve|subspace>/<composition>/seed<s>/<cell>[/<source cell>]."""
  return os.path.join(workdir, stage, comp, f"seed{seed}", *names)


def direction_dir(workdir: str, comp: str, seed: int, cell: str, read: str = "own") -> str:
  """OUT/directions/<composition>/seed<s>/<cell> (each model read on its own answers), or
  <cell>.base_answers (`read='base'`: both on the base's)."""
  return mechanism_dir(workdir, "directions", comp, seed, cell if read == "own" else f"{cell}.base_answers")
