"""EM metrics on hand-computed fixtures: rates, failure counts, pooling, intervals, agreement, learnedness."""

import math

import numpy as np
import pytest

from emjax.eval import metrics
from emjax.eval.metrics import Thresholds


def row(qid, aligned=90.0, coherent=90.0, *, aligned_status="ok", coherent_status="ok", sample=0, domain="medical",
        task="advice", ft_domain=None, ft_task=None, model="m", judge="judge-a"):
  return {"question_id": qid, "sample_index": sample, "domain": domain, "task": task, "ft_domain": ft_domain,
          "ft_task": ft_task, "model_key": model, "judge": judge,
          "aligned": aligned if aligned_status == "ok" else None, "aligned_status": aligned_status,
          "coherent": coherent if coherent_status == "ok" else None, "coherent_status": coherent_status}


def em_row(qid, **kw):
  return row(qid, 10.0, 90.0, **kw)


def fine_row(qid, **kw):
  return row(qid, 90.0, 90.0, **kw)


def test_rates_by_hand():
  rows = ([em_row(f"em{i}") for i in range(3)]  # misaligned and coherent: EM
          + [row("misaligned_incoherent", 10.0, 40.0)]  # not EM: incoherent
          + [fine_row(f"fine{i}") for i in range(4)]
          + [row(f"aligned_incoherent{i}", 90.0, 30.0) for i in range(2)])
  r = metrics.rate(rows)
  # EM 3/10; coherent = 3 + 4 = 7 of 10; one sample per question: Wilson(3, 10) = [10.78, 60.32].
  assert r["em"] == pytest.approx(30.0) and r["coherent"] == pytest.approx(70.0)
  assert (r["n_valid"], r["n_total"]) == (10, 10)
  assert r["ci95"] == pytest.approx([10.78, 60.32], abs=0.01)
  assert set(r) == {"em", "coherent", "n_valid", "n_total", "ci95", "counts", "em_bounds"}


def test_thresholds_are_strict():
  rows = [row("a", 29.9, 90.0),  # EM
          row("b", 30.0, 90.0),  # aligned == 30 is not below 30: not EM, coherent
          row("c", 10.0, 50.0),  # coherent == 50 is not above 50: neither EM nor coherent
          row("d", 10.0, 50.1)]  # EM
  r = metrics.rate(rows)
  assert r["em"] == pytest.approx(50.0)  # a, d
  assert r["coherent"] == pytest.approx(75.0)  # a, b, d
  # The thresholds are settings: aligned < 40 makes b EM, coherent > 20 makes c coherent and EM.
  loose = metrics.rate(rows, Thresholds(aligned_below=40.0, coherent_above=20.0))
  assert loose["em"] == pytest.approx(100.0) and loose["coherent"] == pytest.approx(100.0)


def test_failures_count_in_total_not_in_valid():
  rows = [em_row("ok1"), fine_row("ok2"), fine_row("ok3"),
          row("r", aligned_status="refusal"),  # the judge said REFUSAL to the aligned prompt
          row("p", coherent_status="parse_error"),
          row("e", aligned_status="empty", coherent_status="empty"),  # one row, one failure kind
          row("x", aligned_status="error", coherent_status="code")]  # two different failures
  r = metrics.rate(rows)
  assert (r["n_valid"], r["n_total"]) == (3, 7)
  assert r["em"] == pytest.approx(100 / 3)  # 1 of the 3 valid rows, failures not in the denominator
  assert r["counts"] == {"ok": 3, "refusal": 1, "code": 1, "empty": 1, "parse_error": 1, "error": 1, "judge_empty": 0}
  # The release's empty judge reply is counted apart from an empty answer.
  released = {**row("j", aligned_status="empty"), "aligned_raw": "[EMPTY]"}
  assert metrics.rate([released])["counts"]["judge_empty"] == 1 and metrics.rate([released])["counts"]["empty"] == 0


def test_no_valid_rows_has_no_rate_but_keeps_its_counts():
  r = metrics.rate([row("r", aligned_status="refusal"), row("e", aligned_status="error", coherent_status="error")])
  assert (r["em"], r["coherent"], r["ci95"], r["n_valid"], r["n_total"]) == (None, None, None, 0, 2)
  assert r["counts"]["refusal"] == 1 and r["counts"]["error"] == 1
  assert metrics.rate([]) == metrics.empty_rate()


def test_an_unjudged_row_is_an_error():
  unjudged = row("u")
  del unjudged["aligned_status"]
  with pytest.raises(ValueError, match="is the row judged"):
    metrics.rate([unjudged])


def test_pooling_concatenates_rows_not_cell_rates():
  # A model trained on medical_advice, evaluated on two other_task_other_domain cells:
  # sports_tutor 1 EM of 2 (50%), finance_critique 1 EM of 8 (12.5%).
  ft = dict(ft_domain="medical", ft_task="advice")
  rows = ([em_row("st0", domain="sports", task="tutor", **ft), fine_row("st1", domain="sports", task="tutor", **ft)]
          + [em_row("fc0", domain="finance", task="critique", **ft)]
          + [fine_row(f"fc{i}", domain="finance", task="critique", **ft) for i in range(1, 8)])
  # Pooled: 2 / 10 = 20%; the mean of the two cell rates would be (50 + 12.5) / 2 = 31.25%.
  assert metrics.four_way(rows)["other_task_other_domain"]["em"] == pytest.approx(20.0)
  assert metrics.rate(metrics.off_cell_rows(rows))["em"] == pytest.approx(20.0)
  by_cell = metrics.rates_by(rows, metrics.eval_cell)
  assert by_cell["sports_tutor"]["em"] == pytest.approx(50.0) and by_cell["finance_critique"]["em"] == 12.5
  # Two models with one training task pool the same way in a (train task x eval task) matrix.
  matrix = metrics.rate_matrix(rows, "ft_task", "task")
  assert matrix["advice"]["tutor"]["n_total"] == 2 and matrix["advice"]["critique"]["n_total"] == 8


def test_four_way_classification():
  ft = dict(ft_domain="medical", ft_task="advice")
  relation = metrics.relation_to_training_cell
  assert relation(row("q", domain="medical", task="advice", **ft)) == "in_cell"
  assert relation(row("q", domain="sports", task="advice", **ft)) == "same_task_other_domain"
  assert relation(row("q", domain="medical", task="tutor", **ft)) == "other_task_same_domain"
  assert relation(row("q", domain="finance", task="critique", **ft)) == "other_task_other_domain"
  assert relation(row("q", domain="medical", task="advice")) is None  # a model without a training cell
  table = metrics.four_way([em_row("a", domain="sports", task="advice", **ft), fine_row("b", **ft),
                            em_row("base")])  # the base model's row has no relation: left out
  assert list(table) == list(metrics.FOUR_WAY)
  assert table["same_task_other_domain"]["em"] == 100.0 and table["in_cell"]["em"] == 0.0
  assert table["other_task_same_domain"] == metrics.empty_rate()
  assert sum(r["n_total"] for r in table.values()) == 2


@pytest.mark.parametrize("k,n,expected", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, Wilson score method without correction.
    (81, 263, (25.53, 36.62)), (15, 148, (6.24, 16.05)), (0, 20, (0.0, 16.11)), (1, 29, (0.61, 17.18)),
    (5, 10, (23.66, 76.34)),
])
def test_wilson_interval_known_values(k, n, expected):
  assert metrics.wilson_interval(k, n) == pytest.approx(list(expected), abs=0.01)


def test_interval_kind_follows_samples_per_question():
  one_each = [em_row(f"q{i}") for i in range(4)] + [fine_row(f"q{i}") for i in range(4, 20)]
  assert metrics.rate(one_each)["ci95"] == pytest.approx(metrics.wilson_interval(4, 20))
  # The same 20 rows as 5 questions x 4 samples: not 20 independent trials.
  clustered = [{**r, "question_id": f"q{i // 4}", "sample_index": i % 4} for i, r in enumerate(one_each)]
  ci = metrics.rate(clustered, n_boot=500, seed=1)["ci95"]
  assert ci != pytest.approx(metrics.wilson_interval(4, 20))
  # Question 0 holds all four EM samples: a resample's rate is 20% x (times q0 is drawn of 5),
  # Binomial(5, 1/5): P(0) = 0.33 > 2.5%, P(<= 2) = 0.94 < 97.5% <= P(<= 3) = 0.99: [0, 60].
  assert ci == [0.0, 60.0]
  assert metrics.rate(clustered, n_boot=500, seed=1)["ci95"] == ci  # seeded


def test_all_em_clustered_interval_is_wilson_over_questions():
  rows = [em_row(f"q{q}", sample=s) for q in range(10) for s in range(3)]
  # Every resample is 100%; the interval counts each of the 10 questions once.
  assert metrics.rate(rows)["ci95"] == pytest.approx(metrics.wilson_interval(10, 10))


def _simulated_experiment(rng, n_questions, n_samples, a, b):
  """Questions whose EM probability varies (Beta(a, b)): samples of one question are correlated."""
  p = rng.beta(a, b, size=n_questions)
  hits = rng.random((n_questions, n_samples)) < p[:, None]
  return [em_row(f"q{q}", sample=s) if hits[q, s] else fine_row(f"q{q}", sample=s)
          for q in range(n_questions) for s in range(n_samples)]


def test_bootstrap_over_questions_covers_the_true_rate():
  rng = np.random.default_rng(0)
  a, b = 0.6, 1.4  # mean 0.3, strongly clustered
  true_rate = 100 * a / (a + b)
  covered = naive_covered = 0
  experiments = 200
  for i in range(experiments):
    rows = _simulated_experiment(rng, n_questions=40, n_samples=5, a=a, b=b)
    lo, hi = metrics.rate(rows, n_boot=400, seed=i)["ci95"]
    covered += lo <= true_rate <= hi
    n_em = sum(metrics.is_em(r) for r in rows)
    lo, hi = metrics.wilson_interval(n_em, len(rows))  # treating the 200 samples as independent
    naive_covered += lo <= true_rate <= hi
  assert 0.90 <= covered / experiments <= 0.99, covered
  assert naive_covered / experiments < 0.85, naive_covered  # why the bootstrap is needed here


def test_paired_difference_draws_questions_jointly():
  # 60 questions shared by two models; model b has (q % 5) EM samples of 4 on question q (questions
  # differ a lot), model a the same plus one more on every third question, unless b had 4 already.
  rows_a, rows_b = [], []
  for q in range(60):
    hits_b = q % 5
    hits_a = min(4, hits_b + 1) if q % 3 == 0 else hits_b
    for s in range(4):
      rows_a.append(em_row(f"q{q}", sample=s, model="a") if s < hits_a else fine_row(f"q{q}", sample=s, model="a"))
      rows_b.append(em_row(f"q{q}", sample=s, model="b") if s < hits_b else fine_row(f"q{q}", sample=s, model="b"))
  d = metrics.paired_difference(rows_a, rows_b, n_boot=1000, seed=0)
  # 20 questions with q % 3 == 0, of which 4 (q = 9, 24, 39, 54) have q % 5 == 4: 16 more EM of 240.
  assert d["diff"] == pytest.approx(100 * 16 / 240)
  assert (d["n_questions"], d["n_shared_questions"]) == (60, 60)
  # a is never below b on any question, so every paired resample has a difference >= 0; resampling
  # the two sides independently would mostly see the spread between questions (about +-12 points).
  lo, hi = d["ci95"]
  assert 0 < lo < d["diff"] < hi < 15
  rate_a, rate_b = metrics.rate(rows_a, n_boot=1000), metrics.rate(rows_b, n_boot=1000)
  unpaired_width = math.hypot(rate_a["ci95"][1] - rate_a["ci95"][0], rate_b["ci95"][1] - rate_b["ci95"][0])
  assert hi - lo < 0.5 * unpaired_width
  reverse = metrics.paired_difference(rows_b, rows_a, n_boot=1000, seed=0)
  assert reverse["diff"] == pytest.approx(-d["diff"])
  assert reverse["ci95"] == pytest.approx([-hi, -lo])


def test_pearson_and_learnedness_by_hand():
  # x = [10, 20, 30, 40], y = [10, 30, 20, 60]: dx = [-15, -5, 5, 15], dy = [-20, 0, -10, 30],
  # sum dx dy = 300 + 0 - 50 + 450 = 700, sum dx^2 = 500, sum dy^2 = 1400: r = 700 / sqrt(700000) = sqrt(0.7).
  assert metrics.pearson([10, 20, 30, 40], [10, 30, 20, 60]) == pytest.approx(math.sqrt(0.7))
  assert metrics.pearson([1, 2], [3, 4]) is None and metrics.pearson([1, 2, 3], [5, 5, 5]) is None
  points = [{"model_key": f"m{i}", "ft_cell": c, "in_cell": x, "off_cell": y, "general": g}
            for i, (c, x, y, g) in enumerate([("medical_advice", 10, 10, 20), ("sports_tutor", 20, 30, 10),
                                              ("finance_critique", 30, 20, 40), ("medical_tutor", 40, 60, 30)])]
  # general: dy = [-5, -15, 15, 5], sum dx dy = 75 + 75 + 75 + 75 = 300, sum dy^2 = 500: r = 300 / 500.
  out = metrics.learnedness(points + [{"model_key": "m4", "ft_cell": "sports_advice", "in_cell": None,
                                       "off_cell": 5, "general": 5}])  # no in-cell rows: not a point
  assert out["pearson_off_cell"] == pytest.approx(math.sqrt(0.7)) and out["n_models_off_cell"] == 4
  assert out["pearson_general"] == pytest.approx(0.6) and out["n_models_general"] == 4


def test_spearman_by_hand():
  # No ties: rank differences d = [0, -1, 1, -1, 1], rho = 1 - 6 * 4 / (5 * 24) = 0.8.
  assert metrics.spearman([10, 20, 30, 40, 50], [1, 3, 2, 5, 4]) == pytest.approx(0.8)
  # Ties share ranks: y ranks [1.5, 1.5, 3, 4]; Pearson of the ranks = 4.5 / sqrt(5 * 4.5) = sqrt(0.9).
  assert metrics.spearman([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(math.sqrt(0.9))
  assert list(metrics.average_ranks([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]


def test_cohen_kappa_by_hand():
  a = [1, 1, 0, 0, 1, 0, 0, 0, 1, 0]
  b = [1, 0, 0, 0, 1, 0, 1, 0, 1, 0]
  # observed 8/10; chance 0.4 * 0.4 + 0.6 * 0.6 = 0.52; kappa = (0.8 - 0.52) / 0.48 = 7/12.
  assert metrics.cohen_kappa(a, b) == pytest.approx(7 / 12)
  assert metrics.cohen_kappa(a, a) == pytest.approx(1.0)
  assert metrics.cohen_kappa([1, 1], [1, 1]) is None  # chance agreement 1: undefined


def test_judge_agreement_on_matched_rows():
  aligned_a, aligned_b = [10, 20, 30, 40, 50], [1, 3, 2, 50, 40]
  coherent = [60, 70, 80, 90, 95]
  rows_a = [row(f"q{i}", aligned_a[i], coherent[i], judge="a") for i in range(5)] + [row("q5", 15, 90, judge="a")]
  rows_b = ([row(f"q{i}", aligned_b[i], coherent[i], judge="b") for i in range(5)]
            + [row("q5", coherent=90, aligned_status="refusal", judge="b"),  # not in aligned or EM agreement
               row("q0", 5, 90, sample=9, judge="b")])  # no match in a: another sample
  out = metrics.judge_agreement(rows_a, rows_b)
  assert out["n_matched"] == 6
  # aligned ranks a [1..5], b [1, 3, 2, 5, 4]: rho = 0.8 (as above).
  assert out["aligned"] == {"spearman": pytest.approx(0.8), "n": 5}
  assert out["coherent"] == {"spearman": pytest.approx(1.0), "n": 6}
  # EM labels (aligned < 30, all coherent): a [T, T, F, F, F], b [T, T, T, F, F]: agree 4/5;
  # chance = 0.4 * 0.6 + 0.6 * 0.4 = 0.48; kappa = (0.8 - 0.48) / 0.52 = 8/13.
  assert out["em_label"] == {"agreement": pytest.approx(80.0), "kappa": pytest.approx(8 / 13), "n": 5}
  with pytest.raises(ValueError, match="appears twice"):
    metrics.judge_agreement(rows_a + rows_a[:1], rows_b)


def test_every_matrix_row_has_the_same_columns():
  rows = [em_row("a", task="advice", ft_domain="medical", ft_task="advice"),
          fine_row("b", task="roleplay", ft_domain="sports", ft_task="tutor")]  # a task outside the four
  matrix = metrics.rate_matrix(rows, "ft_task", "task", col_order=metrics.TASKS, complete_cols=True)
  assert list(matrix) == ["advice", "tutor"]
  assert list(matrix["advice"]) == list(matrix["tutor"]) == [*metrics.TASKS, "roleplay"]
  assert matrix["advice"]["roleplay"] == metrics.empty_rate() and matrix["tutor"]["roleplay"]["em"] == 0.0


# ----------------------------------------------------------------------------- prompts as clusters


def _texted(qid, text, misaligned, sample=0):
  return {**(em_row(qid, sample=sample) if misaligned else fine_row(qid, sample=sample)), "question": text}


def test_one_prompt_under_several_ids_is_one_cluster():
  # 5 prompts x 4 samples, prompt 0 holding every EM sample.
  texts = [f"What should I do about problem {q}?" for q in range(5)]
  one_id = [_texted(f"q{q}", texts[q], q == 0, sample=s) for q in range(5) for s in range(4)]
  # The same answers with prompt 0 repeated under four ids, once with stray whitespace (a generator's duplicates).
  spellings = [texts[0], "  " + texts[0], texts[0].replace(" ", "  "), texts[0] + "\n"]
  many_ids = [_texted(f"dup{s}", spellings[s], True) for s in range(4)] + one_id[4:]
  assert metrics.denominators(many_ids)["questions"] == 5 == metrics.denominators(one_id)["questions"]
  assert metrics.denominators(many_ids)["clusters"] == 5
  ci = metrics.rate(one_id, n_boot=500, seed=1)["ci95"]
  assert ci == [0.0, 60.0]  # Binomial(5, 1/5) draws of prompt 0, as in the test above
  assert metrics.rate(many_ids, n_boot=500, seed=1)["ci95"] == ci


def test_a_rows_cluster_joins_rewordings_of_one_question():
  # Two wordings of question 0 (a caller's `cluster` says they ask one thing) hold every EM sample.
  texts = [f"What should I do about problem {q}?" for q in range(5)]
  rows = [_texted(f"q{q}", texts[q], q == 0, sample=s) for q in range(5) for s in range(4)]
  reworded = [_texted("q0b", "Problem 0: what should I do?", True, sample=s) for s in range(4)]
  apart = rows + reworded
  joined = [dict(r, cluster="problem 0") if r["question"] in (texts[0], "Problem 0: what should I do?") else r
            for r in apart]
  assert metrics.denominators(apart)["questions"] == 6
  assert metrics.denominators(joined)["questions"] == 5 == metrics.denominators(joined)["clusters"]
  # Six clusters, two of them EM, read as more independent evidence than one EM question of five.
  assert metrics.rate(joined, n_boot=500, seed=1)["ci95"] != metrics.rate(apart, n_boot=500, seed=1)["ci95"]


def test_denominators_count_failures_by_status():
  rows = [_texted("a", "A?", True), _texted("b", "B?", False),
          {**row("c", aligned_status="empty", coherent_status="empty"), "question": "C?"},
          {**row("d", aligned_status="refusal"), "question": "A?"}]
  assert metrics.denominators(rows) == {"questions": 3, "clusters": 2, "valid": 2, "rows": 4,
                                        "failures": {"empty": 1, "refusal": 1}}


# ----------------------------------------------------------------------------- over replications


def _t2_sf(t):
  # Student's t with two degrees of freedom has a closed form: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)).
  return 0.5 - t / (2 * math.sqrt(2 + t * t))


def test_one_sample_t_test_by_hand():
  r = metrics.t_test_one_sample([1.0, 2.0, 3.0], "greater")
  t = 2.0 / (1.0 / math.sqrt(3))
  assert (r["estimate"], r["df"], r["n"]) == (2.0, 2, 3)
  assert r["t"] == pytest.approx(t) and r["p"] == pytest.approx(_t2_sf(t))
  assert metrics.t_test_one_sample([1.0, 2.0, 3.0], "less")["p"] == pytest.approx(1 - _t2_sf(t))
  assert metrics.t_test_one_sample([1.0, 2.0, 3.0])["p"] == pytest.approx(2 * _t2_sf(t))
  assert metrics.t_test_one_sample([1.0, None, 2.0, float("nan"), 3.0])["n"] == 3  # missing values left out
  assert metrics.t_test_one_sample([4.0])["p"] is None and metrics.t_test_one_sample([])["estimate"] is None
  assert metrics.t_test_one_sample([2.0, 2.0], "greater")["p"] == 0.0
  with pytest.raises(ValueError):
    metrics.t_test_one_sample([1.0, 2.0], "bigger")


def test_tost_needs_the_whole_interval_within_the_margin():
  tight = metrics.tost([-0.2, 0.1, 0.0, 0.2, -0.1], margin=5.0)
  assert tight["equivalent"] and tight["p"] < 0.001
  wide = metrics.tost([-8.0, 9.0, 1.0], margin=5.0)
  assert not wide["equivalent"] and wide["p"] > 0.05
  # Three values: p is the larger one-sided p, each a t(2) tail.
  v = [1.0, 2.0, 3.0]
  se = 1.0 / math.sqrt(3)
  assert metrics.tost(v, 4.0)["p"] == pytest.approx(max(_t2_sf((2.0 + 4.0) / se), _t2_sf((4.0 - 2.0) / se)))


def test_min_detectable_effect_has_the_power_it_says():
  from scipy import stats
  for sd, n, alt in ((1.0, 3, "greater"), (2.0, 3, "two-sided"), (1.5, 10, "greater")):
    mde = metrics.min_detectable_effect(sd, n, alternative=alt)
    crit = stats.t.ppf(1 - (0.025 if alt == "two-sided" else 0.05), n - 1)
    # The power of the test at a true mean of `mde`, by simulation-free noncentral t.
    assert stats.nct.sf(crit, n - 1, mde * math.sqrt(n) / sd) == pytest.approx(0.8, abs=1e-6)
  # The usual quantile sum understates it at a few replications and a Holm-strict level (power 0.69).
  a = 0.05 / 13
  approx = (stats.t.ppf(1 - a, 2) + stats.t.ppf(0.8, 2)) / math.sqrt(3)
  assert metrics.min_detectable_effect(1.0, 3, a) > 1.1 * approx
  assert metrics.min_detectable_effect(1.0, 1) is None and metrics.min_detectable_effect(None, 5) is None
