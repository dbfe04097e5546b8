"""Plans before paying: each paper job compiled for a TPU slice on this CPU, one markdown table.

For every job of the paper at its scale (the SFT recipe of configs/sft/em_cell.py on Llama-3.1-8B,
Qwen2.5-14B and OLMo-3-32B's dimensions; a 1B and a 7B pretraining; on-policy distillation with
teacher and student on one slice; the evaluation job's sampling), the `plan` job's report
(`emjax.train.aot.plan`): per-device memory against the chip's HBM, XLA's FLOP and byte counts,
and the roofline projection step_s = max(flops / peak_bf16_flops, bytes / hbm_bytes_per_s). The
programs are compiled by libtpu from abstract shapes (jax[tpu]; no TPU, no weights, no data).

  python benchmarks/plans.py                      # all plans -> plans.jsonl, then the table
  python benchmarks/plans.py --only=sft-llama3.1-8b,eval-sample-llama3.1-8b
  python benchmarks/plans.py --table              # the table of what plans.jsonl holds

Each plan compiles three programs per step (the step, then the step at 1 and 2 layers for the
cost; see emjax/train/aot.py), minutes each for the large models on a small CPU; a plan's line is
appended to --out as soon as it is done.

OLMo-3-32B: the olmo2 family (post-norm, QK-norm) with OLMo-3-32B's dimensions (d_model 5120, 64
layers, 40 heads, 8 KV heads, d_ff 27648, vocabulary 100278). OLMo-3's sliding-window layers are
full attention here, which is the same computation at 2048 tokens (its window is 4096). The paper
fine-tuned it as 4-bit QLoRA on one GPU; here the base is bf16, sharded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OLMO3_32B = dict(family="olmo2", vocab_size=100278, d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8,
                 head_dim=128, d_ff=27648, rope_theta=500000.0, rope_scaling_factor=0.0, qk_norm=True,
                 post_norm=True, tie_embeddings=False, norm_eps=1e-6)
# OLMo-2-7B's dimensions, for the 7B pretraining.
OLMO2_7B = dict(family="olmo2", vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                head_dim=128, d_ff=11008, rope_theta=500000.0, rope_scaling_factor=0.0, qk_norm=True,
                post_norm=True, tie_embeddings=False, norm_eps=1e-6)


def load_config(rel_path: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(rel_path))[0],
                                                os.path.join(ROOT, rel_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _plan(c, topology: str, step: str = "train", **mesh):
  c.job = "plan"
  c.compile.update(topology=topology, step=step)
  c.mesh.update(mesh)
  return c


def sft(arch: str, topology: str, **mesh):
  # micro=16: the effective batch of 16 in one step (one row per data-parallel device on 16).
  c = load_config("configs/sft/em_cell.py", f"compile,micro=16,arch={'llama3.1-8b' if arch == 'olmo3-32b' else arch}")
  if arch == "olmo3-32b":
    c.model.update(OLMO3_32B)
  return _plan(c, topology, **mesh)


def pretrain_1b(topology: str, **mesh):
  c = load_config("configs/pretrain/llama_1b.py", "batch=64")
  c.train.grad_accum_steps = 4
  return _plan(c, topology, **mesh)


def pretrain_7b(topology: str, **mesh):
  c = load_config("configs/pretrain/llama_1b.py", "batch=64")
  c.model.update(OLMO2_7B)
  c.train.grad_accum_steps = 2
  return _plan(c, topology, **mesh)


def distill(topology: str, teacher_dir: str, **mesh):
  """configs/distill/on_policy.py's step with Llama-3.1-8B as teacher (bf16) and rsLoRA student.

  The teacher is named by a run directory whose config.json describes it (no weights: the plan
  reads none); the student's architecture is set directly instead of from base=HF_DIR.
  """
  from emjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from emjax.train import settings  # pylint: disable=g-import-not-at-top

  sft_cfg = load_config("configs/sft/em_cell.py", "compile")
  c = load_config("configs/distill/on_policy.py", f"teacher={teacher_dir},prompts=prompts.jsonl")
  c.init.hf = ""
  c.model.update(dict(sft_cfg.model))
  c.lora.base_dtype = "bfloat16"
  c.data.tokenizer.update(kind="hf", path="llama3.1-8b")
  teacher = settings.base_config()
  teacher.model.update(dict(sft_cfg.model))
  teacher.data.tokenizer.update(dict(c.data.tokenizer))
  os.makedirs(teacher_dir, exist_ok=True)
  config_lib.write_config(teacher, teacher_dir)
  return _plan(c, topology, **mesh)


def eval_sample(arch: str, topology: str, **mesh):
  """configs/eval/eval.py's answers stage on the general set: 16 prompts x 4 samples, prompts up
  to 1024 tokens (the largest bucket is planned), 600 new tokens, weights in bf16."""
  c = load_config("configs/eval/eval.py")
  sft_cfg = load_config("configs/sft/em_cell.py", f"compile,arch={arch}")
  c.model = dict(sft_cfg.model)
  c.model.update(param_dtype="bfloat16", remat="none")
  c.sample.n = int(c.questions.n_general)
  return _plan(c, topology, step="sample", **mesh)


def pretrain_world(topology: str, **mesh):
  """configs/paper/world.py's full variant: the pretraining step of one (composition, world) unit
  (its model, batch 32 x 128; the study's other stages run smaller steps of the same model)."""
  from emjax.train import settings  # pylint: disable=g-import-not-at-top
  study_cfg = load_config("configs/paper/world.py")
  c = settings.base_config()
  c.model.update(study_cfg.model.to_dict())
  c.data.seq_len = int(study_cfg.study.pretrain.seq_len)
  c.train.update(batch_size=int(study_cfg.study.pretrain.batch_size), loss_chunk_len=0)
  return _plan(c, topology, **mesh)


def plans(teacher_dir: str) -> dict:
  """name -> (a function building the config, what it is)."""
  return {
      "sft-llama3.1-8b": (lambda: sft("llama3.1-8b", "v5e-16", data=1, fsdp=16, tensor=1),
                          "SFT rsLoRA r=32, seq 2048, batch 16"),
      "sft-qwen2.5-14b": (lambda: sft("qwen2.5-14b", "v5p-64", data=1, fsdp=16, tensor=2),
                          "SFT rsLoRA r=32, seq 2048, batch 16"),
      "sft-olmo3-32b": (lambda: sft("olmo3-32b", "v5p-64", data=1, fsdp=16, tensor=2),
                        "SFT rsLoRA r=32, seq 2048, batch 16 (olmo2 family, OLMo-3-32B dims)"),
      "pretrain-1b": (lambda: pretrain_1b("v5e-16", data=1, fsdp=16, tensor=1),
                      "pretraining, Llama-3.2-1B shape, seq 2048, batch 64 (4 x 16)"),
      "pretrain-7b": (lambda: pretrain_7b("v5p-64", data=1, fsdp=32, tensor=1),
                      "pretraining, OLMo-2-7B shape, seq 2048, batch 64 (2 x 32)"),
      "distill-on-policy-8b": (lambda: distill("v5e-16", teacher_dir, data=1, fsdp=16, tensor=1),
                               "on-policy distillation step: Llama-3.1-8B teacher + rsLoRA student, seq 192, batch 16"),
      "eval-sample-llama3.1-8b": (lambda: eval_sample("llama3.1-8b", "v5e-16", data=2, fsdp=1, tensor=8),
                                  "eval sampling: 16 prompts x 4, prompt 1024, 600 new tokens"),
      "pretrain-world-full": (lambda: pretrain_world("v5e-1", data=1, fsdp=1, tensor=1),
                              "the world study's full variant: pretraining step, 1.2M params, seq 128, batch 32"),
      "sft-qwen2.5-14b-v5e": (lambda: sft("qwen2.5-14b", "v5e-16", data=1, fsdp=16, tensor=1),
                              "SFT rsLoRA r=32 on 16 v5e chips (the 14B's activations do not fit 16 GiB)"),
  }


def _gib(x) -> str:
  return f"{x / 2**30:.1f}"


def table(rows: list[dict]) -> str:
  head = ("| plan | slice (chips) | mesh d/f/t | params | peak / HBM per chip (GiB) | fits | args / temp (GiB) "
          "| XLA TFLOP / GB per chip | projected step (bound) | tokens/s |")
  out = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    slice_ = f"{r['topology']} ({r['chips']})"
    params = f"{r['num_params'] / 1e9:.2f}B"
    if r["plan"] == "train":
      programs = [("", r["memory"], r["cost_per_device"], r["projection"], r["projection"]["tokens_per_s"])]
    else:
      programs = [(" prefill", r["memory"]["prefill"], r["cost_per_device"]["prefill"], r["projection"]["prefill"],
                   None),
                  (" decode step", r["memory"]["decode"], r["cost_per_device"]["decode"], r["projection"]["decode"],
                   r["projection"]["decode_tokens_per_s"])]
    for suffix, mem, cost, proj, tps in programs:
      b = mem["per_device_bytes"]
      out.append(
          f"| {r['name']}{suffix} | {slice_} | {mesh} | {params} | {_gib(b['peak'])} / {_gib(mem['hbm_per_device_bytes'])} "
          f"| {'yes' if mem['fits'] else '**NO**'} | {_gib(b['argument'])} / {_gib(b['temp'])} "
          f"| {cost['flops'] / 1e12:.1f} / {cost['bytes_accessed'] / 1e9:.1f} "
          f"| {1e3 * proj['seconds']:.1f} ms ({proj['bound']}) | {f'{tps:,.0f}' if tps else '-'} |")
  return "\n".join(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default="", help="comma-separated plan names (default: all)")
  parser.add_argument("--out", default="plans.jsonl", help="one JSON line per plan (appended)")
  parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
  args = parser.parse_args(argv)

  if not args.table:
    import logging  # pylint: disable=g-import-not-at-top
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only compiled for
    logging.basicConfig(level=logging.WARNING)
    from emjax.train import aot  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory(prefix="emjax-plans-") as tmp:
      known = plans(os.path.join(tmp, "teacher"))
      names = [n for n in args.only.split(",") if n] or list(known)
      unknown = [n for n in names if n not in known]
      if unknown:
        raise SystemExit(f"--only: unknown plan {unknown[0]!r}; known: {', '.join(known)}")
      for name in names:
        build, what = known[name]
        t0 = time.perf_counter()
        report = aot.plan(build(), "")
        report.update(name=name, what=what, wall_seconds=round(time.perf_counter() - t0, 1))
        with open(args.out, "a") as f:
          f.write(json.dumps(report) + "\n")
  rows = {}
  with open(args.out) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["name"]] = row  # the latest plan of each name
  print(table(list(rows.values())))


if __name__ == "__main__":
  main()
