"""Pretrain a tiny Llama-style model from scratch on a mixture of built-in synthetic sources.

The main job: runs offline on a CPU in a couple of minutes.

  python -m emjax.main --config=configs/pretrain/tiny.py --workdir=/tmp/tiny

Variants (`:arg`, comma separated):
  mix=balanced|arithmetic_heavy|grammar_heavy|sorting_heavy   the pretraining-composition ablation
  steps=N            train for N steps (default 300; 20 with smoke)
  smoke              a smaller, shorter model for tests and quick checks

Single weights can also be set directly: `--config.data.sources.grammar.weight=0.1`.
"""

from emjax import config as config_lib
from emjax.train import settings

MIXES = {
    "balanced": dict(arithmetic=1 / 3, grammar=1 / 3, sorting=1 / 3),
    "arithmetic_heavy": dict(arithmetic=0.8, grammar=0.1, sorting=0.1),
    "grammar_heavy": dict(arithmetic=0.1, grammar=0.8, sorting=0.1),
    "sorting_heavy": dict(arithmetic=0.1, grammar=0.1, sorting=0.8),
}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, mix="balanced", steps=0, smoke=False)
  if args.mix not in MIXES:
    raise ValueError(f"configs/pretrain/tiny.py: unknown mix {args.mix!r}; choose from {sorted(MIXES)}")
  c = settings.base_config()
  c.model.update(family="llama", vocab_size=384, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=384, rope_theta=10000.0, tie_embeddings=True)
  c.data.seq_len = 128
  c.data.tokenizer.kind = "byte"
  for name, weight in MIXES[args.mix].items():
    c.data.sources[name].weight = weight
  c.train.update(steps=args.steps or 300, batch_size=16, lr=3e-3, warmup_steps=20, weight_decay=0.1, log_every=10)
  c.checkpoint.update(every_steps=100, keep=2)
  if args.smoke:
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
    c.data.seq_len = 32
    c.train.update(steps=args.steps or 20, batch_size=8, warmup_steps=2, log_every=1)
    c.checkpoint.update(every_steps=5, keep=3)
  return c
