"""The server's throughput under N concurrent clients vs the same requests answered in-process, one run.

The `serve` job (emjax/sample/serve.py) on SmolLM2-135M-Instruct, started in this process on a free
local port; the requests: chat-formatted questions of the released judge-score files (the eval
workload, as benchmarks/continuous.py draws it), each a `/v1/completions` request with the prompt's
token ids, `max_tokens` = its released answer's length capped at `--cap`, temperature 1 and its own
seed. N client threads (`--clients`, a list) each send the next request as soon as their last one
is answered, over HTTP (urllib, one connection per request). In-process: the same prompts, seeds
(the server's per-prompt seed) and limits through the server's own continuous-batching engine,
one `generate` call (what the eval job does). Answers stop at EOS on both sides (the server always
applies the model's stop ids), so each side's new tokens are counted and printed. Everything is
compiled first (one request per prompt bucket, excluded). One JSON line:

  python benchmarks/serve.py                              # 64 requests, cap 128, 32 slots, 8 and 32 clients
  python benchmarks/serve.py --requests=128 --clients=1,8,32,64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import sys
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def server_config(model_dir: str, cap: int, slots: int, max_prompt: int):
  spec = importlib.util.spec_from_file_location("serve_config", os.path.join(ROOT, "configs", "serve.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"hf={model_dir}")
  c.sample.update(max_new_tokens=cap, max_prompt_length=max_prompt, top_logprobs=0)
  c.serve.update(port=0, slots=slots, queue=4096)
  return c


def post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(), method="POST",
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=3600) as r:
    return json.load(r)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="", help="a Hugging Face directory (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--cap", type=int, default=128, help="most new tokens per request")
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--clients", default="8,32", help="concurrent clients, a list")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  import jax

  import continuous as bench_continuous  # benchmarks/continuous.py: the eval workload
  from emjax.data import tokenizers
  from emjax.sample import sampler as sampler_lib
  from emjax.sample import serve

  model_dir = args.model
  if not model_dir:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_fixtures  # pylint: disable=g-import-not-at-top
    model_dir = hf_fixtures.smollm2_dir()
  tokenizer = tokenizers.load_tokenizer({"kind": "hf", "path": model_dir})
  prompts, lengths = bench_continuous.workload(tokenizer, args.requests, args.cap, args.seed)
  max_prompt = next(b for b in sampler_lib.make_buckets(4096) if b >= max(len(p) for p in prompts))
  server = serve.build(server_config(model_dir, args.cap, args.slots, max_prompt)).start()
  engine, api = server.engine, server.api
  name = next(iter(engine.models))
  try:
    body = lambda i, limit: {"model": name, "prompt": prompts[i], "max_tokens": limit,  # noqa: E731
                             "temperature": 1.0, "top_p": 1.0, "seed": i}
    # The server's per-prompt seed for a one-prompt request with `seed` i (serve.Api._run).
    seeds = [(i * 1_000_003) % 2**31 for i in range(len(prompts))]
    sampling = sampler_lib.SamplingParams(max_new_tokens=args.cap, temperature=1.0, top_p=1.0,
                                          stop_token_ids=api.stop_ids)
    weights = engine.weights[name]

    # Compile: every bucket's prefill and the decode, at the server's cache width (its widest bucket).
    firsts = {engine.sampler.bucket_for(len(p)): i for i, p in enumerate(prompts)}
    for i in sorted(firsts.values(), key=lambda i: -len(prompts[i])):
      post(server.url, body(i, 2))
    engine.continuous.generate(weights, [prompts[i] for i in firsts.values()], sampling,
                               max_new_tokens_per_prompt=[2] * len(firsts), cache_bucket=max(firsts))

    before = dict(engine.continuous.stats)
    t0 = time.perf_counter()
    out = engine.continuous.generate(weights, prompts, sampling, prompt_seeds=seeds,
                                     max_new_tokens_per_prompt=lengths, cache_bucket=max(firsts))
    seconds = time.perf_counter() - t0
    tokens = int(out.lengths.sum())
    result = {"model": os.path.basename(os.path.normpath(model_dir)), "device": jax.devices()[0].device_kind,
              "requests": len(prompts), "cap": args.cap, "slots": engine.continuous.slots,
              "in_process": {"seconds": seconds, "answers_per_s": len(prompts) / seconds,
                             "new_tokens_per_s": tokens / seconds, "new_tokens": tokens,
                             "decode_steps": engine.continuous.stats["decode_steps"] - before["decode_steps"]}}
    in_process_tokens = [list(out.tokens[i, 0, :out.lengths[i, 0]]) for i in range(len(prompts))]
    print(json.dumps({"partial": True, **result}), flush=True)

    for n in [int(x) for x in args.clients.split(",")]:
      before = dict(engine.continuous.stats)
      latencies = [0.0] * len(prompts)

      def ask(i):
        t = time.perf_counter()
        reply = post(server.url, body(i, lengths[i]))
        latencies[i] = time.perf_counter() - t
        return reply

      t0 = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(ask, range(len(prompts))))
      seconds = time.perf_counter() - t0
      tokens = sum(r["usage"]["completion_tokens"] for r in replies)
      same = sum(api.engine.tokenizer.decode([t for t in in_process_tokens[i] if t not in api.stop_ids])
                 == r["choices"][0]["text"] for i, r in enumerate(replies))
      result[f"clients_{n}"] = {
          "seconds": seconds, "answers_per_s": len(prompts) / seconds, "new_tokens_per_s": tokens / seconds,
          "new_tokens": tokens, "over_in_process": result["in_process"]["seconds"] / seconds,
          "latency_s": {"median": float(np.median(latencies)), "p90": float(np.quantile(latencies, 0.9))},
          "decode_steps": engine.continuous.stats["decode_steps"] - before["decode_steps"],
          "answers_equal_to_in_process": same}
      print(json.dumps({"partial": True, **result}), flush=True)
  finally:
    server.stop()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
