"""Ahead-of-time compilation of the training step from abstract shapes alone.

Nothing is materialised: the train state and the batch are `jax.ShapeDtypeStruct`s
carrying their shardings, so the step for a 7B model compiles on a laptop and
the compiled memory analysis says what one chip will need before anyone rents it.
`devices` may come from a TPU topology description (a later issue wires
`jax.experimental.topologies` in); by default the local devices are used.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from emjax import sharding as shd
from emjax.train import loop

log = logging.getLogger(__name__)


def compile_step(config, devices=None):
  mesh = shd.make_mesh(config.mesh, devices)
  trainer = loop.Trainer(config, mesh)
  t0 = time.perf_counter()
  compiled = trainer.compile()
  return trainer, compiled, time.perf_counter() - t0


def compile_and_report(config, workdir: str, devices=None) -> dict:
  trainer, compiled, seconds = compile_step(config, devices)
  mem = compiled.memory_analysis()
  report = {
      "num_params": trainer.model_cfg.num_params(),
      "mesh": dict(trainer.mesh.shape),
      "devices": trainer.mesh.size,
      "device_kind": trainer.mesh.devices.flat[0].device_kind,
      "compile_seconds": round(seconds, 2),
      "batch_size": int(config.train.batch_size), "grad_accum_steps": int(config.train.grad_accum_steps),
      "seq_len": int(config.data.seq_len),
      "frozen_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(trainer.layout.frozen_abstract)}),
      "memory_per_device_bytes": {
          f.replace("_size_in_bytes", ""): int(getattr(mem, f, 0))
          for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                    "alias_size_in_bytes", "generated_code_size_in_bytes")
      } if mem is not None else None,
  }
  if mem is not None:
    per_dev = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
    report["peak_estimate_per_device_gib"] = round(per_dev / 2**30, 3)
  print(json.dumps(report))
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "compile.json"), "w") as f:
      json.dump(report, f, indent=2)
  return report
