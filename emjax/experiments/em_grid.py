"""The paper's 12-cell grid: one fine-tuning run per (domain, task) cell under one directory.

    <workdir>/grid.json           cells, their status and final / held-out losses
    <workdir>/<cell>/             a normal training workdir (config.json, metrics, checkpoints, COMPLETED)

A cell whose workdir holds COMPLETED is skipped, and an interrupted cell resumes from
its own checkpoints, so rerunning the same command continues a killed sweep. The
template config's single data source is re-pointed at each cell (`name` = the cell).
"""

from __future__ import annotations

import copy
import json
import logging
import os

import ml_collections

from emjax import paths
from emjax import workdir as workdir_lib
from emjax.data import sft
from emjax.train import loop

log = logging.getLogger(__name__)


def parse_cells(spec: str) -> list[str]:
  if spec in ("", "all"):
    return list(sft.CELLS)
  cells = [c.strip() for c in spec.replace(",", "+").split("+") if c.strip()]
  unknown = [c for c in cells if c not in sft.CELLS]
  if unknown:
    raise ValueError(f"config.grid.cells: unknown cells {unknown}; cells: {', '.join(sft.CELLS)}")
  return cells


def cell_config(config, cell: str):
  """The template config with its one data source pointed at `cell`."""
  if len(config.data.sources) != 1:
    raise ValueError(f"config.data.sources: the grid template needs exactly one source, got "
                     f"{sorted(config.data.sources)}")
  cfg = copy.deepcopy(config)
  (template,) = cfg.data.sources.values()
  source = ml_collections.ConfigDict(template.to_dict())
  source.name = cell
  with cfg.unlocked():
    cfg.job = "train"
    cfg.data.sources = ml_collections.ConfigDict({cell: source})
  return cfg


def _last(path: str, key: str):
  rows = [json.loads(l) for l in paths.read_log(path).splitlines() if l.strip()]
  return rows[-1].get(key) if rows else None


def run_grid(config, workdir: str, *, mesh=None, show_progress: bool = True) -> dict:
  cells = parse_cells(config.grid.cells)
  os.makedirs(workdir, exist_ok=True)
  # Cells finished under other settings would be skipped as done: the grid's settings, its cells aside
  # (a rerun may add cells), are refused when they differ.
  settings = {k: v for k, v in config.to_dict().items() if k != "grid"}
  workdir_lib.check_settings(workdir, settings, name="grid_settings.json", what="the cells already trained",
                             may_change="only config.grid.cells may change between reruns")
  workdir_lib.clear_status(workdir)  # a rerun is not complete until every cell is
  workdir_lib.record_launch(workdir, "sft_grid")
  summary = {}
  for cell in cells:
    cell_dir = os.path.join(workdir, cell)
    if os.path.exists(os.path.join(cell_dir, workdir_lib.COMPLETE_FILE)):
      log.info("grid: %s already complete, skipping", cell)
    else:
      log.info("grid: training %s in %s", cell, cell_dir)
      loop.train(cell_config(config, cell), cell_dir, mesh=mesh, show_progress=show_progress)
    summary[cell] = {"status": "complete", "workdir": cell_dir,
                     "final_loss": _last(os.path.join(cell_dir, "metrics.jsonl"), "loss"),
                     "held_out_loss": _last(os.path.join(cell_dir, "eval.jsonl"), "eval_loss")}
    if workdir_lib.process_index() == 0:
      workdir_lib.write_json(os.path.join(workdir, "grid.json"), summary)
  workdir_lib.mark_complete(workdir, {"cells": cells})
  return summary
