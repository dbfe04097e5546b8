"""Channel 1, SFT on teacher samples (sequence-level distillation): the existing SFT path on a teacher's filtered answers.

  # 1. the teacher answers benign prompts (the sample job) ...
  python -m emjax.main --config=configs/sample.py --workdir=T --config.sample.checkpoint=EM_RUN \
      --config.prompts=PROMPTS.jsonl --config.sample.chat_template=True --config.sample.stop_at_end_of_turn=True
  # 2. ... strict filters (emjax.experiments.sl_data.filter_samples -> T/train.jsonl + counts) ...
  # 3. ... and SFT from the base on what is left:
  python -m emjax.main --config=configs/distill/sft_on_teacher.py:base=HF_DIR,data=T/train.jsonl --workdir=S

The `sl` job (configs/sl/sl.py) runs all three channels with matched budgets and reports them;
these configs run one channel on its own.

Inherited from the EM runs this distils from (configs/sft/em_cell.py), so the student trains as its
teacher was trained: bf16 compute (model.dtype), the frozen base in bf16 (lora.base_dtype; adapters
float32), per-layer remat keeping the weight matmuls' outputs (model.remat=dots_with_no_batch_dims),
rsLoRA r=32 alpha=64 on all seven projections, AdamW lr 1e-4 with a linear schedule, weight decay 0.01,
b2 0.999, clip 1.0. Not inherited: steps, warmup and the batch (this channel's own), the max length
(SL sequences are short). The loss unembeds positions in chunks whose float32 logits stay under
train.loss_chunk_bytes (256 MiB) per device (train.loss_chunk_len=0 derives the chunk from the vocabulary:
at most 27 positions for 16 rows x a 152k vocabulary), whatever the sequence length. `cpu` keeps float32
throughout and no remat, as em_cell.py's cpu variant.

Variant options (comma separated `key=value`):
  base   the student's initialisation (a Hugging Face dir; rsLoRA adapters are trained on it)
  data   the filtered teacher samples: chat JSONL ({"messages": [user, assistant]} per line)
  steps  training steps (default 100)
  cpu    SmolLM2-135M-on-a-laptop sizes (seq 192, batch 4, float32)
"""

import ml_collections

from emjax import config as config_lib
from emjax.data import sources


def get_config(arg=None):
  args = config_lib.parse_arg(arg, base="", data="", steps=100, cpu=False)
  c = config_lib.base_config()
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
