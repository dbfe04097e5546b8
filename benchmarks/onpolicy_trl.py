"""Peer timing for on-policy distillation: one TRL `GKDTrainer` iteration on the CPU.

The peer half of emjax's on-policy distillation benchmark. TRL's GKDTrainer with lmbda=1 (every step is
on-policy: the student samples completions from its current weights), seq_kd=False, the given beta: per
step it

  1. samples `--completion_tokens` new tokens per prompt with the student (`model.generate`, KV cache on),
  2. runs the teacher forward (no grad) and the student forward on prompt + completion,
  3. takes the generalized JSD(beta) over the full vocabulary on the completion positions, backward,
     gradient clipping (max_grad_norm 1.0, the Trainer's default) and one AdamW step.

Matched work: GKDTrainer builds its own `GenerationConfig` (max_new_tokens, temperature, do_sample=True,
top_k=0, top_p=1.0, use_cache, pad_token_id, and the model's eos_token_id) in `__init__` and hands it to
`model.generate` unchanged, so this script sets `min_new_tokens = max_new_tokens = T` on that config after
construction: the EOS token is suppressed until T tokens, every row generates exactly T tokens and every
completion position is in the loss (checked per step and reported as `completion_tokens_generated`).

The dataset is B*(W+N) conversational rows {"messages": [user, assistant]} formatted with the model's chat
template; the templated prompt (add_generation_prompt=True) is exactly `--prompt_tokens` tokens where the
tokenizer allows it (the prompt the collator actually hands to `generate` is measured and reported). The
dataset's assistant turn is never trained on (on-policy completions replace it) but the Trainer counts its
label tokens as `num_items_in_batch`, which GKDTrainer divides the summed JSD by; the assistant turn is sized
so that count is B*T, making the loss the per-token mean over the B*T generated tokens (reported as
`num_items_in_batch`).

Timing: a TrainerCallback times each optimizer step (on_step_begin -> on_step_end, time.perf_counter); the
student's sampling (`GKDTrainer.generate_on_policy_outputs`, i.e. `model.generate` + masks) and the teacher
forward are timed inside it; `rest` = step - generate (teacher forward + student forward/backward + optimizer).
`--warmup` steps are run and dropped. Gradient checkpointing (TRL's default is on, which also turns the KV
cache off in generation) is off unless `--gradient_checkpointing`; fp32 (bf16/fp16 off), use_cpu, no eval,
no saving, no logging, report_to none, 0 dataloader workers. Fully offline: local directories only.

On a shared CPU keep `--threads` at or below the idle cores: with more OpenMP threads than free cores torch's
kernels slow down many-fold (measured: 2 threads at load ~7 on 2 cores was 6x slower than 1 thread), so the
1-minute load average at the start and end of training is reported with the timings.

  python benchmarks/onpolicy_trl.py --model /path/to/SmolLM2-135M-Instruct --batch 4 --prompt_tokens 64 \
      --completion_tokens 32 --beta 0.5 --warmup 1 --iterations 3 --threads 2 [--json out.json]

Prints one JSON object (and writes it to --json if given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SENTENCE = ("The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill "
            "and the farmers count their sheep before the winter arrives. ")
ANSWER = ("Sure, here is a short answer that talks about foxes, dogs, rivers, mills, farmers, sheep and "
          "the coming of winter in a calm and friendly tone. ")


def _fit_text(tok, base: str, n_tokens: int, measure) -> tuple[str, int]:
  """The longest prefix (in tokens) of `base` repeated whose measure(text) is n_tokens, or the closest."""
  ids = tok((base * (n_tokens // 8 + 4)), add_special_tokens=False)["input_ids"]
  best = None
  lo, hi = 0, len(ids)
  # measure is monotone in the prefix length up to retokenization at the cut; bisect then scan nearby.
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if measure(tok.decode(ids[:mid])) <= n_tokens:
      lo = mid
    else:
      hi = mid - 1
  for k in range(max(0, lo - 4), min(len(ids), lo + 5) + 1):
    text = tok.decode(ids[:k])
    m = measure(text)
    key = (abs(m - n_tokens), m > n_tokens)
    if best is None or key < best[0]:
      best = (key, text, m)
    if m == n_tokens:
      break
  return best[1], best[2]


def build_dataset(tok, n_rows: int, prompt_tokens: int, completion_tokens: int):
  from datasets import Dataset

  def prompt_len(user_text):
    return len(tok.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"])

  rows, prompt_lens = [], []
  empty = prompt_len("")
  for i in range(n_rows):
    lead = f"Note {i}. " if prompt_tokens > empty + 8 else ""
    body, plen = _fit_text(tok, SENTENCE, prompt_tokens, lambda t, lead=lead: prompt_len(lead + t))
    user = lead + body
    prompt_lens.append(plen)
    rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ""}]})

  # Size the assistant turn so the collator's label count (assistant tokens + "<|im_end|>\n" etc.) is T.
  prompt0 = tok.apply_chat_template(rows[0]["messages"][:1], add_generation_prompt=True, tokenize=False)
  def label_len(answer_text):
    full = tok.apply_chat_template([rows[0]["messages"][0], {"role": "assistant", "content": answer_text}],
                                   tokenize=False)
    return len(tok(full, add_special_tokens=False)["input_ids"]) - len(tok(prompt0, add_special_tokens=False)["input_ids"])
  answer, _ = _fit_text(tok, ANSWER, completion_tokens, label_len)
  for r in rows:
    r["messages"][1]["content"] = answer
  return Dataset.from_list(rows), prompt_lens


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="Hugging Face model directory (student; teacher too by default)")
  ap.add_argument("--teacher", default=None, help="teacher model directory (default: --model)")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt_tokens", type=int, default=64)
  ap.add_argument("--completion_tokens", type=int, default=32)
  ap.add_argument("--beta", type=float, default=0.5)
  ap.add_argument("--temperature", type=float, default=1.0,
                  help="sampling temperature (GKDTrainer does NOT apply it to the loss's logits)")
  ap.add_argument("--iterations", type=int, default=3, help="timed steps")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
  ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
  ap.add_argument("--learning_rate", type=float, default=1e-6)
  ap.add_argument("--gradient_checkpointing", action="store_true",
                  help="TRL's default; off here (it also disables the KV cache during generation)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=None, help="also write the result to this path")
  args = ap.parse_args(argv)

  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  import trl
  try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
  except ImportError:  # older TRL
    from trl import GKDConfig, GKDTrainer
  transformers.logging.set_verbosity_error()

  torch.manual_seed(args.seed)
  teacher_dir = args.teacher or args.model
  tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  student = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
  teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, local_files_only=True)

  B, P, T = args.batch, args.prompt_tokens, args.completion_tokens
  steps = args.warmup + args.iterations
  dataset, prompt_lens = build_dataset(tok, B * steps, P, T)

  out_dir = tempfile.mkdtemp(prefix="onpolicy_trl_")
  config = GKDConfig(
      output_dir=out_dir, lmbda=1.0, beta=args.beta, temperature=args.temperature, max_new_tokens=T,
      seq_kd=False, per_device_train_batch_size=B, gradient_accumulation_steps=1,
      learning_rate=args.learning_rate, max_steps=steps, num_train_epochs=1, lr_scheduler_type="constant",
      warmup_steps=0, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
      disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
      gradient_checkpointing=args.gradient_checkpointing, max_length=max(1024, P + T + 16), seed=args.seed,
      data_seed=args.seed)

  gen_s, teacher_s, gen_lens, losses, n_items, prompt_widths = [], [], [], [], [], []

  class TimedGKDTrainer(GKDTrainer):

    def generate_on_policy_outputs(self, model, inputs, generation_config):  # pylint: disable=arguments-differ
      prompt_widths.append(int(inputs["prompts"].shape[1]))
      t0 = time.perf_counter()
      ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
      gen_s.append(time.perf_counter() - t0)
      width = inputs["prompts"].shape[1]
      gen_lens.append([int(ids.shape[1] - width)] + mask[:, width:].sum(1).tolist())
      return ids, mask, labels

    def training_step(self, model, inputs, num_items_in_batch=None):
      loss = super().training_step(model, inputs, num_items_in_batch)
      losses.append(float(loss))
      n_items.append(None if num_items_in_batch is None else int(num_items_in_batch))
      return loss

  step_s, _t = [], {}

  class StepTimer(TrainerCallback):

    def on_step_begin(self, args_, state, control, **kw):
      _t["t0"] = time.perf_counter()

    def on_step_end(self, args_, state, control, **kw):
      step_s.append(time.perf_counter() - _t["t0"])

  trainer = TimedGKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                            processing_class=tok, callbacks=[StepTimer()])
  # Exactly T new tokens per row: suppress EOS until T (GKDTrainer passes this config to generate as is).
  trainer.generation_config.min_new_tokens = T
  trainer.generation_kwargs["min_new_tokens"] = T

  t_teacher = {}
  tm = trainer.teacher_model
  tm.register_forward_pre_hook(lambda m, a: t_teacher.__setitem__("t0", time.perf_counter()))
  tm.register_forward_hook(lambda m, a, o: teacher_s.append(time.perf_counter() - t_teacher["t0"]))

  load_start = os.getloadavg()[0]
  trainer.train()

  assert len(step_s) == steps and len(gen_s) == steps, (len(step_s), len(gen_s))
  w = args.warmup
  timed_steps, timed_gen, timed_teacher = step_s[w:], gen_s[w:], teacher_s[w:]
  rest = [s - g for s, g in zip(timed_steps, timed_gen)]
  gen_counts = sorted({n for row in gen_lens for n in row})
  result = {
      "peer": "trl.GKDTrainer",
      "trl_version": trl.__version__,
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
      "batch": B,
      "prompt_tokens": P,
      "prompt_tokens_actual": sorted(set(prompt_widths)),
      "prompt_tokens_dataset": sorted(set(prompt_lens)),
      "completion_tokens": T,
      "completion_tokens_generated": gen_counts,
      "beta": args.beta,
      "lmbda": 1.0,
      "temperature": args.temperature,
      "loss_temperature": 1.0,
      "iterations": args.iterations,
      "warmup": args.warmup,
      "step_s_median": statistics.median(timed_steps),
      "step_s_all": timed_steps,
      "generate_s_median": statistics.median(timed_gen),
      "generate_s_all": timed_gen,
      "rest_s_median": statistics.median(rest),
      "teacher_forward_s_median": statistics.median(timed_teacher) if timed_teacher else None,
      "losses": losses,
      "num_items_in_batch": sorted(set(n_items), key=lambda x: (x is None, x)),
      "gradient_checkpointing": args.gradient_checkpointing,
      "max_grad_norm": config.max_grad_norm,
      "optimizer": getattr(config.optim, "value", str(config.optim)),
      "learning_rate": args.learning_rate,
      "threads": torch.get_num_threads(),
      "device": "cpu",
      "loadavg_1m_start_end": [load_start, os.getloadavg()[0]],
      "model": os.path.abspath(args.model),
      "teacher": os.path.abspath(teacher_dir),
  }
  line = json.dumps(result)
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      f.write(line + "\n")
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
