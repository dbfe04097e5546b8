"""Continuous vs static batching vs transformers `generate` on the eval workload's answer lengths, one run.

The workload: answers drawn (seeded) from the released judge-score files
(../shared/data/structured_em/released_judge_sample/: the paper's models' answers to its questions),
each a chat-formatted question with its answer's length in SmolLM2's tokens, capped at `--cap`.
Every row is made to generate exactly that many tokens (EOS banned, a per-prompt limit), so all three
do the same work: static batching (the sampler's `generate`, the eval job's batches: prompts grouped
by bucket, `--batch` per batch) decodes each batch until its longest row is done, continuous batching
(`--batch` slots) refills a slot as its row ends, and transformers' `generate` (left-padded batches of
`--batch`, EOS suppressed, each batch to its longest, rows cut to their lengths) pads like the static
sampler. Sampling at the paper's temperature 1, top-p 1.

The ideal speedup of continuous over static is the static batches' padded token-steps (each batch's
rows as decoded, padded to `--batch`, times its longest answer) over the sum of the lengths: what
continuous batching with `--batch` slots saves if every slot were always busy and a refill cost
nothing. `fraction_of_ideal` is the measured (end-to-end) speedup over it. Beside it: the decode steps
each side ran and the seconds per step, which tell the packing (steps) from the cost of a step, and
each side's prefill seconds (timed at each call, which waits for the result: a small cost, larger on
the continuous side, which prefills more often and waits after each insertion into a slot, one per
refilled slot; continuous's include those insertions and the padding rows of its fixed-size prefills).
`decode_only_speedup` leaves them out of both sides: the decode alone, without continuous batching's
refill overhead (the headline is the end-to-end speedup).
Each emjax path is compiled first on one prompt per bucket (excluded); each side is then timed once
over the whole workload. One JSON line:

  python benchmarks/continuous.py                      # SmolLM2-135M-Instruct, 64 answers, cap 256, batch 32
  python benchmarks/continuous.py --answers=512                       # the README's figures
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RELEASED = os.path.join(ROOT, "..", "shared", "data", "structured_em", "released_judge_sample")
LENGTHS = os.path.join(ROOT, "benchmarks", "eval_lengths.json")  # `--write_lengths`; what `--preset` reads


def released_rows() -> list[dict]:
  """Every row of the released judge-score files, in a fixed order (sorted paths, then lines)."""
  rows = []
  for path in sorted(glob.glob(os.path.join(RELEASED, "**", "*.jsonl"), recursive=True)):
    with open(path, encoding="utf-8") as f:
      rows += [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise FileNotFoundError(f"{RELEASED}: no released judge-score rows")
  return rows


def picks(count: int, answers: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).choice(count, size=min(answers, count), replace=False)


def workload(tokenizer, answers: int, cap: int, seed: int) -> tuple[list[list[int]], list[int]]:
  """(chat-formatted question tokens, answer lengths in tokens capped at `cap`) of `answers` rows drawn
  from the released files."""
  from emjax.data import chat

  rows = released_rows()
  prompts, lengths = [], []
  for i in picks(len(rows), answers, seed):
    r = rows[int(i)]
    prompts.append(chat.apply_chat_template(tokenizer, [{"role": "user", "content": r["question"]}],
                                            add_generation_prompt=True))
    lengths.append(max(1, min(cap, len(tokenizer.encode(r["response"] or " ")))))
  return prompts, lengths


def write_lengths(tokenizer) -> dict:
  """Every released row's chat-formatted prompt length and answer length in SmolLM2's tokens (uncapped):
  the workload of a `--preset` model, where neither the files nor the tokenizer may be at hand."""
  prompts, lengths = workload(tokenizer, 10**9, 10**9, 0)
  order = np.argsort(picks(len(prompts), 10**9, 0))  # back to the files' order
  table = {"source": "../shared/data/structured_em/released_judge_sample (chat-formatted question, answer)",
           "tokenizer": "SmolLM2-135M-Instruct", "prompt_lengths": [len(prompts[i]) for i in order],
           "answer_lengths": [lengths[i] for i in order]}
  with open(LENGTHS, "w", encoding="utf-8") as f:
    json.dump(table, f)
  return table


def workload_of_lengths(vocab_size: int, answers: int, cap: int, seed: int) -> tuple[list[list[int]], list[int]]:
  """`workload`'s rows (the same draw) as random token ids of each prompt's length, from LENGTHS."""
  with open(LENGTHS, encoding="utf-8") as f:
    table = json.load(f)
  rng = np.random.default_rng(seed + 1)
  prompts, lengths = [], []
  for i in picks(len(table["prompt_lengths"]), answers, seed):
    prompts.append(rng.integers(1, vocab_size, size=table["prompt_lengths"][int(i)]).tolist())  # never id 0
    lengths.append(max(1, min(cap, table["answer_lengths"][int(i)])))
  return prompts, lengths


def static_batches(sampler, prompts, batch: int) -> list[list[int]]:
  """The eval job's static batches: prompts grouped by bucket, in order, `batch` at a time."""
  by_bucket: dict[int, list[int]] = {}
  for i, p in enumerate(prompts):
    by_bucket.setdefault(sampler.bucket_for(len(p)), []).append(i)
  return [group[s:s + batch] for _, group in sorted(by_bucket.items()) for s in range(0, len(group), batch)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="", help="a Hugging Face directory (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--answers", type=int, default=64)
  parser.add_argument("--cap", type=int, default=256, help="most new tokens (the eval job: 600)")
  parser.add_argument("--batch", type=int, default=32, help="static batch size = continuous slots")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prefill_rows", type=int, default=0, help="prompts per continuous prefill (0: the engine's "
                      "default)")
  parser.add_argument("--refill_at", type=int, default=1, help="free slots that end a continuous decode chunk")
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--preset", default="", help="a random-weight model of benchmarks/sampler.py's presets "
                      "(on a GPU: qwen2.5-0.5b) on the workload's lengths (eval_lengths.json), instead of SmolLM2")
  parser.add_argument("--write_lengths", action="store_true", help="write eval_lengths.json and stop")
  args = parser.parse_args()

  import jax

  from emjax.data import tokenizers
  from emjax.models import hf
  from emjax.models.transformer import TransformerConfig
  from emjax.sample import continuous
  from emjax.sample import sampler as sampler_lib

  hf_model = None  # () -> the transformers model, on the side that times it
  if args.preset and args.write_lengths:
    raise SystemExit("--write_lengths reads SmolLM2's tokenizer: leave out --preset")
  if args.preset:
    import sampler as sampler_bench  # benchmarks/sampler.py: its presets and random weights

    if args.preset not in sampler_bench.PRESETS:
      raise SystemExit(f"--preset={args.preset}: one of {sorted(sampler_bench.PRESETS)}")
    preset = sampler_bench.PRESETS[args.preset]
    cfg = TransformerConfig.from_config(preset["model"])
    params = sampler_bench.random_params(cfg, args.seed)
    prompts, lengths = workload_of_lengths(cfg.vocab_size, args.answers, args.cap, args.seed)
    eos, name = 0, args.preset  # token 0: banned, never in a prompt
    hf_model = lambda: hf.to_hf_model(params, cfg, torch_dtype=preset["torch_dtype"])  # noqa: E731
  else:
    model_dir = args.model
    if not model_dir:
      sys.path.insert(0, os.path.join(ROOT, "tests"))
      import hf_fixtures  # pylint: disable=g-import-not-at-top
      model_dir = hf_fixtures.smollm2_dir()
    tokenizer = tokenizers.load_tokenizer({"kind": "hf", "path": model_dir})
    if args.write_lengths:
      table = write_lengths(tokenizer)
      print(json.dumps({"written": LENGTHS, "rows": len(table["prompt_lengths"])}))
      return
    eos, name = int(tokenizer.eos_id), os.path.basename(os.path.normpath(model_dir))
    prompts, lengths = workload(tokenizer, args.answers, args.cap, args.seed)
    cfg = hf.config_from_hf(model_dir)
    params = hf.load_hf_params(model_dir, cfg)
  longest = max(len(p) for p in prompts)
  buckets = tuple(b for b in sampler_lib.make_buckets(1024) if b < longest) + (
      next(b for b in sampler_lib.make_buckets(1024) if b >= longest),)
  sampler = sampler_lib.Sampler(cfg, prompt_buckets=buckets, max_new_tokens_cap=args.cap)
  weights = sampler.prepare_weights(params)
  sampling = sampler_lib.SamplingParams(max_new_tokens=args.cap, temperature=1.0, top_p=1.0, banned_token_ids=(eos,))
  seeds = list(range(len(prompts)))
  batches = static_batches(sampler, prompts, args.batch)
  padded = sum(args.batch * max(lengths[i] for i in b) for b in batches)  # pad_batch_to=batch: rows decoded
  steps = sum(max(lengths[i] for i in b) for b in batches)
  ideal = padded / sum(lengths)
  engine = continuous.ContinuousSampler(sampler, slots=args.batch, prefill_rows=args.prefill_rows,
                                       refill_at=args.refill_at)
  # Prefill (and, continuous, insertion) time on each side, timed at each call: what the decode-only
  # speedup leaves out.
  spent = {"prefill": 0.0}
  prefill_fn, insert_fn = sampler.prefill_fn, engine.insert_fn

  def timed(fn):
    def call(*a, **k):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*a, **k))
      spent["prefill"] += time.perf_counter() - t
      return out
    return call

  sampler.prefill_fn, engine.insert_fn = timed(prefill_fn), timed(insert_fn)

  # Compile: one prompt per bucket, two tokens (both paths' programs for every bucket used).
  warm = {sampler.bucket_for(len(p)): i for i, p in enumerate(prompts)}
  for i in warm.values():
    sampler.generate(weights, [prompts[i]], sampling, pad_batch_to=args.batch, max_new_tokens_per_prompt=[2])
  engine.generate(weights, [prompts[i] for i in warm.values()], sampling,
                  max_new_tokens_per_prompt=[2] * len(warm))

  spent["prefill"] = 0.0
  t0 = time.perf_counter()
  static_tokens = 0
  for b in batches:
    out = sampler.generate(weights, [prompts[i] for i in b], sampling, prompt_seeds=[seeds[i] for i in b],
                           pad_batch_to=args.batch, max_new_tokens_per_prompt=[lengths[i] for i in b])
    static_tokens += int(out.lengths.sum())
  t_static = time.perf_counter() - t0
  p_static, spent["prefill"] = spent["prefill"], 0.0
  before = dict(engine.stats)
  t0 = time.perf_counter()
  out = engine.generate(weights, prompts, sampling, prompt_seeds=seeds, max_new_tokens_per_prompt=lengths)
  t_cont = time.perf_counter() - t0
  p_cont = spent["prefill"]
  cont_steps = engine.stats["decode_steps"] - before["decode_steps"]
  prefills = engine.stats["prefills"] - before["prefills"]
  cont_tokens = int(out.lengths.sum())
  assert static_tokens == cont_tokens == sum(lengths), (static_tokens, cont_tokens, sum(lengths))

  result = {"model": name, "device": jax.devices()[0].device_kind,
            "answers": len(prompts), "cap": args.cap, "batch": args.batch,
            "lengths": {"mean": float(np.mean(lengths)), "median": float(np.median(lengths)), "max": max(lengths),
                        "at_cap": int(sum(x == args.cap for x in lengths))},
            "static_batches": len(batches), "static_decode_steps": steps, "ideal_speedup": ideal,
            "static": {"seconds": t_static, "answers_per_s": len(prompts) / t_static,
                       "new_tokens_per_s": static_tokens / t_static, "decode_steps": steps,
                       "seconds_per_step": t_static / steps, "prefill_seconds": p_static,
                       "decode_seconds_per_step": (t_static - p_static) / steps},
            "continuous": {"seconds": t_cont, "answers_per_s": len(prompts) / t_cont,
                           "new_tokens_per_s": cont_tokens / t_cont, "slots": engine.slots,
                           "prefill_rows": engine.prefill_rows, "refill_at": engine.refill_at,
                           "decode_steps": cont_steps, "prefills": prefills,
                           "seconds_per_step": t_cont / cont_steps, "prefill_seconds": p_cont,
                           "decode_seconds_per_step": (t_cont - p_cont) / cont_steps,
                           "packing_bound_speedup": steps / cont_steps}}
  result["speedup"] = t_static / t_cont
  result["fraction_of_ideal"] = result["speedup"] / ideal
  result["decode_only_speedup"] = (t_static - p_static) / (t_cont - p_cont)
  result["decode_only_fraction_of_ideal"] = result["decode_only_speedup"] / ideal
  print(json.dumps({"partial": True, **result}), flush=True)
  if not args.skip_hf:
    result["hf"] = bench_hf(hf_model or (lambda: model_dir), prompts, lengths, args.batch, eos, batches)
    result["continuous_over_hf"] = result["hf"]["seconds"] / t_cont
  print(json.dumps(result))


def bench_hf(model_fn, prompts, lengths, batch: int, eos: int, batches) -> dict:
  """transformers `generate` over the same batches: left-padded, EOS suppressed, each batch to its longest.
  `model_fn()`: the model, or a Hugging Face directory to load (float32)."""
  import torch
  import transformers

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model_fn()
  if isinstance(model, str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
  model = model.to(device).eval()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run(idx, limit):
    width = max(len(prompts[i]) for i in idx)
    ids = torch.full((len(idx), width), eos, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
      ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
      mask[r, width - len(prompts[i]):] = 1
    with torch.no_grad():
      return model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=1.0,
                            top_p=1.0, top_k=0, max_new_tokens=limit, min_new_tokens=limit, suppress_tokens=[eos],
                            pad_token_id=eos)

  run(batches[0][:2], 2)  # warm-up
  sync()
  t0 = time.perf_counter()
  for b in batches:
    run(b, max(lengths[i] for i in b))
  sync()
  seconds = time.perf_counter() - t0
  return {"seconds": seconds, "answers_per_s": len(prompts) / seconds, "device": device,
          "new_tokens_per_s": sum(lengths) / seconds, "torch_threads": torch.get_num_threads(),
          "transformers": transformers.__version__}


if __name__ == "__main__":
  main()
