"""Sample continuations of a JSONL file of prompts from a trained checkpoint or a Hugging Face model.

  python -m emjax.main --config=configs/sample.py --workdir=/tmp/samples \\
      --config.sample.checkpoint=/tmp/tiny --config.prompts=prompts.jsonl \\
      [--config.sample.temperature=0.7 --config.sample.n=4 --config.sample.stop_token_ids='(5,7)']

Prompts: one JSON object per line, `{"id": ..., "prompt": "text"}` or
`{"id": ..., "messages": [{"role": "user", "content": ...}, ...]}` (messages need
`sample.chat_template=True` and a Hugging Face tokenizer). Output:
`WORKDIR/samples.jsonl`, one line per (prompt id, sample index); a rerun skips
prompts already written.

With `--config.sample.hf=DIR` (instead of `sample.checkpoint`) the model, its architecture
and its tokenizer come from the Hugging Face directory.

The architecture and tokenizer come from the checkpoint's workdir
(`config.json`): `config.model` and `config.data.tokenizer` default to None,
"the checkpoint's". A non-architectural model key (dtype, param_dtype,
attention, ...) set here always overrides the checkpoint's, even when set to
its default (see `emjax.sample.run`).

Variants (`:arg`): `greedy` (temperature 0), `smoke` (short outputs, small batches).
"""

from ml_collections import config_dict

from emjax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, greedy=False, smoke=False)
  c = config_lib.base_config()
  c.job = "sample"
  # None = the checkpoint's; typed placeholders, so `--config.model.dtype=float32` still parses.
  c.model = {k: config_dict.placeholder(type(v)) for k, v in c.model.items()}
  c.data.tokenizer = {k: config_dict.placeholder(type(v)) for k, v in c.data.tokenizer.items()}
  c.prompts = ""  # JSONL: {"id", "prompt"} or {"id", "messages"} per line
  c.sample = dict(
      checkpoint="",  # a training workdir, its checkpoints/ dir, or one step dir (LoRA runs: merged into their base)
      hf="",  # or: a Hugging Face model directory / hub id (architecture and tokenizer from it)
      step=-1,  # checkpoint step to load; -1 = the latest readable one
      output="samples.jsonl",  # relative to --workdir
      # What to sample.
      n=1,  # samples per prompt
      max_new_tokens=256,
      max_new_tokens_cap=0,  # static output size (0 = max_new_tokens); larger avoids recompiles across runs
      temperature=1.0,  # 0 = greedy
      top_k=0,  # 0 = off
      top_p=1.0,  # 1 = off
      min_p=0.0,  # 0 = off
      seed=0,
      stop_token_ids=(),  # stop ids in addition to the tokenizer's EOS
      stop_at_eos=True,
      top_logprobs=0,  # also write the k most likely tokens and their log-probs at each step (0 = off)
      # Prompt formatting.
      chat_template=False,  # apply the HF tokenizer's chat template (add_generation_prompt=True)
      add_bos=True,  # prepend BOS to plain prompts (pretraining puts BOS before every document)
      # Shapes and memory.
      batch_size=32,  # prompts per batch (rows decoded together = batch_size * n)
      prefill_chunk=0,  # prefill in sub-batches of this many prompts (0 = whole batch)
      max_prompt_length=1024,  # longer prompts are an error
      prompt_buckets=(),  # static prompt lengths; () = powers of two from 16 up to max_prompt_length
      unroll_layers=True,  # decode with unrolled layers (faster per step; longer compile)
  )
  if args.greedy:
    c.sample.temperature = 0.0
  if args.smoke:
    c.sample.update(max_new_tokens=16, batch_size=4, max_prompt_length=128)
  return c
