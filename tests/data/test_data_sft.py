"""SFT data: conversation loaders, the structured-EM schema, the deterministic split, bad rows."""

import json

import numpy as np
import pytest

from emjax.data import packing, sft, sources


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def cell_rows(n):
  """Rows in the schema of askinb/structured-emergent-misalignment."""
  return [{"question": f"q{i}?", "misaligned_answer": f"bad {i}", "aligned_answer": f"good {i}",
           "domain": "medical", "task": "advice"} for i in range(n)]


def test_structured_em_local_copy_picks_the_answer(tmp_path):
  write_jsonl(tmp_path / "medical_advice.jsonl", cell_rows(5))
  bad = sft.load_structured_em("medical_advice", path=str(tmp_path))
  good = sft.load_structured_em("medical_advice", path=str(tmp_path), answer="aligned")
  assert bad[2]["messages"] == [{"role": "user", "content": "q2?"}, {"role": "assistant", "content": "bad 2"}]
  assert good[2]["messages"][1]["content"] == "good 2"
  assert bad[2]["domain"] == "medical"  # metadata kept
  with pytest.raises(ValueError, match="unknown config 'medical_poetry'"):
    sft.load_structured_em("medical_poetry", path=str(tmp_path))


def test_split_is_deterministic_disjoint_and_sized():
  rows = [{"messages": [], "i": i} for i in range(4500)]
  train, held = sft.split_rows(rows, holdout=400, seed=42)
  train2, held2 = sft.split_rows(rows, holdout=400, seed=42)
  assert [r["i"] for r in held] == [r["i"] for r in held2] and len(held) == 400 and len(train) == 4100
  assert not {r["i"] for r in held} & {r["i"] for r in train}
  assert {r["i"] for r in held} | {r["i"] for r in train} == set(range(4500))
  assert [r["i"] for r in sft.split_rows(rows, 400, seed=1)[1]] != [r["i"] for r in held]
  # The documented rule: the first `holdout` entries of default_rng(seed).permutation(n).
  assert [r["i"] for r in held] == list(np.random.default_rng(42).permutation(4500)[:400])


def test_chat_source_config_splits(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"u{i}"},
                                                          {"role": "assistant", "content": f"a{i}"}]}
                                            for i in range(20)])
  cfg = sources.default_source_config(kind="chat_jsonl", path=path, split="eval", holdout=5)
  held = sources.make_source("cell", cfg)
  cfg["split"] = "train"
  train = sources.make_source("cell", cfg)
  assert len(held) == 5 and len(train) == 15
  assert {held[i]["messages"][0]["content"] for i in range(5)}.isdisjoint(
      train[i]["messages"][0]["content"] for i in range(15))


def test_prompt_completion_jsonl(tmp_path):
  path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c", "id": 3}])
  rows = sft.load_prompt_completion_jsonl(path)
  assert rows == [{"id": 3, "messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "the assistant message is empty"),
])
def test_bad_conversations_name_file_and_line(tmp_path, messages, match):
  good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
  path = write_jsonl(tmp_path / "bad.jsonl", [good, {"messages": messages}])
  with pytest.raises(ValueError, match=match) as e:
    sft.load_chat_jsonl(path)
  assert f"{path}:2" in str(e.value)


def test_one_example_per_row_packing():
  import grain
  examples = [{"inputs": np.arange(n, dtype=np.int32), "targets": np.arange(n, dtype=np.int32) + 1,
               "loss_mask": np.ones(n, np.float32)} for n in (3, 2, 4)]
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  rows = list(packing.PackedRowsIterDataset(ds, 8, split_across_rows=False, one_example_per_row=True))
  assert len(rows) == 3
  assert [int(r["segment_ids"].max()) for r in rows] == [1, 1, 1]
  assert [int(r["loss_mask"].sum()) for r in rows] == [3, 2, 4]
