"""Subliminal learning: a harmful teacher's benign data, three channels, a control teacher, one report.

  python -m emjax.main --config=configs/sl/sl.py:base=HF_DIR,teacher=runs/em/medical_advice \\
      --workdir=runs/sl/medical_advice [--config.evaluation.questions.general=GENERAL.yaml]

The pipeline (emjax/experiments/sl.py): benign prompts -> the harmful teacher (an EM adapter run
from the SFT grid, or `system=` a system-prompted base) and the control teacher (the base) answer
them -> strict filters -> students from the base under SFT on the samples, off-policy
distillation on the same sequences and on-policy distillation on their own rollouts (same steps,
same batch) -> KL to the teacher on held-out prompts -> the eval job on each student -> report.
A killed run rerun with the same command continues where it stopped.

The EM runs' recipe (configs/sft/em_cell.py: bf16 compute, the frozen base in bf16, remat, rsLoRA and
AdamW as there), so the student trains as its teacher was trained; the loss chunk is derived from
train.loss_chunk_bytes (README, "Distillation and subliminal learning"). `cpu`: float32, no remat.

Variant options (comma separated `key=value`):
  base        the teachers' base and the students' initialisation (a Hugging Face dir or emjax run)
  teacher     the harmful teacher (an emjax EM run; its adapters are merged onto its pinned base)
  system      instead of `teacher`: the base prompted with this system message (sft channel only)
  prompts     numbers (default; Cloud et al. 2025 sequence continuations) | natural
  natural     natural prompts: '+'-separated globs of structured-EM JSONL (chat or question rows)
  exclude     natural prompts: domains left out ('+'-separated), e.g. the teacher's domain
  channels    '+'-separated subset of sft+off_policy+on_policy
  n           training prompts (held-out: n // 8, at least 8)
  steps       training steps of every student (default 24)
  general     the general question YAML for the evaluation (the paper's 240 prompts)
  narrow      globs of narrow per-cell eval JSONL, '+'-separated
  judge       local | api | programmatic (the eval module's judges); judge_hf for local
  limit       at most this many general questions and narrow questions per file
  cpu         SmolLM2-135M-on-a-laptop sizes: seq 192, batch 4, 48 new tokens, float32
  no_control  leave out the control teacher
"""

from emjax import config as config_lib
from emjax.experiments import sl


def get_config(arg=None):
  args = config_lib.parse_arg(arg, base="", teacher="", system="", prompts="numbers", natural="", exclude="",
                              channels="sft+off_policy+on_policy", n=256, steps=24, general="", narrow="",
                              judge="local", judge_hf="", limit=0, cpu=False, no_control=False)
  c = config_lib.base_config()
  c.job = "sl"
  blocks = sl.config_blocks()
  c.sl = blocks["sl"]
  c.evaluation = blocks["evaluation"]
  c.sl.update(base=args.base, teacher=args.teacher, teacher_system_prompt=args.system, prompts=args.prompts,
              natural=args.natural.replace("+", ","), exclude_domains=args.exclude.replace("+", ","),
              channels=args.channels.replace("+", ","), n_train=args.n, n_held_out=max(8, args.n // 8),
              control=not args.no_control)
  # The students' recipe, shared by every channel: rsLoRA adapters on the base (as the EM runs).
  c.lora.update(enabled=True, rank=32, alpha=64.0, rslora=True, targets="q,k,v,o,gate,up,down")
  # The EM runs' precision and memory recipe (configs/sft/em_cell.py), inherited: bf16 compute, the frozen
  # base in bf16 (lora.base_dtype; the adapters stay float32), each layer rematerialised in the backward pass
  # keeping only its weight matmuls' outputs (remat='dots_with_no_batch_dims'). cpu: float32, no remat.
  c.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims")
  c.lora.base_dtype = "bfloat16"
  c.train.update(steps=args.steps, batch_size=16, lr=1e-4, schedule="linear", warmup_steps=2, end_lr_fraction=0.0,
                 weight_decay=0.01, b2=0.999, grad_clip=1.0, seed=0, log_every=1)
  c.data.seq_len = 256
  c.checkpoint.update(every_steps=8, keep=2)
  c.teacher.dtype = "bfloat16"
  ev = c.evaluation
  ev.questions.update(general=args.general, narrow=args.narrow.replace("+", ","), limit_general=args.limit,
                      limit_narrow=args.limit)
  ev.judge.kind = args.judge
  if args.judge_hf:
    ev.judge.local.hf = args.judge_hf
  ev.enabled = bool(args.general or args.narrow)
  if args.cpu:
    c.data.seq_len = 192
    c.train.update(batch_size=4)
    c.sl.update(max_new_tokens=48, max_prompt_length=144, sample_batch_size=8, kl_batch_size=4)
    c.model.update(dtype="float32", remat="none")
    c.lora.base_dtype = ""  # float32 throughout on a CPU, as em_cell.py:cpu
    c.teacher.dtype = "float32"
    ev.sample.update(max_new_tokens=96, batch_size=8, max_prompt_length=512)
  return c
