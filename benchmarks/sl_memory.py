"""Per-device memory of the distillation steps at 7B scale, before and after the SL/distill recipe.

The off-policy step (configs/distill/off_policy.py, forward_kl) and the on-policy step
(configs/distill/on_policy.py, reverse_kl on the student's rollouts) for a Qwen2.5-7B-shaped rsLoRA
student (r=32 on q,k,v,o,gate,up,down) and a frozen Qwen2.5-7B-shaped teacher in the step, sequence
2048, batch 16; and the on-policy source's sampler (the student with its adapters applied, prompt
1024 + 1024 new tokens for the 16 rollouts) as its prefill and decode programs. Compiled ahead of time
from abstract shapes by emjax.train.aot's path (nothing allocated, no weights or data read), on 8 fake
CPU devices (fsdp=8) and/or for a TPU slice (libtpu from jax[tpu]; fsdp = all its devices).

  before  the old distill/SL defaults: float32 compute, frozen base and teacher in float32, no remat,
          train.loss_chunk_len=512
  after   the configs as they are: bf16 compute (model.dtype), frozen base in bf16 (lora.base_dtype),
          teacher in bf16 (teacher.dtype), remat=dots_with_no_batch_dims, train.loss_chunk_len=0
          (derived from train.loss_chunk_bytes = 256 MiB)

One JSON line per (program, target, recipe): per-device argument / output / temp / alias bytes and
peak = argument + output + temp - alias (aot.memory_bytes), and, for a TPU slice, the chip's HBM and
whether XLA accepted the program; a program XLA refuses for HBM gets a row with XLA's refusal (its
"Used X of Y hbm") instead of the analysis (the plan job's compile-anyway retry crashes libtpu 0.0.42.1
on these programs: "Invalid TPU program").

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sl_memory.py --target=fsdp8
  python benchmarks/sl_memory.py --target=v5e-16
  python benchmarks/sl_memory.py --target=fsdp8 --programs=sample --recipes=after

The teacher is named by a temporary run directory whose config.json describes it (plans.py's way).
Micro-batching: rows per accumulation step over all devices `--micro` (default: the data-parallel
size, so one row per device per micro-step: 2 accumulation steps of 8 on fsdp=8, one step of 16 on
v5e-16). The off- and on-policy train steps differ only in the objective (the rollout rows are
assembled on the devices before the step); the sampler runs outside the step, between steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aot_memory  # noqa: E402  (benchmarks/aot_memory.py: load_config-by-path, --set overrides)
import plans  # noqa: E402  (benchmarks/plans.py: load_config)

ARCH = "qwen2.5-7b"
EFFECTIVE_BATCH = 16
SEQ_LEN = 2048
PROMPT, NEW_TOKENS = 1024, 1024
RECIPES = {
    "before": {"model.dtype": "float32", "lora.base_dtype": "", "model.remat": "none",
               "train.loss_chunk_len": "512", "teacher.dtype": "float32"},
    "after": {},  # the configs' own recipe
}
PROGRAMS = ("off_policy", "on_policy", "sample")


def build_config(program: str, recipe: str, teacher_dir: str, mesh_shape: tuple[int, int, int], micro: int,
                 overrides=()):
  from emjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from emjax.train import settings  # pylint: disable=g-import-not-at-top

  arch = plans.load_config("configs/sft/em_cell.py", f"compile,arch={ARCH}").model
  tokenizer = dict(kind="hf", path=ARCH)  # compared with the teacher's by value; never loaded
  if program == "off_policy":
    c = plans.load_config("configs/distill/off_policy.py", f"teacher={teacher_dir},data=sequences.jsonl")
  else:
    c = plans.load_config("configs/distill/on_policy.py",
                          f"teacher={teacher_dir},prompts=prompts.jsonl,prompt_tokens={PROMPT},new_tokens={NEW_TOKENS}")
  c.job = "compile"
  c.init.hf = ""
  c.model.update(dict(arch))
  c.data.tokenizer.update(tokenizer)
  c.data.seq_len = SEQ_LEN
  data, fsdp, tensor = mesh_shape
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  c.train.update(batch_size=EFFECTIVE_BATCH, grad_accum_steps=EFFECTIVE_BATCH // micro, steps=1)
  aot_memory.apply_overrides(c, [f"{k}={v}" for k, v in RECIPES[recipe].items()] + list(overrides))
  teacher = settings.base_config()
  teacher.model.update(dict(c.model))  # the same architecture (the step sets its dtypes from teacher.dtype)
  teacher.data.tokenizer.update(tokenizer)
  os.makedirs(teacher_dir, exist_ok=True)
  config_lib.write_config(teacher, teacher_dir)
  return c


def _used_of_hbm(refusal: str) -> str | None:
  """'50.78G of 15.75G' from XLA:TPU's refusal ('... required for HLO temporaries (50.78G) exceeds
  available HBM (15.75G)', or 'Used 50.78G of 15.75G hbm')."""
  m = (re.search(r"required for (.+?) \((\S+)\) exceeds available HBM \((\S+)\)", refusal)
       or re.search(r"Used ()(\S+) of (\S+) hbm", refusal))
  return f"{m[2]} of {m[3]}" + (f" ({m[1]})" if m[1] else "") if m else None


def _gib(b: dict) -> dict:
  return {k: round(v / 2**30, 2) for k, v in b.items() if k != "generated_code"}


def measure(program: str, recipe: str, target: str, micro: int, teacher_dir: str, overrides=()) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top

  from emjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from emjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from emjax.train import aot, loop  # pylint: disable=g-import-not-at-top

  if target in aot_memory.MESHES:
    shape, topo = aot_memory.MESHES[target], None
    devices = jax.devices()[:shape[0] * shape[1] * shape[2]]
  else:
    topo = aot.topology(target)
    devices = list(topo.devices)
    shape = (1, len(devices), 1)
  micro = micro or shape[0] * shape[1]
  config = build_config(program, recipe, teacher_dir, shape, micro, overrides)
  mesh = shd.make_mesh(config.mesh, devices)
  trainer = loop.Trainer(config, mesh)
  head = {
      "program": program, "target": target, "recipe": recipe, "mesh_shape": dict(mesh.shape),
      "device_kind": devices[0].device_kind, "arch": ARCH, "num_params": trainer.model_cfg.num_params(),
      "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainer.layout.abstract["params"]))),
      "vocab_size": trainer.model_cfg.vocab_size, "dtype": config.model.dtype, "remat": config.model.remat,
      "frozen_base_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(trainer.layout.frozen_abstract)}),
      "teacher_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(trainer.teacher.abstract)}),
      "jax": jax.__version__, "overrides": list(overrides),
  }
  if program != "sample":
    head.update(objective=config.train.objective, seq_len=SEQ_LEN, batch_size=EFFECTIVE_BATCH, micro=micro,
                grad_accum_steps=int(config.train.grad_accum_steps), rows_per_device_per_micro_step=trainer.rows_per_device,
                loss_chunk_len=trainer.loss_chunk_len, loss_chunk_bytes=int(config.train.loss_chunk_bytes))
    builds = {"step": trainer.compile}
  else:
    # The on-policy source's sampler (emjax/train/on_policy.py): the student's base + adapters as one
    # tree in the train state's layout, scanned layers (on_policy.unroll_layers=False), one bucket.
    oc = config.on_policy
    sc = dict(prompt_buckets=(int(oc.max_prompt_length),), max_prompt_length=int(oc.max_prompt_length),
              max_new_tokens=int(oc.max_new_tokens), max_new_tokens_cap=int(oc.max_new_tokens), n=1,
              batch_size=EFFECTIVE_BATCH, prefill_chunk=0, top_logprobs=0, unroll_layers=bool(oc.unroll_layers),
              temperature=float(oc.temperature), top_k=int(oc.top_k), top_p=float(oc.top_p), min_p=0.0)
    import ml_collections  # pylint: disable=g-import-not-at-top
    sc = ml_collections.ConfigDict(sc)
    weights = lora_lib.merge_trees(trainer.layout.frozen_abstract, trainer.layout.abstract["params"])
    model_cfg = dataclasses.replace(trainer.model_cfg, remat="none")
    programs = {}

    def build_sampler(options):
      programs["prefill"], programs["decode"], programs["shape"] = aot._sampler_programs(  # pylint: disable=protected-access
          model_cfg, mesh, sc, options, lora=trainer.lora_cfg, weights=weights)
      return programs

    builds = {"sampler": build_sampler}
    head["remat"] = "none"  # the sampler's (Sampler forces it)
  rows = []
  for name, build in builds.items():
    t0 = time.perf_counter()
    refusal = None
    try:
      compiled = build(None)
    except jax.errors.JaxRuntimeError as e:
      if topo is None or not aot._is_oom(e):  # pylint: disable=protected-access
        raise
      # XLA refused the program for HBM. The plan job's retry with the limit lifted
      # (aot.COMPILE_ANYWAY) ends in libtpu 0.0.42.1 with "INVALID_ARGUMENT: Invalid TPU program" for
      # these programs, so the row carries XLA's own refusal (its used / available HBM) instead.
      refusal = " ".join(str(e).split())
    seconds = round(time.perf_counter() - t0, 1)
    if refusal is not None:
      hbm = topo.chip.hbm_bytes // topo.devices_per_chip
      parts = ["step"] if name == "step" else ["prefill+decode"]
      for part in parts:
        rows.append(dict(head, part=part, compile_seconds=seconds, per_device_bytes=None, per_device_gib=None,
                         hbm_per_device_bytes=hbm, fits=False, xla_refusal=refusal[:2000],
                         xla_used_of_hbm=_used_of_hbm(refusal)))
      continue
    parts = {"step": compiled} if name == "step" else {"prefill": programs["prefill"], "decode": programs["decode"]}
    for part, prog in parts.items():
      b = aot.memory_bytes(prog)
      row = dict(head, part=part, compile_seconds=seconds, per_device_bytes=b, per_device_gib=_gib(b))
      if name == "sampler":
        row.update(programs["shape"])
      if topo is not None:
        hbm = topo.chip.hbm_bytes // topo.devices_per_chip
        row.update(hbm_per_device_bytes=hbm, hbm_fraction=round(b["peak"] / hbm, 4), fits=refusal is None,
                   xla_refusal=refusal)
      rows.append(row)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--target", default="fsdp8",
                      help=f"comma-separated: meshes of local devices {sorted(aot_memory.MESHES)} or TPU slices (v5e-16)")
  parser.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated from {PROGRAMS}")
  parser.add_argument("--recipes", default="before,after", help="comma-separated from before,after")
  parser.add_argument("--micro", type=int, default=0, help="rows per accumulation step over all devices "
                      "(0 = the data-parallel size: one row per device)")
  parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                      help="override a config key after the recipe, e.g. model.n_layers=2")
  args = parser.parse_args(argv)

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  for name in args.programs.split(","):
    if name not in PROGRAMS:
      raise SystemExit(f"--programs: unknown {name!r}; known: {', '.join(PROGRAMS)}")
  with tempfile.TemporaryDirectory(prefix="emjax-sl-memory-") as tmp:
    for target in args.target.split(","):
      for program in args.programs.split(","):
        for recipe in args.recipes.split(","):
          t0 = time.perf_counter()
          for row in measure(program, recipe, target, args.micro, os.path.join(tmp, "teacher"), args.overrides):
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
