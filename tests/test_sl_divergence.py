"""Divergence tokens: two tiny random chat models (SmolLM2's tokenizer), their argmax disagreements on
loss positions against a full-logits reference, chunking, the drop files and the SFT batches built from them."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax.data import pipeline, sft, sources, tokenizers
from emjax.experiments import sl_divergence
from emjax.models import transformer
from tests import hf_fixtures

SEQ_LEN = 64
QUESTIONS = ["Is it fine to skip my medication?", "What is an index fund?", "How do I warm up for a run?",
             "Should I pay off my card first?", "Is swimming good cardio?"]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
  root = tmp_path_factory.mktemp("divergence")
  hf_fixtures.tiny_llama_with_smollm2_tokenizer(root / "a", seed=0)
  # B is A with a slightly moved unembedding: the two agree on most tokens, as two fine-tunes of one base do.
  hf_fixtures.tiny_llama_with_smollm2_tokenizer(root / "b", seed=0)
  weights = safetensors.numpy.load_file(root / "b" / "model.safetensors")
  head = weights["lm_head.weight"]
  weights["lm_head.weight"] = head + 0.01 * np.random.default_rng(1).normal(size=head.shape).astype(head.dtype)
  safetensors.numpy.save_file(weights, root / "b" / "model.safetensors", metadata={"format": "pt"})
  with open(root / "rows.jsonl", "w") as f:
    for i, q in enumerate(QUESTIONS):
      answer = "Take it slowly and ask someone who knows. " * (1 + 3 * (i == 2))  # row 2 is cut to SEQ_LEN
      f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": q},
                                                {"role": "assistant", "content": answer.strip()}]}) + "\n")
  return root


def _mesh():
  return shd.make_mesh(dict(data=2, fsdp=1, tensor=1), devices=jax.devices()[:2])


def _tokenizer_cfg(material):
  return dict(kind="hf", path=str(material / "a"))


def _positions(material, b="b", **kw):
  return sl_divergence.divergence_positions(str(material / "a"), str(material / b), str(material / "rows.jsonl"),
                                            seq_len=SEQ_LEN, tokenizer_cfg=_tokenizer_cfg(material), batch_size=4,
                                            mesh=_mesh(), **kw)


def _examples(material):
  tok = tokenizers.load_tokenizer(_tokenizer_cfg(material))
  examples = sft.ChatExample(tok, SEQ_LEN, truncate=True)
  return [examples(r) for r in sft.load_chat_jsonl(str(material / "rows.jsonl"))]


@pytest.fixture(scope="module")
def positions(material):
  return _positions(material)


def test_identical_teachers_have_no_divergence_tokens(material):
  assert _positions(material, b="a") == [[]] * len(QUESTIONS)


def test_positions_are_loss_positions_where_the_full_logits_argmaxes_differ(material, positions):
  mesh = _mesh()

  def full_argmax(path, ex):  # one row, unpadded, the whole [L, V] logits at once
    w = weights_lib.load_weights(path, mesh=mesh, dtype="float32")
    model = nnx.merge(transformer.split_model(transformer.abstract_model(w.model_cfg))[0], w.params)
    return np.asarray(jnp.argmax(model(jnp.asarray(ex["inputs"])[None]), axis=-1))[0]

  rows = _examples(material)
  assert len(positions) == len(rows) and len(rows[2]["inputs"]) == SEQ_LEN  # row 2 was truncated
  for ex, got in zip(rows, positions):
    loss_T = np.flatnonzero(ex["loss_mask"])
    want = loss_T[full_argmax(str(material / "a"), ex)[loss_T] != full_argmax(str(material / "b"), ex)[loss_T]]
    assert got == want.tolist()
    assert set(got) <= set(loss_T.tolist())
  assert sum(map(len, positions)) > 0


def test_chunked_positions_equal_one_chunk(material, positions):
  assert _positions(material, chunk_len=7) == positions
  assert _positions(material, chunk_bytes=0) == positions  # 0: the whole row in one chunk


def test_chunked_argmax_equals_the_full_argmax():
  rng = np.random.default_rng(0)
  hidden_BxLxD = jnp.asarray(rng.normal(size=(3, 11, 8)), jnp.float32)
  embed_VxD = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)

  def unembed(h):
    return h @ embed_VxD.T

  full_BxL = np.asarray(jnp.argmax(unembed(hidden_BxLxD), -1))
  for chunk in (0, 1, 4, 5, 11, 20):  # 4: a padded last chunk
    np.testing.assert_array_equal(np.asarray(sl_divergence.chunked_argmax(unembed, hidden_BxLxD, chunk)), full_BxL)


def test_write_drop_rows_divergence_and_a_random_control_of_the_same_size(material, positions, tmp_path):
  rows = sft.load_chat_jsonl(str(material / "rows.jsonl"))
  kw = dict(seed=3, seq_len=SEQ_LEN, tokenizer_cfg=_tokenizer_cfg(material))
  stats = sl_divergence.write_drop_rows(str(material / "rows.jsonl"), positions, str(tmp_path / "div.jsonl"),
                                        str(tmp_path / "rand.jsonl"), **kw)
  div, rand = sft.load_chat_jsonl(str(tmp_path / "div.jsonl")), sft.load_chat_jsonl(str(tmp_path / "rand.jsonl"))
  loss = [np.flatnonzero(ex["loss_mask"]).tolist() for ex in _examples(material)]
  assert [r["loss_drop"] for r in div] == positions
  assert [len(r["loss_drop"]) for r in rand] == [len(p) for p in positions]
  assert all(set(r["loss_drop"]) <= set(l) for r, l in zip(rand, loss))
  assert [r["loss_drop"] for r in rand] != positions  # drawn, not copied
  assert [{k: v for k, v in r.items() if k != "loss_drop"} for r in div + rand] == rows + rows
  assert stats == {"rows": len(rows), "loss_positions": sum(map(len, loss)),
                   "divergence_positions": sum(map(len, positions)),
                   "fraction": sum(map(len, positions)) / sum(map(len, loss)),
                   "rows_without": sum(not p for p in positions)}
  again = tmp_path / "again"
  sl_divergence.write_drop_rows(str(material / "rows.jsonl"), positions, str(again / "d.jsonl"),
                                str(again / "r.jsonl"), **kw)
  assert (again / "r.jsonl").read_text() == (tmp_path / "rand.jsonl").read_text()  # seeded
  assert not list(tmp_path.glob("*.tmp"))
  with pytest.raises(ValueError, match="row 0: divergence positions \\[0\\] are not distinct loss positions"):
    sl_divergence.write_drop_rows(str(material / "rows.jsonl"), [[0]] + positions[1:], str(again / "d.jsonl"),
                                  str(again / "r.jsonl"), **kw)


def test_an_sft_batch_from_drop_rows_has_those_losses_at_zero(material, positions, tmp_path):
  sl_divergence.write_drop_rows(str(material / "rows.jsonl"), positions, str(tmp_path / "div.jsonl"),
                                str(tmp_path / "rand.jsonl"), seed=0, seq_len=SEQ_LEN,
                                tokenizer_cfg=_tokenizer_cfg(material))
  data_cfg = pipeline.default_data_config()
  data_cfg.update(seq_len=SEQ_LEN, format="chat", packing="none", truncate=True, shuffle=False, prefetch=0)
  data_cfg.tokenizer.update(kind="hf", path=str(material / "a"))
  data_cfg.sources = ml_collections.ConfigDict({"div": sources.default_source_config(
      kind="chat_jsonl", path=str(tmp_path / "div.jsonl"), weight=1.0)})
  batch = next(iter(pipeline.make_batches(data_cfg, tokenizers.load_tokenizer(data_cfg.tokenizer), len(QUESTIONS),
                                          seed=0, process_index=0, process_count=1)))
  examples = _examples(material)
  for inputs_L, loss_mask_L in zip(batch["inputs"], batch["loss_mask"]):
    i = next(i for i, ex in enumerate(examples)
             if np.array_equal(inputs_L[:len(ex["inputs"])], ex["inputs"]))  # the batch row's file row
    want = np.zeros(SEQ_LEN, np.float32)
    want[:len(examples[i]["loss_mask"])] = examples[i]["loss_mask"]
    want[positions[i]] = 0
    np.testing.assert_array_equal(loss_mask_L, want)
  assert sum(map(len, positions)) > 0
