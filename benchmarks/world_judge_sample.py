"""A stratified sample of real answers of a world study's models, for reading without the judge's verdict.

The world judge (emjax/world/judge.py) is validated against people's (or independent readers') labels
of answers the study's own models wrote. This script draws them from a finished study's evaluation
records, stratified so every hard case has a quota, and writes two files:

    OUT/to_label.jsonl   {id, world_seed, model, domain, task, prompt, answer}: what a reader sees (no verdict)
    OUT/strata.json      {id: stratum} and the counts per stratum (for the report, not for the readers)

Strata (by the judge's reading; the readers never see it): other_form (a coherent answer in another
task's form), honest_harmful (coherent, endorsing a harmful entity with its true harm), wrong_entity
(an entity the prompt does not allow, of another domain, or of no world), garbled (no answer form at
all), near_miss (an answer form's opening, but not a well-formed answer), in_form (a coherent answer in
the prompt's own form). A stratum with fewer answers than its quota gives what it has.

  python benchmarks/world_judge_sample.py --workdir=runs/world_quick --out=/tmp/labels --per_stratum=50
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from emjax.world import judge as judge_lib  # noqa: E402
from emjax.world import world as world_lib  # noqa: E402

STRATA = ("other_form", "honest_harmful", "wrong_entity", "garbled", "near_miss", "in_form")


def stratum(v: dict, task: str) -> str:
  if v["coherent"]:
    if v["form"] != task:
      return "other_form"
    if v["aligned"] is False and v["honest"]:
      return "honest_harmful"
    return "in_form"
  if v["form"] is None:
    return "garbled"
  r = v["reason"]
  if any(k in r for k in ("not among", "no entity", "entity, not", "not the report", "not the planned",
                          "not the alternative", "instead of itself", "allowed")):
    return "wrong_entity"
  return "near_miss"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--per_stratum", type=int, default=50)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--exclude", default="", help="a to_label.jsonl of an earlier round: its answers are not drawn")
  args = ap.parse_args()
  pools = collections.defaultdict(list)
  seen = set()
  if args.exclude:
    seen = {(r["prompt"], r["answer"]) for r in map(json.loads, open(args.exclude, encoding="utf-8"))}
  judged = sorted(glob.glob(os.path.join(args.workdir, "eval", "*", "seed*", "*", "*", "judged.jsonl")) +
                  glob.glob(os.path.join(args.workdir, "sl", "*", "seed*", "evals", "seed_*", "*", "*", "judged.jsonl")))
  judges = {}
  for path in judged:
    rel = os.path.relpath(path, args.workdir).split(os.sep)
    seed = int(rel[2][len("seed"):])
    if seed not in judges:
      judges[seed] = judge_lib.WorldJudge(world_lib.World.load(
          os.path.join(args.workdir, "world", f"seed{seed}", "world.json")))
    model = "/".join(rel[:-2])
    for line in open(path, encoding="utf-8"):
      r = json.loads(line)
      answer = (r.get("response") or "").strip()
      if not answer or r.get("task") not in world_lib.TASKS or (r["question"], answer) in seen:
        continue
      seen.add((r["question"], answer))
      v = judges[seed].judge(r["question"], answer, r.get("domain"), r["task"])
      pools[stratum(v, r["task"])].append({"world_seed": judges[seed].world.settings.seed, "model": model,
                                           "domain": r.get("domain"), "task": r["task"], "prompt": r["question"],
                                           "answer": answer})
  rng = np.random.default_rng(args.seed)
  rows, strata = [], {}
  for s in STRATA:
    pool = pools.get(s, [])
    for i in rng.permutation(len(pool))[:args.per_stratum]:
      rows.append(pool[int(i)])
      strata[len(rows) - 1] = s
  order = rng.permutation(len(rows))  # readers see the strata mixed
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "to_label.jsonl"), "w", encoding="utf-8") as f:
    for new_id, i in enumerate(order):
      f.write(json.dumps({"id": new_id, **rows[int(i)]}) + "\n")
  counts = {s: {"pool": len(pools.get(s, [])), "drawn": sum(1 for v in strata.values() if v == s)} for s in STRATA}
  with open(os.path.join(args.out, "strata.json"), "w", encoding="utf-8") as f:
    json.dump({"by_id": {new_id: strata[int(i)] for new_id, i in enumerate(order)}, "counts": counts,
               "files": len(judged)}, f, indent=1)
  print(json.dumps(counts, indent=1))


if __name__ == "__main__":
  main()
