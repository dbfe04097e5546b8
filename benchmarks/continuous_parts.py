"""Two measurements behind continuous batching's design (benchmarks/README.md, `continuous.py`), one JSON line each.

`--part=prefill`: one prefill of SmolLM2-135M-Instruct (bucket 128) with 1, 2, 4, 8, 16 and 32 prompts, the
seconds per prompt: a prefill reads the weights once whatever its rows, so few-row prefills cost more per
prompt (why the engine prefills `slots // 8` prompts at once and lets them wait for slots).

`--part=width`: the decode step's attention (`transformer.cached_attention`, SmolLM2's shapes: 32 rows, 3 KV
heads of 3 queries, head dim 64, XLA:CPU with the decode's compiler options) over the same live columns in
caches of other widths (the columns past each row's last one masked): how many output elements differ in
their bits from a cache of 383 columns, and the same for the scores' dot alone against 512 columns. A row's
numbers change with the number of columns the attention spans, so the continuous cache keeps one width per
file (resumed jobs write the same bits).

  python benchmarks/continuous_parts.py --part=prefill
  python benchmarks/continuous_parts.py --part=width
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def prefill() -> dict:
  import jax

  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import hf_fixtures  # pylint: disable=g-import-not-at-top

  from emjax.models import hf
  from emjax.sample import sampler as sampler_lib

  model_dir = hf_fixtures.smollm2_dir()
  cfg = hf.config_from_hf(model_dir)
  sampler = sampler_lib.Sampler(cfg, prompt_buckets=(64, 128, 256), max_new_tokens_cap=256)
  weights = sampler.prepare_weights(hf.load_hf_params(model_dir, cfg))
  rng = np.random.default_rng(0)
  per_prompt_ms = {}
  for rows in (1, 2, 4, 8, 16, 32):
    tokens = rng.integers(1, 1000, size=(rows, 128)).astype(np.int32)
    lengths = np.full((rows,), 128, np.int32)

    def once():
      put = sampler._put_batch  # pylint: disable=protected-access
      return jax.block_until_ready(sampler.prefill_fn(weights, put(tokens), put(lengths), None, n=1))

    once()
    once()
    calls = max(1, 32 // rows)
    t0 = time.perf_counter()
    for _ in range(calls):
      once()
    per_prompt_ms[rows] = (time.perf_counter() - t0) / calls / rows * 1e3
  return {"part": "prefill", "model": os.path.basename(os.path.normpath(model_dir)), "bucket": 128,
          "ms_per_prompt_by_rows": per_prompt_ms}


def width() -> dict:
  import jax
  import jax.numpy as jnp

  from emjax.models import transformer
  from emjax.sample import sampler as sampler_lib

  rows, kv_heads, group, head_dim = 32, 3, 3, 64
  rng = np.random.default_rng(0)
  live_B = rng.integers(100, 380, size=rows)  # each row's columns: all within the narrowest cache
  q = rng.standard_normal((rows, 1, kv_heads * group, head_dim)).astype(np.float32)
  k_all = rng.standard_normal((rows, kv_heads, head_dim, 1100)).astype(np.float32)
  v_all = rng.standard_normal((rows, kv_heads, 1100, head_dim)).astype(np.float32)
  options = sampler_lib.decode_compiler_options(None)
  attend = jax.jit(transformer.cached_attention, compiler_options=options)
  scores = jax.jit(lambda q, k: jnp.einsum("bkgld,bkds->bkgls", q, k), compiler_options=options)

  def attention(columns):
    mask = (np.arange(columns)[None] < live_B[:, None])[:, None, :]
    return np.asarray(attend(q, k_all[..., :columns].copy(), v_all[:, :, :columns].copy(), mask))

  q_groups = q.reshape(rows, 1, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)

  def score(columns):
    return np.asarray(scores(q_groups, k_all[..., :columns].copy()))[..., :380]

  widths = (381, 382, 383, 384, 385, 400, 447, 500, 511, 512, 513, 576, 640, 1024)
  base, base_scores = attention(383), score(512)
  return {"part": "width", "device": jax.devices()[0].device_kind, "elements": int(base.size),
          "attention_bits_differ_from_383": {w: int((attention(w) != base).sum()) for w in widths},
          "score_bits_differ_from_512": {w: int((score(w) != base_scores).sum()) for w in widths if w >= 381},
          "compiler_options": options, "jax": jax.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("prefill", "width"), required=True)
  args = parser.parse_args()
  print(json.dumps(prefill() if args.part == "prefill" else width()))


if __name__ == "__main__":
  main()
