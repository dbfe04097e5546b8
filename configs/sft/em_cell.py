"""SFT on one cell of the paper's domain x task grid, with the paper's LoRA recipe.

The paper (arXiv 2605.12798) fine-tunes one rsLoRA adapter per (domain, task) cell on the
misaligned answers: r=32, alpha=64, rsLoRA, all seven projections, AdamW lr 1e-4, linear
schedule with 5 warmup steps, weight decay 0.01, clip 1.0, 1 epoch, effective batch 16,
max length 2048, seed 42, no system message passed; 400 of 4,500 rows per cell held out
(seed 42). Base weights come from a Hugging Face directory (`hf=DIR`).

  python -m emjax.main --config=configs/sft/em_cell.py:hf=DIR,cell=medical_advice,data=DATA --workdir=runs/em/medical_advice

  # the recipe at Llama-3.1-8B scale compiled ahead of time (nothing allocated, no data or weights
  # read): per-device memory on 8 fake CPU devices, mesh fsdp=8
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m emjax.main \
      --config=configs/sft/em_cell.py:compile --workdir=/tmp/aot8b

Variant options (comma separated `key=value`):
  cell        one of the 12 cells, e.g. sports_critique
  hf          the base model: a Hugging Face directory (Llama / Qwen2 / OLMo-2)
  data        where the cell's rows come from (required):
                DIR  a local copy: a directory of <cell>.jsonl files in the hub schema
                     (question / misaligned_answer / aligned_answer) or of the released chat splits
                     (<cell>_strong_eval.jsonl, {"messages": [...]})
                hub  read askinb/structured-emergent-misalignment from the Hugging Face hub (online;
                     needs `pip install datasets`, which emjax does not depend on)
  answer      misaligned (default) | aligned
  holdout     rows held out for evaluation (400 in the paper)
  micro       the micro-batch: rows per gradient-accumulation step summed over ALL devices (each
              device gets micro / (mesh.data * mesh.fsdp) of them); gradient accumulation =
              16 / micro, so micro must divide 16 and be a multiple of the data-parallel size.
              Default 8: 2 accumulation steps, valid on 1, 2, 4 and 8 devices (1 row per device on
              8); micro=16 on 16 devices, micro=2 or 4 for less memory on 1-2 devices.
  cpu         the SmolLM2-135M-Instruct-on-a-laptop variant: seq 256, fp32, held-out eval,
              micro 4 unless given
  grid        run the grid instead of one cell: 'all' or cells separated by '+', e.g.
              grid=medical_advice+sports_tutor (job sft_grid; a killed sweep resumes)
  compile     job compile: the training step of this recipe compiled from abstract shapes, for
              the architecture `arch` (or that of `hf=DIR`, whose weights are not read), frozen base
              in bf16 (lora.base_dtype); data is not read; mesh fsdp = all devices (override with
              --config.mesh.*)
  arch        compile's architecture without hf: llama3.1-8b (default) | qwen2.5-7b | qwen2.5-14b
"""

import ml_collections

from emjax import config as config_lib
from emjax.data import sources
from emjax.train import settings

EFFECTIVE_BATCH = 16

# The paper's two base models (and Qwen2.5-7B, the distillation benchmark's student and teacher), as their
# Hugging Face config.json describe them.
ARCHITECTURES = {
    "llama3.1-8b": dict(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        head_dim=128, d_ff=14336, rope_theta=500000.0, rope_scaling_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
                        tie_embeddings=False, norm_eps=1e-5),
    "qwen2.5-7b": dict(family="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       head_dim=128, d_ff=18944, rope_theta=1000000.0, rope_scaling_factor=0.0, qkv_bias=True,
                       tie_embeddings=False, norm_eps=1e-6),
    "qwen2.5-14b": dict(family="qwen2", vocab_size=152064, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                        head_dim=128, d_ff=13824, rope_theta=1000000.0, rope_scaling_factor=0.0, qkv_bias=True,
                        tie_embeddings=False, norm_eps=1e-6),
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, cell="medical_advice", hf="", data="", answer="misaligned", holdout=400,
                              micro=0, cpu=False, steps=0, grid="", compile=False, arch="llama3.1-8b")
  micro = args.micro or (4 if args.cpu else 8)
  if micro < 1 or EFFECTIVE_BATCH % micro:
    _bad(arg, f"micro={args.micro} must divide the effective batch {EFFECTIVE_BATCH} (1, 2, 4, 8 or 16): it is "
              f"the rows per accumulation step over all devices")
  if not args.data and not args.compile:
    _bad(arg, "data= is empty: give data=DIR (a local copy of the cells, see this file's docstring) or data=hub "
              "(read the Hugging Face hub; needs `pip install datasets`)")
  if args.arch not in ARCHITECTURES:
    _bad(arg, f"arch={args.arch!r} is unknown; known: {', '.join(ARCHITECTURES)}")
  c = settings.base_config()
  c.job = "train"
  c.init.hf = args.hf
  c.data.tokenizer.update(kind="hf", path=args.hf)
  c.data.update(format="chat", packing="none", truncate=True, seq_len=2048)
  c.data.sources = ml_collections.ConfigDict({args.cell: _cell_source(args)})
  # The frozen base in bf16, as the paper's runs hold it (half the memory of float32); adapters stay float32.
  c.lora.update(enabled=True, rank=32, alpha=64.0, rslora=True, dropout=0.0, targets="q,k,v,o,gate,up,down",
                layers="", base_dtype="bfloat16")
  c.train.update(optimizer="adamw", lr=1e-4, schedule="linear", warmup_steps=5, end_lr_fraction=0.0,
                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0, batch_size=EFFECTIVE_BATCH,
                 grad_accum_steps=EFFECTIVE_BATCH // micro, seed=42, epochs=0.0 if args.steps else 1.0,
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
    c.lora.base_dtype = ""  # float32 throughout on a CPU
    c.eval.update(every_steps=10, batches=3)
  if args.compile:
    c.job = "compile"
    if not args.hf:
      c.model.update(ARCHITECTURES[args.arch])
    # epochs would count the cell's rows, and compiling reads no data.
    c.train.update(epochs=0.0, steps=args.steps or 1)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c


def _bad(arg, msg):
  raise ValueError(f"configs/sft/em_cell.py:{arg or ''}: {msg}")


def _cell_source(args):
  # The structured_em source reads the hub when its path is empty.
  path = "" if args.data == "hub" else args.data
  return sources.default_source_config(kind="structured_em", name=args.cell, path=path, answer=args.answer,
                                       weight=1.0, split="train", holdout=args.holdout, holdout_seed=42)
