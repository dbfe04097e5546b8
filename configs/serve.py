"""An OpenAI-compatible server for a model emjax loads (emjax/sample/serve.py).

  python -m emjax.main --config=configs/serve.py:hf=HF_DIR --workdir=/tmp/serve
  python -m emjax.main --config=configs/serve.py:checkpoint=RUN --workdir=/tmp/serve --config.serve.port=8001
  python -m emjax.main --config=configs/serve.py:hf=BASE --workdir=/tmp/serve \\
      --config.serve.adapters=medical=PEFT_DIR_1,sports=PEFT_DIR_2      # adapters side by side

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`, model id the
directory's name (or `--config.serve.model_name`). The sampling defaults of a request are OpenAI's;
`config.sample` sets the model, its prompt lengths (`max_prompt_length`), the longest answer
(`max_new_tokens`, the cap of `max_tokens`), the stop ids always applied (EOS, end of turn) and the
chat template.
"""

from ml_collections import config_dict

from emjax import config as config_lib
from emjax.sample import run as sample_run
from emjax.sample import serve
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, hf="", checkpoint="")
  c = settings.base_config()
  c.job = "serve"
  c.model = {k: config_dict.placeholder(type(v)) for k, v in c.model.items()}
  c.data.tokenizer = {k: config_dict.placeholder(type(v)) for k, v in c.data.tokenizer.items()}
  c.sample = sample_run.sample_block()
  c.sample.update(hf=args.hf, checkpoint=args.checkpoint, chat_template=True, stop_at_end_of_turn=True, max_new_tokens=512,
                  max_prompt_length=2048, top_logprobs=serve.MAX_TOP_LOGPROBS)
  c.serve = serve.serve_block()
  return c
