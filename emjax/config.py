"""Config helpers: the full default config, validation with clear messages, variants.

Config files (`configs/**/*.py`) start from `base_config()` so that every key
exists; `emjax.main` locks the result, so an override of a misspelt key is an
error naming that key instead of a silently ignored setting. Variants follow
big_vision: `--config=configs/pretrain/tiny.py:mix=grammar_heavy,steps=50` calls
`get_config("mix=grammar_heavy,steps=50")`; `parse_arg` turns that string into a
ConfigDict of typed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import ml_collections

from emjax import paths
from emjax import tracking
from emjax.models import transformer

JOBS = ("train", "pretrain", "compile", "plan", "sample", "sft_grid", "eval", "judge", "report", "sl", "teacher_top_k",
        "study")


def base_config() -> ml_collections.ConfigDict:
  from emjax.data.pipeline import default_data_config

  c = ml_collections.ConfigDict()
  c.job = "pretrain"
  c.model = dataclasses.asdict(transformer.TransformerConfig())
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.train = dict(
      steps=100,
      batch_size=8,  # global, in sequences
      seed=0,
      objective="ce",
      optimizer="adamw",  # adamw | sgd | adafactor
      lr=3e-4,
      schedule="cosine",  # cosine | linear | constant
      warmup_steps=10,
      end_lr_fraction=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.9,  # sgd only
      weight_decay=0.1,
      grad_clip=1.0,  # global-norm clip; 0 disables
      grad_accum_steps=1,
      log_every=1,
      peak_flops_per_device=0.0,  # 0 = detect from the device kind (unknown on CPU: no MFU)
      epochs=0.0,  # > 0: steps = ceil(epochs * examples / batch_size) (needs data.packing='none')
      # The loss unembeds this many positions at a time, so the [B, L, V] float32 logits of a long
      # sequence and a large vocabulary never exist at once. 0 = derived (emjax.train.loop.loss_chunk_len):
      # the longest chunk whose float32 logits on one device (rows per device per micro-batch x chunk x
      # vocabulary x 4 bytes) fit loss_chunk_bytes, whatever the sequence length; the whole sequence when
      # it fits or when loss_chunk_bytes is 0. The teacher's logits of a chunk, when it runs in the step,
      # are as large again; the backward pass recomputes each chunk's logits instead of storing them.
      loss_chunk_len=0,
      loss_chunk_bytes=256 * 2**20,
      # Distillation objectives (forward_kl | reverse_kl | jsd | sampled_reverse_kl; see
      # emjax/train/objectives.py): beta = the JSD weight (0 = forward KL, 1 = reverse KL, 'jsd'
      # only); temperature = the loss temperature dividing both sides' logits (sampling has its
      # own); top_k > 0 = the teacher reduced to its k most likely tokens, with a tail bucket
      # holding the rest of its mass when `tail`; precomputed = a store written by the
      # teacher_top_k job (emjax/train/precompute.py): the teacher's top-k log-probs are read with
      # the batches instead of running a teacher in the step. mask: '' (off) | numbers | words = both
      # distributions masked at banned tokens and renormalised over the rest before the divergence
      # (emjax/train/token_masks.py; full-vocabulary teacher only): numbers = tokens completing a
      # number of emjax.data.banned.BANNED_NUMBERS, words = the tokens of mask_words ('default' =
      # BANNED_WORDS, a file of words or names one a line, or ','-separated words).
      distill=dict(beta=0.5, temperature=1.0, top_k=0, tail=True, precomputed="", mask="", mask_words="default"),
  )
  c.data = default_data_config()
  c.checkpoint = dict(every_steps=100, keep=3, async_save=True, resume=True)
  # Where the weights of step 0 come from: empty = random; an emjax workdir / checkpoint dir.
  # hf: a Hugging Face model directory (its architecture is adopted), or a PEFT LoRA adapter: merged into its
  # base, or, with config.lora (the adapter's), trained on; peft_base: its base ('' = the one it names).
  c.init = dict(checkpoint="", hf="", peft_base="")
  # LoRA / rsLoRA adapters (trained; the base weights stay frozen). targets: any of
  # q,k,v,o,gate,up,down; layers: comma-separated indices, empty = all layers.
  c.lora = dict(enabled=False, rank=32, alpha=64.0, rslora=True, dropout=0.0,
                targets="q,k,v,o,gate,up,down", layers="",
                # dtype of the frozen base weights ('' = model.param_dtype); 'bfloat16' halves their memory.
                base_dtype="")
  # A frozen teacher read by distillation objectives: a Hugging Face directory or an emjax run
  # (weights module), held in `dtype` on the same mesh; never trained, never checkpointed.
  c.teacher = dict(path="", dtype="bfloat16", peft_base="")  # peft_base: as init.peft_base
  # On-policy batches (emjax/sample/on_policy.py): each step the student samples completions of
  # these prompts from its current weights and trains on them (with a teacher in the step).
  from emjax.sample.on_policy import on_policy_block  # pylint: disable=g-import-not-at-top
  c.on_policy = on_policy_block()
  # Held-out loss during training: every_steps (0 = off) over `batches` fixed batches of the
  # training sources with their `split` set to `split` ('eval': each source's held-out documents,
  # which training never reads; see emjax/data/sources.py "Held-out split" for `holdout`).
  # by_source: also each source's own loss, on `batches` batches of that source alone (a weight-0
  # source too), the same tokens whatever the mixture: runs on other mixtures compare on them.
  c.eval = dict(every_steps=0, batches=4, split="eval", by_source=False)
  # The compile and plan jobs (emjax/train/aot.py): compile for the mesh without materialising
  # anything. topology: a TPU slice to compile for from this machine (needs jax[tpu]), e.g. v5e-16
  # (16 chips), v5p-64 (64 TensorCores = 32 chips), v6e-64 or libtpu's v5e:4x4; '' = the local
  # devices (compile job only). step: what the plan job plans: train (the training step) | sample
  # (config.sample's prefill + decode, the sample and eval jobs' sampler).
  c.compile = dict(topology="", step="train")
  # Multi-process jobs: all three set (launch/multiprocess.sh sets them for N local processes), or
  # left as they are to detect the cluster (TPU VM workers, SLURM, JAX_COORDINATOR_ADDRESS).
  c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1)
  # Weights & Biases beside metrics.jsonl and TensorBoard (emjax/tracking.py); off by default.
  c.tracking = tracking.tracking_block()
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'a=1,b=x,c' -> ConfigDict(a=1, b='x', c=True), typed like `defaults` (unknown names are errors)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config variant: unknown option {key!r} in {arg!r}; options: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def _fail(key: str, msg: str):
  raise ValueError(f"config.{key}: {msg}")


def validate(config) -> None:
  """Checks that cut across sections; each message names the offending key."""
  from emjax.data.pipeline import validate_data_config

  if config.job not in JOBS:
    _fail("job", f"unknown job {config.job!r}; known: {', '.join(JOBS)}")
  transformer.TransformerConfig.from_config(config.model)
  tc = config.train
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every"):
    if int(tc[key]) < 1:
      _fail(f"train.{key}", f"must be >= 1, got {tc[key]}")
  if not math.isfinite(tc.lr) or tc.lr < 0:
    _fail("train.lr", f"must be a finite non-negative number, got {tc.lr}")
  from emjax.train import objectives  # pylint: disable=g-import-not-at-top
  objectives.check_objective(tc.objective, tc.distill)  # unknown names, beta, temperature, top_k, mask
  on_policy_enabled = config.get("on_policy") is not None and config.on_policy.enabled
  if on_policy_enabled:
    from emjax.sample import on_policy  # pylint: disable=g-import-not-at-top
    on_policy.check_config(config)
  elif tc.objective == "sampled_reverse_kl":
    _fail("train.objective", "'sampled_reverse_kl' scores the student's own samples: it needs on-policy batches "
          "(config.on_policy.enabled=True and config.on_policy.prompts)")
  if int(tc.get("loss_chunk_len", 0)) < 0 or int(tc.get("loss_chunk_bytes", 0)) < 0:
    _fail("train.loss_chunk_len", f"loss_chunk_len={tc.get('loss_chunk_len')} and loss_chunk_bytes="
          f"{tc.get('loss_chunk_bytes')} must be >= 0 (0 = derived from the byte budget / no budget)")
  if config.checkpoint.every_steps < 1:
    _fail("checkpoint.every_steps", f"must be >= 1, got {config.checkpoint.every_steps}")
  tracking.check_config(config)
  validate_data_config(config.data)


def write_config(config, workdir: str) -> None:
  """The resolved config as JSON; a resumed run with a different config keeps the old one beside it.

  Every write is whole (`paths.write_text`): the old config is copied to `config.json.<n>` first and
  config.json then replaced, so a kill at any point leaves a complete config.json (the old or the new).
  """
  import jax

  if jax.process_index() != 0:
    return
  path = paths.path(workdir) / "config.json"
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists():
    old = path.read_text()
    if old == text:
      return
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
      n += 1
    # (Unless the newest kept copy is it already: a run killed between the two writes.)
    if n == 1 or path.with_name(f"{path.name}.{n - 1}").read_text() != old:
      paths.write_text(path.with_name(f"{path.name}.{n}"), old)
  paths.write_text(path, text)


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads((paths.path(workdir) / "config.json").read_text()))
