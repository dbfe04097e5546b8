"""Per-device memory of the paper's SFT step at its scale, compiled ahead of time from abstract shapes.

The recipe of `configs/sft/em_cell.py` (rsLoRA r=32 on all seven projections, bf16 compute,
sequence 2048, effective batch 16) on Llama-3.1-8B (or `--arch=qwen2.5-14b`), compiled by the
same path as the `compile` job (`emjax.train.aot`): the train state, frozen base and batch are
`jax.ShapeDtypeStruct`s, nothing is allocated, no weights or data are read. One JSON line per mesh:
the compiled step's per-device argument / output / temp / alias bytes and the peak estimate
argument + output + temp - alias (what `aot.compile_and_report` reports).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/aot_memory.py
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/aot_memory.py --mesh=fsdp8,data8,dp2fsdp2tp2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/aot_memory.py --micro=16 \
      --set=model.param_dtype=bfloat16

`--set=KEY=VALUE` (repeatable) overrides any existing config key, typed like its default, e.g.
the frozen-base dtype or the loss chunk once the config has such keys; a key the config lacks is
an error naming it. Estimates come from XLA's compiled memory analysis on the platform compiled
for (here XLA:CPU with fake devices); they are not comparable across jax versions or platforms.
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

# name -> (data, fsdp, tensor) for 8 devices.
MESHES = {
    "fsdp8": (1, 8, 1),
    "data8": (8, 1, 1),
    "fsdp4tp2": (1, 4, 2),
    "dp2fsdp2tp2": (2, 2, 2),
    "one": (1, 1, 1),  # a single device (uses the first device only)
}


def load_config(variant: str):
  spec = importlib.util.spec_from_file_location("em_cell", os.path.join(ROOT, "configs/sft/em_cell.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _typed(old, text: str):
  if isinstance(old, bool):
    return text.lower() in ("1", "true", "yes")
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  return text


def apply_overrides(config, overrides):
  for item in overrides:
    key, eq, value = item.partition("=")
    if not eq:
      raise SystemExit(f"--set={item}: expected KEY=VALUE, e.g. --set=model.param_dtype=bfloat16")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise SystemExit(f"--set={item}: config has no key {key!r} (no {p!r} section) in this checkout")
      node = node[p]
    if leaf not in node:
      raise SystemExit(f"--set={item}: config has no key {key!r} in this checkout")
    node[leaf] = _typed(node[leaf], value)


def measure(config, mesh_name: str) -> dict:
  import jax

  from emjax import sharding as shd
  from emjax.train import aot, loop

  data, fsdp, tensor = MESHES[mesh_name]
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  devices = jax.devices()[:data * fsdp * tensor]
  mesh = shd.make_mesh(config.mesh, devices)
  trainer = loop.Trainer(config, mesh)
  t0 = time.perf_counter()
  compiled = trainer.compile()
  seconds = time.perf_counter() - t0
  per_device = aot.memory_bytes(compiled)
  peak = per_device.pop("peak")
  lora_params = sum(x.size for x in jax.tree.leaves(trainer.layout.abstract["params"]))
  tc = config.train
  dp = shd.data_parallel_size(mesh)
  return {
      "mesh": mesh_name, "mesh_shape": dict(mesh.shape),
      "num_params": trainer.model_cfg.num_params(), "trainable_params": int(lora_params),
      "vocab_size": trainer.model_cfg.vocab_size, "seq_len": config.data.seq_len,
      "batch_size": tc.batch_size, "grad_accum_steps": tc.grad_accum_steps,
      "rows_per_device_per_micro_step": tc.batch_size // tc.grad_accum_steps // dp,
      "dtype": config.model.dtype, "param_dtype": config.model.param_dtype, "remat": config.model.remat,
      # As compiled (a checkout without lora.base_dtype holds the base in param_dtype whatever the config says).
      "frozen_base_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(trainer.layout.frozen_abstract)}),
      # As compiled: the chunk the trainer derived (train.loss_chunk_len=0: from train.loss_chunk_bytes); a
      # checkout without the derivation reports the key (None: no such key, the whole sequence).
      "loss_chunk_len": getattr(trainer, "loss_chunk_len", tc.get("loss_chunk_len")),
      "compile_seconds": round(seconds, 1),
      "per_device_bytes": dict(per_device, peak=peak),
      "per_device_gib": {k: round(v / 2**30, 2) for k, v in dict(per_device, peak=peak).items()
                         if k != "generated_code"},
      "jax": jax.__version__, "platform": devices[0].platform,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mesh", default="fsdp8", help=f"comma-separated names from {sorted(MESHES)}")
  parser.add_argument("--arch", default="llama3.1-8b", help="llama3.1-8b | qwen2.5-14b")
  parser.add_argument("--micro", type=int, default=0,
                      help="rows per accumulation step over all devices (em_cell's micro=; 0 = its default)")
  parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                      help="override a config key, e.g. model.param_dtype=bfloat16")
  args = parser.parse_args(argv)

  import jax

  variant = f"compile,arch={args.arch}" + (f",micro={args.micro}" if args.micro else "")
  for name in args.mesh.split(","):
    if name not in MESHES:
      raise SystemExit(f"--mesh: unknown mesh {name!r}; known: {', '.join(MESHES)}")
    need = MESHES[name][0] * MESHES[name][1] * MESHES[name][2]
    if jax.device_count() < need:
      raise SystemExit(f"--mesh={name} needs {need} devices, there are {jax.device_count()}: run with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={need}")
    config = load_config(variant)
    apply_overrides(config, args.overrides)
    row = measure(config, name)
    row.update(variant=variant, overrides=args.overrides)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
