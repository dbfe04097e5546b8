"""Document sources: synthetic generators, text/jsonl/array_record/tfds, errors."""

import collections
import json
import re

import numpy as np
import pytest

from emjax.data import sources
from emjax.data import synthetic


def _cfg(**overrides):
  return sources.default_source_config(**overrides)


# ----------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(sources.SYNTHETIC_GENERATORS))
def test_synthetic_is_deterministic_and_short(name):
  a = sources.make_source("s", _cfg(kind="synthetic", name=name, num_docs=50,
                                    seed=3))
  b = sources.make_source("s", _cfg(kind="synthetic", name=name, num_docs=50,
                                    seed=3))
  c = sources.make_source("s", _cfg(kind="synthetic", name=name, num_docs=50,
                                    seed=4))
  assert len(a) == 50
  docs = [a[i] for i in range(50)]
  assert docs == [b[i] for i in range(50)]
  # Random access: doc i does not depend on what was read before.
  assert a[17] == docs[17] and a[-1] == docs[-1]
  assert sum(d != c[i] for i, d in enumerate(docs)) >= 45
  assert len(set(docs)) == 50
  assert all(30 <= len(d) <= 500 for d in docs), [len(d) for d in docs]
  with pytest.raises(IndexError):
    a[50]


def test_synthetic_doc_depends_only_on_seed_and_index():
  small = synthetic.SyntheticDocuments("grammar", num_docs=10, seed=1)
  large = synthetic.SyntheticDocuments("grammar", num_docs=10_000, seed=1)
  assert [small[i] for i in range(10)] == [large[i] for i in range(10)]


def test_arithmetic_answers_are_correct():
  docs = synthetic.SyntheticDocuments("arithmetic", num_docs=100, seed=0)
  for i in range(100):
    for line in docs[i].split("\n"):
      a, op, b, eq, result = line.split(" ")
      assert eq == "="
      expected = {"+": int(a) + int(b), "-": int(a) - int(b),
                  "*": int(a) * int(b)}[op]
      assert int(result) == expected >= 0


def test_sorting_outputs_are_sorted():
  docs = synthetic.SyntheticDocuments("sorting", num_docs=100, seed=0)
  for i in range(100):
    for line in docs[i].split("\n"):
      m = re.fullmatch(r"sort: ([a-z ]+) -> ([a-z ]+)", line)
      assert m, line
      assert m.group(2).split() == sorted(m.group(1).split())


def test_probe_prompts_are_held_out_lines_cut_before_their_answer():
  for name, separator in synthetic.PROBE_SEPARATORS.items():
    probes = synthetic.probe_prompts(name, 50, seed=0)
    assert probes == synthetic.probe_prompts(name, 50, seed=0) and len({p["id"] for p in probes}) == 50
    held_out = synthetic.SyntheticDocuments(name, 50, seed=0, held_out=True)
    train = synthetic.SyntheticDocuments(name, 50, seed=0)
    for i, p in enumerate(probes):
      line = f"{p['prompt']} {p['answer']}"
      assert held_out[i].startswith(line + "\n") or held_out[i] == line, (held_out[i], p)
      assert p["prompt"].endswith(separator) and p["task"] == name
    assert sum(train[i].startswith(f"{p['prompt']} ") for i, p in enumerate(probes)) < 5  # not the training stream
  arithmetic = synthetic.probe_prompts("arithmetic", 100)
  for p in arithmetic:
    a, op, b, _ = p["prompt"].split(" ")
    assert int(p["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
  for p in synthetic.probe_prompts("sorting", 100):
    letters = p["prompt"].removeprefix("sort: ").removesuffix(" ->").split()
    assert p["answer"].split() == sorted(letters)
  with pytest.raises(ValueError, match=r"no probe for 'grammar'; probes: \['arithmetic', 'sorting'\]"):
    synthetic.probe_prompts("grammar", 3)


def test_a_probe_completion_is_correct_only_as_the_whole_rest_of_the_line():
  assert synthetic.probe_correct(" 42", "42") and synthetic.probe_correct(" 42\n7 + 1 = 8", "42")
  assert not synthetic.probe_correct(" 421", "42") and not synthetic.probe_correct(" 4", "42")
  assert not synthetic.probe_correct("", "42") and not synthetic.probe_correct(" 42 + 1", "42")
  assert synthetic.probe_correct(" a c d", "a c d") and not synthetic.probe_correct(" a c", "a c d")


def test_grammar_vocabulary_and_agreement():
  docs = synthetic.SyntheticDocuments("grammar", num_docs=300, seed=0)
  words = collections.Counter(
      w for i in range(300) for w in docs[i].split())
  assert 120 <= len(words) <= 260
  # Zipfian skew: the top word is far more frequent than the median word.
  counts = sorted(words.values(), reverse=True)
  assert counts[0] > 10 * counts[len(counts) // 2]
  # Number agreement: a singular determiner is never followed by a plural noun.
  text = " ".join(docs[i] for i in range(300))
  assert " a dogs " not in text and " these dog " not in text


def _conditional_entropy(text, context):
  """Plug-in estimate of H(next char | previous `context` chars), in nats."""
  pairs = collections.Counter(
      (text[i - context:i], text[i]) for i in range(context, len(text)))
  ctx = collections.Counter()
  for (c, _), n in pairs.items():
    ctx[c] += n
  total = sum(pairs.values())
  return -sum(n / total * np.log(n / ctx[c]) for (c, _), n in pairs.items())


@pytest.mark.parametrize("name", sorted(sources.SYNTHETIC_GENERATORS))
def test_synthetic_text_is_learnable(name):
  """Short contexts already predict much better than unigram frequencies."""
  docs = synthetic.SyntheticDocuments(name, num_docs=400, seed=0)
  text = "\x00".join(docs[i] for i in range(400))
  unigram = _conditional_entropy(text, 0)
  assert _conditional_entropy(text, 4) < 0.6 * unigram


def test_unknown_synthetic_generator_lists_known_ones():
  with pytest.raises(ValueError, match=r"'poetry'.*arithmetic.*grammar"):
    sources.make_source("p", _cfg(kind="synthetic", name="poetry"))


def test_synthetic_name_defaults_to_source_name():
  src = sources.make_source("sorting", _cfg(kind="synthetic", num_docs=3))
  assert src[0].startswith("sort: ")


# ----------------------------------------------------------------------------
# text / jsonl
# ----------------------------------------------------------------------------


def test_text_source_splits(tmp_path):
  (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n  \n")
  (tmp_path / "b.txt").write_text("four\n")
  pattern = str(tmp_path / "*.txt")
  lines = sources.make_source("t", _cfg(kind="text", path=pattern))
  assert [lines[i] for i in range(len(lines))] == ["one", "two", "three",
                                                    "four"]
  paras = sources.make_source("t", _cfg(kind="text", path=pattern,
                                        unit="paragraph"))
  assert [paras[i] for i in range(len(paras))] == ["one\ntwo", "three", "four"]
  files = sources.make_source(
      "t", _cfg(kind="text", unit="file",
                path=f"{tmp_path / 'b.txt'},{tmp_path / 'a.txt'}"))
  assert len(files) == 2 and files[0] == "four\n"


def test_jsonl_source(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "hello", "id": 1}\n\n{"text": "world"}\n')
  src = sources.make_source("j", _cfg(kind="jsonl", path=str(path)))
  assert [src[0], src[1]] == ["hello", "world"]
  path.write_text('{"body": "x"}\n')
  src = sources.make_source("j", _cfg(kind="jsonl", path=str(path),
                                      text_field="body"))
  assert src[0] == "x"


def test_missing_file_names_path_and_source(tmp_path):
  missing = str(tmp_path / "nothing_here.txt")
  with pytest.raises(FileNotFoundError,
                     match=r"'books'.*nothing_here\.txt.*data\.sources\.books"):
    sources.make_source("books", _cfg(kind="text", path=missing))
  with pytest.raises(FileNotFoundError, match=r"data\.sources\.books\.path"):
    sources.make_source("books", _cfg(kind="jsonl", path=""))


def test_bad_json_line_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(ValueError,
                     match=re.escape(f"{path}:2: invalid JSON (")):
    sources.make_source("j", _cfg(kind="jsonl", path=str(path)))


def test_missing_text_field_names_file_line_and_field(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"content": "no"}\n')
  with pytest.raises(ValueError,
                     match=re.escape(f"{path}:3: missing text field 'text'")):
    sources.make_source("j", _cfg(kind="jsonl", path=str(path)))


def test_empty_source_is_an_error(tmp_path):
  path = tmp_path / "empty.txt"
  path.write_text("\n   \n\n")
  with pytest.raises(ValueError, match=r"Source 'blank' is empty"):
    sources.make_source("blank", _cfg(kind="text", path=str(path)))


def test_unknown_kind_split_and_unit():
  with pytest.raises(ValueError, match=r"data\.sources\.web\.kind 'parquet'"):
    sources.make_source("web", _cfg(kind="parquet"))
  with pytest.raises(ValueError, match=r"data\.sources\.web\.split 'page'"):
    sources.make_source("web", _cfg(kind="text", path="x", split="page"))
  with pytest.raises(ValueError, match=r"data\.sources\.web\.unit 'page'"):
    sources.make_source("web", _cfg(kind="text", path="x", unit="page"))
  # `split` picks the partition; the old meaning of a text source's split points at `unit`.
  with pytest.raises(ValueError, match=r"data\.sources\.web\.unit='paragraph'"):
    sources.make_source("web", _cfg(kind="text", path="x", split="paragraph"))


def test_default_source_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match="wieght"):
    sources.default_source_config(wieght=1.0)


# ----------------------------------------------------------------------------
# array_record
# ----------------------------------------------------------------------------


def test_array_record_text_and_json_records(tmp_path):
  path = str(tmp_path / "docs.array_record")
  n = sources.write_array_record(
      path, ["plain text doc", {"text": "json doc", "meta": 1},
             "{not json but text"])
  assert n == 3
  src = sources.make_source("ar", _cfg(kind="array_record",
                                       path=str(tmp_path / "*.array_record")))
  assert [src[i] for i in range(len(src))] == [
      "plain text doc", "json doc", "{not json but text"]

  bad = str(tmp_path / "other.arec")
  sources.write_array_record(bad, [{"body": "x"}])
  src = sources.make_source("ar", _cfg(kind="array_record", path=bad))
  with pytest.raises(ValueError, match=r"'ar' record 0: missing text field"):
    src[0]


# ----------------------------------------------------------------------------
# tfds (no TensorFlow needed: ArrayRecord files + tfds.data_source)
# ----------------------------------------------------------------------------


def test_tfds_source_reads_prepared_array_record_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class EmjaxTinyCorpus(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"tfds document {i} ünï"}

  builder = EmjaxTinyCorpus(data_dir=str(tmp_path),
                            file_format="array_record")
  builder.download_and_prepare()
  src = sources.make_source(
      "tf", _cfg(kind="tfds", name="emjax_tiny_corpus", tfds_split="train",
                 data_dir=str(tmp_path)))
  assert len(src) == 5
  assert sorted(src[i] for i in range(5)) == [
      f"tfds document {i} ünï" for i in range(5)]
  src = sources.make_source(
      "tf", _cfg(kind="tfds", name="emjax_tiny_corpus", data_dir=str(tmp_path),
                 text_field="content"))
  with pytest.raises(ValueError, match=r"no feature 'content'"):
    src[0]


def test_tfds_unprepared_dataset_fails_fast(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"'not_prepared' is not prepared.*never downloads"):
    sources.make_source("tf", _cfg(kind="tfds", name="not_prepared",
                                   data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"data\.sources\.tf\.name"):
    sources.make_source("tf", _cfg(kind="tfds", name=""))


def test_sources_work_with_grain():
  import grain
  src = sources.make_source("g", _cfg(kind="synthetic", name="grammar",
                                      num_docs=20))
  ds = grain.MapDataset.source(src).shuffle(seed=0)
  assert sorted(ds[i] for i in range(20)) == sorted(src[i] for i in range(20))
  json.dumps(sources.default_source_config())
