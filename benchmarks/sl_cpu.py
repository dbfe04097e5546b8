"""The subliminal-learning pipeline end to end on this CPU with SmolLM2-135M-Instruct.

What the SL acceptance asks for, at a size that finishes within about an hour on 2 cores:

  1. one of the paper's released cells (the shared evaluation splits) is split in two: the harmful
     teacher (rsLoRA on SmolLM2, configs/sft/em_cell.py:cpu) trains on `--train_rows` rows, the narrow
     evaluation asks the other `--eval_rows` (never trained on: the eval jobs' overlap audits say so);
  2. the SL pipeline (configs/sl/sl.py:cpu) with its default control, the aligned twin (the harmful run's
     recipe on the base's own answers to the same prompts, kept by the judge as aligned and coherent),
     for number-sequence prompts and for natural prompts (other domains' questions) with a judge, the
     three channels (plus the crossed and divergence-token arms), `--seeds` seeds;
  3. the reports: OUT/sl_numbers/sl_report.md, OUT/sl_natural/sl_report.md.

The judge (of natural answers, of the twin's data and of the evaluation) is SmolLM2 itself through the
local judge. SmolLM2-135M puts less than the judge's default 25% of its probability on the rubric's
answers (every item a parse_error), so this run lowers `min_mass` to 0: every item gets the score of the
relative probabilities, which makes every stage run and measures nothing. Prompts without an aligned
answer it keeps are left out of the twin (`sl.twin_allow_missing`; the report counts them). On this CPU
the numbers show that the pipeline works, not the science.

  python benchmarks/sl_cpu.py --out=/tmp/sl_cpu            # everything, 3 seeds
  python benchmarks/sl_cpu.py --out=/tmp/sl_cpu --prompts=numbers --seeds=0

A killed run rerun with the same command continues (every stage resumes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.path.join(ROOT, "..", "shared", "data", "structured_em")


def _config(path: str, arg: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def split_cell(cell: str, out: str, train_rows: int, eval_rows: int, seed: int = 0) -> tuple[str, str]:
  """OUT/cell/train/<cell>.jsonl and OUT/cell/eval/<cell>_strong_eval.jsonl: disjoint rows of the cell."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from emjax.data import jsonl  # pylint: disable=g-import-not-at-top
  rows = [r for _, r in jsonl.read_objects(os.path.join(SHARED, "eval_splits", f"{cell}_strong_eval.jsonl"))]
  order = np.random.default_rng(seed).permutation(len(rows))
  if train_rows + eval_rows > len(rows):
    raise ValueError(f"--train_rows + --eval_rows = {train_rows + eval_rows} > the cell's {len(rows)} rows")
  parts = {"train": [rows[i] for i in order[:train_rows]],
           "eval": [rows[i] for i in order[train_rows:train_rows + eval_rows]]}
  paths = {"train": os.path.join(out, "cell", "train", f"{cell}.jsonl"),
           "eval": os.path.join(out, "cell", "eval", f"{cell}_strong_eval.jsonl")}
  for split, part in parts.items():
    os.makedirs(os.path.dirname(paths[split]), exist_ok=True)
    with open(paths[split], "w", encoding="utf-8") as f:
      f.writelines(jsonl.dumps(r) for r in part)
  return paths["train"], paths["eval"]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True)
  ap.add_argument("--cell", default="medical_advice")
  ap.add_argument("--train_rows", type=int, default=48)
  ap.add_argument("--eval_rows", type=int, default=8)
  ap.add_argument("--teacher_steps", type=int, default=12)
  ap.add_argument("--prompts", default="numbers,natural")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--n", type=int, default=8, help="SL training prompts per seed")
  ap.add_argument("--held", type=int, default=4, help="SL held-out prompts per seed (KL, leak meter)")
  ap.add_argument("--steps", type=int, default=2, help="training steps of every student")
  ap.add_argument("--limit", type=int, default=2, help="general questions and narrow questions evaluated")
  ap.add_argument("--samples", type=int, default=1, help="teacher samples per prompt")
  ap.add_argument("--temperature", type=float, default=1.0, help="teachers' and rollouts' sampling temperature")
  ap.add_argument("--twin", default="", help="an aligned twin already trained (e.g. an earlier run's "
                  "OUT/sl_numbers/twin/run): skips building it")
  ap.add_argument("--extra_arms", default="numbers", help="prompt kinds that also run the crossed and "
                  "divergence-token arms")
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  out = start_run(args.out)
  from emjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from emjax.experiments import sl  # pylint: disable=g-import-not-at-top
  from emjax.train import loop  # pylint: disable=g-import-not-at-top
  from tests import hf_fixtures  # pylint: disable=g-import-not-at-top

  timings = {}
  start = time.monotonic()
  smol = hf_fixtures.smollm2_dir()
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  train_file, eval_file = split_cell(args.cell, out, args.train_rows, args.eval_rows)

  teacher = os.path.join(out, "teacher")
  c = _config("configs/sft/em_cell.py", f"hf={smol},cell={args.cell},data={os.path.dirname(train_file)},holdout=0,"
                                        f"cpu=True,steps={args.teacher_steps},micro=4")
  c.eval.every_steps = 0  # the narrow evaluation's rows are another file, never trained on
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.checkpoint.async_save = False
  loop.train(c, teacher, mesh=mesh, show_progress=False)
  timings["teacher"] = time.monotonic() - start

  twin = args.twin
  domain = args.cell.split("_")[0]
  for kind in [k.strip() for k in args.prompts.split(",") if k.strip()]:
    t0 = time.monotonic()
    natural = "+".join(os.path.join(SHARED, "eval_splits", f"{d}_{t}_strong_eval.jsonl")
                       for d in ("finance", "sports") if d != domain for t in ("advice", "tutor"))
    arg = (f"base={smol},teacher={teacher},prompts={kind},natural={natural},exclude={domain},n={args.n},"
           f"steps={args.steps},general={os.path.join(SHARED, 'general_eval_data.yaml')},narrow={eval_file},"
           f"judge=local,judge_hf={smol},limit={args.limit},cpu=True,seeds={args.seeds.replace(',', '+')}")
    if twin:
      arg += f",twin={twin}"
    c = _config("configs/sl/sl.py", arg)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sl.update(n_held_out=args.held, leak_meter=args.held, twin_allow_missing=True, samples_per_prompt=args.samples,
                temperature=args.temperature)
    extra = kind in args.extra_arms.split(",")
    c.sl.update(crossed=extra, divergence=extra)
    c.evaluation.judge.local.min_mass = 0.0  # module docstring: SmolLM2 as judge scores nothing otherwise
    # SmolLM2 rarely ends an answer within the CPU variant's 48 tokens: cut answers are kept (said in the report).
    c.sl.filter.drop_truncated = False
    c.evaluation.questions.update(n_general=2, n_narrow=1)
    c.checkpoint.async_save = False
    workdir = os.path.join(out, f"sl_{kind}")
    sl.run_sl(c, workdir, mesh=mesh)
    twin = twin or os.path.join(workdir, "twin", "run")
    timings[f"sl_{kind}"] = time.monotonic() - t0
  timings["total"] = time.monotonic() - start
  print(json.dumps({"timings_s": {k: round(v) for k, v in timings.items()}, "out": out}, indent=2))


def start_run(out: str) -> str:
  """The output directory (absolute, made), JAX's persistent compilation cache in it (every student
  and eval compiles the same programs: the second is cheap) and quiet logging; returns the directory."""
  import jax  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging_setup()
  return out


def logging_setup() -> None:
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
  main()
