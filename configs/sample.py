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
from emjax.sample import run as sample_run
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, greedy=False, smoke=False)
  c = settings.base_config()
  c.job = "sample"
  # None = the checkpoint's; typed placeholders, so `--config.model.dtype=float32` still parses.
  c.model = {k: config_dict.placeholder(type(v)) for k, v in c.model.items()}
  c.data.tokenizer = {k: config_dict.placeholder(type(v)) for k, v in c.data.tokenizer.items()}
  c.prompts = ""  # JSONL: {"id", "prompt"} or {"id", "messages"} per line
  c.sample = sample_run.sample_block()
  if args.greedy:
    c.sample.temperature = 0.0
  if args.smoke:
    c.sample.update(max_new_tokens=16, batch_size=4, max_prompt_length=128)
  return c
