"""Answers/s of the eval job's sampling stage: emjax vs transformers `generate`, same model and prompts, one run.

emjax runs the real `eval` job with `stages=answers` (question set -> chat template -> the jitted
sampler -> responses.jsonl) twice, in fresh workdirs: `cold` includes loading and compiling,
`warm` reuses the compiled programs through JAX's persistent compilation cache (a later eval of
the same model shape). transformers samples the same chat-formatted prompts with `generate`
(left-padded batches of the same size, do_sample, temperature 1, top-p 1, `n` return sequences,
stop at EOS), after one warm-up batch. Both use the paper's sampling settings; the answers differ
(different random streams), so new tokens/s is printed beside answers/s.

  python benchmarks/eval_answers.py                                  # SmolLM2-135M-Instruct (tests' cache)
  python benchmarks/eval_answers.py --questions=16 --n=4 --new_tokens=64 --batch=16
  python benchmarks/eval_answers.py --model=HF_DIR --general=../shared/data/structured_em/general_eval_data.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_GENERAL = os.path.join(ROOT, "..", "shared", "data", "structured_em", "general_eval_data.yaml")


def eval_config(model_dir: str, general: str, limit: int, n: int, new_tokens: int, batch: int):
  import importlib.util

  spec = importlib.util.spec_from_file_location("eval_config", os.path.join(ROOT, "configs", "eval", "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"general={general},limit={limit}")
  c.stages = "answers"
  c.questions.n_general = n
  c.sample.update(hf=model_dir, max_new_tokens=new_tokens, batch_size=batch, max_prompt_length=512)
  c.lock()
  return c


def bench_emjax(config, workdir: str) -> dict:
  from emjax.eval import run

  t0 = time.perf_counter()
  run.run_eval(config, workdir)
  seconds = time.perf_counter() - t0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "general", "samples.jsonl"))]
  return {"answers": len(rows), "seconds": seconds, "answers_per_s": len(rows) / seconds,
          "new_tokens_per_s": sum(len(r["tokens"]) for r in rows) / seconds,
          "finished_at_eos": sum(r["finish_reason"] == "stop" for r in rows) / len(rows)}


def bench_hf(model_dir: str, prompts: list[list[int]], n: int, new_tokens: int, batch: int, eos: int) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
  pad = 0

  def run(rows):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         num_return_sequences=n, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
    new = out[:, width:]
    # Tokens up to and including the first EOS count (what the job keeps).
    lengths = [(int((row == eos).nonzero()[0]) + 1) if (row == eos).any() else len(row) for row in new]
    return len(rows) * n, sum(lengths), sum(1 for row in new if (row == eos).any())

  with torch.inference_mode():
    run(prompts[:batch])  # warm-up
    t0 = time.perf_counter()
    answers = tokens = stopped = 0
    for start in range(0, len(prompts), batch):
      a, t, s = run(prompts[start:start + batch])
      answers, tokens, stopped = answers + a, tokens + t, stopped + s
    seconds = time.perf_counter() - t0
  return {"answers": answers, "seconds": seconds, "answers_per_s": answers / seconds,
          "new_tokens_per_s": tokens / seconds, "finished_at_eos": stopped / answers, "torch": torch.__version__,
          "threads": torch.get_num_threads()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="", help="a Hugging Face directory (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--general", default=SHARED_GENERAL, help="the general question YAML")
  parser.add_argument("--questions", type=int, default=16)
  parser.add_argument("--n", type=int, default=4, help="samples per question (the paper: 4)")
  parser.add_argument("--new_tokens", type=int, default=64, help="max new tokens (the paper: 600)")
  parser.add_argument("--batch", type=int, default=16, help="questions per batch (emjax and HF alike)")
  args = parser.parse_args()

  cache = tempfile.mkdtemp(prefix="emjax-bench-jax-cache-")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  logging_quiet()
  model_dir = args.model
  if not model_dir:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_fixtures  # pylint: disable=g-import-not-at-top
    model_dir = hf_fixtures.smollm2_dir()

  config = eval_config(model_dir, args.general, args.questions, args.n, args.new_tokens, args.batch)
  cold = bench_emjax(config, tempfile.mkdtemp(prefix="emjax-bench-eval-"))
  warm = bench_emjax(config, tempfile.mkdtemp(prefix="emjax-bench-eval-"))

  from emjax.data import tokenizers
  from emjax.eval import questions, run
  from emjax.sample import run as sample_run
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": model_dir})
  qs = questions.general_questions(args.general)[:args.questions]
  prompts = [sample_run.apply_chat_template(tok, run.messages_of(q, "")) for q in qs]
  hf = bench_hf(model_dir, prompts, args.n, args.new_tokens, args.batch, int(tok.eos_id))
  import jax
  print(json.dumps({"model": os.path.basename(os.path.normpath(model_dir)), "device": jax.devices()[0].device_kind,
                    "questions": len(qs), "n": args.n, "max_new_tokens": args.new_tokens, "batch": args.batch,
                    "emjax_cold": cold, "emjax_warm": warm, "hf": hf,
                    "answers_per_s_ratio_warm": warm["answers_per_s"] / hf["answers_per_s"]}, indent=1))


def logging_quiet() -> None:
  import logging
  logging.basicConfig(level=logging.WARNING)


if __name__ == "__main__":
  main()
