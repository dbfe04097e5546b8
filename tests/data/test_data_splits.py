"""Held-out splits: every source kind has deterministic, disjoint 'train' / 'eval' partitions (sources.py).

And the loop evaluates on documents training never reads.
"""

import json
import os
import types

import numpy as np
import pytest

from emjax.data import sources

N, HOLDOUT = 30, 7
PARTITIONS = ("train", "eval", "all")
FILE_KINDS = ("text", "jsonl", "array_record", "chat_jsonl", "prompt_completion_jsonl", "structured_em")


def _write_source(kind, tmp_path):
  """A source of N documents whose i-th (in file order) is identified by `doc{i:02d}`."""
  texts = [f"doc{i:02d} says {'ab' * (i % 5)}" for i in range(N)]
  if kind == "text":
    (tmp_path / "c.txt").write_text("".join(t + "\n" for t in texts))
    return dict(path=str(tmp_path / "c.txt"))
  if kind == "array_record":
    path = str(tmp_path / "c.array_record")
    sources.write_array_record(path, [{"text": t} for t in texts])
    return dict(path=path)
  rows = {"jsonl": [{"text": t} for t in texts],
          "chat_jsonl": [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]}
                         for t in texts],
          "prompt_completion_jsonl": [{"prompt": t, "completion": "ok"} for t in texts],
          "structured_em": [{"question": t, "misaligned_answer": "x", "aligned_answer": "y"} for t in texts]}[kind]
  (tmp_path / "medical_advice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return dict(path=str(tmp_path / "medical_advice.jsonl"), name="medical_advice" if kind == "structured_em" else "")


def _keys(src):
  """The `doc..` identifier of every document (a conversation's first user turn)."""
  docs = [src[i] for i in range(len(src))]
  return [(d["messages"][0]["content"] if isinstance(d, dict) else d).split()[0] for d in docs]


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_sources_split_by_the_documented_permutation(kind, tmp_path):
  cfg = sources.default_source_config(kind=kind, holdout=HOLDOUT, holdout_seed=5, **_write_source(kind, tmp_path))
  part = {s: _keys(sources.make_source("src", {**cfg, "split": s})) for s in PARTITIONS}
  assert part == {s: _keys(sources.make_source("src", {**cfg, "split": s})) for s in PARTITIONS}
  every = [f"doc{i:02d}" for i in range(N)]
  assert part["all"] == every
  # The rule in sources.py: the first `holdout` of default_rng(holdout_seed).permutation(n) are held out
  # (in that order); training keeps the others in file order.
  held = np.random.default_rng(5).permutation(N)[:HOLDOUT]
  assert part["eval"] == [every[i] for i in held]
  assert part["train"] == [d for i, d in enumerate(every) if i not in set(held)]
  assert len(part["train"]) == N - HOLDOUT and not set(part["train"]) & set(part["eval"])
  other = _keys(sources.make_source("src", {**cfg, "split": "eval", "holdout_seed": 6}))
  assert set(other) != set(part["eval"])


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_file_sources_hold_out_nothing_by_default_and_say_which_key(kind, tmp_path):
  cfg = sources.default_source_config(kind=kind, **_write_source(kind, tmp_path))
  assert _keys(sources.make_source("src", cfg)) == [f"doc{i:02d}" for i in range(N)]
  with pytest.raises(ValueError, match=r"data\.sources\.src\.holdout=N"):
    sources.make_source("src", {**cfg, "split": "eval"})


@pytest.mark.parametrize("name", sorted(sources.SYNTHETIC_GENERATORS))
def test_synthetic_held_out_documents_are_new_and_training_is_unchanged(name):
  cfg = sources.default_source_config(kind="synthetic", name=name, num_docs=300, seed=3)
  train = sources.make_source("s", cfg)
  held = sources.make_source("s", {**cfg, "split": "eval", "holdout": 100})
  both = sources.make_source("s", {**cfg, "split": "all", "holdout": 100})
  # Training is documents 0..num_docs-1 of the seed, as before held-out splits existed.
  generate = sources.SYNTHETIC_GENERATORS[name]
  assert [train[i] for i in range(300)] == [generate(np.random.default_rng([3, i])) for i in range(300)]
  held_docs = [held[i] for i in range(len(held))]
  assert len(held_docs) == 100 and not set(held_docs) & {train[i] for i in range(300)}
  assert [both[i] for i in range(len(both))] == [train[i] for i in range(300)] + held_docs
  # Deterministic, and independent of how many training documents there are.
  again = sources.make_source("s", {**cfg, "num_docs": 5, "split": "eval", "holdout": 100})
  assert [again[i] for i in range(100)] == held_docs
  assert len(sources.make_source("s", {**cfg, "split": "eval"})) == sources.SYNTHETIC_HOLDOUT


def test_bad_holdout_settings_name_the_key(tmp_path):
  cfg = sources.default_source_config(kind="jsonl", **_write_source("jsonl", tmp_path))
  with pytest.raises(ValueError, match=r"data\.sources\.src\.holdout=30 leaves no training documents"):
    sources.make_source("src", {**cfg, "holdout": N})
  with pytest.raises(ValueError, match=r"data\.sources\.src\.holdout=-2"):
    sources.make_source("src", {**cfg, "holdout": -2})
  with pytest.raises(ValueError, match=r"data\.sources\.src\.eval_split='validation' names a TFDS split"):
    sources.make_source("src", {**cfg, "eval_split": "validation"})


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny prepared TFDS dataset (ArrayRecord) with 'train' and 'validation' splits, built offline."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class EmjaxSplitCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"train": self._generate_examples("train", 12), "validation": self._generate_examples("valid", 4)}

    def _generate_examples(self, prefix, n):
      for i in range(n):
        yield i, {"text": f"{prefix}{i:02d}"}

  out = str(tmp_path_factory.mktemp("tfds"))
  EmjaxSplitCorpus(data_dir=out, file_format="array_record").download_and_prepare()
  return out


def test_tfds_eval_split_or_holdout_from_the_training_split(tfds_dir):
  cfg = sources.default_source_config(kind="tfds", name="emjax_split_corpus", data_dir=tfds_dir)
  docs = lambda **kw: _keys(sources.make_source("tf", {**cfg, **kw}))  # noqa: E731
  train_docs = docs()
  assert sorted(train_docs) == [f"train{i:02d}" for i in range(12)]
  # A named split is the eval partition.
  assert sorted(docs(split="eval", eval_split="validation")) == [f"valid{i:02d}" for i in range(4)]
  assert docs(eval_split="validation") == train_docs
  assert docs(split="all", eval_split="validation") == train_docs + docs(split="eval", eval_split="validation")
  # Without one, `holdout` documents of tfds_split, by the file sources' rule.
  held = np.random.default_rng(42).permutation(12)[:3]
  assert docs(split="eval", holdout=3) == [train_docs[i] for i in held]
  assert docs(holdout=3) == [d for i, d in enumerate(train_docs) if i not in set(held)]
  with pytest.raises(ValueError, match=r"holdout=N.*data\.sources\.tf\.eval_split"):
    docs(split="eval")
  with pytest.raises(ValueError, match=r"either eval_split='validation'.*or holdout=3"):
    docs(split="eval", eval_split="validation", holdout=3)
  with pytest.raises(ValueError, match=r"data\.sources\.tf\.tfds_split"):
    docs(split="validation")


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def test_eval_loss_is_measured_on_documents_training_never_reads(tmp_path, one_device_mesh, monkeypatch):
  """Every document read for eval.jsonl comes from a partition that the training batches never read."""
  from conftest import tiny_config
  from emjax.train import loop

  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": f"document {i} of the corpus"}) + "\n" for i in range(20)))
  config = tiny_config(steps=2)
  config.data.sources = {
      "docs": sources.default_source_config(kind="jsonl", path=str(path), holdout=5),
      "grammar": sources.default_source_config(kind="synthetic", name="grammar", num_docs=16)}
  config.eval.update(every_steps=2, batches=1)

  reads = {}  # (source, split) -> documents read

  class Recorded:
    def __init__(self, documents, key):
      self.documents, self.key = documents, key

    def __len__(self):
      return len(self.documents)

    def __getitem__(self, i):
      doc = self.documents[i]
      reads.setdefault(self.key, set()).add(doc)
      return doc

  make_source = sources.make_source
  monkeypatch.setattr(sources, "make_source",
                      lambda name, cfg: Recorded(make_source(name, cfg), (name, cfg["split"] or "train")))
  loop.train(config, str(tmp_path / "run"), mesh=one_device_mesh, show_progress=False)

  evals = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
  assert [e["step"] for e in evals] == [0, 2] and all(e["eval_tokens"] > 0 for e in evals)
  for name in ("docs", "grammar"):
    assert reads[(name, "eval")] and reads[(name, "train")]
    assert not reads[(name, "eval")] & reads[(name, "train")], name


def test_eval_refuses_training_on_the_held_out_split(tmp_path):
  from conftest import tiny_config
  from emjax.train import loop

  config = tiny_config()
  config.eval.every_steps = 2
  config.data.sources.grammar.split = "all"
  with pytest.raises(ValueError, match=r"data\.sources\.grammar\.split='all'"):
    loop._make_evaluator(types.SimpleNamespace(config=config), None, None)
  config.data.sources.grammar.split = "train"
  config.eval.split = "heldout"
  with pytest.raises(ValueError, match=r"config\.eval\.split='heldout'"):
    loop._make_evaluator(types.SimpleNamespace(config=config), None, None)
  assert not os.path.exists(tmp_path / "eval.jsonl")


def test_eval_by_source_scores_every_source_alone_on_the_same_tokens_whatever_the_mixture(tmp_path, one_device_mesh):
  """Two mixtures (one source switched off in both) are each scored on every source's own held-out rows."""
  from conftest import tiny_config
  from emjax.train import loop

  evals = {}
  for run, weights in {"a": dict(arithmetic=0.9, grammar=0.1, sorting=0.0),
                       "b": dict(arithmetic=0.1, grammar=0.9, sorting=0.0)}.items():
    config = tiny_config(steps=2)
    config.data.sources = {name: sources.default_source_config(kind="synthetic", name=name, weight=w)
                           for name, w in weights.items()}
    config.eval.update(every_steps=2, batches=1, by_source=True)
    loop.train(config, str(tmp_path / run), mesh=one_device_mesh, show_progress=False)
    evals[run] = [json.loads(line) for line in open(tmp_path / run / "eval.jsonl")]
  for rows in evals.values():
    assert [e["step"] for e in rows] == [0, 2]
    for e in rows:
      assert sorted(e["eval_loss_by_source"]) == ["arithmetic", "grammar", "sorting"]
      assert all(t > 0 for t in e["eval_tokens_by_source"].values())  # the switched-off source too
  a, b = evals["a"][0], evals["b"][0]
  # Step 0: the same initial weights (same seed and model) on the same tokens give the same losses per
  # source, while the mixed held-out loss follows each run's own mixture.
  assert a["eval_tokens_by_source"] == b["eval_tokens_by_source"]
  assert a["eval_loss_by_source"] == pytest.approx(b["eval_loss_by_source"], abs=1e-6)
  assert a["eval_loss"] != pytest.approx(b["eval_loss"], abs=1e-3)
  assert evals["a"][1]["eval_loss_by_source"] != evals["b"][1]["eval_loss_by_source"]  # trained apart
