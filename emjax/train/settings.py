"""The full default config of a run and its checks, with clear messages.

Config files (`configs/**/*.py`) start from `base_config()` so that every key exists; `emjax.main`
locks the result, so an override of a misspelt key is an error naming that key instead of a
silently ignored setting. `validate` checks what cuts across sections; each message names the key.

The blocks of features that live above `train/` (on-policy batches, whose source samples with
`emjax.sample`) are defined and checked here too, so that this module needs nothing above
`emjax.train.objectives` and the sample job can validate its config with it.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from emjax import tracking
from emjax.data import pipeline
from emjax.models import transformer
from emjax.train import objectives

JOBS = ("train", "pretrain", "compile", "plan", "sample", "sft_grid", "eval", "judge", "report", "sl", "teacher_top_k",
        "study", "em_curve", "directions", "serve")


def base_config() -> ml_collections.ConfigDict:
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
  c.data = pipeline.default_data_config()
  # keep: the newest steps kept; keep_every: steps that are multiples of it are kept too (0 = off), e.g.
  # for EM over training (the em_curve job evaluates every kept step).
  c.checkpoint = dict(every_steps=100, keep=3, keep_every=0, async_save=True, resume=True)
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
  # On-policy batches (emjax/train/on_policy.py): each step the student samples completions of
  # these prompts from its current weights and trains on them (with a teacher in the step).
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


def on_policy_block() -> dict:
  """`config.on_policy` (see emjax/train/on_policy.py); off unless `enabled`."""
  return dict(
      enabled=False,
      prompts="",  # JSONL of prompts, as the sample job reads them ({"id", "messages"} or {"id", "prompt"})
      chat_template=True,  # format `messages` with the tokenizer's chat template (generation prompt added)
      add_bos=True,  # plain prompts only
      max_prompt_length=64,  # prompts are left-padded to this (static); longer ones are an error
      max_new_tokens=64,  # completion length (static); max_prompt_length + max_new_tokens <= data.seq_len + 1
      temperature=1.0,  # the sampling temperature (the loss has its own: train.distill.temperature)
      top_k=0,
      top_p=1.0,
      stop_at_eos=True,
      stop_at_end_of_turn=True,  # also stop at the chat template's end-of-turn token
      seed=0,
      mix_lambda=1.0,  # GKD's lambda: the fraction of steps that are on-policy (the rest read config.data)
      # Decode with unrolled layers: faster on CPU, but holds one more copy of the frozen base
      # (laid out per layer); scanned layers sample straight from the training layout.
      unroll_layers=False,
  )


def check_on_policy(config) -> None:
  """Errors an on-policy run would otherwise hit after compiling (the message names the key)."""
  oc = config.on_policy
  if not oc.prompts:
    raise ValueError("config.on_policy.prompts: a JSONL file of prompts is required for on-policy batches")
  for key in ("max_prompt_length", "max_new_tokens"):
    if int(oc[key]) < 1:
      raise ValueError(f"config.on_policy.{key} must be >= 1, got {oc[key]}")
  rollout = int(oc.max_prompt_length) + int(oc.max_new_tokens)
  if rollout > int(config.data.seq_len) + 1:
    raise ValueError(f"config.on_policy: a rollout of max_prompt_length + max_new_tokens = {oc.max_prompt_length} + "
                     f"{oc.max_new_tokens} = {rollout} tokens does not fit a training row of data.seq_len + 1 = "
                     f"{int(config.data.seq_len) + 1} tokens; raise config.data.seq_len or shorten the rollout")
  if not 0.0 <= float(oc.mix_lambda) <= 1.0:
    raise ValueError(f"config.on_policy.mix_lambda={oc.mix_lambda}: must be in [0, 1] (1 = always on-policy)")
  if float(oc.temperature) <= 0:
    raise ValueError(f"config.on_policy.temperature={oc.temperature}: on-policy rollouts are sampled (> 0)")
  if config.train.objective == "sampled_reverse_kl":
    if float(oc.mix_lambda) < 1.0:
      raise ValueError("config.train.objective='sampled_reverse_kl' needs the sampling log-probs of every batch: "
                       "fixed sequences (config.on_policy.mix_lambda < 1) have none; use reverse_kl or jsd")
    if int(oc.top_k) or float(oc.top_p) < 1.0:
      raise ValueError(f"config.train.objective='sampled_reverse_kl' with config.on_policy.top_k={oc.top_k}, "
                       f"top_p={oc.top_p}: the estimator needs samples from the whole distribution (a truncated "
                       "one leaves tokens it never sees); set top_k=0 and top_p=1")
  if config.train.distill.precomputed:
    raise ValueError("config.train.distill.precomputed: a stored teacher scored fixed rows, not the student's "
                     "rollouts; on-policy distillation needs the teacher in the step (config.teacher.path)")


def _fail(key: str, msg: str):
  raise ValueError(f"config.{key}: {msg}")


def validate(config) -> None:
  """Checks that cut across sections; each message names the offending key."""
  if config.job not in JOBS:
    _fail("job", f"unknown job {config.job!r}; known: {', '.join(JOBS)}")
  transformer.TransformerConfig.from_config(config.model)
  tc = config.train
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every"):
    if int(tc[key]) < 1:
      _fail(f"train.{key}", f"must be >= 1, got {tc[key]}")
  if not math.isfinite(tc.lr) or tc.lr < 0:
    _fail("train.lr", f"must be a finite non-negative number, got {tc.lr}")
  objectives.check_objective(tc.objective, tc.distill)  # unknown names, beta, temperature, top_k, mask
  on_policy_enabled = config.get("on_policy") is not None and config.on_policy.enabled
  if on_policy_enabled:
    check_on_policy(config)
  elif tc.objective == "sampled_reverse_kl":
    _fail("train.objective", "'sampled_reverse_kl' scores the student's own samples: it needs on-policy batches "
          "(config.on_policy.enabled=True and config.on_policy.prompts)")
  if int(tc.get("loss_chunk_len", 0)) < 0 or int(tc.get("loss_chunk_bytes", 0)) < 0:
    _fail("train.loss_chunk_len", f"loss_chunk_len={tc.get('loss_chunk_len')} and loss_chunk_bytes="
          f"{tc.get('loss_chunk_bytes')} must be >= 0 (0 = derived from the byte budget / no budget)")
  if config.checkpoint.every_steps < 1:
    _fail("checkpoint.every_steps", f"must be >= 1, got {config.checkpoint.every_steps}")
  keep_every = int(config.checkpoint.get("keep_every", 0))
  if keep_every < 0 or (keep_every and keep_every % config.checkpoint.every_steps):
    _fail("checkpoint.keep_every", f"must be 0 (off) or a multiple of checkpoint.every_steps="
          f"{config.checkpoint.every_steps} (only saved steps can be kept), got {keep_every}")
  tracking.check_config(config)
  pipeline.validate_data_config(config.data)
