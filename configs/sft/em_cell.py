"""SFT on one cell of the paper's domain x task grid, with the paper's LoRA recipe.

The paper (arXiv 2605.12798) fine-tunes one rsLoRA adapter per (domain, task) cell on the
misaligned answers: r=32, alpha=64, rsLoRA, all seven projections, AdamW lr 1e-4, linear
schedule with 5 warmup steps, weight decay 0.01, clip 1.0, 1 epoch, effective batch 16,
max length 2048, seed 42, no system message passed; 400 of 4,500 rows per cell held out
(seed 42). Base weights come from a Hugging Face directory (`hf=DIR`).

  python -m emjax.main --config=configs/sft/em_cell.py:hf=DIR,cell=medical_advice,data=DATA --workdir=runs/em/medical_advice

Variant options (comma separated `key=value`):
  cell        one of the 12 cells, e.g. sports_critique
  hf          the base model: a Hugging Face directory (Llama / Qwen2 / OLMo-2)
  data        a local copy of the dataset: a directory of <cell>.jsonl files in the hub schema
              (question / misaligned_answer / aligned_answer) or of the released chat splits
              (<cell>_strong_eval.jsonl, {"messages": [...]}); empty = read the hub (online)
  answer      misaligned (default) | aligned
  holdout     rows held out for evaluation (400 in the paper)
  micro       per-device micro-batch: grad accumulation = 16 / micro
  cpu         the SmolLM2-135M-Instruct-on-a-laptop variant: seq 256, fp32, held-out eval
  grid        run the grid instead of one cell: 'all' or cells separated by '+', e.g.
              grid=medical_advice+sports_tutor (job sft_grid; a killed sweep resumes)
"""

import ml_collections

from emjax import config as config_lib
from emjax.data import sources


def get_config(arg=None):
  args = config_lib.parse_arg(arg, cell="medical_advice", hf="", data="", answer="misaligned", holdout=400,
                              micro=2, cpu=False, steps=0, grid="")
  c = config_lib.base_config()
  c.job = "train"
  c.init.hf = args.hf
  c.data.tokenizer.update(kind="hf", path=args.hf)
  c.data.update(format="chat", packing="none", truncate=True, seq_len=2048)
  c.data.sources = ml_collections.ConfigDict({args.cell: _cell_source(args)})
  c.lora.update(enabled=True, rank=32, alpha=64.0, rslora=True, dropout=0.0, targets="q,k,v,o,gate,up,down",
                layers="")
  c.train.update(optimizer="adamw", lr=1e-4, schedule="linear", warmup_steps=5, end_lr_fraction=0.0,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0, batch_size=16,
                 grad_accum_steps=max(1, 16 // args.micro), seed=42, epochs=0.0 if args.steps else 1.0,
                 steps=args.steps or 1, log_every=1)
  c.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims")
  c.checkpoint.update(every_steps=50, keep=2)
  c.eval.update(every_steps=0, batches=8, split="eval")
  # The grid runner (job sft_grid): one run per cell under <workdir>/<cell>, complete cells skipped.
  c.grid = dict(cells=args.grid or "all")
  if args.grid:
    c.job = "sft_grid"
  if args.cpu:
    c.data.seq_len = 256
    c.model.update(dtype="float32", remat="none")
    c.train.grad_accum_steps = 4
    c.eval.update(every_steps=10, batches=3)
  return c


def _cell_source(args):
  return sources.default_source_config(kind="structured_em", name=args.cell, path=args.data, answer=args.answer,
                                       weight=1.0, split="train", holdout=args.holdout, holdout_seed=42)
