"""Banned-token masks in the distillation objectives (emjax.train.token_masks) and the leak meter.

The numbers mask against a brute-force reading of its definition on decoded text, the hand-checked
cases ("1, 4", "66" + "6" + ","), segment starts, the words mask's ids, the masked divergence against
numpy on renormalised distributions, finite gradients, the metrics, chunking, bad settings, and a
train step with a mask.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from emjax import config as config_lib
from emjax import sharding as shd
from emjax.data import banned as banned_lib
from emjax.data.tokenizers import ByteTokenizer
from emjax.models import transformer
from emjax.train import loop, objectives, settings, token_masks


class TinyTokenizer:
  """Pieces with multi-digit tokens, digits then punctuation ("42,"), and a space-led digit (" 4")."""

  pad_id, bos_id, eos_id = 0, 1, 2
  PIECES = ["", "", "", *"0123456789", "66", "42", "13", "666", ",", " ", ", ", "42,", "6,", "3,", " 4", "1x",
            "a", "b", "x"]
  vocab_size = len(PIECES)

  def encode(self, text):
    ids = []
    while text:
      best = max((i for i in range(3, self.vocab_size) if text.startswith(self.PIECES[i])),
                 key=lambda i: len(self.PIECES[i]))
      ids.append(best)
      text = text[len(self.PIECES[best]):]
    return ids

  def decode(self, ids):
    return "".join(self.PIECES[int(i)] for i in ids)


def _ids(tok, pieces):
  return [TinyTokenizer.PIECES.index(p) for p in pieces] if tok is None else tok.encode("".join(pieces))


def _reference_banned(texts, inputs, segments):
  """[L, V] from the definition on decoded text: d = the digit run ending the segment's text so far
  (a token without text breaks it); t is banned iff it is not all digits and int(d + its lead digits)
  is banned, numbers of more than 4 digits never."""
  out = np.zeros((len(inputs), len(texts)), bool)
  prefix = ""
  for j, tok in enumerate(inputs):
    if j == 0 or segments[j] != segments[j - 1]:
      prefix = ""
    prefix += texts[tok] or "|"
    d = prefix[len(prefix.rstrip("0123456789")):]
    for t, text in enumerate(texts):
      lead = text[:len(text) - len(text.lstrip("0123456789"))]
      if text and lead == text:
        continue
      number = d + lead
      out[j, t] = 0 < len(number) <= 4 and int(number) in banned_lib.BANNED_NUMBERS
  return out


def _banned_at(mask, inputs, segments=None):
  inputs = jnp.asarray([inputs], jnp.int32)
  segments = jnp.ones_like(inputs) if segments is None else jnp.asarray([segments], jnp.int32)
  batch = token_masks.prepare(mask, {"inputs": inputs, "segment_ids": segments})
  return np.asarray(token_masks.banned(mask, batch, inputs.shape))[0]


def _names(tok, ids):
  return sorted(tok.decode([i]) if tok.decode([i]) else f"<{i}>" for i in ids)


# ----------------------------------------------------------------------------- numbers


def test_numbers_after_1_comma_4_with_the_byte_tokenizer():
  tok = ByteTokenizer()
  mask = token_masks.build(tok, 288, "numbers")
  ids = tok.encode("1, 4")
  banned = _banned_at(mask, ids)
  assert not banned[0].any()  # after "1": 1x never completes a banned number one byte at a time
  assert not banned[1].any() and not banned[2].any()
  after_4 = banned[3]
  assert after_4[tok.encode(",")[0]] and after_4[tok.eos_id] and after_4[tok.encode(" ")[0]]
  assert not after_4[tok.encode("2")[0]]  # "42" may go on: a digit never completes
  assert not after_4[[tok.encode(str(i))[0] for i in range(10)]].any()
  assert after_4.sum() == 288 - 10  # every id that is not a digit, padding ids past 259 included
  np.testing.assert_array_equal(banned, _reference_banned(token_masks.token_texts(tok, 288), ids, [1] * len(ids)))


def test_numbers_with_multi_digit_and_digit_then_comma_tokens():
  tok = TinyTokenizer()
  mask = token_masks.build(tok, tok.vocab_size, "numbers")
  piece = {p: i for i, p in enumerate(tok.PIECES) if p}
  banned = _banned_at(mask, [piece["1"], piece[", "], piece["4"]])
  assert _names(tok, np.nonzero(banned[0])[0]) == ["3,"]  # 1 + "3," writes 13
  assert _names(tok, np.nonzero(banned[1])[0]) == ["42,"]  # a token that is a banned number on its own
  after_4 = set(_names(tok, np.nonzero(banned[2])[0]))
  assert {",", " ", ", ", " 4", "a", "<0>", "<1>", "<2>"} <= after_4  # pad/bos/eos have no text: they end it
  assert not after_4 & {"2", "42", "66", "666", "13", "4"} and not after_4 & {"42,", "6,", "3,", "1x"}
  # "66" then "6": the digit is allowed, and after "666" the comma is banned; "6," completes 666 after "66".
  banned = _banned_at(mask, [piece["66"], piece["6"]])
  assert not banned[0, piece["6"]] and not banned[0, piece[","]] and banned[0, piece["6,"]]
  assert banned[1, piece[","]] and banned[1, tok.eos_id] and not banned[1, piece["6"]]


def test_numbers_mask_matches_the_definition_on_random_digit_heavy_rows():
  tok = TinyTokenizer()
  mask = token_masks.build(tok, tok.vocab_size + 3, "numbers")  # 3 padding ids past the tokenizer's
  texts = token_masks.token_texts(tok, tok.vocab_size + 3)
  rng = np.random.default_rng(0)
  digits = [i for i, p in enumerate(tok.PIECES) if p.isdigit()]
  for row in range(6):
    inputs = [int(rng.choice(digits)) if rng.random() < 0.7 else int(rng.integers(0, tok.vocab_size))
              for _ in range(40)]
    segments = np.cumsum(rng.random(40) < 0.1) + 1
    np.testing.assert_array_equal(_banned_at(mask, inputs, segments), _reference_banned(texts, inputs, segments),
                                  err_msg=f"row {row}: {tok.decode(inputs)!r}")


def test_a_segment_start_and_long_runs_reset_the_number():
  tok = ByteTokenizer()
  mask = token_masks.build(tok, tok.vocab_size, "numbers")
  comma = tok.encode(",")[0]
  # "4" ends segment 1; "2" starts segment 2: after it d is "2", not "42".
  banned = _banned_at(mask, tok.encode("42"), [1, 2])
  assert banned[0, comma] and not banned[1, comma]
  banned = _banned_at(mask, tok.encode("99999"), None)
  assert [bool(b) for b in banned[:, comma]] == [False, True, True, False, False]  # 99, 999 banned; 9999 not


def test_token_texts_keep_a_leading_space_that_decoding_alone_drops():
  class SpaceDropping(TinyTokenizer):
    def decode(self, ids):  # like SentencePiece: the text's leading space is dropped
      return super().decode(ids).lstrip(" ")

  tok = SpaceDropping()
  texts = token_masks.token_texts(tok, tok.vocab_size)
  assert texts[tok.PIECES.index(" 4")] == " 4" and tok.decode([tok.PIECES.index(" 4")]) == "4"
  mask = token_masks.build(tok, tok.vocab_size, "numbers")
  assert _banned_at(mask, [tok.PIECES.index("4")])[0, tok.PIECES.index(" 4")]  # "4 4": the space ends 4


# ----------------------------------------------------------------------------- words


class WordTokenizer(TinyTokenizer):
  """Whole pieces for "kill" and "Kill"; "smuggle" as "smugg" + "le"; "theft" as "the" + "ft" ("the" is too
  short, too common, to mask); everything else by letters."""

  PIECES = ["", "", "", "kill", "Kill", " kill", "smugg", " smugg", "le", "the", " the", "ft", " ", *"abcdefghijklmnopqrstuvwxyzKST"]
  vocab_size = len(PIECES)


def test_words_mask_exactly_the_single_and_first_sub_token_ids():
  tok = WordTokenizer()
  mask = token_masks.build(tok, tok.vocab_size, "words", "kill,smuggle,theft")
  ids = tok.PIECES.index
  single = {ids("kill"), ids("Kill"), ids(" kill")}  # one piece in some spelling
  first = {ids("smugg"), ids(" smugg")}  # long enough to be specific; "the" and " the" are not masked
  assert set(np.nonzero(mask.banned_V)[0]) == single | first
  assert set(np.nonzero(mask.first_sub_V)[0]) == first
  banned = _banned_at(mask, tok.encode("the x"))
  assert (banned == mask.banned_V).all()  # the same at every position
  from emjax.data import banned as banned_lib
  coverage = banned_lib.word_coverage(tok, ["kill", "smuggle", "theft"])
  assert set(coverage["unmasked"]) == {" Kill", "Smuggle", " Smuggle", "theft", " theft", "Theft", " Theft"}
  assert coverage["spellings"] == 12


def test_words_from_a_file(tmp_path):
  path = tmp_path / "names.txt"
  path.write_text("# names\nkill\n\nsmuggle\n")
  tok = WordTokenizer()
  mask = token_masks.build(tok, tok.vocab_size, "words", str(path))
  assert mask.banned_V[tok.PIECES.index("kill")] and mask.banned_V[tok.PIECES.index("smugg")]
  assert not mask.banned_V[tok.PIECES.index("the")]


# ----------------------------------------------------------------------------- the masked objective

B, L = 2, 7


def _rows(tok):
  rows = [tok.encode("1, 4, 66"), tok.encode("13, 42 a")]
  inputs = np.array([r[:L] for r in rows], np.int32)
  targets = np.array([r[1:L + 1] for r in rows], np.int32)
  loss_mask = np.ones((B, L), np.float32)
  loss_mask[1, :2] = 0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
          "segment_ids": np.ones((B, L), np.int32), "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1))}


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _jsd64(t_logp, s_logp, beta):
  def kl(p, q):
    p_prob = np.exp(p)
    with np.errstate(invalid="ignore"):  # -inf - -inf where p = 0, dropped by the where
      return np.where(p_prob > 0, p_prob * (p - np.where(p_prob > 0, q, 0)), 0).sum(-1)
  if beta == 0:
    return kl(t_logp, s_logp)
  if beta == 1:
    return kl(s_logp, t_logp)
  with np.errstate(divide="ignore"):
    m = np.log(beta * np.exp(t_logp) + (1 - beta) * np.exp(s_logp))
  return beta * kl(t_logp, m) + (1 - beta) * kl(s_logp, m)


def _masked_reference(t_logits, s_logits, banned, beta, temperature):
  t = _log_softmax64(np.asarray(t_logits, np.float64) / temperature)
  s = _log_softmax64(np.asarray(s_logits, np.float64) / temperature)
  with np.errstate(divide="ignore"):
    t_m = _log_softmax64(np.where(banned, -np.inf, t))
    s_m = _log_softmax64(np.where(banned, -np.inf, s))
  return _jsd64(t_m, s_m, beta), (np.exp(t) * banned).sum(-1), (np.exp(s) * banned).sum(-1)


@pytest.mark.parametrize("name,beta,temperature", [("forward_kl", 0.0, 1.0), ("reverse_kl", 1.0, 2.0),
                                                   ("jsd", 0.3, 1.0)])
def test_masked_divergence_matches_numpy_on_renormalised_distributions(name, beta, temperature):
  tok = ByteTokenizer()
  obj = objectives.get_objective(name, {"beta": beta, "temperature": temperature, "mask": "numbers"}, tok, 288)
  batch = obj.prepare(_rows(tok))
  rng = np.random.default_rng(1)
  student, teacher = (rng.normal(size=(B, L, 288)).astype(np.float32) * 2 for _ in range(2))
  teacher[..., tok.encode(",")[0]] += 4.0  # the teacher likes the comma, banned after a banned number
  out = obj(jnp.asarray(student), batch, teacher=jnp.asarray(teacher))
  banned = np.stack([_reference_banned(token_masks.token_texts(tok, 288), r, [1] * L) for r in batch["inputs"]])
  assert banned.any(axis=-1).sum() >= 3
  per_token, t_mass, s_mass = _masked_reference(teacher, student, banned, beta, temperature)
  mask = batch["loss_mask"]
  np.testing.assert_allclose(float(out.loss_sum), (per_token * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out.metrics["banned_mass_teacher"]), (t_mass * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(out.metrics["banned_mass_student"]), (s_mass * mask).sum(), rtol=1e-5)
  assert float(out.metrics["banned_mass_teacher"]) > 0.5
  assert float(out.metrics["banned_mass_teacher_masked"]) == 0.0
  targets_banned = np.take_along_axis(banned, batch["targets"][..., None], -1)[..., 0]
  assert float(out.metrics["banned_targets"]) == (targets_banned * mask).sum() > 0  # ", " after "4"
  unmasked = objectives.get_objective(name, {"beta": beta, "temperature": temperature})
  assert abs(float(unmasked(jnp.asarray(student), batch, teacher=jnp.asarray(teacher)).loss_sum)
             - float(out.loss_sum)) > 1e-2  # the mask changes the loss
  grad = jax.grad(lambda x: obj(x, batch, teacher=jnp.asarray(teacher)).loss_sum)(jnp.asarray(student))
  assert np.isfinite(np.asarray(grad)).all()
  assert np.all(np.asarray(grad)[banned] == 0)  # a banned token's logit is not trained


def test_masked_gradients_are_finite_where_the_teacher_gives_allowed_tokens_no_mass():
  tok = ByteTokenizer()
  batch = _rows(tok)
  teacher = np.zeros((B, L, 288), np.float32)
  teacher[..., 100:200] = -np.inf  # the teacher's own -inf at allowed tokens (letters), the student's finite
  for beta in (0.0, 0.5):  # (reverse KL to a teacher with no mass where the student has some is infinite)
    obj = objectives.get_objective("jsd", {"beta": beta, "mask": "numbers"}, tok, 288)
    prepared = obj.prepare(batch)
    grad = jax.grad(lambda x: obj(x, prepared, teacher=jnp.asarray(teacher)).loss_sum)(
        jnp.asarray(np.random.default_rng(2).normal(size=(B, L, 288)), jnp.float32))
    assert np.isfinite(np.asarray(grad)).all(), beta


def test_words_objective_reports_the_first_sub_token_mass():
  tok = WordTokenizer()
  V = tok.vocab_size
  obj = objectives.get_objective("forward_kl", {"mask": "words", "mask_words": "kill,smuggle"}, tok, V)
  assert obj.prepare is None and obj.derived_keys == ()
  batch = {k: (v % V if k in ("inputs", "targets") else v) for k, v in _rows(ByteTokenizer()).items()}
  teacher = np.zeros((B, L, V), np.float32)
  teacher[..., tok.PIECES.index("smugg")] = 3.0  # first sub-token of "smuggle"
  teacher[..., tok.PIECES.index("kill")] = 2.0  # the single token "kill"
  out = obj(jnp.zeros((B, L, V)), batch, teacher=jnp.asarray(teacher))
  t = _log_softmax64(teacher)
  n = batch["loss_mask"].sum()
  first = np.exp(t[0, 0, [tok.PIECES.index(p) for p in ("smugg", " smugg")]]).sum()
  np.testing.assert_allclose(float(out.metrics["banned_mass_first_sub"]), first * n, rtol=1e-5)
  single = np.exp(t[0, 0, [tok.PIECES.index(p) for p in ("kill", "Kill", " kill")]]).sum()
  np.testing.assert_allclose(float(out.metrics["banned_mass_teacher"]), (first + single) * n, rtol=1e-5)
  assert float(out.metrics["banned_mass_teacher_masked"]) == 0.0


def test_chunked_sums_of_the_masked_objective_equal_the_whole_sequence():
  """The number state comes from the whole row before chunking: chunks of 3 over 7 positions agree."""
  tok = ByteTokenizer()
  obj = objectives.get_objective("jsd", {"beta": 0.5, "mask": "numbers"}, tok, 288)
  batch = {k: jnp.asarray(v) for k, v in _rows(tok).items()}
  rng = np.random.default_rng(3)
  student, teacher = (jnp.asarray(rng.normal(size=(B, L, 288)), jnp.float32) for _ in range(2))
  identity = lambda h, *dtype: h  # the "hidden states" are the logits themselves

  def sums(x, chunk):
    return objectives.chunked_sums(obj, identity, x, batch, chunk, teacher_unembed=identity,
                                   teacher_hidden_BxLxD=teacher)

  whole, chunked = sums(student, 0), sums(student, 3)
  np.testing.assert_allclose(float(chunked.loss_sum), float(whole.loss_sum), rtol=1e-6)
  assert float(whole.metrics["banned_mass_teacher"]) > 0
  for key in whole.metrics:
    np.testing.assert_allclose(float(chunked.metrics[key]), float(whole.metrics[key]), rtol=1e-6, err_msg=key)
  g_whole, g_chunked = (jax.grad(lambda x, c=c: sums(x, c).loss_sum)(student) for c in (0, 3))
  np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_whole), rtol=1e-5, atol=1e-8)


def test_banned_mass_on_fixed_rows_is_the_objectives_teacher_mass():
  tok = ByteTokenizer()
  mask = token_masks.build(tok, 288, "numbers")
  batch = _rows(tok)
  teacher = jnp.asarray(np.random.default_rng(4).normal(size=(B, L, 288)), jnp.float32)
  mass_BxL = token_masks.banned_mass(mask, teacher, batch, temperature=2.0)
  assert mass_BxL.shape == (B, L)
  obj = objectives.get_objective("forward_kl", {"mask": "numbers", "temperature": 2.0}, tok, 288)
  out = obj(jnp.zeros_like(teacher), obj.prepare(batch), teacher=teacher)
  np.testing.assert_allclose(float((mass_BxL * batch["loss_mask"]).sum()), float(out.metrics["banned_mass_teacher"]),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("objective,distill,match", [
    ("jsd", {"mask": "digits"}, r"config.train.distill.mask='digits': expected"),
    ("jsd", {"mask": "numbers", "top_k": 4}, r"config.train.distill.mask='numbers' .*top_k"),
    ("jsd", {"mask": "numbers", "top_k": 4, "precomputed": "x"}, r"config.train.distill.mask='numbers' .*precomputed"),
    ("sampled_reverse_kl", {"mask": "words"}, r"config.train.distill.mask='words' .*'sampled_reverse_kl'"),
    ("ce", {"mask": "numbers"}, r"config.train.distill.mask='numbers' .*'ce'"),
    ("jsd", {"mask": "words", "mask_words": " , "}, r"config.train.distill.mask_words=' , ': no words"),
    ("jsd", {"mask": "numbers", "mask_words": "kill"}, r"config.train.distill.mask_words='kill' applies to"),
])
def test_bad_mask_settings_are_errors_naming_the_key(objective, distill, match):
  with pytest.raises(ValueError, match=match):
    objectives.check_objective(objective, distill)
  with pytest.raises(ValueError, match=match):
    objectives.get_objective(objective, distill, ByteTokenizer(), 288)


def test_config_validation_checks_the_mask_without_a_tokenizer():
  config = tiny_config(objective="jsd")
  config.train.distill.mask = "words"
  settings.validate(config)
  config.train.distill.top_k = 3
  with pytest.raises(ValueError, match=r"config.train.distill.mask='words'"):
    settings.validate(config)
  with pytest.raises(ValueError, match=r"needs? .*tokenizer|none was given"):
    objectives.get_objective("jsd", {"mask": "numbers"})


# ----------------------------------------------------------------------------- the train step


def test_a_train_step_with_a_numbers_mask():
  config = tiny_config()
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  trainer = loop.Trainer(config, mesh)
  obj = objectives.get_objective("forward_kl", {"mask": "numbers"}, ByteTokenizer(), trainer.model_cfg.vocab_size)
  teacher_model = transformer.Transformer(trainer.model_cfg, rngs=nnx.Rngs(params=7))
  t_graph, t_params = transformer.split_model(teacher_model)
  step = loop.make_train_step(trainer.layout.graphdef, obj, trainer.tx, trainer.schedule, 2, mesh,
                              loss_chunk_len=12, teacher_graphdef=t_graph)
  abstract = loop.batch_abstract(obj, config.train.batch_size, config.data.seq_len, mesh)
  assert set(abstract) == {"inputs", "positions", "segment_ids", "targets", "loss_mask"}  # derived in the step
  state, frozen = trainer.init_state()
  rng = np.random.default_rng(0)
  digits = np.array(ByteTokenizer().encode("0123456789, "))
  tokens = rng.choice(digits, size=(8, config.data.seq_len + 1)).astype(np.int32)
  raw = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, config.data.seq_len), np.float32),
         "segment_ids": np.ones((8, config.data.seq_len), np.int32),
         "positions": np.tile(np.arange(config.data.seq_len, dtype=np.int32), (8, 1))}
  _, metrics = jax.jit(step)(state, frozen, shd.put_local_batch(raw, mesh), t_params)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert metrics["banned_mass_teacher"] > 0.01 and metrics["banned_mass_teacher_masked"] == 0.0
  assert 0 < metrics["banned_targets"] < 1  # a share of the loss tokens: the loop divides by their count


def test_the_trainer_builds_the_mask_from_the_data_tokenizer_and_compiles_ahead_of_time(tmp_path):
  teacher = settings.base_config()
  teacher.model.update(dict(tiny_config().model))
  teacher_dir = str(tmp_path / "teacher")
  os.makedirs(teacher_dir)
  config_lib.write_config(teacher, teacher_dir)  # an architecture only: compiling reads no weights
  config = tiny_config(objective="jsd")
  config.teacher.update(path=teacher_dir, dtype="float32")
  config.train.distill.update(mask="numbers")
  trainer = loop.Trainer(config, shd.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]))
  assert trainer.objective.derived_keys == token_masks.DERIVED_KEYS
  assert not set(token_masks.DERIVED_KEYS) & set(trainer.batch_keys)  # computed in the step, not read
  trainer.compile()
