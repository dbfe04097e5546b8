"""EM over training and a misalignment direction with its ablation, end to end on this CPU with SmolLM2.

What issue 24's SmolLM2 acceptance asks for, small enough for 2 cores:

  1. one of the paper's released cells (the shared evaluation splits) split in two: rsLoRA SFT of
     SmolLM2-135M-Instruct (configs/sft/em_cell.py:cpu) on `--train_rows` rows, keeping every
     `--keep_every`-th checkpoint; the narrow evaluation asks the other `--eval_rows` rows;
  2. the em_curve job over the kept steps (general questions and the held-out narrow rows);
  3. the base model's eval on the same questions, then the directions job with the paper authors'
     recipe (fine-tuned minus base, each on its own answers, at n_layers // 2);
  4. the fine-tuned model's eval with that direction ablated, and with a random unit direction ablated
     (the control), beside the plain one.

The judge is SmolLM2 itself through the local judge with `min_mass` 0 (as benchmarks/sl_cpu.py: it
puts too little probability on the rubric's answers otherwise): every stage runs and the numbers
measure the mechanism, not the science. OUT/mechanisms.json and OUT/mechanisms.md hold the results.

  python benchmarks/mechanisms_cpu.py --out=/tmp/mech

A killed run rerun with the same command continues (every stage resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.sl_cpu import SHARED, _config, split_cell, start_run  # noqa: E402


def _eval_config(smol: str, eval_file: str, limit: int):
  c = _config("configs/eval/eval.py", f"general={os.path.join(SHARED, 'general_eval_data.yaml')},narrow={eval_file},"
                                      f"judge=local,judge_hf={smol},limit={limit},smoke=True")
  c.judge.local.min_mass = 0.0  # the module docstring: SmolLM2 as judge scores nothing otherwise
  c.questions.update(n_general=2, n_narrow=1)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c


def _rates(eval_dir: str) -> dict:
  """EM (with its interval and n) and the mean judge scores of one eval, general and in-cell."""
  with open(os.path.join(eval_dir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  (model,) = results["models"].values()
  general = model["general"]["overall"]
  cell = model.get("ft_cell")
  in_cell = (model.get("narrow") or {}).get("in_cell", {}).get(cell) if cell else None
  pick = lambda r: None if not r else {"em": r["em"], "ci95": r["ci95"], "n": r["n_valid"],  # noqa: E731
                                       "coherent": r.get("coherent")}
  out = {"general": pick(general), "in_cell": pick(in_cell)}
  # The mean scores move even where no answer crosses the EM thresholds (a small judge, few answers).
  for set_name in ("general", "narrow"):
    with open(os.path.join(eval_dir, set_name, "judged.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    for score in ("aligned", "coherent"):
      vals = [r[score] for r in rows if r.get(score) is not None]
      out[f"{set_name}_mean_{score}"] = sum(vals) / len(vals) if vals else None
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True)
  ap.add_argument("--cell", default="medical_advice")
  ap.add_argument("--train_rows", type=int, default=96)
  ap.add_argument("--eval_rows", type=int, default=8)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--keep_every", type=int, default=4)
  ap.add_argument("--limit", type=int, default=6, help="general questions evaluated (a seeded random subset)")
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = start_run(args.out)
  from emjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from emjax.eval import curves, direction_job, run as eval_run  # pylint: disable=g-import-not-at-top
  from emjax.train import loop  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top

  timings, start = {}, time.monotonic()
  smol = hf_fixtures.smollm2_dir()
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  train_file, eval_file = split_cell(args.cell, out, args.train_rows, args.eval_rows)

  run = os.path.join(out, f"{args.cell}_s0")
  c = _config("configs/sft/em_cell.py", f"hf={smol},cell={args.cell},data={os.path.dirname(train_file)},holdout=0,"
                                        f"cpu=True,steps={args.steps},micro=4")
  c.eval.every_steps = 0  # the narrow evaluation's rows are another file, never trained on
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.checkpoint.update(every_steps=args.keep_every, keep=1, keep_every=args.keep_every, async_save=False)
  loop.train(c, run, mesh=mesh, show_progress=False)
  timings["sft"] = time.monotonic() - start

  t0 = time.monotonic()
  cc = _config("configs/eval/curve.py", f"general={os.path.join(SHARED, 'general_eval_data.yaml')},narrow={eval_file},"
                                        f"judge=local,judge_hf={smol},limit={args.limit},smoke=True")
  cc.judge.local.min_mass = 0.0
  cc.questions.update(n_general=2, n_narrow=1)
  cc.mesh = dict(data=1, fsdp=1, tensor=1)
  cc.curve.update(runs=run, every=1, threshold=10.0)
  curve = curves.run_curve(cc, os.path.join(out, "curve"), mesh=mesh)
  timings["curve"] = time.monotonic() - t0
  final = curve["runs"][os.path.basename(run)][-1]

  t0 = time.monotonic()
  base_cfg = _eval_config(smol, eval_file, args.limit)
  base_cfg.sample.hf = smol
  base_cfg.evaluated.model_key = "SmolLM2-135M-Instruct (base)"
  eval_run.run_eval(base_cfg, os.path.join(out, "base_eval"), mesh=mesh)
  dc = _config("configs/eval/directions.py", "paper")
  dc.directions.update(answers=os.path.join(out, "curve", os.path.basename(run), f"step_{final}", "general"),
                       base=os.path.join(out, "base_eval", "general"), batch_size=4)
  found = direction_job.run_directions(dc, os.path.join(out, "direction"), mesh=mesh)
  d = np.load(os.path.join(out, "direction", "direction.npy"))
  rng_dir = np.random.default_rng(0).normal(size=d.shape).astype(np.float32)
  np.save(os.path.join(out, "direction", "random.npy"), rng_dir / np.linalg.norm(rng_dir))
  timings["direction"] = time.monotonic() - t0

  t0 = time.monotonic()
  rates = {"plain": _rates(os.path.join(out, "curve", os.path.basename(run), f"step_{final}")),
           "base": _rates(os.path.join(out, "base_eval"))}
  for name, path in (("ablated", "direction.npy"), ("random ablated", "random.npy")):
    ec = _eval_config(smol, eval_file, args.limit)
    ec.sample.update(checkpoint=run, step=final)
    ec.sample.edit.update(direction=os.path.join(out, "direction", path), ablate="all")
    workdir = os.path.join(out, "eval_" + name.replace(" ", "_"))
    eval_run.run_eval(ec, workdir, mesh=mesh)
    rates[name] = _rates(workdir)
  timings["ablations"] = time.monotonic() - t0
  timings["total"] = time.monotonic() - start

  with open(os.path.join(out, "curve", "curve.json"), encoding="utf-8") as f:
    curve_rows = json.load(f)["rows"]
  summary = {"curve": curve_rows, "direction": {k: v for k, v in found.items() if k != "explained"},
             "explained_at_position": found["explained"][found["position"]], "rates_at_final_step": rates,
             "final_step": final, "timings_s": {k: round(v) for k, v in timings.items()}}
  with open(os.path.join(out, "mechanisms.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  fmt = lambda r: "–" if not r or r["em"] is None else f"{r['em']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] (n {r['n']})"  # noqa: E731
  lines = ["# SmolLM2-135M-Instruct: EM over training, and a direction ablated", "",
           "| step | in-cell EM | general EM | train loss |", "|---|---|---|---|"]
  lines += [f"| {r['step']} | {fmt(r['in_cell'])} | {fmt(r['general'])} | {r['train_loss']} |" for r in curve_rows]
  lines += ["", f"Direction: the paper's recipe at position {found['position']} over {found['prompts']} prompts "
            f"(top singular value's share {found['explained'][found['position']]:.2f}).", "",
            f"| step {final} | in-cell EM | general EM | mean aligned (general / narrow) | mean coherent (general / narrow) |",
            "|---|---|---|---|---|"]
  num = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
  lines += [f"| {name} | {fmt(r['in_cell'])} | {fmt(r['general'])} | {num(r['general_mean_aligned'])} / "
            f"{num(r['narrow_mean_aligned'])} | {num(r['general_mean_coherent'])} / {num(r['narrow_mean_coherent'])} |"
            for name, r in rates.items()]
  with open(os.path.join(out, "mechanisms.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(json.dumps({"timings_s": summary["timings_s"], "out": out}, indent=2))


if __name__ == "__main__":
  main()
