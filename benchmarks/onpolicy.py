"""On-policy distillation, one iteration: emjax (sample / teacher / update) vs TRL's GKDTrainer, one run.

    python benchmarks/onpolicy.py --model=SMOLLM2_DIR [--batch=4 --prompt_tokens=64 --completion_tokens=32]
        [--beta=0.5 --iterations=3 --threads=1] [--no-trl]

Both sides: the same Hugging Face model as student (every parameter trained, as GKDTrainer does by
default; `--lora` trains rsLoRA r=8 adapters on q,v instead, sampled unmerged) and as teacher, the same
batch of chat prompts of exactly `prompt_tokens` tokens, exactly `completion_tokens` sampled tokens per
row (no early stop), temperature 1, generalized JSD(beta) over the full vocabulary on the completion
tokens (lambda = 1: every step on-policy), AdamW, float32. The emjax side runs first, then TRL's script
(benchmarks/onpolicy_trl.py) in a subprocess, so they never share the CPU.

emjax's iteration = rollout (sampler with the student's current weights, rows assembled on device)
+ train step (teacher forward + student forward/backward + update, one jitted call). The teacher's
share is timed separately by a jitted teacher forward on the same batch. Compilations are counted:
the sampler's traces and the step's executable must not change after the first iteration.
Prints one JSON object per side and a ratio line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def emjax_side(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from emjax.data import tokenizers
  from emjax.train import loop
  from emjax.train import on_policy
  from emjax.train import settings
  from onpolicy_trl import SENTENCE, _fit_text  # the same prompt construction as the TRL side

  tok_cfg = {"kind": "hf", "path": args.model}
  tokenizer = tokenizers.load_tokenizer(tok_cfg)
  hf = tokenizer.hf_tokenizer

  def prompt_len(text):
    return len(hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"])

  workdir = tempfile.mkdtemp(prefix="emjax-onpolicy-bench-")
  prompts_path = os.path.join(workdir, "prompts.jsonl")
  lengths = []
  with open(prompts_path, "w") as f:
    for i in range(args.batch * (args.iterations + args.warmup)):
      lead = f"Note {i}. "
      body, n = _fit_text(hf, SENTENCE, args.prompt_tokens, lambda t, lead=lead: prompt_len(lead + t))
      lengths.append(n)
      f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": lead + body}]}) + "\n")

  c = settings.base_config()
  c.job = "train"
  c.init.hf = args.model
  c.data.tokenizer.update(tok_cfg)
  # lambda = 1: every batch is a rollout, config.data's (synthetic) sources are never read.
  c.data.seq_len = args.prompt_tokens + args.completion_tokens
  c.teacher.update(path=args.model, dtype="float32")
  c.on_policy.update(enabled=True, prompts=prompts_path, max_prompt_length=max(lengths),
                     max_new_tokens=args.completion_tokens, temperature=args.temperature, stop_at_eos=False,
                     stop_at_end_of_turn=False, unroll_layers=True)
  c.lora.update(enabled=bool(args.lora), rank=8, alpha=16.0, targets="q,v")
  c.train.update(objective="jsd", batch_size=args.batch, steps=args.iterations + args.warmup, lr=1e-6,
                 warmup_steps=0, loss_chunk_len=0)
  c.train.distill.update(beta=args.beta, temperature=1.0)
  c.model.update(dtype="float32", remat="none")
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  settings.validate(c)

  trainer = loop.Trainer(c)
  state, frozen = trainer.init_state(workdir)
  teacher = trainer.load_teacher()
  t0 = time.perf_counter()
  step = trainer.compile()
  compile_s = time.perf_counter() - t0
  source = on_policy.make_source(trainer, tokenizer)
  teacher_graph = trainer.teacher.graphdef

  @jax.jit
  def teacher_forward(params, batch):
    model = nnx.merge(teacher_graph, params)
    return jnp.sum(model(batch["inputs"], batch["positions"], batch["segment_ids"]))

  rows, counts = [], []
  for it in range(args.warmup + args.iterations):
    t0 = time.perf_counter()
    source.set_weights(state["params"], frozen)
    batch = next(source)
    jax.block_until_ready(batch)
    t1 = time.perf_counter()
    jax.block_until_ready(teacher_forward(teacher, batch))
    t2 = time.perf_counter()
    state, metrics = step(state, frozen, batch, teacher)
    jax.block_until_ready(metrics)
    t3 = time.perf_counter()
    counts.append(dict(source.sampler.trace_counts))
    rows.append({"sample_s": t1 - t0, "teacher_s": t2 - t1, "step_s": t3 - t2, "iteration_s": (t1 - t0) + (t3 - t2),
                 "loss": float(metrics["loss"]), "completion_tokens": float(metrics["loss_tokens"])})
  timed = rows[args.warmup:]
  med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
  return {"side": "emjax", "lora": bool(args.lora), "jax": jax.__version__, "device": jax.devices()[0].device_kind, "batch": args.batch,
          "prompt_tokens_actual": sorted(set(lengths)), "completion_tokens": args.completion_tokens,
          "beta": args.beta, "lambda": 1.0, "iterations": args.iterations, "step_compile_s": compile_s,
          "iteration_s_median": med("iteration_s"), "sample_s_median": med("sample_s"),
          "teacher_s_median": med("teacher_s"), "step_s_median": med("step_s"),
          "update_without_teacher_s_median": med("step_s") - med("teacher_s"),
          "first_iteration_s": rows[0]["iteration_s"], "traces_after_each_iteration": counts,
          "compilations_constant_after_first": all(c == counts[0] for c in counts[1:]),
          "losses": [r["loss"] for r in rows], "loss_tokens": [r["completion_tokens"] for r in rows]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt_tokens", type=int, default=64)
  ap.add_argument("--completion_tokens", type=int, default=32)
  ap.add_argument("--beta", type=float, default=0.5)
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--iterations", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--threads", type=int, default=1, help="TRL's torch threads")
  ap.add_argument("--no-trl", dest="trl", action="store_false")
  ap.add_argument("--lora", action="store_true", help="emjax trains LoRA adapters (TRL still trains everything)")
  args = ap.parse_args(argv)
  ours = emjax_side(args)
  print(json.dumps(ours), flush=True)
  if not args.trl:
    return
  out = tempfile.mktemp(suffix=".json")
  cmd = [sys.executable, os.path.join(HERE, "onpolicy_trl.py"), "--model", args.model, "--batch", str(args.batch),
         "--prompt_tokens", str(args.prompt_tokens), "--completion_tokens", str(args.completion_tokens),
         "--beta", str(args.beta), "--temperature", str(args.temperature), "--iterations", str(args.iterations),
         "--warmup", str(args.warmup), "--threads", str(args.threads), "--json", out]
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  peer = json.load(open(out))
  print(json.dumps(peer), flush=True)
  print(json.dumps({"ratio_trl_step_over_emjax_iteration": peer["step_s_median"] / ours["iteration_s_median"],
                    "emjax_iteration_s": ours["iteration_s_median"], "trl_step_s": peer["step_s_median"],
                    "emjax_sample_s": ours["sample_s_median"], "trl_generate_s": peer.get("generate_s_median")}))


if __name__ == "__main__":
  main()
