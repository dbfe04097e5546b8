"""The first thing to run on a lent accelerator (about a minute on a GPU; `benchmarks/gpu.sh` runs it first).

Checks, in order, and stops at the first that makes the rest meaningless:

  1. versions (python, jax, jaxlib, flax, optax, numpy, torch, transformers) and the backend jax
     started: with --expect=gpu, any backend but the GPU is exit code 3 (JAX_PLATFORMS=cuda makes a
     CUDA plugin that fails to start an error instead of a silent fallback to the CPU);
  2. that emjax's training loop, sampler and on-policy source import on this jax (exit code 4 if not);
  3. what float32 matmuls do here: the error of a 1024^3 product at jax's default precision and at
     "highest" against float64 (TF32 on NVIDIA GPUs, one bf16 pass on TPUs, exact on CPUs), i.e.
     what `model.matmul_precision` changes;
  4. forward + backward of every attention implementation on emjax's exact shapes (the training
     preset's: Qwen2.5-0.5B's heads, batch 8 x 2048, bf16 on a GPU; a small float32 shape on a CPU),
     with emjax's segment mask (two packed documents and padding per row): emjax's einsum ("xla"),
     jax's XLA lowering ("fused"), cuDNN with the mask as a bias (what emjax passed before it told
     the kernel about causality), with the mask and is_causal, and with is_causal alone (one segment:
     no bias, no bias gradient); each with its compile time, best time, model TFLOP/s and its largest
     difference from the einsum reference on the real (unpadded) rows. cuDNN variants are skipped
     with the reason where there is no NVIDIA GPU; a cuDNN failure on a GPU is exit code 5 (the
     benchmarks then run with model.attention=fused);
  5. one forward + backward of a small emjax Transformer with model.attention=auto (what `auto`
     resolved to here, and that the model compiles with it; exit code 6 if not).

Prints a line per check and, last, one JSON line with everything (also written to --out).

  python benchmarks/smoke.py                     # whatever backend jax picks
  JAX_PLATFORMS=cuda python benchmarks/smoke.py --expect=gpu
  python benchmarks/smoke.py --preset=cpu        # the small shapes (the dry run on a CPU)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback

from timing import best_of, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_NOT_EXPECTED_BACKEND = 3
EXIT_IMPORT_FAILED = 4
EXIT_CUDNN_FAILED = 5
EXIT_MODEL_FAILED = 6

# The attention of benchmarks/train.py's presets (heads, kv heads, head dim), at their batch and length.
PRESETS = {
    "qwen2.5-0.5b": dict(batch=8, seq=2048, heads=14, kv_heads=2, head_dim=64, dtype="bfloat16"),
    "cpu": dict(batch=2, seq=256, heads=8, kv_heads=4, head_dim=32, dtype="float32"),
}
# name -> (implementation, mask: "segments" | None, causal flag)
VARIANTS = {
    "xla (emjax einsum, mask)": ("xla", "segments", False),
    "fused (jax XLA, mask + causal)": ("fused", "segments", True),
    "cudnn mask": ("cudnn", "segments", False),
    "cudnn mask + causal": ("cudnn", "segments", True),
    "cudnn causal only": ("cudnn", None, True),
    "fused causal only": ("fused", None, True),
}


def say(*parts) -> None:
  print(*parts, flush=True)


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "grain", "ml_collections",
               "orbax.checkpoint"):
    try:
      out[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # pylint: disable=broad-except
      out[name] = f"MISSING ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
  return out


def backend(expect: str) -> tuple[dict, str | None]:
  """(what jax started on, an error message when it is not what `expect` asks for)."""
  import jax
  info = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
  try:
    devices = jax.devices()
  except Exception as e:  # pylint: disable=broad-except  # e.g. JAX_PLATFORMS=cuda without a working CUDA plugin
    info["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
    info["jax_plugins_installed"] = _jax_plugins()
    return info, (f"jax could not start the backend JAX_PLATFORMS={info['JAX_PLATFORMS'] or '(unset)'} asks for "
                  f"({info['error']}; jax plugins installed: {', '.join(info['jax_plugins_installed']) or 'none'}); "
                  "no GPU here, or its CUDA plugin does not load")
  info.update(backend=jax.default_backend(), devices=len(devices), device_kind=devices[0].device_kind,
              platform=devices[0].platform, platform_version=getattr(devices[0].client, "platform_version", "?"))
  capability = getattr(devices[0], "compute_capability", None)
  if capability is not None:
    info["compute_capability"] = str(capability)
  from emjax.train import perf
  info["peak_bf16_flops_per_device"] = perf.peak_flops_per_device(0.0, devices[0])
  info["peak_source"] = perf.peak_source(0.0, devices[0])
  if expect != "any" and info["backend"] != expect:
    return info, (f"expected the {expect} backend, jax is on {info['backend']} ({info['device_kind']}); "
                  "the figures would be of another machine")
  return info, None


def _jax_plugins() -> list[str]:
  """The PJRT plugins jax could load (jax_plugins.*; the CUDA one is jax_plugins.xla_cuda12 / 13)."""
  import pkgutil
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  return sorted(m.name for m in pkgutil.iter_modules(jax_plugins.__path__))


def emjax_imports() -> dict:
  out = {}
  for module in ("emjax.train.loop", "emjax.sample.sampler", "emjax.train.on_policy", "emjax.train.aot"):
    try:
      importlib.import_module(module)
      out[module] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      out[module] = f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
  return out


def matmul_precision() -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=(1024, 1024)).astype(np.float32) for _ in range(2))
  exact = a.astype(np.float64) @ b.astype(np.float64)
  out = {}
  for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision):
      got = np.asarray(jax.jit(jnp.matmul)(a, b), np.float64)
    out[f"{precision}_max_rel_error"] = float(np.abs(got - exact).max() / np.abs(exact).max())
  return out


def _inputs(shape: dict):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from emjax.models import transformer as T
  b, l, h, k, dh = (shape[key] for key in ("batch", "seq", "heads", "kv_heads", "head_dim"))
  dtype = jnp.dtype(shape["dtype"])
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (b, l, h, dh), dtype)
  kk = jax.random.normal(keys[1], (b, l, k, dh), dtype)
  v = jax.random.normal(keys[2], (b, l, k, dh), dtype)
  weights = jax.random.normal(keys[3], (b, l, h, dh), jnp.float32)
  # Two packed documents and padding, as emjax's packing writes rows.
  first, second = int(0.6 * l), int(0.35 * l)
  segments = np.zeros((b, l), np.int32)
  segments[:, :first], segments[:, first:first + second] = 1, 2
  positions = np.zeros((b, l), np.int32)
  positions[:, :first], positions[:, first:first + second] = np.arange(first), np.arange(second)
  mask = T.attention_mask(jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(positions),
                          jnp.asarray(segments))
  pos1 = jnp.broadcast_to(jnp.arange(l), (b, l))
  one = jnp.ones((b, l), jnp.int32)
  mask_one = T.attention_mask(pos1, one, pos1, one)
  real = jnp.asarray(segments > 0)
  return q, kk, v, weights, mask, mask_one, real


def attention(shape: dict, repeats: int, on_nvidia_gpu: bool) -> tuple[dict, bool]:
  """Per variant: timings and the difference from the einsum reference; and whether a cuDNN variant failed."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from emjax.models import transformer as T
  q, k, v, weights, mask, mask_one, real = _inputs(shape)
  b, l, h, dh = q.shape
  # Model FLOPs of causal attention, forward + backward: 3 x (4 B H Dh x L^2 / 2).
  flops = 3 * 4 * b * h * dh * l * l / 2

  def make(impl, use_mask, causal):
    m = {"segments": mask, "one": mask_one, None: None}[use_mask]

    def loss(q, k, v, m, weights):  # the mask an argument, as in the model (not a folded constant)
      out = T.dot_product_attention(q, k, v, m, impl, causal=causal)
      return jnp.sum(out.astype(jnp.float32) * weights), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return lambda: step(q, k, v, m, weights)

  def run(fn):
    (_, out), grads = fn()
    jax.block_until_ready((out, grads))
    return out, grads

  refs = {}
  for key, use_mask in (("segments", "segments"), ("one", "one")):
    fn = make("xla", use_mask, False)
    refs[key] = run(fn)
  results, cudnn_failed = {}, False
  for name, (impl, use_mask, causal) in VARIANTS.items():
    if impl == "cudnn" and not on_nvidia_gpu:
      results[name] = {"skipped": f"cuDNN needs an NVIDIA GPU; backend here is {jax.default_backend()}"}
      say(f"  {name:34s} skipped ({results[name]['skipped']})")
      continue
    try:
      fn = make(impl, use_mask, causal)
      (out, grads), compile_s = timed(lambda: run(fn))  # noqa: B023
      _, best = best_of(lambda: run(fn), repeats)  # noqa: B023
    except Exception as e:  # pylint: disable=broad-except
      results[name] = {"failed": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
      cudnn_failed |= impl == "cudnn"
      say(f"  {name:34s} FAILED: {results[name]['failed']}")
      continue
    ref_out, ref_grads = refs["segments" if use_mask else "one"]
    rows = np.asarray(real if use_mask else jnp.ones_like(real))
    diff_out = float(np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32))[rows].max())
    diff_dq = float(np.abs(np.asarray(grads[0], np.float32) - np.asarray(ref_grads[0], np.float32))[rows].max())
    results[name] = {"compile_s": round(compile_s, 2), "fwd_bwd_ms": round(1e3 * best, 3),
                     "model_tflops_per_s": float(f"{flops / best / 1e12:.4g}"),
                     "max_abs_diff_out": diff_out, "max_abs_diff_dq": diff_dq}
    say(f"  {name:34s} {1e3 * best:9.2f} ms fwd+bwd  {flops / best / 1e12:8.3g} TFLOP/s  compile {compile_s:5.1f} s"
        f"  |out - einsum| {diff_out:.2e}  |dq - einsum| {diff_dq:.2e}")
  return results, cudnn_failed


def model_auto(shape: dict) -> dict:
  """A small emjax model (the preset's head layout, 2 layers) with attention=auto, forward + backward."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from emjax.models import transformer as T
  h, k, dh = shape["heads"], shape["kv_heads"], shape["head_dim"]
  cfg = T.TransformerConfig(family="qwen2", vocab_size=1024, d_model=h * dh, n_layers=2, n_heads=h, n_kv_heads=k,
                            d_ff=2 * h * dh, qkv_bias=True, dtype=shape["dtype"], attention="auto")
  seq = min(shape["seq"], 512)
  resolved = T.resolve_attention("auto", jnp.dtype(cfg.dtype), dh, seq, seq, True)
  graph, params = T.split_model(T.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, seq), 0, cfg.vocab_size)

  @jax.jit
  def step(p, tokens):
    def loss(p):
      logits = nnx.merge(graph, p)(tokens, None, jnp.ones_like(tokens))
      return jnp.mean(logits.astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss)(p)

  (value, _), seconds = timed(lambda: jax.block_until_ready(step(params, tokens)))
  return {"attention_auto_resolves_to": resolved, "first_call_s": round(seconds, 2),
          "loss_finite": bool(math.isfinite(float(value)))}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--expect", default="any", choices=("any", "gpu", "tpu", "cpu"),
                      help="the backend these figures must come from; another one is exit code 3")
  parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="attention shapes (default: qwen2.5-0.5b on a GPU or TPU, cpu on a CPU)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="", help="also write the JSON line here")
  args = parser.parse_args()

  report = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
  say("versions:", json.dumps(report["versions"]))
  report["backend"], problem = backend(args.expect)
  say("backend:", json.dumps(report["backend"]))

  def finish(code: int, message: str = "") -> int:
    report["exit_code"] = code
    if message:
      report["stopped"] = message
      say(f"SMOKE STOP (exit {code}): {message}")
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
      with open(args.out, "w") as f:
        f.write(line + "\n")
    return code

  if problem:
    return finish(EXIT_NOT_EXPECTED_BACKEND, problem)
  report["imports"] = emjax_imports()
  say("emjax imports:", json.dumps(report["imports"]))
  failed = [m for m, status in report["imports"].items() if status != "ok"]
  if failed:
    return finish(EXIT_IMPORT_FAILED, f"emjax does not import on this jax: {failed[0]}: {report['imports'][failed[0]]}")

  import jax
  report["matmul_precision"] = matmul_precision()
  say("float32 matmul vs float64:", json.dumps(report["matmul_precision"]))
  on_cpu = jax.default_backend() == "cpu"
  name = args.preset or ("cpu" if on_cpu else "qwen2.5-0.5b")
  shape = PRESETS[name]
  report["attention_shape"] = dict(shape, preset=name)
  say(f"attention, forward + backward, {json.dumps(shape)}:")
  device = jax.devices()[0]
  on_nvidia_gpu = device.platform == "gpu" and "nvidia" in device.device_kind.lower()
  report["attention"], cudnn_failed = attention(shape, args.repeats, on_nvidia_gpu)
  try:
    report["model_auto"] = model_auto(shape if not on_cpu else PRESETS["cpu"])
  except Exception:  # pylint: disable=broad-except
    report["model_auto"] = {"failed": traceback.format_exc(limit=3)[-1500:]}
  say("emjax model, attention=auto:", json.dumps(report["model_auto"]))
  if cudnn_failed:
    return finish(EXIT_CUDNN_FAILED, "cuDNN attention failed on this GPU: benchmark with model.attention=fused")
  if "failed" in report["model_auto"]:
    return finish(EXIT_MODEL_FAILED, "an emjax model with attention=auto did not run here")
  return finish(0)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
