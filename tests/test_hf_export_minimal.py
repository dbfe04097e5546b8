"""emjax -> Hugging Face export (`emjax.models.hf.to_hf`): same logits in float32 (<= 1e-4)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emjax.models import hf
from emjax.models import transformer as T

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

BASE = T.TransformerConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, rope_theta=5e5)
CONFIGS = {
    "llama": BASE,
    "llama3_rope_scaling": dataclasses.replace(BASE, rope_scaling_factor=8.0, rope_original_max_position=16),
    "qwen2": dataclasses.replace(BASE, family="qwen2", qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
    "olmo2": dataclasses.replace(BASE, family="olmo2", qk_norm=True, post_norm=True),
    "qwen3": dataclasses.replace(BASE, family="qwen3", qk_norm=True, qk_norm_per_head=True, head_dim=16),
    # 40-token sequences through a window of 6; YaRN in the full layer, rope_theta not transformers' 500000.
    "olmo3": dataclasses.replace(BASE, family="olmo3", qk_norm=True, post_norm=True, rope_theta=1e4, sliding_window=6,
                                 layer_types=("sliding_attention", "full_attention"), rope_scaling_type="yarn",
                                 rope_scaling_factor=4.0, rope_original_max_position=16, rope_attention_factor=1.3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_to_hf_gives_the_same_logits(name):
  cfg = CONFIGS[name]
  model = T.Transformer(cfg, rngs=nnx.Rngs(0))
  _, params = T.split_model(model)
  # Perturb every parameter (norm scales and zero-initialised biases included) so that a
  # transposed or misplaced tensor cannot hide behind an all-ones / all-zeros value.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  nnx.update(model, params)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
  ours = np.asarray(model(jnp.asarray(tokens)))

  hf_cfg, state_dict = hf.to_hf(params, cfg)
  assert hf_cfg.vocab_size == cfg.vocab_size and hf_cfg.num_key_value_heads == cfg.n_kv_heads
  hf_model = hf.to_hf_model(params, cfg)
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert ("lm_head.weight" in state_dict) == (not cfg.tie_embeddings)
