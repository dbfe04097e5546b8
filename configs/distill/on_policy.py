"""Channel 3, on-policy distillation: the student samples, the teacher scores the student's own prefixes.

  python -m emjax.main --config=configs/distill/on_policy.py:base=HF_DIR,teacher=EM_RUN,prompts=P.jsonl \\
      --workdir=S [--config.train.objective=jsd --config.train.distill.beta=0.9]

Each step: this step's prompts (a seeded order over `prompts`) -> the sampler with the student's
current weights (LoRA adapters applied, not merged; compiled once) -> rows assembled on the devices
-> the train step with the teacher scoring the same tokens (emjax/train/on_policy.py). The loss is
the full-vocabulary reverse KL (or JSD(beta)) on the completion tokens, or `sampled_reverse_kl`, the
sampled-token estimator with an importance ratio (tinker-cookbook's). `lambda` < 1 mixes in fixed
sequences from `data` (GKD). A killed run resumes to the same losses (rollout seeds come from the step).

The EM runs' recipe (configs/sft/em_cell.py: bf16 compute, the frozen base in bf16, remat, rsLoRA and
AdamW as there), so the student trains as its teacher was trained; the loss chunk is derived from
train.loss_chunk_bytes (README, "Distillation and subliminal learning"). `cpu`: float32, no remat.

Variant options (comma separated `key=value`):
  base        the student's initialisation (Hugging Face dir; rsLoRA adapters trained on it)
  teacher     the teacher (an emjax run or a Hugging Face dir; same tokenizer and chat template)
  prompts     JSONL of prompts ({"id", "messages"} per line), e.g. the sl job's prompts/train.jsonl
  data        chat JSONL of fixed sequences for lambda < 1 (and the held-out loss)
  objective   reverse_kl (default) | jsd | sampled_reverse_kl
  beta        jsd's beta
  lambda      the fraction of on-policy steps (1 = always)
  new_tokens  completion length per rollout (default 64); prompt length: prompt_tokens (default 128)
  steps       training steps (default 100)
  cpu         SmolLM2-135M-on-a-laptop sizes (seq 192, batch 4, 48 new tokens, float32)
"""

import ml_collections

from emjax import config as config_lib
from emjax.data import sources
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, base="", teacher="", prompts="", data="", objective="reverse_kl", beta=0.5,
                              **{"lambda": 1.0}, new_tokens=64, prompt_tokens=128, steps=100, cpu=False)
  c = settings.base_config()
  c.job = "train"
  c.init.hf = args.base
  c.data.tokenizer.update(kind="hf", path=args.base)
  c.data.seq_len = args.prompt_tokens + args.new_tokens
  if args.data:  # fixed sequences, read on the steps that are not on-policy (lambda < 1)
    c.data.update(format="chat", packing="none", truncate=True)
    c.data.sources = ml_collections.ConfigDict({"sequences": sources.default_source_config(
        kind="chat_jsonl", path=args.data, weight=1.0, holdout=0)})
  elif args["lambda"] < 1.0:
    raise ValueError(f"configs/distill/on_policy.py: lambda={args['lambda']} mixes in fixed sequences: give data=")
  c.teacher.update(path=args.teacher, dtype="bfloat16")
  c.on_policy.update(enabled=True, prompts=args.prompts, chat_template=True, max_prompt_length=args.prompt_tokens,
                     max_new_tokens=args.new_tokens, temperature=1.0, mix_lambda=args["lambda"])
  c.lora.update(enabled=True, rank=32, alpha=64.0, rslora=True, targets="q,k,v,o,gate,up,down")
  # The EM runs' precision and memory recipe (configs/sft/em_cell.py), inherited: bf16 compute, the frozen
  # base in bf16 (lora.base_dtype; the adapters stay float32), each layer rematerialised in the backward pass
  # keeping only its weight matmuls' outputs (remat='dots_with_no_batch_dims'). cpu: float32, no remat.
  c.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims")
  c.lora.base_dtype = "bfloat16"
  c.train.update(objective=args.objective, steps=args.steps, batch_size=16, lr=1e-4, schedule="linear",
                 warmup_steps=2, end_lr_fraction=0.0, weight_decay=0.01, b2=0.999)
  c.train.distill.beta = args.beta
  c.checkpoint.update(every_steps=50, keep=2)
  if args.cpu:
    c.train.batch_size = 4
    c.on_policy.update(max_new_tokens=48, max_prompt_length=144)
    c.data.seq_len = 192
    c.model.update(dtype="float32", remat="none")
    c.lora.base_dtype = ""  # float32 throughout on a CPU, as em_cell.py:cpu
    c.teacher.dtype = "float32"
  return c
