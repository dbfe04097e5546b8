"""Sampling throughput: emjax's jitted sampler vs Hugging Face `generate`, same weights, one process.

A random model in a Llama/Qwen2 configuration is built in emjax and exported to
`transformers` with `emjax.models.hf.to_hf` (the same weights); both sides
decode the same prompts greedily for the same number of new tokens (no stop
token). Each side is warmed up (compilation excluded), then timed end to end
(prefill + decode + results on the host) over `--repeats` calls; the best call
counts. emjax's side of every batch size runs first and is printed as it ends
(`"side": "emjax"`), before transformers is imported, so that a failure on the HF side
keeps emjax's figures; then, per batch size, one JSON line for the pair:

  {"batch": B, "emjax": {"tokens_per_s", ...}, "hf": {...}, "ratio": emjax / hf,
   "greedy_tokens_agree": bool, "agree_fraction": rows identical, "first_disagreement_step": ...,
   "bandwidth_floor_fraction": ..., ...}

new tokens/s = batch * new_tokens / seconds. `bandwidth_floor_fraction` (emjax,
decode only) = (bytes of weights + KV cache read per decode step / measured
device copy bandwidth) / measured seconds per decode step; `read_floor_fraction` is the
same with the measured read-only bandwidth (a sum over a large array) in place of the
copy bandwidth, the tighter floor for a step that reads weights and cache.

  python benchmarks/sampler.py                          # CPU: ~34M-param Llama, fp32, bs 1 and 32
  python benchmarks/sampler.py --preset=cpu-tiny        # CPU: ~5M-param Llama (laptop-pretraining scale)
  python benchmarks/sampler.py --preset=qwen2.5-0.5b    # GPU: Qwen2.5-0.5B shape, bf16, bs 1 and 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from timing import best_of, timed

PRESETS = {
    # ~34M parameters (half of them embedding + head): a 2-core CPU decodes it in ms per step.
    # init_std 0.05: peaked next-token distributions, so that the greedy comparison with HF is not
    # decided by near-ties that any change of summation order flips.
    "cpu-small": dict(
        model=dict(family="llama", vocab_size=16384, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4,
                   d_ff=1376, rope_theta=10000.0, tie_embeddings=False, dtype="float32", init_std=0.05),
        batches=(1, 32), prompt=128, new_tokens=128, torch_dtype="float32"),
    # ~5M parameters: the scale of the small models pretrained from scratch on a laptop.
    "cpu-tiny": dict(
        model=dict(family="llama", vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                   d_ff=688, rope_theta=10000.0, tie_embeddings=False, dtype="float32", init_std=0.05),
        batches=(1, 32), prompt=128, new_tokens=128, torch_dtype="float32"),
    # Qwen2.5-0.5B's shape (random weights): the peer figures in shared/benchmarks/peer_baselines.md.
    "qwen2.5-0.5b": dict(
        model=dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                   d_ff=4864, rope_theta=1e6, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6,
                   param_dtype="bfloat16", dtype="bfloat16", attention="xla", init_std=0.05),
        batches=(1, 64), prompt=128, new_tokens=256, torch_dtype="bfloat16"),
}


def random_params(cfg, seed: int):
  import jax
  from flax import nnx
  from emjax.models import transformer

  @jax.jit
  def init(key):
    return transformer.split_model(transformer.Transformer(cfg, rngs=nnx.Rngs(params=key)))[1]

  return init(jax.random.PRNGKey(seed))


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
  """Bytes read + written per second by an in-place (donated) update of a large array."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  # Donated, so the output reuses the input's memory: a fresh output buffer would time page faults.
  f = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  buffer = [f(x).block_until_ready()]

  def update():
    buffer[0] = f(buffer[0]).block_until_ready()

  _, best = best_of(update, repeats)
  return 2 * nbytes / best


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
  """Bytes read per second by a sum over a large array (a decode step mostly reads)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  _, best = best_of(lambda: f(x).block_until_ready(), repeats)
  return nbytes / best


def bench_emjax(cfg, params, prompts: np.ndarray, new_tokens: int, repeats: int, unroll: bool) -> dict:
  import jax
  from emjax.sample import sampler as sampler_lib

  b, p = prompts.shape
  sampler = sampler_lib.Sampler(cfg, prompt_buckets=(p,), max_new_tokens_cap=new_tokens, unroll_layers=unroll)
  sp = sampler_lib.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  rows = prompts.tolist()
  _, compile_s = timed(lambda: sampler.generate(jax.block_until_ready(sampler.prepare_weights(params)), rows, sp))
  # Once per set of weights (a copy into the per-layer layout), not per call: timed apart.
  weights, prepare_s = timed(lambda: jax.block_until_ready(sampler.prepare_weights(params)))
  out, best = best_of(lambda: sampler.generate(weights, rows, sp), repeats)
  # Prefill alone, to split the time into prefill and per-step decode.
  tokens = sampler._put_batch(prompts.astype(np.int32))  # pylint: disable=protected-access
  lengths = sampler._put_batch(np.full((b,), p, np.int32))  # pylint: disable=protected-access
  prefill = lambda: jax.block_until_ready(sampler.prefill_fn(weights, tokens, lengths, n=1))  # noqa: E731
  prefill()
  _, prefill_s = best_of(prefill, repeats)
  assert (out.lengths == new_tokens).all()
  return {"tokens_per_s": b * new_tokens / best, "seconds": best, "prefill_s": prefill_s,
          "decode_step_ms": 1e3 * (best - prefill_s) / new_tokens, "compile_s": compile_s,
          "prepare_weights_s": prepare_s,
          "unroll_layers": unroll, "tokens": out.tokens[:, 0]}


def bench_hf(cfg, params, prompts: np.ndarray, new_tokens: int, repeats: int, torch_dtype: str,
             static_compile: bool) -> dict:
  import torch
  from emjax.models import hf

  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = hf.to_hf_model(params, cfg, torch_dtype=torch_dtype).to(device)
  ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
  kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0)
  if static_compile:
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    kwargs["cache_implementation"] = "static"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  def generate():
    out = model.generate(ids, **kwargs)
    sync()
    return out

  with torch.inference_mode():
    _, warmup_s = timed(generate)
    out, best = best_of(generate, repeats)
  b = prompts.shape[0]
  return {"tokens_per_s": b * new_tokens / best, "seconds": best, "warmup_s": warmup_s, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "static_compile": static_compile,
          "tokens": out[:, prompts.shape[1]:].cpu().numpy()}


def bytes_per_decode_step(cfg, batch: int, prompt: int, new_tokens: int) -> float:
  """Weights (the embedding only as the output head when tied; one row per token otherwise) + mean KV read."""
  import jax.numpy as jnp
  w = jnp.dtype(cfg.param_dtype).itemsize
  weights = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
  kv_slots = prompt + new_tokens / 2  # attention reads the whole cache each step (masked)
  kv = 2 * cfg.n_layers * batch * kv_slots * cfg.n_kv_heads * cfg.resolved_head_dim * jnp.dtype(cfg.dtype).itemsize
  return weights * w + kv


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="default: qwen2.5-0.5b on a GPU, cpu-small otherwise")
  parser.add_argument("--batches", default="", help="comma-separated batch sizes (default: the preset's)")
  parser.add_argument("--prompt", type=int, default=0, help="prompt length (default: the preset's)")
  parser.add_argument("--new_tokens", type=int, default=0, help="new tokens (default: the preset's)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--unroll", default="auto", choices=("auto", "true", "false"),
                      help="unroll layers in the emjax decode (auto: unrolled)")
  parser.add_argument("--hf_static_compile", action="store_true",
                      help="HF with a static cache and torch.compile (the stronger peer on GPU)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  import jax
  from emjax.models.transformer import TransformerConfig

  on_cpu = jax.devices()[0].platform == "cpu"
  name = args.preset or ("cpu-small" if on_cpu else "qwen2.5-0.5b")
  preset = PRESETS[name]
  cfg = TransformerConfig.from_config(preset["model"])
  prompt_len = args.prompt or preset["prompt"]
  new_tokens = args.new_tokens or preset["new_tokens"]
  batches = [int(b) for b in args.batches.split(",")] if args.batches else list(preset["batches"])
  unroll = args.unroll != "false"
  params = random_params(cfg, args.seed)
  bandwidth = copy_bandwidth()
  read_bw = read_bandwidth()
  rng = np.random.default_rng(args.seed)
  runs = []
  for batch in batches:
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len))
    ours = bench_emjax(cfg, params, prompts, new_tokens, args.repeats, unroll)
    floor_s = bytes_per_decode_step(cfg, batch, prompt_len, new_tokens) / bandwidth
    head = {
        "preset": name, "params": cfg.num_params(), "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens,
        "dtype": cfg.dtype, "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_floor_fraction": floor_s / (ours["decode_step_ms"] / 1e3),
        # The same floor at the measured read-only bandwidth (a step reads far more than it writes).
        "read_bandwidth_gb_s": read_bw / 1e9,
        "read_floor_fraction": floor_s * bandwidth / read_bw / (ours["decode_step_ms"] / 1e3),
    }
    print(json.dumps({**head, "side": "emjax", "emjax": {k: v for k, v in ours.items() if k != "tokens"}}),
          flush=True)
    runs.append((batch, prompts, ours, head))
  for batch, prompts, ours, head in runs:
    try:
      theirs = bench_hf(cfg, params, prompts, new_tokens, args.repeats, preset["torch_dtype"],
                        args.hf_static_compile)
    except Exception as e:  # pylint: disable=broad-except  # emjax's figures are out; say why HF's are not
      print(json.dumps({**head, "hf_error": f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"}), flush=True)
      raise
    same_BxT = ours.pop("tokens") == theirs.pop("tokens")
    same_rows = same_BxT.all(axis=1)
    first_diff = int(np.argmin(same_BxT.all(axis=0))) if not same_rows.all() else None
    print(json.dumps({
        **head, "emjax": ours, "hf": theirs,
        "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "greedy_tokens_agree": bool(same_rows.all()), "agree_fraction": float(same_rows.mean()),
        "first_disagreement_step": first_diff,
    }), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
