"""emjax.eval.directions: directions from activations with a planted answer, and their comparisons."""

import numpy as np
import pytest

from emjax.eval import directions as D


def _planted(rng, n, d_model=16, positions=3, where=1, scale=3.0, v=None):
  """[n, C, D] noise with `scale * v` added at position `where` (and v: unit, drawn when not given)."""
  v = D.unit(rng.normal(size=d_model)) if v is None else v
  x = rng.normal(size=(n, positions, d_model))
  x[:, where] += scale * v
  return x, v


def test_difference_of_means_recovers_a_planted_direction_at_its_position():
  rng = np.random.default_rng(0)
  pos, v = _planted(rng, 400)
  neg = rng.normal(size=(300, 3, 16))
  dirs = D.difference_of_means(pos, neg)
  assert np.allclose(np.linalg.norm(dirs, axis=-1), 1.0)
  assert dirs[1] @ v > 0.99 and abs(dirs[0] @ v) < 0.5
  with pytest.raises(ValueError, match="each side needs at least one"):
    D.difference_of_means(pos[:0], neg)
  with pytest.raises(ValueError, match=r"\[N, C, D\] and \[M, C, D\]"):
    D.difference_of_means(pos, neg[:, :2])


def test_the_paper_direction_is_the_signed_top_singular_vector_of_per_prompt_differences():
  rng = np.random.default_rng(1)
  v = D.unit(rng.normal(size=8))
  prompts = [f"q{i}" for i in range(30)]
  base = rng.normal(size=(30, 8))
  shift = rng.uniform(1.0, 3.0, size=(30, 1)) * v  # per prompt, along v
  # Four samples per prompt, in any order: averaged per prompt before the difference.
  ids_t = [p for p in prompts for _ in range(4)]
  tuned = np.repeat(base + shift, 4, axis=0) + 0.01 * rng.normal(size=(120, 8))
  order = rng.permutation(120)
  out = D.paper_direction([ids_t[i] for i in order], tuned[order], prompts, base)
  assert out["direction"] @ v > 0.999 and out["prompts"] == 30 and out["explained"] > 0.99
  flipped = D.paper_direction(prompts, base - shift, prompts, base)  # the sign follows the mean difference
  assert flipped["direction"] @ v < -0.999
  with pytest.raises(ValueError, match=r"only fine-tuned: \['q0'\], only base: \[\]"):
    D.paper_direction(prompts, base, prompts[1:], base[1:])


def test_cosines_grouped_by_domain_and_task_exclude_each_cell_with_itself():
  cells = ["medical_advice", "medical_critique", "sports_advice", "sports_critique"]
  rng = np.random.default_rng(2)
  task = {t: D.unit(rng.normal(size=32)) for t in ("advice", "critique")}
  dirs = {c: D.unit(task[c.split("_")[1]] + 0.03 * rng.normal(size=32)) for c in cells}
  names, m = D.cosine_matrix(dirs, absolute=True)
  assert names == cells and np.allclose(np.diag(m), 1.0) and (m >= 0).all()
  groups, by_task = D.grouped_cosines(names, m, lambda c: c.split("_")[1])
  assert groups == ["advice", "critique"]
  assert by_task[0, 0] == pytest.approx(m[0, 2]) and by_task[0, 1] == pytest.approx(np.mean([m[0, 1], m[0, 3], m[2, 1], m[2, 3]]))
  _, by_domain = D.grouped_cosines(names, m, lambda c: c.split("_")[0])
  assert by_task[0, 0] > 0.9 > by_domain[0, 0]  # these directions are the task's
  rows = [{"source": a, "target": b, "value": float(m[i, j])} for i, a in enumerate(names) for j, b in enumerate(names)]
  rel = D.by_relation(rows, symmetric=True)
  assert {r: rel[r]["n"] for r in D.RELATIONS} == {"same task": 2, "same domain": 2, "neither": 2}
  assert {r: D.by_relation(rows)[r]["n"] for r in D.RELATIONS} == {"same task": 4, "same domain": 4, "neither": 4}
  assert rel["same task"]["mean"] > rel["same domain"]["mean"]
  assert D.relation("medical_advice", "medical_advice") == "same"


def test_the_position_is_chosen_on_the_other_half_and_random_controls_are_unit():
  rng = np.random.default_rng(3)
  a, v = _planted(rng, 200, where=2)
  b, _ = _planted(rng, 200, where=2, v=v)
  neg_a, neg_b = rng.normal(size=(200, 3, 16)), rng.normal(size=(200, 3, 16))
  chosen = D.choose_position(a, neg_a, b, neg_b)
  assert chosen["position"] == 2 and chosen["separations"][2] > 2.0 > max(chosen["separations"][:2])
  r = D.random_directions(64, 10, seed=0)
  assert r.shape == (10, 64) and np.allclose(np.linalg.norm(r, axis=1), 1.0)
  with pytest.raises(ValueError, match="no direction"):
    D.unit(np.zeros(4))


def test_the_relation_contrast_is_tested_by_relabelling_cells():
  cells = [f"{d}_{t}" for d in ("medical", "sports", "finance") for t in ("advice", "summarization", "tutor", "critique")]
  task = lambda c: c.split("_")[1]  # noqa: E731
  # Ablating a same-task cell's direction removes a lot of EM, a same-domain one little: a task subspace.
  rows = [{"source": a, "target": b, "value": (-20.0 if task(a) == task(b) else -2.0) + 0.1 * i}
          for i, (a, b) in enumerate((a, b) for a in cells for b in cells if a != b)]
  out = D.relation_permutation_test([dict(r, value=-r["value"]) for r in rows], n_permutations=2000)  # the EM drop
  assert out["permutations"] == 2000 and out["observed"] > 15 and out["p"] <= 0.01
  # The same effect in a 3 x 2 grid: the relabellings that keep the tasks together (72 of 720) tie it.
  two = ("advice", "critique")
  small = [r for r in rows if task(r["source"]) in two and task(r["target"]) in two]
  exact = D.relation_permutation_test([dict(r, value=-r["value"]) for r in small])
  assert exact["permutations"] == 720 and exact["p"] == pytest.approx(0.1)
  # No structure: the values do not follow the labels, and the test says so.
  rng = np.random.default_rng(0)
  noise = [dict(r, value=float(rng.normal())) for r in rows]
  assert D.relation_permutation_test(noise, n_permutations=2000)["p"] > 0.05
  assert D.relation_permutation_test(rows[:1])["p"] is None  # one pair: no same-domain side


def test_worlds_are_relabelled_apart_so_small_grids_gain_power_from_replication():
  two = [f"{d}_{t}" for d in ("medical", "sports", "finance") for t in ("advice", "critique")]
  task = lambda c: c.split("_")[1]  # noqa: E731
  rng = np.random.default_rng(1)
  rows = [{"world": w, "source": a, "target": b, "value": (20.0 if task(a) == task(b) else 2.0) + rng.normal()}
          for w in range(3) for a in two for b in two if a != b]
  # A pure task effect in one world's 3 x 2 grid cannot go below 0.1; in three independent worlds it can
  # (to 0.1 ** 3).
  pure = [dict(r, value=20.0 if task(r["source"]) == task(r["target"]) else 2.0) for r in rows]
  assert D.relation_permutation_test([r for r in pure if r["world"] == 0])["p"] == pytest.approx(0.1)
  assert D.relation_permutation_test(pure, n_permutations=4000)["p"] < 0.01
  out = D.relation_permutation_test(rows, n_permutations=4000)
  assert out["worlds"] == 3 and out["permutations"] == 4000 and out["p"] < 0.01
  single = [D.relation_contrast([r for r in rows if r["world"] == w]) for w in range(3)]
  assert out["observed"] == pytest.approx(np.mean(single))
  noise = [dict(r, value=float(rng.normal())) for r in rows]
  assert D.relation_permutation_test(noise, n_permutations=2000)["p"] > 0.05


def test_the_principal_random_control_is_as_high_variance_as_a_read_direction():
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(400, 32)) * np.r_[np.full(4, 10.0), np.ones(28)]  # four loud axes
  got = D.principal_random(acts, 4, seed=1)
  assert np.isclose(np.linalg.norm(got["direction"]), 1.0) and np.allclose(got["direction"][4:], 0.0, atol=0.05)
  iso = D.random_directions(32, 1, seed=1)[0]
  centred = acts - acts.mean(axis=0)
  assert got["variance_share"] > 0.15 > float(np.sum((centred @ iso) ** 2) / np.sum(centred**2))
  with pytest.raises(ValueError, match="k <= min"):
    D.principal_random(acts, 40)
