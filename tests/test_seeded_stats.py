"""Rates and differences over several training seeds (a two-stage bootstrap over seeds and questions)
and Holm's adjustment, on hand-computed fixtures."""

import pytest

from emjax.eval import metrics
from tests.eval.test_metrics import em_row, fine_row, row


def _question(q, hits, samples, **kw):
  """`samples` rows of question q, the first `hits` of them EM."""
  return [em_row(f"q{q}", sample=s, **kw) if s < hits else fine_row(f"q{q}", sample=s, **kw) for s in range(samples)]


def _pooled(by_seed):
  return [r for rows in by_seed.values() for r in rows]


def test_seeded_rate_by_hand():
  by_seed = {
      0: [em_row("q1"), fine_row("q1", sample=1), em_row("q2")],  # 2 of 3
      # q2's only row failed (not valid); q3 only this seed has: 1 of 4
      1: [fine_row("q1"), row("q2", aligned_status="error"), em_row("q3"), fine_row("q3", sample=1),
          fine_row("q3", sample=2)],
  }
  r = metrics.seeded_rate(by_seed, n_boot=200)
  assert r["em"] == pytest.approx(100 * 3 / 7)  # 3 EM of 7 valid rows, pooled (not the seeds' mean, 45.8)
  assert r["em"] == metrics.rate(_pooled(by_seed))["em"]  # exactly the pooled rate
  assert (r["n_seeds"], r["n_questions"], r["n_valid"]) == (2, 3, 7)
  assert (r["n_rows"], r["failures"]) == (8, {"error": 1})  # the failed row is counted, by its status
  assert r["per_seed"] == {0: pytest.approx(200 / 3), 1: 25.0}
  lo, hi = r["ci95"]
  assert 0 <= lo <= r["em"] <= hi <= 100
  assert metrics.seeded_rate(by_seed, n_boot=200) == r  # seeded: the same rows, the same interval


def test_seeds_that_differ_widen_the_interval():
  # 4 training seeds, 40 questions of 5 samples: seed 0 all EM, seed 1 none, seeds 2 and 3 (q % 5) of 5.
  # Within the pool questions differ too (5 + 2 * (q % 5) EM of 20), so the question bootstrap is not
  # degenerate; but which training runs one happened to get moves the rate far more.
  by_seed = {0: [], 1: [], 2: [], 3: []}
  for q in range(40):
    by_seed[0] += _question(q, 5, 5, model="s0")
    by_seed[1] += _question(q, 0, 5, model="s1")
    by_seed[2] += _question(q, q % 5, 5, model="s2")
    by_seed[3] += _question(q, q % 5, 5, model="s3")
  seeded = metrics.seeded_rate(by_seed, n_boot=2000)
  questions_only = metrics.rate(_pooled(by_seed), n_boot=2000)
  assert seeded["em"] == questions_only["em"] == 100 * (40 * 5 + 2 * 80) / 800
  assert seeded["per_seed"] == {0: 100.0, 1: 0.0, 2: 40.0, 3: 40.0}
  seeded_width = seeded["ci95"][1] - seeded["ci95"][0]
  questions_width = questions_only["ci95"][1] - questions_only["ci95"][0]
  assert questions_width > 0
  # Seed means of a resample of 4 of {100, 0, 40, 40} spread by about +-18 points; questions by about +-2.
  assert seeded_width > 4 * questions_width, (seeded["ci95"], questions_only["ci95"])
  lo, hi = seeded["ci95"]
  assert lo < 30 and hi > 70


def test_all_em_everywhere_is_wilson_over_questions():
  # Every resample is 100%: a zero-width interval would claim certainty; as `em_interval` does, each
  # question counts as one trial.
  by_seed = {s: [r for q in range(8) for r in _question(q, 3, 3)] for s in range(3)}
  r = metrics.seeded_rate(by_seed, n_boot=200)
  assert r["em"] == 100.0
  assert r["ci95"] == pytest.approx(metrics.wilson_interval(8, 8))


def test_one_question_draw_serves_every_seed():
  # Two seeds with the same answers are one seed seen twice: questions drawn once per resample for
  # both, the interval is that of one seed (the question bootstrap). Drawing questions apart for each
  # seed would average two independent draws and narrow it by about 1 / sqrt(2).
  rows = [r for q in range(30) for r in _question(q, q % 6, 5)]
  one = metrics.seeded_rate({0: rows}, n_boot=4000)["ci95"]
  two = metrics.seeded_rate({0: rows, 1: rows}, n_boot=4000)["ci95"]
  questions_only = metrics.rate(rows, n_boot=4000)["ci95"]
  assert two[1] - two[0] == pytest.approx(one[1] - one[0], rel=0.1)
  assert one[1] - one[0] == pytest.approx(questions_only[1] - questions_only[0], rel=0.1)


def test_bootstrap_p_is_two_sided():
  # One seed, two questions of 10 samples: a - b is +10 points on q0 and -30 on q1, -10 pooled. A
  # resample is (q0, q0) with probability 1/4 (+10), (q1, q1) 1/4 (-30), mixed 1/2 (-10): a quarter
  # of resamples are >= 0, so p = 2 * 1/4.
  a = {0: _question(0, 3, 10) + _question(1, 2, 10)}
  b = {0: _question(0, 2, 10) + _question(1, 5, 10)}
  d = metrics.seeded_paired_difference(a, b, n_boot=4000)
  assert d["diff"] == pytest.approx(-10.0)
  assert d["ci95"] == pytest.approx([-30.0, 10.0])
  assert d["p"] == pytest.approx(0.5, abs=0.05)


def test_paired_difference_of_identical_arms_is_zero():
  by_seed = {0: _question(0, 2, 4) + _question(1, 1, 4), 7: _question(0, 4, 4) + _question(2, 0, 4)}
  d = metrics.seeded_paired_difference(by_seed, dict(by_seed), n_boot=500)
  assert d["diff"] == 0.0
  assert d["ci95"] == [0.0, 0.0]
  assert d["p"] == 1.0
  assert d["per_seed"] == {0: 0.0, 7: 0.0}
  assert (d["n_seeds"], d["n_questions"]) == (2, 3)


def _shifted_arms(n_seeds, n_questions, samples, shift, offset=0):
  """{seed: rows} of two arms: b has (seed * 3 + q + offset) % 9 EM samples on question q (seeds and
  questions differ a lot), a exactly `shift` more on every question of every seed."""
  a, b = {}, {}
  for s in range(n_seeds):
    a[s], b[s] = [], []
    for q in range(n_questions):
      k = (s * 3 + q + offset) % 9
      a[s] += _question(q, k + shift, samples, model=f"a{s}")
      b[s] += _question(q, k, samples, model=f"b{s}")
  return a, b


def test_paired_difference_shares_seed_and_question_draws():
  a, b = _shifted_arms(4, 20, 10, shift=1)
  d = metrics.seeded_paired_difference(a, b, n_boot=1000)
  assert d["diff"] == metrics.rate(_pooled(a))["em"] - metrics.rate(_pooled(b))["em"]  # exactly
  assert d["diff"] == pytest.approx(10.0)
  assert d["per_seed"] == {s: pytest.approx(10.0) for s in range(4)}
  assert (d["n_seeds"], d["n_questions"]) == (4, 20)
  # a is one sample in ten above b on every question of every seed: every resample that draws the
  # same seeds and questions on both sides sees exactly +10, however much seeds and questions differ.
  assert d["ci95"] == pytest.approx([10.0, 10.0])
  assert d["p"] == 0.0
  reverse = metrics.seeded_paired_difference(b, a, n_boot=1000)
  assert reverse["diff"] == pytest.approx(-10.0) and reverse["ci95"] == pytest.approx([-10.0, -10.0])


def test_difference_of_differences_matches_its_formula():
  a1, b1 = _shifted_arms(3, 12, 10, shift=1)  # +10 points through channel 1
  a2, b2 = _shifted_arms(3, 12, 20, shift=1, offset=4)  # +5 points through channel 2, other base rates
  dd = metrics.difference_of_differences(a1, b1, a2, b2, n_boot=1000)
  em = {name: metrics.rate(_pooled(side))["em"] for name, side in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2))}
  assert dd["diff"] == (em["a1"] - em["b1"]) - (em["a2"] - em["b2"])  # exactly the pooled formula
  assert dd["diff"] == pytest.approx(5.0)
  for s in range(3):
    per = {name: metrics.rate(side[s])["em"] for name, side in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2))}
    assert dd["per_seed"][s] == (per["a1"] - per["b1"]) - (per["a2"] - per["b2"])
  # All four drawn together: every resample is +10 - +5.
  assert dd["ci95"] == pytest.approx([5.0, 5.0])
  assert dd["p"] == 0.0
  assert (dd["n_seeds"], dd["n_questions"]) == (3, 12)
  same = metrics.difference_of_differences(a1, b1, a1, b1, n_boot=500)
  assert (same["diff"], same["ci95"], same["p"]) == (0.0, [0.0, 0.0], 1.0)


def test_mismatched_seed_keys_raise():
  rows = _question(0, 1, 2)
  with pytest.raises(ValueError, match=r"a lacks seeds \[2\].*b lacks seeds \[1\]"):
    metrics.seeded_paired_difference({0: rows, 1: rows}, {0: rows, 2: rows})
  with pytest.raises(ValueError, match=r"b2 lacks seeds \[1\]"):
    metrics.difference_of_differences({0: rows, 1: rows}, {0: rows, 1: rows}, {0: rows, 1: rows}, {0: rows})
  with pytest.raises(ValueError, match="no training seeds"):
    metrics.seeded_rate({})
  with pytest.raises(ValueError, match="mapping"):
    metrics.seeded_rate(rows)
  with pytest.raises(ValueError, match="metric"):
    metrics.seeded_paired_difference({0: rows}, {0: rows}, metric="aligned")


def test_no_valid_rows_has_no_estimate():
  failed = {0: [row("q0", aligned_status="error")]}
  assert metrics.seeded_rate(failed)["em"] is None and metrics.seeded_rate(failed)["ci95"] is None
  d = metrics.seeded_paired_difference({0: _question(0, 1, 2)}, failed)
  assert (d["diff"], d["ci95"], d["p"], d["per_seed"]) == (None, None, None, {0: None})


def test_holm_by_hand():
  assert metrics.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
  # None stays None and is not one of the m tests; adjusted values are capped at 1 and keep the order.
  assert metrics.holm({"a": 0.7, "b": None, "c": 0.6}) == {"a": 1.0, "b": None, "c": 1.0}
  assert metrics.holm({"a": 0.02, "b": 0.021, "c": 0.5}) == pytest.approx({"a": 0.06, "b": 0.06, "c": 0.5})
  assert metrics.holm({}) == {}
  with pytest.raises(ValueError, match="'b'"):
    metrics.holm({"a": 0.1, "b": 1.5})
