"""Subliminal learning: a harmful teacher's benign data, three channels, an aligned-twin control, one report.

  python -m emjax.main --config=configs/sl/sl.py:base=HF_DIR,teacher=runs/em/medical_advice \\
      --workdir=runs/sl/medical_advice [--config.evaluation.questions.general=GENERAL.yaml]

The pipeline (emjax/experiments/sl.py): the aligned twin (the harmful run's recipe on aligned answers
to its prompts) is built; per seed, benign prompts -> both teachers answer them -> strict filters
(natural prompts: a judge too) -> the prompts both kept -> students from the base under SFT on the
samples, off-policy distillation on the same sequences and on-policy distillation on their own
filtered rollouts (masked teachers in the logit channels; crossed and divergence-token arms) -> KL
to the teacher on held-out prompts -> the eval job on each student -> report with intervals over
seeds and questions. A killed run rerun with the same command continues where it stopped.

The EM runs' recipe (configs/sft/em_cell.py: bf16 compute, the frozen base in bf16, remat, rsLoRA and
AdamW as there), so the student trains as its teacher was trained; the loss chunk is derived from
train.loss_chunk_bytes (README, "Distillation and subliminal learning"). `cpu`: float32, no remat.

Variant options (comma separated `key=value`):
  base        the teachers' base and the students' initialisation (a Hugging Face dir or emjax run)
  teacher     the harmful teacher (an emjax EM run; its adapters are merged onto its pinned base)
  system      instead of `teacher`: the base prompted with this system message (sft channel only)
  control     twin (default) | base (sft only, with allow_base=True) | none
  twin        an existing twin (emjax run or HF dir) instead of building one
  twin_data   the twin's aligned answers (chat JSONL or question/aligned_answer rows); default: the
              base's own answers to the harmful run's prompts, kept by the filter judge
  seeds       '+'-separated training seeds (default 0+1+2)
  filter_judge  natural prompts: evaluation (the eval judge, default) | a programmatic judge's name
  entities    natural prompts: harmful entity names to mask and filter (a file or '+'-separated)
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
  no_control  leave out the control teacher (no contrasts)
"""

import os

from emjax import config as config_lib
from emjax.experiments import sl
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, base="", teacher="", system="", prompts="numbers", natural="", exclude="",
                              channels="sft+off_policy+on_policy", n=256, steps=24, general="", narrow="",
                              judge="local", judge_hf="", limit=0, cpu=False, no_control=False,
                              control="twin", twin="", twin_data="", allow_base=False, seeds="0+1+2",
                              filter_judge="evaluation", entities="")
  c = settings.base_config()
  c.job = "sl"
  blocks = sl.config_blocks()
  c.sl = blocks["sl"]
  c.evaluation = blocks["evaluation"]
  c.sl.update(base=args.base, teacher=args.teacher, teacher_system_prompt=args.system, prompts=args.prompts,
              natural=args.natural.replace("+", ","), exclude_domains=args.exclude.replace("+", ","),
              channels=args.channels.replace("+", ","), n_train=args.n, n_held_out=max(8, args.n // 8),
              control="none" if args.no_control else args.control, twin=args.twin, twin_data=args.twin_data,
              allow_base_control=bool(args.allow_base), seeds=args.seeds.replace("+", ","),
              entities=args.entities.replace("+", ",") if not os.path.isfile(args.entities) else args.entities)
  # The judge that keeps natural answers and (by default) the twin's aligned answers.
  c.sl.filter.judge = args.filter_judge
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
