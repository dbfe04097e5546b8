"""A Llama-3.2-1B-shaped model (1.24B parameters): for ahead-of-time compilation and accelerators.

  # compile the training step for 8 fake CPU devices and print the memory per device
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m emjax.main \
      --config=configs/pretrain/llama_1b.py:compile --workdir=/tmp/aot1b

Variants: `compile` (job=compile on the data=2, fsdp=2, tensor=2 mesh), `seq=N`, `batch=N`.
"""

from emjax import config as config_lib
from emjax.train import settings


def get_config(arg=None):
  args = config_lib.parse_arg(arg, compile=False, seq=2048, batch=16)
  c = settings.base_config()
  c.model.update(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                 head_dim=64, d_ff=8192, rope_theta=500000.0, rope_scaling_factor=32.0,
                 rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
                 tie_embeddings=True, dtype="bfloat16", remat="dots_with_no_batch_dims")
  c.data.seq_len = args.seq
  c.train.update(batch_size=args.batch, lr=3e-4, warmup_steps=200, steps=10000)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  if args.compile:
    c.job = "compile"
    c.mesh.update(data=2, fsdp=2, tensor=2)
  return c
