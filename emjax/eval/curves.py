"""EM over training: the eval job at every kept checkpoint of one or more runs, and its curves.

A run trained with `checkpoint.keep_every` keeps its checkpoints over training. The `em_curve` job
evaluates each kept step (or every `curve.every`-th) with the eval job's question sets, sampling and
judges, one eval workdir per (run, step) under WORKDIR/<run name>/step_<step>, each resumable; an
API judge's cache and cost ledger are WORKDIR's, shared by every step. Then, per step: in-cell,
off-cell and general EM with their intervals, general coherence, the training loss and the narrow
task's held-out loss (the run's eval.jsonl at that step: what the task has been learnt to). Several
runs (seeds, or LoRA / full / distilled students) give, per step, the mean and range of general EM,
and per run the first step at which EM exceeds `curve.threshold`.

WORKDIR gets curve.json (the rows), results.json ({"curve": ...}), report.md and figures/em_curve.png;
COMPLETED only when every step of every run is.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

from emjax import config as config_lib
from emjax import paths, weights as weights_lib, workdir as workdir_lib
from emjax.eval import run as eval_run

log = logging.getLogger(__name__)

CURVE_FILE = "curve.json"
FIGURE = "em_curve.png"
MEASURES = ("in_cell", "off_cell", "general")


def curve_block() -> dict:
  return dict(
      runs="",  # ','-separated training workdirs (emjax runs: SFT, LoRA, distilled students), e.g. seeds
      every=1,  # evaluate every k-th kept checkpoint (1 = all of them; the last is always evaluated)
      threshold=10.0,  # EM (%) whose first crossing is reported per run
  )


def curve_config(**eval_args) -> Any:
  c = eval_run.eval_job_config(**eval_args)
  c.job = "em_curve"
  c.curve = curve_block()
  return c


def _runs(config) -> list[str]:
  runs = [r.strip() for r in str(config.curve.runs).split(",") if r.strip()]
  if not runs:
    raise ValueError("config.curve.runs: the training runs to follow (','-separated workdirs) are required")
  names = [run_name(r) for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"config.curve.runs: two runs share a directory name ({names}); each names its curve")
  return runs


def run_name(run: str) -> str:
  return os.path.basename(os.path.normpath(run))


def steps_of(run: str, every: int) -> list[int]:
  """The steps of `run` to evaluate, chosen by value so that a rerun chooses the same ones: the kept
  steps (multiples of its checkpoint.keep_every) that are multiples of `every` of them, and its final
  step once the run is COMPLETED. (The newest steps a running job keeps besides are pruned later.)"""
  src = weights_lib.resolve(run, key="config.curve.runs")
  if src.kind != "emjax":
    raise ValueError(f"config.curve.runs: {run!r} is not an emjax training run (a Hugging Face model has no steps)")
  if every < 1:
    raise ValueError(f"config.curve.every must be >= 1, got {every}")
  steps = src.steps()
  if not steps:
    raise FileNotFoundError(f"config.curve.runs: {run!r} has no finished checkpoint")
  keep_every = int((config_lib.load_config_json(run).get("checkpoint") or {}).get("keep_every") or 0)
  if keep_every < 1:
    raise ValueError(f"config.curve.runs: {run!r} was trained with checkpoint.keep_every=0, so only its newest "
                     "checkpoints are kept and there is no curve to follow; train with "
                     "--config.checkpoint.keep_every=K (a multiple of checkpoint.every_steps)")
  chosen = [s for s in steps if s % (keep_every * every) == 0]
  if workdir_lib.is_complete(run) and steps[-1] not in chosen:
    chosen.append(steps[-1])
  if not chosen:
    raise FileNotFoundError(f"config.curve.runs: {run!r} has no kept step yet (steps {steps}, "
                            f"keep_every={keep_every}, curve.every={every})")
  return chosen


def step_config(config, run: str, step: int, workdir: str):
  """The eval job's config for one checkpoint; an API judge's cache and ledger are the curve's."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.job = "eval"
    del c["curve"]
    c.sample.checkpoint, c.sample.step = run, int(step)
    if not c.evaluated.model_key:
      c.evaluated.model_key = f"{run_name(run)}@{step}"
    api = c.judge.get("api")
    if api is not None:
      api.cache_path = api.cache_path or os.path.join(workdir, "judge_cache.jsonl")
      api.ledger_path = api.ledger_path or os.path.join(workdir, "judge_cost.jsonl")
  return c


def logged(run: str, log_name: str, key: str) -> dict[int, float]:
  """{step: the last value of `key` logged at it} from a run's log, read once per run."""
  out = {}
  for line in paths.read_log(paths.path(run) / log_name).splitlines():
    if line.strip():
      row = json.loads(line)
      if row.get(key) is not None:
        out[int(row["step"])] = float(row[key])
  return out


def _rate(r: Mapping | None) -> dict:
  if not r:
    return {"em": None, "ci95": None, "n": 0}
  return {"em": r.get("em"), "ci95": r.get("ci95"), "n": r.get("n_valid", 0)}


def step_row(run: str, step: int, results: Mapping, losses: Mapping[str, Mapping[int, float]]) -> dict:
  """One step's measures from its eval's results.json (the one model it evaluated) and the run's
  `losses` ({"train_loss" / "held_out_loss": `logged(...)`})."""
  (model,) = results["models"].values()
  general = model.get("general", {}).get("overall")
  narrow = model.get("narrow") or {}
  cell = model.get("ft_cell")
  in_cell = (narrow.get("in_cell") or {}).get(cell) if cell else None
  return {"run": run_name(run), "step": int(step), "in_cell": _rate(in_cell), "off_cell": _rate(narrow.get("off_cell")),
          "general": _rate(general), "coherent": general.get("coherent") if general else None,
          # The judge's well-formed rate on the cell's own prompts: the narrow task's measure where the
          # run holds no data out (the synthetic world's judge scores the form).
          "in_cell_coherent": in_cell.get("coherent") if in_cell else None,
          **{name: by_step.get(int(step)) for name, by_step in losses.items()}}


def summarise(rows: Sequence[Mapping], threshold: float) -> dict:
  """Across runs: per step, general EM's mean, range and n runs; per run, the first step over `threshold`."""
  by_step: dict[int, list[float]] = {}
  for r in rows:
    if r["general"]["em"] is not None:
      by_step.setdefault(r["step"], []).append(r["general"]["em"])
  across = [{"step": s, "runs": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v)}
            for s, v in sorted(by_step.items())]
  first: dict[str, dict] = {}
  surely: dict[str, dict] = {}
  for name in dict.fromkeys(r["run"] for r in rows):
    mine = sorted((r for r in rows if r["run"] == name), key=lambda r: r["step"])
    first[name] = {m: next((r["step"] for r in mine if r[m]["em"] is not None and r[m]["em"] > threshold), None)
                   for m in MEASURES}
    surely[name] = {m: next((r["step"] for r in mine if r[m]["ci95"] and r[m]["ci95"][0] > threshold), None)
                    for m in MEASURES}
  return {"general_across_runs": across, "first_step_over_threshold": first,
          "first_step_interval_over_threshold": surely, "threshold": threshold}


def run_curve(config, workdir: str, *, mesh=None) -> dict:
  runs = _runs(config)
  every = int(config.curve.every)
  plan = {run: steps_of(run, every) for run in runs}
  os.makedirs(workdir, exist_ok=True)
  settings = {k: v for k, v in config.to_dict().items() if k not in ("curve", "sample")}
  settings["sample"] = {k: v for k, v in config.sample.to_dict().items() if k not in ("checkpoint", "step", "hf")}
  settings["curve"] = {"every": every}  # runs may be added, and a run's new steps followed, on a rerun
  workdir_lib.check_settings(workdir, settings, what="its steps' evaluations",
                             may_change="config.curve.runs and config.curve.threshold may change")
  workdir_lib.clear_status(workdir)
  workdir_lib.record_launch(workdir, "em_curve")
  rows = []
  for run in runs:
    losses = {"train_loss": logged(run, "metrics.jsonl", "loss"),
              "held_out_loss": logged(run, "eval.jsonl", "eval_loss")}
    for step in plan[run]:
      sub = os.path.join(workdir, run_name(run), f"step_{step}")
      if not workdir_lib.is_complete(sub):
        log.info("em_curve: %s step %d", run, step)
        eval_run.run_eval(step_config(config, run, step, workdir), sub, mesh=mesh)
      with open(os.path.join(sub, "results.json"), encoding="utf-8") as f:
        rows.append(step_row(run, step, json.load(f), losses))
      missing = [name for name, by_step in losses.items() if by_step and rows[-1][name] is None]
      if missing:
        log.warning("em_curve: %s logged no %s at step %d (train.log_every / eval.every_steps do not divide it)",
                    run, " or ".join(missing), step)
    if not losses["held_out_loss"]:
      log.info("em_curve: %s logged no held-out loss (no eval holdout); the in-cell coherent rate is its task "
               "measure", run)
  summary = summarise(rows, float(config.curve.threshold))
  if workdir_lib.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, CURVE_FILE), {"rows": rows, **summary})
    workdir_lib.write_json(os.path.join(workdir, "results.json"), {"curve": {"rows": rows, **summary}})
    workdir_lib.write_text(os.path.join(workdir, "report.md"), report_text(rows, summary))
    if config.report.get("figures", True):
      os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
      draw(rows, os.path.join(workdir, "figures", FIGURE))
  workdir_lib.barrier("em_curve")
  out = {"runs": {run_name(r): plan[r] for r in runs}, **summary}
  workdir_lib.mark_complete(workdir, out)
  return out


def _fmt(rate: Mapping) -> str:
  if rate["em"] is None:
    return "–"
  ci = rate["ci95"]
  return f"{rate['em']:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "") + f" (n {rate['n']})"


def _num(x, digits=3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_text(rows: Sequence[Mapping], summary: Mapping) -> str:
  lines = ["# EM over training", "",
           "Each step is one eval of that checkpoint (its own workdir beside this report). EM in %, with the "
           "95% interval of each rate and its n; the task measure is the run's held-out loss at that step.", "",
           "| run | step | in-cell EM | off-cell EM | general EM | coherent | in-cell coherent | train loss | held-out loss |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['step']} | {_fmt(r['in_cell'])} | {_fmt(r['off_cell'])} | {_fmt(r['general'])} | "
                 f"{_num(r['coherent'], 1)} | {_num(r.get('in_cell_coherent'), 1)} | {_num(r['train_loss'])} | "
                 f"{_num(r['held_out_loss'])} |")
  th = summary["threshold"]
  lines += ["", f"First evaluated step with EM over {th:g}%: the estimate, and (after /) the whole 95% interval "
            "(– : none; steps between evaluated ones are not seen):", "",
            "| run | in-cell | off-cell | general |", "|---|---|---|---|"]
  surely = summary["first_step_interval_over_threshold"]
  for name, first in summary["first_step_over_threshold"].items():
    cells = [f"{'–' if first[m] is None else first[m]} / {'–' if surely[name][m] is None else surely[name][m]}"
             for m in MEASURES]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if len(summary["first_step_over_threshold"]) > 1:
    lines += ["", "General EM across runs (mean, range):", "", "| step | runs | mean | min | max |", "|---|---|---|---|---|"]
    for a in summary["general_across_runs"]:
      lines.append(f"| {a['step']} | {a['runs']} | {a['mean']:.1f} | {a['min']:.1f} | {a['max']:.1f} |")
  return "\n".join(lines) + "\n"


def draw(rows: Sequence[Mapping], path: str) -> None:
  """EM (three measures, intervals shaded) and the two losses against the step, one line per run."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

  fig = Figure(figsize=(12, 4), dpi=120)
  axes = fig.subplots(1, 2)
  colours = {"in_cell": "tab:red", "off_cell": "tab:orange", "general": "tab:purple"}
  for name in dict.fromkeys(r["run"] for r in rows):
    mine = sorted((r for r in rows if r["run"] == name), key=lambda r: r["step"])
    steps = [r["step"] for r in mine]
    for m in MEASURES:
      em = [r[m]["em"] if r[m]["em"] is not None else math.nan for r in mine]
      axes[0].plot(steps, em, marker="o", color=colours[m], label=f"{m} ({name})", alpha=0.9)
      lo = [r[m]["ci95"][0] if r[m]["ci95"] else math.nan for r in mine]
      hi = [r[m]["ci95"][1] if r[m]["ci95"] else math.nan for r in mine]
      axes[0].fill_between(steps, lo, hi, color=colours[m], alpha=0.1)
    for key, style in (("train_loss", "-"), ("held_out_loss", "--")):
      axes[1].plot(steps, [r[key] if r[key] is not None else math.nan for r in mine], style, marker=".",
                   label=f"{key.replace('_', ' ')} ({name})")
  axes[0].set(xlabel="step", ylabel="EM rate (%)", ylim=(0, 100), title="EM over training")
  axes[1].set(xlabel="step", ylabel="loss", title="the narrow task")
  for ax in axes:
    ax.legend(fontsize="x-small")
  fig.tight_layout()
  fig.savefig(path, format="png")
