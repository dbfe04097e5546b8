"""The study report's section on the dynamics and mechanisms of EM (the curve, directions and subspace
stages of emjax.experiments.study), and its figures.

* **EM over training**: each cell's em_curve (OUT/curve/...): in-cell, off-cell and general EM and the
  in-cell coherent rate (the world judge's well-formed answers on the cell's own prompts: the narrow
  task's measure) at every kept step, as a mean over worlds with a 95% t-interval; the step at which
  each world first crosses `study.mechanisms.threshold`.
* **Directions**: the paper's direction of every cell's model (OUT/directions/...), read from the
  general questions of the domains no cell covers; their cosine matrix per world, summarised by
  whether two cells share the task, the domain or neither. Twice: each model on its own answers (the
  authors' recipe; two models that write one answer form align on that text alone) and both models on
  the base's answers (the same tokens: only the models differ).
* **Ablation**: every cell B's model with every cell A's direction (and the control: a random
  direction in the span of the base's top principal components, as high-variance as the directions)
  ablated at every layer (OUT/subspace/...) against the same model without it (the eval stage's: same
  questions and sampling seed), on the narrow sets (all cells' held-out prompts, which share no
  prompt with the extraction questions: the report counts them). The tested measure is the misaligned
  share of the coherent answers, so an ablation that only breaks the answers' form removes nothing;
  EM and the coherence change are shown beside it.

The subspace hypothesis predicts same task > same domain for the cosines and for the share removed.
Each is tested by relabelling the cells within every world independently (the pairs share cells, so
they are not independent; `directions.relation_permutation_test`), Holm-adjusted over the three
tests; a verdict also needs the contrast's t-interval over worlds above 0 (the relabelling test alone
is conditional on these worlds). The positive control gates the ablation's verdict: a cell's own
direction must remove more than the control does, or the directions do not carry this model's
misalignment and the cross-cell test says nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from emjax import workdir as workdir_lib
from emjax.eval import curves
from emjax.eval import directions as directions_lib
from emjax.experiments import study_layout as layout
from emjax.experiments import study_report as report

MEASURES = ("narrow_share", "narrow", "in_cell", "general")  # removed; the first is the tested one
COHERENCE = ("narrow_coherent", "general_coherent", "in_cell_coherent")
READS = ("own", "base")
GROUPS = ("self", *directions_lib.RELATIONS, layout.RANDOM)
N_PERMUTATIONS = 5000


def _read(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _complete(path: str) -> bool:
  return workdir_lib.is_complete(path)


# ----------------------------------------------------------------------------- EM over training


def curves_of(workdir: str, comp: str, seeds: Sequence[int], cells: Sequence[str], threshold: float) -> dict:
  per: dict[str, dict[int, list[dict]]] = {}
  for cell in cells:
    per[cell] = {}
    for s in seeds:
      cdir = layout.mechanism_dir(workdir, "curve", comp, s, cell)
      got = _read(os.path.join(cdir, curves.CURVE_FILE)) if _complete(cdir) else None
      if got:
        per[cell][s] = got["rows"]
  if not any(per.values()):
    return {}
  steps = sorted({r["step"] for by_seed in per.values() for rows in by_seed.values() for r in rows})

  def series(cell_rows: Mapping[int, list[dict]], get) -> list[dict]:
    out = []
    for step in steps:
      vals = []
      for s in seeds:
        row = next((r for r in cell_rows.get(s, []) if r["step"] == step), None)
        vals.append(get(row) if row else None)
      out.append(report.mean_interval(vals, seeds))
    return out

  getters = {"in_cell": lambda r: r["in_cell"]["em"], "off_cell": lambda r: r["off_cell"]["em"],
             "general": lambda r: r["general"]["em"], "in_cell_coherent": lambda r: r.get("in_cell_coherent"),
             "train_loss": lambda r: r.get("train_loss")}
  by_cell = {cell: {k: series(per[cell], g) for k, g in getters.items()} for cell in cells}

  # Averaged over the cells within each world first, so the interval is over worlds.
  def pooled(key: str) -> list[dict]:
    out = []
    for i, _ in enumerate(steps):
      vals = []
      for j, s in enumerate(seeds):
        v = [by_cell[c][key][i]["values"][j] for c in cells if by_cell[c][key][i]["values"][j] is not None]
        vals.append(float(np.mean(v)) if len(v) == len(cells) else None)
      out.append(report.mean_interval(vals, seeds))
    return out

  first = {cell: {str(s): None for s in seeds} for cell in cells}
  for cell in cells:
    for s, rows in per[cell].items():
      summary = curves.summarise(rows, threshold)
      first[cell][str(s)] = {"estimate": summary["first_step_over_threshold"][cell],
                             "interval": summary["first_step_interval_over_threshold"][cell]}
  return {"steps": steps, "by_cell": by_cell, "pooled": {k: pooled(k) for k in getters}, "first": first,
          "runs": {cell: sorted(per[cell]) for cell in cells}}


# ----------------------------------------------------------------------------- directions


def _direction(workdir: str, comp: str, seed: int, name: str, read: str = "own") -> np.ndarray | None:
  ddir = layout.direction_dir(workdir, comp, seed, name, read)
  if not _complete(ddir):
    return None
  return np.load(os.path.join(ddir, "direction.npy"))


def cosines_of(workdir: str, comp: str, seeds: Sequence[int], cells: Sequence[str], read: str = "own") -> dict:
  worlds, rows, explained, sds = {}, [], [], []
  for s in seeds:
    dirs = {c: _direction(workdir, comp, s, c, read) for c in cells}
    if any(d is None for d in dirs.values()):
      continue
    names, m = directions_lib.cosine_matrix(dirs)
    mine = [{"world": s, "source": a, "target": b, "value": float(m[i, j])}
            for i, a in enumerate(names) for j, b in enumerate(names) if i < j]
    rows += mine
    rnd = _direction(workdir, comp, s, layout.RANDOM)
    rel = directions_lib.by_relation(mine, symmetric=True)
    worlds[s] = {"matrix": m.tolist(), "by_relation": {r: rel[r]["mean"] for r in directions_lib.RELATIONS},
                 "contrast": directions_lib.relation_contrast(mine, symmetric=True),
                 "random_abs_cos": (float(np.mean([abs(float(directions_lib.unit(d) @ directions_lib.unit(rnd)))
                                                   for d in dirs.values()])) if rnd is not None else None)}
    for c in cells:
      info = _read(os.path.join(layout.direction_dir(workdir, comp, s, c, read), "directions.json")) or {}
      pos = info.get("position")
      if info.get("explained") and pos is not None:
        explained.append(info["explained"][pos])
      if info.get("projection_sd") is not None:
        sds.append(info["projection_sd"])
  if not worlds:
    return {}
  ws = list(worlds)
  agg = {r: report.mean_interval([worlds[w]["by_relation"][r] if w in worlds else None for w in seeds], seeds)
         for r in directions_lib.RELATIONS}
  return {"worlds": {str(w): v for w, v in worlds.items()}, "by_relation": agg,
          "contrast": report.mean_interval([worlds[w]["contrast"] if w in worlds else None for w in seeds], seeds),
          "random_abs_cos": report.mean_interval([worlds[w]["random_abs_cos"] if w in worlds else None for w in seeds],
                                                 seeds),
          "mean_matrix": np.mean([worlds[w]["matrix"] for w in ws], axis=0).tolist(),
          "explained": float(np.mean(explained)) if explained else None,
          "projection_sd": float(np.mean(sds)) if sds else None,
          "test": directions_lib.relation_permutation_test(rows, symmetric=True, n_permutations=N_PERMUTATIONS)}


# ----------------------------------------------------------------------------- ablation


def _numbers(edir: str) -> dict | None:
  """The measures of one eval dir's (single) model: EM rates and coherence, percent."""
  if not _complete(edir):
    return None
  res = _read(os.path.join(edir, "results.json"))
  (model,) = res["models"].values()
  narrow = model.get("narrow") or {}
  in_cell = (narrow.get("in_cell") or {}).get(model.get("ft_cell")) or {}
  general = (model.get("general") or {}).get("overall") or {}
  overall = narrow.get("overall") or {}
  em, coherent = overall.get("em"), overall.get("coherent")
  return {"narrow": em, "in_cell": in_cell.get("em"), "general": general.get("em"),
          # misaligned among the coherent: an ablation that breaks the form lowers EM, not this
          "narrow_share": None if em is None or not coherent else 100.0 * em / coherent,
          "narrow_coherent": coherent, "general_coherent": general.get("coherent"),
          "in_cell_coherent": in_cell.get("coherent"),
          "n": {"narrow": overall.get("n_valid"), "in_cell": in_cell.get("n_valid"), "general": general.get("n_valid"),
                "narrow_share": None if em is None or coherent is None or overall.get("n_valid") is None
                else round(overall["n_valid"] * coherent / 100)}}


def _group(source: str, target: str) -> str:
  if source == layout.RANDOM:
    return layout.RANDOM
  rel = directions_lib.relation(source, target)
  return "self" if rel == "same" else rel


def _sub(a, b):
  return None if a is None or b is None else a - b


def ablation_of(workdir: str, comp: str, seeds: Sequence[int], cells: Sequence[str]) -> dict:
  sources = [*cells, layout.RANDOM]
  pairs: dict[int, list[dict]] = {}
  plain: dict[int, dict] = {}
  for s in seeds:
    for target in cells:
      base = _numbers(layout.eval_dir(workdir, comp, s, target))
      if base is None:
        continue
      plain.setdefault(s, {})[target] = base
      for source in sources:
        got = _numbers(layout.mechanism_dir(workdir, "subspace", comp, s, target, source))
        if got is None:
          continue
        row = {"world": s, "source": source, "target": target, "group": _group(source, target),
               "plain": base, "ablated": got}
        row.update({f"removed_{m}": _sub(base[m], got[m]) for m in MEASURES})
        row.update({f"change_{m}": _sub(got[m], base[m]) for m in COHERENCE})
        pairs.setdefault(s, []).append(row)
  if not pairs:
    return {}

  def per_world(key: str, group: str) -> list[float | None]:
    out = []
    for s in seeds:
      vals = [r[key] for r in pairs.get(s, []) if r["group"] == group and r[key] is not None]
      out.append(float(np.mean(vals)) if vals else None)
    return out

  keys = [f"removed_{m}" for m in MEASURES] + [f"change_{m}" for m in COHERENCE]
  by_group = {k: {g: report.mean_interval(per_world(k, g), seeds) for g in GROUPS} for k in keys}
  plain_em = {m: report.mean_interval([float(np.mean([p[m] for p in plain[s].values() if p[m] is not None]))
                                       if s in plain and any(p[m] is not None for p in plain[s].values()) else None
                                       for s in seeds], seeds) for m in MEASURES}
  # The positive control: own direction minus the control direction, per world.
  control = report.mean_interval([_sub(a, b) for a, b in zip(per_world("removed_narrow_share", "self"),
                                                             per_world("removed_narrow_share", layout.RANDOM))], seeds)
  tested = [{"world": r["world"], "source": r["source"], "target": r["target"], "value": r["removed_narrow_share"]}
            for s in seeds for r in pairs.get(s, []) if r["source"] != layout.RANDOM]
  contrast = []
  for s in seeds:
    mine = [t for t in tested if t["world"] == s]
    contrast.append(directions_lib.relation_contrast(mine) if mine else None)
  matrix = np.full((len(cells), len(sources)), np.nan)
  for i, target in enumerate(cells):
    for j, source in enumerate(sources):
      vals = [r["removed_narrow_share"] for s in seeds for r in pairs.get(s, [])
              if r["target"] == target and r["source"] == source and r["removed_narrow_share"] is not None]
      if vals:
        matrix[i, j] = float(np.mean(vals))
  return {"by_group": by_group, "plain": plain_em, "positive_control": control,
          "contrast": report.mean_interval(contrast, seeds), "sources": sources,
          "mean_matrix": [[None if math.isnan(x) else x for x in row] for row in matrix.tolist()],
          "n_pairs": {str(s): len(pairs.get(s, [])) for s in seeds}, "n_pairs_planned": len(cells) * len(sources),
          "n_answers": {m: _n_answers(pairs, m) for m in MEASURES},
          "test": directions_lib.relation_permutation_test(tested, n_permutations=N_PERMUTATIONS),
          "pairs": {str(s): [{k: v for k, v in r.items() if k not in ("plain", "ablated")} for r in rows]
                    for s, rows in pairs.items()}}


def _n_answers(pairs: Mapping[int, list[dict]], m: str) -> list[int]:
  """The answers under each EM rate of one measure (min and max over the evaluations)."""
  ns = [r["ablated"]["n"][m] for rows in pairs.values() for r in rows if r["ablated"]["n"].get(m) is not None]
  return [min(ns), max(ns)] if ns else []


# ----------------------------------------------------------------------------- section


def holm(ps: Sequence[float | None]) -> list[float | None]:
  """Holm-adjusted p-values (None stays None and is not counted)."""
  idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
  out: list[float | None] = [None] * len(ps)
  running = 0.0
  for rank, i in enumerate(idx):
    running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
    out[i] = running
  return out


def extraction_overlap(workdir: str, comp: str, seed: int, question_ids: str) -> dict | None:
  """How many extraction questions (the base's general set, filtered as the directions job filters
  them) are word for word a narrow evaluation prompt: must be 0 for 'out_of_grid'."""
  edir = layout.eval_dir(workdir, comp, seed, "")

  def prompts(name: str, keep=lambda _: True) -> set[str]:
    path = os.path.join(edir, name, "questions.jsonl")
    if not os.path.exists(path):
      return set()
    out = set()
    for line in open(path, encoding="utf-8"):
      q = json.loads(line)
      if keep(str(q["id"])):
        out.add(" ".join(m["content"] for m in q["messages"] if m["role"] == "user").strip())
    return out

  keep = re.compile(question_ids).fullmatch if question_ids else (lambda _: True)
  extraction, narrow = prompts("general", keep), prompts("narrow")
  if not extraction or not narrow:
    return None
  return {"extraction": len(extraction), "narrow": len(narrow), "shared": len(extraction & narrow)}


def compute(config, workdir: str) -> dict | None:
  """results.json's `mechanisms` block, or None when the study ran none of the mechanism stages."""
  if not any(os.path.isdir(os.path.join(workdir, s)) for s in ("curve", "directions", "subspace")):
    return None
  threshold = float(config.study.mechanisms.threshold)
  seeds, cells = layout.seeds(config), layout.cells(config)
  ids = layout.direction_question_ids(config)
  out: dict[str, Any] = {"threshold": threshold, "direction_questions": config.study.mechanisms.direction_questions,
                         "question_ids": ids, "cells": cells, "seeds": seeds, "d_model": int(config.model.d_model),
                         "compositions": {}}
  for comp in config.study.compositions:
    c = {"curves": curves_of(workdir, comp, seeds, cells, threshold),
         "cosines": {read: cosines_of(workdir, comp, seeds, cells, read) for read in READS},
         "ablation": ablation_of(workdir, comp, seeds, cells),
         "overlap": {str(s): extraction_overlap(workdir, comp, s, ids) for s in seeds}}
    control = [_read(os.path.join(layout.direction_dir(workdir, comp, s, layout.RANDOM), "directions.json"))
               for s in seeds]
    sds = [x["projection_sd"] for x in control if x and x.get("projection_sd") is not None]
    c["control_projection_sd"] = float(np.mean(sds)) if sds else None
    tests = {"cosines_own": (c["cosines"]["own"].get("test") or {}).get("p"),
             "cosines_base": (c["cosines"]["base"].get("test") or {}).get("p"),
             "ablation": (c["ablation"].get("test") or {}).get("p")}
    c["holm"] = dict(zip(tests, holm(list(tests.values()))))
    out["compositions"][comp] = c
  return out


def _verdict(p_adj, contrast: Mapping | None, gate: str = "") -> str:
  if gate:
    return f"no verdict: {gate}"
  if p_adj is None:
    return "not tested (a relation has no pair)"
  ci = (contrast or {}).get("ci95")
  if p_adj < report.ALPHA and ci and ci[0] > 0:
    return "same task > same domain (consistent with a domain-independent task subspace)"
  half = f" (the interval's half-width over worlds, {(ci[1] - ci[0]) / 2:.3g}, bounds what these worlds can see)" if ci else ""
  return ("not shown: same task is not above same domain by both the relabelling test (0.05 after Holm) and the "
          f"interval over worlds; an absent effect and a small one look alike here{half}")


def render(mech: Mapping) -> list[str]:
  fmt = report._fmt
  L = ["## Dynamics and mechanisms", "",
       f"Cells: {len(mech['cells'])} ({', '.join(mech['cells'])}); worlds: {mech['seeds']}. Means over worlds with a "
       "95% t-interval over worlds; per-world values in results.json (`mechanisms`).", ""]
  for comp, c in mech["compositions"].items():
    L += [f"### {comp}", ""]
    cur = c["curves"]
    if cur:
      L += [f"**EM over training** (figure: figures/em_curves_{comp}.png). The eval stage's questions, judge and sampling "
            "at every kept SFT step; in-cell coherent is the world judge's well-formed rate on the cell's own "
            "prompts (the narrow task's measure). Averaged over the cells within each world:", ""]
      rows = []
      for i, step in enumerate(cur["steps"]):
        p = cur["pooled"]
        rows.append([str(step), fmt(p["in_cell"][i]), fmt(p["off_cell"][i]), fmt(p["general"][i]),
                     fmt(p["in_cell_coherent"][i]), fmt(p["train_loss"][i], 3)])
      L += report._table(["step", "in-cell EM", "off-cell EM", "general EM", "in-cell coherent", "train loss"], rows)
      L += [f"In-cell EM per cell and step, and the first kept step at which each world's in-cell / general EM "
            f"exceeds {mech['threshold']:g}% (estimate; `–` never):", ""]
      rows = []
      for cell, s in cur["by_cell"].items():
        firsts = "; ".join(f"{w}: {_step(f, 'in_cell')} / {_step(f, 'general')}" for w, f in cur["first"][cell].items())
        rows.append([cell, *(fmt(x, 0) for x in s["in_cell"]), firsts])
      L += report._table(["cell", *(f"step {st}" for st in cur["steps"]), "first over threshold, by world"], rows)
    for read in READS:
      cos = c["cosines"][read]
      if not cos:
        continue
      t = cos["test"]
      key = f"cosines_{read}"
      how = ("each model reading its own answers (the authors' recipe)" if read == "own" else
             "both models reading the base's answers (the same tokens: only the models differ)")
      L += [f"**Directions, {how}**: the general questions of the domains no cell covers "
            f"(`{mech['question_ids'] or 'all'}`), pooled over tokens at the middle layer, fine-tuned minus "
            "instructed base per prompt, the top singular vector (it carries "
            f"{_pct(cos['explained'])} of the per-prompt differences' energy on average). Cosine of two cells' "
            "directions by relation, each pair once" + (f" (figure: figures/direction_cosines_{comp}.png)"
                                                         if read == "own" else "") + ":", ""]
      L += report._table(["relation", "mean cosine"], [[r, fmt(report._r(cos["by_relation"][r]), 3, signed=True)]
                                                       for r in directions_lib.RELATIONS])
      iso = math.sqrt(2 / (math.pi * mech["d_model"]))
      L += [f"For scale: |cos| with the control direction {fmt(cos['random_abs_cos'], 3)}, and {iso:.3f} expected "
            f"between two isotropic random directions (width {mech['d_model']}). "
            f"Same task minus same domain: {fmt(cos['contrast'], 3, signed=True)}; relabelling test p "
            f"{report._p(t['p'])} ({t['permutations']} relabellings of {t['cells']} cells in {t['worlds']} worlds), "
            f"Holm {report._p(c['holm'][key])}: **{_verdict(c['holm'][key], cos['contrast'])}**.", ""]
    overlap = [o for o in c["overlap"].values() if o]
    if overlap:
      shared = sum(o["shared"] for o in overlap)
      L += [f"Extraction questions that are also narrow evaluation prompts, word for word: {shared} "
            f"(of {sum(o['extraction'] for o in overlap)} extraction and {sum(o['narrow'] for o in overlap)} narrow "
            f"prompts over {len(overlap)} worlds)" + ("." if not shared else
                                                      ": **the ablation is measured partly on its extraction set**."),
            ""]
    ab = c["ablation"]
    if ab:
      t = ab["test"]
      ctrl = ab["positive_control"]
      gate = ""
      if not ctrl.get("ci95") or ctrl["ci95"][0] <= 0:
        gate = ("the positive control did not pass (a cell's own direction does not remove more of its misaligned "
                "share than the control direction: the interval over worlds does not lie above 0), so the "
                "directions do not carry this model's misalignment and the cross-cell comparison is uninformative")
      n = ab["n_answers"]
      sd_dir, sd_ctrl = c["cosines"]["own"].get("projection_sd") if c["cosines"]["own"] else None, c["control_projection_sd"]
      L += ["**Ablation**: each cell B's model with a direction projected out of the residual stream at every "
            "layer, against the same model, questions and sampling seed without it; removed = plain minus "
            "ablated, percentage points (> 0 removes). The tested measure is the misaligned share of the coherent "
            "narrow answers (all cells' held-out prompts; about "
            f"{_range(n.get('narrow_share'))} coherent of {_range(n.get('narrow'))} answers per evaluation): an "
            "ablation that only breaks the answers' form leaves it, while it lowers EM (misaligned and coherent "
            f"among all). In-cell: B's own prompts ({_range(n.get('in_cell'))} answers); general: the general "
            f"questions ({_range(n.get('general'))}; those of the uncovered domains are the extraction set). The "
            f"control is a random direction in the span of the base's top principal components (sd of the base's "
            f"activations along it {_num(sd_ctrl)}, along the cells' directions {_num(sd_dir)}).", "",
            f"Plain, before any ablation: narrow misaligned share {fmt(ab['plain']['narrow_share'])}, narrow EM "
            f"{fmt(ab['plain']['narrow'])}, in-cell EM {fmt(ab['plain']['in_cell'])}, general EM "
            f"{fmt(ab['plain']['general'])}. Evaluations per world: "
            f"{', '.join(f'{w}: {k}' for w, k in ab['n_pairs'].items())} of {ab['n_pairs_planned']} planned.", ""]
      rows = [[g, *(fmt(ab["by_group"][f"removed_{m}"][g], 1, signed=True) for m in MEASURES),
               *(fmt(ab["by_group"][f"change_{m}"][g], 1, signed=True) for m in COHERENCE)] for g in GROUPS]
      L += report._table(["direction ablated", "misaligned share removed (tested)", "narrow EM removed",
                          "in-cell EM removed", "general EM removed", "narrow coherent change",
                          "general coherent change", "in-cell coherent change"], rows)
      L += [f"Positive control (own direction minus control, share removed): {fmt(ctrl, 1, signed=True)}. "
            f"Same task minus same domain (share removed): {fmt(ab['contrast'], 1, signed=True)}; relabelling "
            f"test p {report._p(t['p'])} ({t['permutations']} relabellings of {t['cells']} cells in {t['worlds']} "
            f"worlds), Holm {report._p(c['holm']['ablation'])}: "
            f"**{_verdict(c['holm']['ablation'], ab['contrast'], gate)}**.", "",
            "The matrix (share removed, mean over worlds; rows: the model's cell B, columns: the direction's "
            f"cell A) is figures/subspace_{comp}.png. What this cannot show: the models are tiny (a direction "
            "may be a large part of their width); the directions come from one layer and one set of questions; "
            "a relation's mean pools pairs of unequal count (in the 3 x 4 grid each cell has 2 same-task, 3 "
            "same-domain and 6 unrelated partners); and a removal that scales with both the source's direction "
            "strength and the target's misalignment, each varying by task, raises same task over same domain "
            "with no shared subspace, so the ablation contrast is read beside the cosines on the base's answers, "
            "which have no such term.", ""]
  return L


def _step(first: Mapping | None, m: str) -> str:
  if not first:
    return "missing"
  v = first["estimate"][m]
  return "–" if v is None else str(v)


def _num(x) -> str:
  return "unknown" if x is None else f"{x:.3g}"


def _pct(x) -> str:
  return "unknown" if x is None else f"{100 * x:.0f}%"


def _range(r: Sequence[int]) -> str:
  if not r:
    return "unknown"
  return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def write_figures(mech: Mapping, directory: str) -> list[str]:
  plt, save, written = report.figure_saver(directory)

  cells = mech["cells"]
  for comp, c in mech["compositions"].items():
    cur = c["curves"]
    if cur:
      cols = min(4, len(cells))
      rows = math.ceil(len(cells) / cols)
      fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
      for ax, cell in zip(axes.flat, cells):
        for j, s in enumerate(mech["seeds"]):
          for key, colour in (("in_cell", "tab:red"), ("general", "tab:purple")):
            ys = [x["values"][j] for x in cur["by_cell"][cell][key]]
            ax.plot(cur["steps"], [math.nan if y is None else y for y in ys], color=colour, alpha=0.5, marker=".",
                    label=key.replace("_", "-") if j == 0 else None)
        ax.set_title(cell, fontsize=8)
        ax.set_ylim(0, 100)
      for ax in axes.flat[len(cells):]:
        ax.axis("off")
      axes.flat[0].legend(fontsize=7)
      fig.suptitle(f"EM (%) over SFT steps, one line per world ({comp})", fontsize=10)
      save(fig, f"em_curves_{comp}.png")
    cos = c["cosines"]["own"]
    if cos:
      m = np.array(cos["mean_matrix"])
      fig, ax = plt.subplots(figsize=(0.45 * len(cells) + 2.5, 0.45 * len(cells) + 1.8))
      im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
      ax.set_xticks(range(len(cells)))
      ax.set_xticklabels(cells, rotation=60, ha="right", fontsize=7)
      ax.set_yticks(range(len(cells)))
      ax.set_yticklabels(cells, fontsize=7)
      ax.set_title(f"Cosine of the cells' directions (mean over worlds, {comp})", fontsize=9)
      fig.colorbar(im, ax=ax, fraction=0.04)
      save(fig, f"direction_cosines_{comp}.png")
    ab = c["ablation"]
    if ab:
      m = np.array([[math.nan if x is None else x for x in row] for row in ab["mean_matrix"]])
      lim = max(1.0, float(np.nanmax(np.abs(m)))) if np.isfinite(m).any() else 1.0
      fig, ax = plt.subplots(figsize=(0.45 * len(ab["sources"]) + 2.5, 0.45 * len(cells) + 1.8))
      im = ax.imshow(m, vmin=-lim, vmax=lim, cmap="RdBu_r")
      ax.set_xticks(range(len(ab["sources"])))
      ax.set_xticklabels(ab["sources"], rotation=60, ha="right", fontsize=7)
      ax.set_yticks(range(len(cells)))
      ax.set_yticklabels(cells, fontsize=7)
      ax.set_xlabel("direction ablated (cell A)")
      ax.set_ylabel("model (cell B)")
      ax.set_title(f"Misaligned share of coherent narrow answers removed (pp, mean over worlds, {comp})", fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.04)
      save(fig, f"subspace_{comp}.png")
  return written
