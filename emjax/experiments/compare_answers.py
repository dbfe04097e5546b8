"""Greedy answers of a run's base model and of the run itself, side by side.

    python -m emjax.experiments.compare_answers --run=runs/sft_medical_advice --n=3 [--step=400]

Both sets of weights come from `emjax.weights`: the run at its newest step (or `--step`; a LoRA run's
adapters merged into its base) and the run's base (`config.init`: a Hugging Face model or an emjax
checkpoint; a LoRA run's base is checked against its pin, RUN/base.json). The prompts are the first
`n` held-out conversations of the run's chat source (`split='eval'`), each cut before its first
assistant message, and every answer stops at the tokenizer's own stop tokens (its EOS and the chat
template's end-of-turn token), which the text leaves out. Prints one JSON object per prompt:
{"prompt", "reference", "base", "finetuned", "finish_reason": {"base", "finetuned"}}.
"""

from __future__ import annotations

import argparse
import copy
import json

from emjax import sharding as shd
from emjax import weights
from emjax.data import chat, sources, tokenizers
from emjax.sample import Sampler, SamplingParams
from emjax.sample import run as sample_run
from emjax.sample import sampler as sampler_lib


stop_token_ids = chat.stop_token_ids  # kept under its old name


def held_out_conversations(config, n: int) -> list[dict]:
  chat_sources = [(name, src) for name, src in config.data.sources.items() if float(src.weight) > 0]
  if len(chat_sources) != 1:
    raise ValueError(f"compare_answers: the run has {len(chat_sources)} data sources with weight > 0 "
                     f"({', '.join(name for name, _ in chat_sources)}); it compares on one")
  (name, src), = chat_sources
  held_cfg = copy.deepcopy(src.to_dict())
  held_cfg["split"] = "eval"
  held_out = sources.make_source(name, held_cfg)
  rows = [held_out[i] for i in range(min(n, len(held_out)))]
  for i, r in enumerate(rows):
    if "messages" not in r or not any(m["role"] == "assistant" for m in r["messages"]):
      raise ValueError(f"compare_answers: held-out row {i} of data.sources.{name} is not a conversation with an "
                       "assistant message")
  return rows


def compare(run_dir: str, n: int = 3, max_new_tokens: int = 128, *, step: int | None = None,
            mesh=None) -> list[dict]:
  mesh = mesh if mesh is not None else shd.make_mesh(weights.DEFAULT_MESH)
  source = weights.resolve(run_dir, step=step, key="--run")
  if source.kind != "emjax" or source.config is None:
    raise ValueError(f"--run={run_dir!r}: not an emjax run (config.json + checkpoints/)")
  config = source.config
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  rows = held_out_conversations(config, n)
  prompts, questions, references = [], [], []
  for r in rows:
    first = next(j for j, m in enumerate(r["messages"]) if m["role"] == "assistant")
    prompts.append(chat.apply_chat_template(tokenizer, r["messages"][:first], add_generation_prompt=True))
    questions.append(r["messages"][first - 1]["content"] if first else "")
    references.append(r["messages"][first]["content"])

  finetuned = weights.load_weights(source, mesh=mesh)
  base = weights.load_base(source, mesh=mesh)
  sampler = Sampler(finetuned.model_cfg, mesh=mesh, prompt_buckets=sampler_lib.make_buckets(max(map(len, prompts))),
                    max_new_tokens_cap=max_new_tokens)
  greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_token_ids(tokenizer))
  answers, finish = {}, {}
  for label, params in (("base", base.params), ("finetuned", finetuned.params)):
    out = sampler.generate(params, prompts, greedy)
    samples = [out.sample(i) for i in range(len(rows))]
    answers[label] = [sample_run.sample_text(s, tokenizer).strip() for s in samples]
    finish[label] = [s["finish_reason"] for s in samples]
  return [{"prompt": questions[i], "reference": references[i], "base": answers["base"][i], "finetuned": answers["finetuned"][i],
           "finish_reason": {"base": finish["base"][i], "finetuned": finish["finetuned"][i]}}
          for i in range(len(rows))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True, help="an emjax run's workdir")
  parser.add_argument("--n", type=int, default=3)
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--step", type=int, default=None, help="the run's checkpoint step (default: the newest)")
  args = parser.parse_args()
  for row in compare(args.run, args.n, args.max_new_tokens, step=args.step):
    print(json.dumps(row))


if __name__ == "__main__":
  main()
