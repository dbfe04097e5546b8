"""Training-step throughput: emjax vs Hugging Face transformers (PyTorch), same shape, one process.

Both sides train the same Llama/Qwen2-shaped model (random weights) with AdamW on
the same batch size and sequence length; each is warmed up, then timed in `--rounds`
rounds of `--steps` steps, the two sides alternating round by round (other load on a
shared machine then slows both alike); the median round counts. emjax's side is built, timed
alone and printed first (`"side": "emjax alone"`), before anything of transformers is imported,
so that a failure on the HF side (another transformers on the device) keeps emjax's figures.
Then one JSON line for the pair:

  {"emjax": {"tokens_per_s", "mfu", ...}, "hf": {...}, "ratio_tokens_per_s": emjax / hf, ...}

MFU = model FLOPs (6 N T + causal attention; `Trainer.flops_per_step`) / (seconds * peak). The
peak is the device's dense bf16 figure on accelerators (`emjax.train.perf`, its source printed);
on CPU there is no vendor figure, so the benchmark measures a float32 matmul peak first and reports
MFU against it.

  python benchmarks/train.py                      # CPU: small Llama shape
  python benchmarks/train.py --preset=qwen2.5-0.5b  # GPU: Qwen2.5-0.5B shape, seq 2048, bf16, attention auto (cuDNN)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

PRESETS = {
    # A small Llama shape that a 2-core CPU steps through in about a second.
    "cpu-small": dict(
        model=dict(family="llama", vocab_size=8192, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704,
                   rope_theta=10000.0, tie_embeddings=False, dtype="float32"),
        batch=8, seq=256),
    # The synthetic-world study's model (configs/paper/world.py:quick), at its pretraining batch.
    "world-quick": dict(
        model=dict(family="llama", vocab_size=768, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256,
                   rope_theta=10000.0, tie_embeddings=True, dtype="float32", remat="none", scan_layers=False),
        batch=32, seq=96),
    # Qwen2.5-0.5B: what the peer figures in shared/benchmarks/peer_baselines.md use.
    "qwen2.5-0.5b": dict(
        model=dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                   d_ff=4864, rope_theta=1e6, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6,
                   dtype="bfloat16", remat="dots_with_no_batch_dims", attention="auto"),
        batch=8, seq=2048),
}


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - t0)


def bench_emjax(preset: dict, warmup: int, attention: str = "") -> "Side":
  import jax
  from emjax.train import settings
  from emjax import sharding as shd
  from emjax.train import loop

  config = settings.base_config()
  config.model.update(**preset["model"])
  if attention:
    config.model.attention = attention
  config.data.seq_len = preset["seq"]
  config.train.update(batch_size=preset["batch"], steps=1_000_000, lr=1e-4, warmup_steps=0)
  trainer = loop.Trainer(config)
  state, frozen = trainer.init_state()
  rng = np.random.default_rng(0)
  b, l = preset["batch"], preset["seq"]
  tokens = rng.integers(0, config.model.vocab_size, (b, l + 1)).astype(np.int32)
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, l), np.int32),
           "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
           "loss_mask": np.ones((b, l), np.float32)}
  batch = shd.put_local_batch(local, trainer.mesh)
  compiled = trainer.compile()
  carry = {"state": state}

  def step():
    carry["state"], metrics = compiled(carry["state"], frozen, batch, None)
    return metrics

  def sync(metrics):
    jax.block_until_ready(metrics)
    return float(metrics["loss"])

  from emjax.models import transformer
  cfg = trainer.model_cfg
  resolved = transformer.resolve_attention(cfg.attention, jax.numpy.dtype(cfg.dtype), cfg.resolved_head_dim, l, l,
                                           True, trainer.mesh.devices.flat[0])
  info = {"flops_per_step": trainer.flops_per_step(), "devices": trainer.mesh.size,
          "device_kind": jax.devices()[0].device_kind, "attention": f"{cfg.attention} -> {resolved}"}
  return Side(step, sync, warmup, info)


def bench_hf(preset: dict, warmup: int, compile_model: bool) -> "Side":
  import torch
  import transformers

  m = preset["model"]
  common = dict(vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
                num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
                num_key_value_heads=m["n_kv_heads"], rope_theta=m["rope_theta"],
                tie_word_embeddings=m["tie_embeddings"], rms_norm_eps=m.get("norm_eps", 1e-5))
  if m["family"] == "qwen2":
    hf_cfg = transformers.Qwen2Config(**common)
  else:
    hf_cfg = transformers.LlamaConfig(**common)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf_cfg._attn_implementation = "sdpa"
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(device)
  model.train()
  fwd = torch.compile(model) if compile_model else model
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
  b, l = preset["batch"], preset["seq"]
  tokens = torch.randint(0, m["vocab_size"], (b, l), device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=m["dtype"] == "bfloat16")

  def step():
    with autocast:
      loss = fwd(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync_device = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def sync(loss):
    sync_device()
    return float(loss.detach())

  info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "compiled": compile_model}
  return Side(step, sync, warmup, info)


@dataclasses.dataclass
class Side:
  """One framework's training step, timed by `interleaved`."""

  step: Any  # () -> a value that `sync` waits for
  sync: Any  # value -> loss (blocks until the step finished)
  warmup: int
  info: dict


def interleaved(sides: dict[str, Side], steps: int, rounds: int, batch_tokens: int) -> dict[str, dict]:
  """Median seconds per step of each side over `rounds` alternating rounds of `steps` steps.

  Alternating the sides round by round (rather than timing one, then the other) spreads any other
  load on the machine over both, so their ratio stays meaningful on a shared CPU.
  """
  for side in sides.values():
    if side.warmup:
      out = None
      for _ in range(side.warmup):
        out = side.step()
      side.sync(out)
  times = {name: [] for name in sides}
  losses = {}
  for _ in range(rounds):
    for name, side in sides.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = side.step()
      losses[name] = side.sync(out)
      times[name].append((time.perf_counter() - t0) / steps)
  results = {}
  for name, side in sides.items():
    seconds = float(np.median(times[name]))
    results[name] = {"step_s": seconds, "tokens_per_s": batch_tokens / seconds, "loss": losses[name],
                     "step_s_rounds": [round(t, 5) for t in times[name]], **side.info}
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="default: qwen2.5-0.5b on a GPU, cpu-small otherwise")
  parser.add_argument("--steps", type=int, default=5, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; the median counts")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--hf_compile", action="store_true", help="also wrap the HF model in torch.compile")
  parser.add_argument("--peak_flops", type=float, default=0.0, help="override the per-device peak FLOP/s")
  parser.add_argument("--attention", default="", choices=("", "auto", "xla", "fused", "cudnn"),
                      help="override the preset's model.attention (e.g. fused where cuDNN fails)")
  args = parser.parse_args()

  import jax
  from emjax.models.transformer import TransformerConfig
  from emjax.train import perf

  on_cpu = jax.devices()[0].platform == "cpu"
  name = args.preset or ("cpu-small" if on_cpu else "qwen2.5-0.5b")
  preset = PRESETS[name]
  peak = perf.peak_flops_per_device(args.peak_flops)
  peak_source = perf.peak_source(args.peak_flops)
  if peak is None:
    peak, peak_source = measure_matmul_peak(), "measured fp32 1024^3 matmul on this CPU"
  cfg = TransformerConfig.from_config(preset["model"])
  head = {"preset": name, "params": cfg.num_params(), "batch": preset["batch"], "seq": preset["seq"],
          "dtype": preset["model"]["dtype"], "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
          "peak_flops_per_device": peak, "peak_source": peak_source, "date": time.strftime("%Y-%m-%d")}
  tokens = preset["batch"] * preset["seq"]
  emjax_side = bench_emjax(preset, args.warmup, args.attention)
  alone = interleaved({"emjax": emjax_side}, args.steps, 1, tokens)["emjax"]
  emjax_side.warmup = 0  # compiled and warm: the paired rounds below need no second warm-up
  alone["mfu"] = alone["flops_per_step"] / alone["step_s"] / (alone["devices"] * peak)
  print(json.dumps({**head, "side": "emjax alone (one round, before the HF side is built)", "emjax": alone}),
        flush=True)
  try:
    hf_side = bench_hf(preset, args.warmup, args.hf_compile)
  except Exception as e:  # pylint: disable=broad-except  # emjax's figures are out; say why HF's are not
    print(json.dumps({**head, "hf_error": f"{type(e).__name__}: {' '.join(str(e).split())[:1000]}"}), flush=True)
    raise
  results = interleaved({"emjax": emjax_side, "hf": hf_side}, args.steps, args.rounds, tokens)
  emjax_result, hf_result = results["emjax"], results["hf"]
  flops = emjax_result["flops_per_step"]
  for r in (emjax_result, hf_result):
    r["mfu"] = flops / r["step_s"] / (emjax_result["devices"] * peak)
  print(json.dumps({
      **head, "emjax": emjax_result, "hf": hf_result,
      "ratio_tokens_per_s": emjax_result["tokens_per_s"] / hf_result["tokens_per_s"],
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from emjax import runtime
  # What the main job runs with (emjax.main sets it the same way), for both sides alike.
  runtime.reexec_with_huge_pages()
  main()
