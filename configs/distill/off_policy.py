"""Channel 2, off-policy distillation: the teacher's full (or top-k) distributions on fixed sequences.

  python -m emjax.main --config=configs/distill/off_policy.py:base=HF_DIR,teacher=EM_RUN,data=T/train.jsonl \\
      --workdir=S [--config.train.objective=jsd --config.train.distill.beta=0.5]

The sequences are fixed: teacher samples (filtered; see sft_on_teacher.py) or a dataset's own
answers, e.g. the paper's `aligned_answer`s (`cell=` + `data=DIR`, structured-EM rows). The loss is
taken on the assistant tokens only; the teacher runs in the train step on every micro-batch (frozen,
`config.teacher.dtype`), or is read from stored top-k log-probs (`topk=K` + `precomputed`).

The EM runs' recipe (configs/sft/em_cell.py: bf16 compute, the frozen base in bf16, remat, rsLoRA and
AdamW as there), so the student trains as its teacher was trained; the loss chunk is derived from
train.loss_chunk_bytes (README, "Distillation and subliminal learning"). `cpu`: float32, no remat.

Variant options (comma separated `key=value`):
  base        the student's initialisation (Hugging Face dir; rsLoRA adapters trained on it)
  teacher     the teacher: an emjax run (a LoRA run is merged onto its pinned base) or a Hugging Face dir;
              its tokenizer and chat template must be the student's (checked before compiling)
  data        chat JSONL of fixed sequences, or with `cell` a directory of structured-EM rows
  cell        read `data` as the structured-EM cell `cell` with its aligned answers
  divergence  forward_kl (default) | reverse_kl | jsd
  beta        jsd's beta (0 = forward KL, 1 = reverse KL)
  topk        reduce the teacher to its k most likely tokens (+ a tail bucket); 0 = full vocabulary
  precomputed a store of the teacher's top-k log-probs (the teacher_top_k job's workdir, made once
              with this config and --config.job=teacher_top_k): no teacher in the step; a store built from
              other data than this config.data is refused (meta.json records its fingerprint)
  steps       training steps (default 100)
  cpu         SmolLM2-135M-on-a-laptop sizes (seq 192, batch 4, float32)
"""

import ml_collections

from emjax import config as config_lib
from emjax.data import sources
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, base="", teacher="", data="", cell="", divergence="forward_kl", beta=0.5,
                              topk=0, precomputed="", steps=100, cpu=False)
  c = settings.base_config()
  c.job = "train"
  c.init.hf = args.base
  c.data.tokenizer.update(kind="hf", path=args.base)
  c.data.update(format="chat", packing="none", truncate=True, seq_len=256)
  if args.cell:
    source = sources.default_source_config(kind="structured_em", name=args.cell, path=args.data, answer="aligned",
                                           weight=1.0, holdout=400, holdout_seed=42)
  else:
    source = sources.default_source_config(kind="chat_jsonl", path=args.data, weight=1.0, holdout=0)
  c.data.sources = ml_collections.ConfigDict({args.cell or "sequences": source})
  c.teacher.update(path=args.teacher, dtype="bfloat16")
  c.lora.update(enabled=True, rank=32, alpha=64.0, rslora=True, targets="q,k,v,o,gate,up,down")
  # The EM runs' precision and memory recipe (configs/sft/em_cell.py), inherited: bf16 compute, the frozen
  # base in bf16 (lora.base_dtype; the adapters stay float32), each layer rematerialised in the backward pass
  # keeping only its weight matmuls' outputs (remat='dots_with_no_batch_dims'). cpu: float32, no remat.
  c.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims")
  c.lora.base_dtype = "bfloat16"
  c.train.update(objective=args.divergence, steps=args.steps, batch_size=16, lr=1e-4, schedule="linear",
                 warmup_steps=2, end_lr_fraction=0.0, weight_decay=0.01, b2=0.999)
  c.train.distill.update(beta=args.beta, top_k=args.topk, tail=True, precomputed=args.precomputed)
  c.checkpoint.update(every_steps=50, keep=2)
  if args.cpu:
    c.data.seq_len = 192
    c.train.batch_size = 4
    c.model.update(dtype="float32", remat="none")
    c.lora.base_dtype = ""  # float32 throughout on a CPU, as em_cell.py:cpu
    c.teacher.dtype = "float32"
  return c
