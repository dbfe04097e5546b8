"""Greedy answers of a base model and of its LoRA fine-tune, side by side.

    python -m emjax.experiments.compare_answers --run=runs/sft_medical_advice --n=3

Reads the run's config.json (base model from `init.hf`, LoRA settings, data source), takes the
first `n` held-out conversations of its source (`split='eval'`), and answers each user turn
greedily with the base weights and with base + the run's latest adapters merged. Prints one
JSON object per prompt: {"prompt", "reference", "base", "finetuned"}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import orbax.checkpoint as ocp


def compare(run_dir: str, n: int = 3, max_new_tokens: int = 128) -> list[dict]:
  from emjax import config as config_lib
  from emjax.data import chat, sources, tokenizers
  from emjax.models import hf, lora, transformer
  from emjax.sample import Sampler, SamplingParams
  from emjax.train import checkpoint as ckpt_lib

  config = config_lib.load_config_json(run_dir)
  model_cfg = transformer.TransformerConfig.from_config(config.model)
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  base = hf.load_hf_params(config.init.hf, model_cfg)
  steps = ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=0).steps()
  if not steps:
    raise FileNotFoundError(f"{run_dir}: no checkpoint to compare with")
  saved = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(run_dir, "checkpoints", str(steps[-1]), "state")))
  lora_cfg = lora.LoRAConfig.from_config(config.lora)
  from emjax.train.state import merge_trees
  finetuned = lora.merge_lora(merge_trees(base, saved["params"]), lora_cfg)

  (name, src), = config.data.sources.items()
  held_cfg = copy.deepcopy(src.to_dict())
  held_cfg["split"] = "eval"
  held_out = sources.make_source(name, held_cfg)
  rows = [held_out[i] for i in range(min(n, len(held_out)))]
  prompts = [chat.apply_chat_template(tokenizer, [m for m in r["messages"] if m["role"] != "assistant"][:1],
                                      add_generation_prompt=True) for r in rows]
  sampler = Sampler(model_cfg, prompt_buckets=(256, 512), max_new_tokens_cap=max_new_tokens)
  greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                          stop_token_ids=(tokenizer.eos_id,))
  answers = {}
  for label, params in (("base", base), ("finetuned", finetuned)):
    out = sampler.generate(params, prompts, greedy)
    answers[label] = [tokenizer.decode(out.sample(i)["tokens"]).replace("<|im_end|>", "").strip()
                      for i in range(len(rows))]
  return [{"prompt": r["messages"][0]["content"], "reference": r["messages"][1]["content"],
           "base": answers["base"][i], "finetuned": answers["finetuned"][i]} for i, r in enumerate(rows)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True)
  parser.add_argument("--n", type=int, default=3)
  parser.add_argument("--max_new_tokens", type=int, default=128)
  args = parser.parse_args()
  for row in compare(args.run, args.n, args.max_new_tokens):
    print(json.dumps(row))


if __name__ == "__main__":
  main()
