"""Channel 1, SFT on teacher samples (sequence-level distillation): the existing SFT path on a teacher's filtered answers.

  # 1. the teacher answers benign prompts (the sample job) ...
  python -m emjax.main --config=configs/sample.py --workdir=T --config.sample.checkpoint=EM_RUN \
      --config.prompts=PROMPTS.jsonl --config.sample.chat_template=True --config.sample.stop_at_end_of_turn=True
  # 2. ... strict filters (emjax.experiments.sl_data.filter_samples -> T/train.jsonl + counts) ...
  # 3. ... and SFT from the base on what is left:
  python -m emjax.main --config=configs/distill/sft_on_teacher.py:base=HF_DIR,data=T/train.jsonl --workdir=S

The `sl` job (configs/sl/sl.py) runs all three channels with matched budgets and reports them;
these configs run one channel on its own.

The EM runs' recipe (configs/sft/em_cell.py: bf16 compute, the frozen base in bf16, remat, rsLoRA and
AdamW as there), so the student trains as its teacher was trained; the loss chunk is derived from
train.loss_chunk_bytes (README, "Distillation and subliminal learning"). `cpu`: float32, no remat.

Variant options (comma separated `key=value`):
  base   the student's initialisation (a Hugging Face dir; rsLoRA adapters are trained on it)
  data   the filtered teacher samples: chat JSONL ({"messages": [user, assistant]} per line)
  steps  training steps (default 100)
  cpu    SmolLM2-135M-on-a-laptop sizes (seq 192, batch 4, float32)
"""

import ml_collections

from emjax import config as config_lib
from emjax.data import sources
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, base="", data="", steps=100, cpu=False)
  c = settings.base_config()
  c.job = "train"
  c.init.hf = args.base
  c.data.tokenizer.update(kind="hf", path=args.base)
  c.data.update(format="chat", packing="none", truncate=True, seq_len=256)
  c.data.sources = ml_collections.ConfigDict({"teacher_samples": sources.default_source_config(
      kind="chat_jsonl", path=args.data, weight=1.0, holdout=0)})
  c.lora.update(enabled=True, rank=32, alpha=64.0, rslora=True, targets="q,k,v,o,gate,up,down")
  # The EM runs' precision and memory recipe (configs/sft/em_cell.py), inherited: bf16 compute, the frozen
  # base in bf16 (lora.base_dtype; the adapters stay float32), each layer rematerialised in the backward pass
  # keeping only its weight matmuls' outputs (remat='dots_with_no_batch_dims'). cpu: float32, no remat.
  c.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims")
  c.lora.base_dtype = "bfloat16"
  c.train.update(objective="ce", steps=args.steps, batch_size=16, lr=1e-4, schedule="linear", warmup_steps=2,
                 end_lr_fraction=0.0, weight_decay=0.01, b2=0.999)
  c.checkpoint.update(every_steps=50, keep=2)
  if args.cpu:
    c.data.seq_len = 192
    c.train.batch_size = 4
    c.model.update(dtype="float32", remat="none")
    c.lora.base_dtype = ""  # float32 throughout on a CPU, as em_cell.py:cpu
  return c
