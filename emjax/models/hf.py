"""emjax parameters -> a Hugging Face `transformers` model of the same family (Llama, Qwen2, OLMo-2).

`to_hf(params, model_cfg)` returns the matching `transformers` config and a
`state_dict` of torch tensors, so that `AutoModelForCausalLM.from_config(cfg)`
+ `load_state_dict` gives a model with the same logits (float32: <= 1e-4).

Layout: emjax keeps attention projections per head ([D, H, Dh], [H, Dh, D]) and
dense weights as [in, out]; torch `nn.Linear` stores [out, in], heads flattened
head-major (H*Dh). Both use the same "rotate half" RoPE layout, so no permutation
of q/k is needed. Stacked layers (leading `layers` axis) become `model.layers.{i}`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from emjax.models import transformer


def hf_config(model_cfg: transformer.TransformerConfig, **extra):
  """The `transformers` config describing the same architecture."""
  import transformers

  c = model_cfg
  rope_scaling = None
  if c.rope_scaling_factor:
    rope_scaling = {"rope_type": "llama3", "factor": c.rope_scaling_factor, "low_freq_factor": c.rope_low_freq_factor,
                    "high_freq_factor": c.rope_high_freq_factor,
                    "original_max_position_embeddings": c.rope_original_max_position}
  common = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                head_dim=c.resolved_head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                rope_scaling=rope_scaling, tie_word_embeddings=c.tie_embeddings, hidden_act="silu",
                max_position_embeddings=max(32768, int(c.rope_original_max_position * (c.rope_scaling_factor or 1))),
                # emjax models know nothing of special tokens; the caller sets them (e.g. from the
                # tokenizer). HF's class defaults (Llama eos=2, OLMo-2 eos=50279) would be wrong.
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
  common.update(extra)
  if c.family == "qwen2":
    # HF Qwen2 always has q/k/v biases (zeros when the emjax model has none).
    return transformers.Qwen2Config(**common)
  if c.family == "olmo2":
    return transformers.Olmo2Config(**common)
  # Llama's `attention_bias` also adds an o_proj bias; it is exported as zeros.
  return transformers.LlamaConfig(attention_bias=c.qkv_bias, **common)


def to_hf(params: Mapping[str, Any], model_cfg: transformer.TransformerConfig,
          torch_dtype: str = "float32") -> tuple[Any, dict]:
  """(transformers config, state_dict of torch tensors) for emjax `params` (a nested dict of arrays)."""
  import torch

  c = model_cfg
  dtype = getattr(torch, torch_dtype)
  h, k, dh, d = c.n_heads, c.n_kv_heads, c.resolved_head_dim, c.d_model

  def t(x) -> "torch.Tensor":
    # np.array copies (also out of bf16 / device arrays); torch gets its own contiguous memory.
    return torch.from_numpy(np.array(x, dtype=np.float32)).to(dtype).contiguous()

  sd: dict[str, Any] = {"model.embed_tokens.weight": t(params["embed"]),
                        "model.norm.weight": t(params["final_norm"]["scale"])}
  if not c.tie_embeddings:
    sd["lm_head.weight"] = t(np.asarray(params["lm_head"]).T)
  layers = params["layers"]
  attn, mlp = layers["attn"], layers["mlp"]
  for i in range(c.n_layers):
    p = f"model.layers.{i}."
    sd[p + "self_attn.q_proj.weight"] = t(np.asarray(attn["q_proj"][i]).reshape(d, h * dh).T)
    sd[p + "self_attn.k_proj.weight"] = t(np.asarray(attn["k_proj"][i]).reshape(d, k * dh).T)
    sd[p + "self_attn.v_proj.weight"] = t(np.asarray(attn["v_proj"][i]).reshape(d, k * dh).T)
    sd[p + "self_attn.o_proj.weight"] = t(np.asarray(attn["o_proj"][i]).reshape(h * dh, d).T)
    has_bias = c.qkv_bias or c.family == "qwen2"
    if has_bias:
      for name, heads in (("q", h), ("k", k), ("v", k)):
        bias = attn[f"{name}_bias"][i] if c.qkv_bias else np.zeros((heads, dh), np.float32)
        sd[p + f"self_attn.{name}_proj.bias"] = t(np.asarray(bias).reshape(heads * dh))
    if c.family == "llama" and c.qkv_bias:
      sd[p + "self_attn.o_proj.bias"] = t(np.zeros((d,), np.float32))
    if c.qk_norm:
      sd[p + "self_attn.q_norm.weight"] = t(np.asarray(attn["q_norm"][i]).reshape(h * dh))
      sd[p + "self_attn.k_norm.weight"] = t(np.asarray(attn["k_norm"][i]).reshape(k * dh))
    sd[p + "mlp.gate_proj.weight"] = t(np.asarray(mlp["gate_proj"][i]).T)
    sd[p + "mlp.up_proj.weight"] = t(np.asarray(mlp["up_proj"][i]).T)
    sd[p + "mlp.down_proj.weight"] = t(np.asarray(mlp["down_proj"][i]).T)
    attn_norm = t(layers["attn_norm"]["scale"][i])
    mlp_norm = t(layers["mlp_norm"]["scale"][i])
    if c.post_norm:  # OLMo-2: the norms apply to each sub-layer's output
      sd[p + "post_attention_layernorm.weight"] = attn_norm
      sd[p + "post_feedforward_layernorm.weight"] = mlp_norm
    else:
      sd[p + "input_layernorm.weight"] = attn_norm
      sd[p + "post_attention_layernorm.weight"] = mlp_norm
  return hf_config(c), sd


def to_hf_model(params: Mapping[str, Any], model_cfg: transformer.TransformerConfig,
                torch_dtype: str = "float32", attn_implementation: str = "sdpa"):
  """A ready `transformers` causal LM (eval mode, CPU) holding the same weights."""
  import torch
  import transformers

  cfg, sd = to_hf(params, model_cfg, torch_dtype)
  cfg._attn_implementation = attn_implementation  # pylint: disable=protected-access
  model = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, torch_dtype))
  missing, unexpected = model.load_state_dict(sd, strict=False)
  # A tied head is not in the state dict; it follows the embedding.
  missing = [m for m in missing if not (m == "lm_head.weight" and model_cfg.tie_embeddings)]
  if missing or unexpected:
    raise ValueError(f"to_hf_model: state_dict mismatch: missing {missing}, unexpected {unexpected}")
  return model.eval()
