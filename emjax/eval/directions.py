"""Directions in the residual stream from captured activations (`Sampler.capture`), and how to compare them.

Two ways to find a misalignment direction, both per residual position (layer) and unit-normalised:

* `difference_of_means`: misaligned minus aligned answers of one model (the judge's labels), or a
  fine-tuned model minus its base on the same answers (Soligo, Turner et al. 2025).
* `paper_direction`: the paper authors' own recipe (askinb/em_nlp_clean_repo,
  experiments/main_em_experiment/directions/extract_directions.py): each model reads its own answers
  to the general questions, mean-pooled over every token of the conversation without its system
  block at the middle layer (Hugging Face `hidden_states[n_layers // 2]`, our position
  n_layers // 2); the samples of a prompt are averaged; per prompt, fine-tuned minus base; the
  direction is the top right-singular vector of those differences, uncentred, signed to agree with
  their mean.

`cosine_matrix` and `grouped_cosines` compare directions across training cells (the authors'
plot_cosine.py takes |cos| and averages each pair of groups over i != j), and `by_relation`
summarises any cell-by-cell matrix by whether two cells share the task, the domain, or neither, the
grouping of the paper's "domain-independent subspace" hypothesis; `relation_permutation_test` tests
"same task > same domain" by relabelling the cells (the pairs are not independent). `choose_position` picks the layer
on held-out questions (directions from one half, separation measured on the other);
`random_directions` are the control of the same (unit) norm, `principal_random` one as high-variance
as a direction read from the same activations.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np


def unit(v: np.ndarray, *, what: str = "direction") -> np.ndarray:
  """`v` over its norm along the last axis; a zero or non-finite vector is an error (it has no direction)."""
  v = np.asarray(v, np.float64)
  norm = np.linalg.norm(v, axis=-1, keepdims=True)
  if not np.all(np.isfinite(norm)) or np.any(norm == 0):
    raise ValueError(f"{what}: a zero or non-finite vector has no direction")
  return v / norm


def difference_of_means(positive_NxCxD: np.ndarray, negative_MxCxD: np.ndarray) -> np.ndarray:
  """Unit mean(positive) - mean(negative) per position: [C, D] from [N, C, D] and [M, C, D]."""
  a, b = np.asarray(positive_NxCxD, np.float64), np.asarray(negative_MxCxD, np.float64)
  if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
    raise ValueError(f"difference_of_means: [N, C, D] and [M, C, D] activations, got {a.shape} and {b.shape}")
  if not len(a) or not len(b):
    raise ValueError(f"difference_of_means: {len(a)} positive and {len(b)} negative rows; each side needs at least one")
  return unit(a.mean(axis=0) - b.mean(axis=0), what="the difference of means")


def per_prompt_means(ids: Sequence[Hashable], acts_NxD: np.ndarray) -> tuple[list, np.ndarray]:
  """The activations of each prompt's samples averaged: (prompt ids sorted as strings, [P, D])."""
  acts = np.asarray(acts_NxD, np.float64)
  if len(ids) != len(acts):
    raise ValueError(f"{len(ids)} ids for {len(acts)} activation rows")
  groups: dict = {}
  for i, key in enumerate(ids):
    groups.setdefault(key, []).append(i)
  keys = sorted(groups, key=str)
  return keys, np.stack([acts[groups[k]].mean(axis=0) for k in keys])


def paired_top_singular(diff_PxD: np.ndarray) -> tuple[np.ndarray, float]:
  """(v1, the fraction of the squared singular values it carries) of the uncentred SVD of per-prompt
  differences; v1 is signed so that it agrees with their mean (unit norm, as a singular vector)."""
  diff = np.asarray(diff_PxD, np.float64)
  if diff.ndim != 2 or len(diff) < 1:
    raise ValueError(f"paired_top_singular: [P, D] differences, got {diff.shape}")
  _, s, vh = np.linalg.svd(diff, full_matrices=False)
  v1 = vh[0]
  if v1 @ diff.mean(axis=0) < 0:
    v1 = -v1
  total = float(np.sum(s**2))
  return v1, (float(s[0]**2) / total if total > 0 else float("nan"))


def paper_direction(tuned_ids: Sequence[Hashable], tuned_NxD: np.ndarray, base_ids: Sequence[Hashable],
                    base_MxD: np.ndarray) -> dict:
  """The authors' direction of one fine-tuned model against its base (module docstring): each side's
  pooled activations of its own answers with their prompt ids. Both must cover the same prompts."""
  tk, tuned = per_prompt_means(tuned_ids, tuned_NxD)
  bk, base = per_prompt_means(base_ids, base_MxD)
  if tk != bk:
    only_t, only_b = sorted(set(tk) - set(bk), key=str), sorted(set(bk) - set(tk), key=str)
    raise ValueError(f"paper_direction: the fine-tuned and base answers cover other prompts (only fine-tuned: "
                     f"{only_t[:5]}, only base: {only_b[:5]})")
  diff = tuned - base
  v1, explained = paired_top_singular(diff)
  return {"direction": v1, "explained": explained, "mean_difference": diff.mean(axis=0), "prompts": len(tk)}


def cosine_matrix(directions: Mapping[str, np.ndarray], *, absolute: bool = False) -> tuple[list[str], np.ndarray]:
  """(names, [K, K] cosine similarities) of named directions (|cos| with `absolute`, as plot_cosine.py)."""
  names = list(directions)
  if not names:
    raise ValueError("cosine_matrix: no directions")
  u = unit(np.stack([np.asarray(directions[n], np.float64).reshape(-1) for n in names]))
  m = np.clip(u @ u.T, -1.0, 1.0)
  return names, (np.abs(m) if absolute else m)


def grouped_cosines(names: Sequence[str], matrix: np.ndarray, group_of: Callable[[str], str]) -> tuple[list[str], np.ndarray]:
  """(groups in first-appearance order, [G, G]): the mean of matrix[i, j] over i in G, j in H, i != j
  (plot_cosine.py's averages; their figure then shows 1 on the diagonal, here the within-group mean
  is kept: NaN for a group of one cell)."""
  groups = list(dict.fromkeys(group_of(n) for n in names))
  index = {g: [i for i, n in enumerate(names) if group_of(n) == g] for g in groups}
  out = np.full((len(groups), len(groups)), np.nan)
  for a, ga in enumerate(groups):
    for b, gb in enumerate(groups):
      vals = [matrix[i, j] for i in index[ga] for j in index[gb] if i != j]
      if vals:
        out[a, b] = float(np.mean(vals))
  return groups, out


def relation(cell_a: str, cell_b: str) -> str:
  """'same' | 'same task' | 'same domain' | 'neither' for two 'domain_task' cells."""
  da, _, ta = cell_a.partition("_")
  db, _, tb = cell_b.partition("_")
  if (da, ta) == (db, tb):
    return "same"
  if ta == tb:
    return "same task"
  if da == db:
    return "same domain"
  return "neither"


RELATIONS = ("same task", "same domain", "neither")


def by_relation(rows: Sequence[Mapping], *, symmetric: bool = False) -> dict[str, dict]:
  """{relation: {n, mean, values}} of rows {source, target, value} ('domain_task' cells), off-diagonal
  pairs only: e.g. the EM change in the model trained on `target` when `source`'s direction is ablated
  (both orders are measurements), or with `symmetric` a cosine matrix's entries (each unordered pair
  once). The pairs share cells, so they are not independent: a claim needs a test that permutes the
  cells' labels, not these n."""
  out: dict[str, dict] = {r: {"values": []} for r in RELATIONS}
  seen = set()
  for row in rows:
    if symmetric:
      pair = frozenset((row["source"], row["target"]))
      if pair in seen:
        continue
      seen.add(pair)
    rel = relation(row["source"], row["target"])
    if rel != "same" and row["value"] is not None and math.isfinite(row["value"]):
      out[rel]["values"].append(float(row["value"]))
  for r in RELATIONS:
    vals = out[r]["values"]
    out[r].update(n=len(vals), mean=float(np.mean(vals)) if vals else None)
  return out


def relation_contrast(rows: Sequence[Mapping], *, symmetric: bool = False) -> float | None:
  """mean(same task) - mean(same domain) of `by_relation(rows)`: the subspace hypothesis's statistic
  (a well-learned task stored apart from its domain predicts > 0); None when either side is empty."""
  rel = by_relation(rows, symmetric=symmetric)
  a, b = rel["same task"]["mean"], rel["same domain"]["mean"]
  return None if a is None or b is None else a - b


def _relation_values(rows: Sequence[Mapping], cells: Sequence[str], symmetric: bool) -> np.ndarray:
  """[C, C] of the rows' values (NaN where none; with `symmetric`, each unordered pair once, at i < j)."""
  index = {c: i for i, c in enumerate(cells)}
  values = np.full((len(cells), len(cells)), np.nan)
  for row in rows:
    i, j = index[row["source"]], index[row["target"]]
    if symmetric:
      i, j = min(i, j), max(i, j)
      if not np.isnan(values[i, j]):
        continue  # by_relation's rule: the first row of a pair
    if i != j and row["value"] is not None and math.isfinite(row["value"]):
      values[i, j] = float(row["value"])
  return values


def _labelled_contrast(values: np.ndarray, domain: np.ndarray, task: np.ndarray) -> float | None:
  """`relation_contrast` of a [C, C] value matrix under the cells' (domain, task) labels."""
  same_d, same_t = domain[:, None] == domain[None, :], task[:, None] == task[None, :]
  finite = np.isfinite(values)
  a, b = values[finite & same_t & ~same_d], values[finite & same_d & ~same_t]
  return None if not len(a) or not len(b) else float(a.mean() - b.mean())


def relation_permutation_test(rows: Sequence[Mapping], *, symmetric: bool = False, n_permutations: int = 10000,
                              seed: int = 0) -> dict:
  """The contrast's one-sided p-value under relabelling the cells: every permutation of the cells'
  names when there are at most 7 cells (exact), else `n_permutations` random ones. The pairs share
  cells, so this, not a test over pairs, is the honest null. Small grids cannot reach significance: the
  relabellings that keep every task's cells together leave a pure task effect unchanged, so its p is at
  least t! (d!)^t / (d t)! for d domains and t tasks: 1/3 for 2 x 2 cells, 0.1 for 3 x 2, 6.5e-5 for
  the paper's 3 x 4.

  Rows with a `world` key are independent replications (each world its own cells' measurements): the
  statistic is the mean over worlds of each world's contrast, and each relabelling relabels every
  world on its own (random permutations whenever there is more than one world)."""
  by_world: dict = {}
  for r in rows:
    by_world.setdefault(r.get("world", 0), []).append(r)
  worlds = []
  for w, mine in by_world.items():
    cells = sorted({r["source"] for r in mine} | {r["target"] for r in mine})
    values = _relation_values(mine, cells, symmetric)
    domain = np.array([c.partition("_")[0] for c in cells])
    task = np.array([c.partition("_")[2] for c in cells])
    if _labelled_contrast(values, domain, task) is not None:
      worlds.append((w, cells, values, domain, task))
  n_cells = max((len(c) for _, c, *_ in worlds), default=0)
  if not worlds:
    return {"observed": None, "p": None, "permutations": 0, "cells": n_cells, "worlds": 0}

  def statistic(perms) -> float | None:
    got = [_labelled_contrast(v, d[p], t[p]) for (_, _, v, d, t), p in zip(worlds, perms)]
    return None if any(g is None for g in got) else float(np.mean(got))

  observed = statistic([np.arange(len(c)) for _, c, *_ in worlds])
  exact = len(worlds) == 1 and n_cells <= 7
  if exact:  # the identity is among them
    draws = ([np.array(p)] for p in itertools.permutations(range(n_cells)))
  else:
    rng = np.random.default_rng(seed)
    draws = ([rng.permutation(len(c)) for _, c, *_ in worlds] for _ in range(n_permutations))
  stats = [s for s in map(statistic, draws) if s is not None]
  hits = sum(s >= observed - 1e-12 for s in stats)
  # Drawn relabellings count the observed one too (Phipson and Smyth 2010): p is never 0.
  p = (hits / len(stats) if exact else (hits + 1) / (len(stats) + 1)) if stats else None
  return {"observed": observed, "p": p, "permutations": len(stats), "cells": n_cells, "worlds": len(worlds)}


def random_directions(d_model: int, n: int, seed: int = 0) -> np.ndarray:
  """`n` directions drawn uniformly on the unit sphere of the residual stream: [n, d_model]."""
  return unit(np.random.default_rng(seed).normal(size=(n, d_model)))


def principal_random(acts_NxD: np.ndarray, k: int, seed: int = 0) -> dict:
  """A random unit direction in the span of the top `k` principal components of `acts_NxD` (centred),
  Gaussian weights on them: {direction, variance_share: the share of the activations' variance along
  it}. An ablation control as high-variance as a direction read from the same activations."""
  x = np.asarray(acts_NxD, np.float64)
  if x.ndim != 2 or len(x) < 2 or not 1 <= k <= min(x.shape):
    raise ValueError(f"principal_random: [N >= 2, D] activations and 1 <= k <= min(N, D), got {x.shape} and k={k}")
  x = x - x.mean(axis=0)
  _, s, vh = np.linalg.svd(x, full_matrices=False)
  d = unit(np.random.default_rng(seed).normal(size=k) @ vh[:k])
  total = float(np.sum(s**2))
  return {"direction": d, "variance_share": float(np.sum((x @ d) ** 2)) / total if total > 0 else float("nan")}


def separation(direction_D: np.ndarray, positive_NxD: np.ndarray, negative_MxD: np.ndarray) -> float:
  """Cohen's d of the projections on `direction_D` (positive minus negative, pooled standard deviation)."""
  d = unit(direction_D)
  a, b = np.asarray(positive_NxD, np.float64) @ d, np.asarray(negative_MxD, np.float64) @ d
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"separation: {len(a)} positive and {len(b)} negative rows; each side needs at least two")
  pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
  if pooled > 0:
    return float((a.mean() - b.mean()) / pooled)
  return 0.0 if a.mean() == b.mean() else math.copysign(math.inf, a.mean() - b.mean())


def choose_position(positive_NxCxD: np.ndarray, negative_MxCxD: np.ndarray, positive_half: np.ndarray,
                    negative_half: np.ndarray) -> dict:
  """The position whose difference-of-means direction, taken from (`positive`, `negative`), best separates
  the other half of the questions (`positive_half`, `negative_half`): {position, separations}."""
  dirs = difference_of_means(positive_NxCxD, negative_MxCxD)
  ph, nh = np.asarray(positive_half), np.asarray(negative_half)
  seps = [separation(dirs[c], ph[:, c], nh[:, c]) for c in range(dirs.shape[0])]
  return {"position": int(np.argmax(seps)), "separations": seps}
