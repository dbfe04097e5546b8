"""Filtered on-policy rollouts: `OnPolicySource(..., rollout_filter=, stats_path=)`.

The filter sees each rollout's prompt record, its text (without the stop token) and
finish reason; a rejected rollout's loss_mask is zeroed and nothing else changes; a
batch of rejects trains with loss 0; the counts resume exactly with the source's
state and are written to `stats_path`; with several processes only process 0 judges
and every process receives its verdicts.
"""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest

from emjax.data import tokenizers
from emjax.sample import sampler as sampler_lib
from emjax.train import loop
from emjax.train import on_policy
from test_on_policy import NEW_TOKENS, _config, _mesh, _rows, prompts_file, teacher_dir  # noqa: F401  (fixtures)

REJECTED_IDS = {"p0", "p3", "p5", "p6"}


class Recorder:
  """A filter that rejects by prompt id (and, when asked, everything) and remembers what it saw."""

  def __init__(self, reject_all=False):
    self.calls, self.reject_all = [], reject_all

  def __call__(self, record, text, finish_reason):
    self.calls.append((record, text, finish_reason))
    if self.reject_all:
      return "everything"
    return "listed" if record["id"] in REJECTED_IDS else None


@pytest.fixture(scope="module")
def setup(teacher_dir, prompts_file):
  config = _config(teacher_dir, prompts_file)
  config.on_policy.stop_at_eos = True
  trainer = loop.Trainer(config, _mesh(1))
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  state, frozen = trainer.init_state()
  return trainer, tokenizer, state, frozen


def _draw(source, state, frozen, steps):
  batches = []
  for _ in range(steps):
    source.set_weights(state["params"], frozen)
    batches.append(jax.device_get(next(source)))
  return batches


def test_rejected_rollouts_lose_their_loss_mask_and_the_filter_sees_each_text(setup, prompts_file, tmp_path):
  trainer, tokenizer, state, frozen = setup
  records = [json.loads(line) for line in open(prompts_file)]
  plain = on_policy.make_source(trainer, tokenizer)
  # A token the random student emits often becomes a stop token, so both finish reasons occur.
  first = _draw(plain, state, frozen, 1)[0]
  counts = np.bincount(first["targets"][first["loss_mask"] > 0], minlength=tokenizer.vocab_size)
  stop = dataclasses.replace(plain.sampling, stop_token_ids=plain.sampling.stop_token_ids + (int(counts.argmax()),))
  plain = on_policy.make_source(trainer, tokenizer)
  plain.sampling = stop
  want = _draw(plain, state, frozen, 2)
  judge = Recorder()
  stats = str(tmp_path / "stats" / "rollouts.json")
  source = on_policy.make_source(trainer, tokenizer, rollout_filter=judge, stats_path=stats)
  source.sampling = stop
  got = _draw(source, state, frozen, 2)
  b = trainer.config.train.batch_size
  assert len(judge.calls) == 2 * b
  stop_ids = set(source.sampling.stop_token_ids)
  for step in range(2):
    idx = source.prompt_indices(step)
    for r, i in enumerate(idx):
      record, text, finish = judge.calls[step * b + r]
      assert record == records[i]  # the prompt file's line, in the batch's order
      mask = want[step]["loss_mask"][r] > 0
      completion = want[step]["targets"][r][mask].tolist()
      stopped = completion[-1] in stop_ids
      assert finish == (sampler_lib.FINISH_STOP if stopped else sampler_lib.FINISH_LENGTH)
      assert stopped or len(completion) == NEW_TOKENS
      assert text == tokenizer.decode(completion[:-1] if stopped else completion)
      kept = record["id"] not in REJECTED_IDS
      np.testing.assert_array_equal(got[step]["loss_mask"][r], want[step]["loss_mask"][r] * kept)
    for key in want[step]:
      if key != "loss_mask":
        np.testing.assert_array_equal(got[step][key], want[step][key])
  assert {f for _, _, f in judge.calls} == {sampler_lib.FINISH_STOP, sampler_lib.FINISH_LENGTH}
  rejected = sum(record["id"] in REJECTED_IDS for record, _, _ in judge.calls)
  assert 0 < rejected < 2 * b
  counts = {"total": 2 * b, "kept": 2 * b - rejected, "rejected": {"listed": rejected}}
  assert source.get_state()["rollouts"] == counts
  assert json.load(open(stats)) == {"step": 2, **counts}
  assert not os.path.exists(stats + ".tmp")
  assert "rollouts" not in plain.get_state()  # no filter: the state of before


def test_counts_resume_exactly_and_a_changed_filter_is_refused(setup):
  trainer, tokenizer, state, frozen = setup
  straight = on_policy.make_source(trainer, tokenizer, rollout_filter=Recorder())
  _draw(straight, state, frozen, 2)
  saved = json.loads(json.dumps(straight.get_state()))  # as a checkpoint stores it
  _draw(straight, state, frozen, 1)
  resumed = on_policy.make_source(trainer, tokenizer, rollout_filter=Recorder())
  resumed.set_state(saved)
  assert resumed.get_state()["rollouts"] == saved["rollouts"]
  _draw(resumed, state, frozen, 1)
  assert resumed.get_state() == straight.get_state()
  with pytest.raises(ValueError, match="saved with a rollout filter, and this run has none"):
    on_policy.make_source(trainer, tokenizer).set_state(saved)
  unfiltered = on_policy.make_source(trainer, tokenizer)
  _draw(unfiltered, state, frozen, 1)
  with pytest.raises(ValueError, match="saved without a rollout filter, and this run filters"):
    on_policy.make_source(trainer, tokenizer, rollout_filter=Recorder()).set_state(unfiltered.get_state())


def test_a_batch_of_rejected_rollouts_trains_with_loss_zero(teacher_dir, prompts_file, tmp_path):
  config = _config(teacher_dir, prompts_file, steps=2, warmup_steps=0)
  workdir, stats = str(tmp_path / "run"), str(tmp_path / "run" / "rollout_filter.json")
  make = functools.partial(on_policy.make_source, rollout_filter=Recorder(reject_all=True), stats_path=stats)
  loop.train(config, workdir, mesh=_mesh(1), show_progress=False, make_batch_source=make)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["loss"] == 0.0 and r["loss_tokens"] == 0.0
    assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), r
  b = config.train.batch_size
  assert json.load(open(stats)) == {"step": 2, "total": 2 * b, "kept": 0, "rejected": {"everything": 2 * b}}


def test_only_process_0_judges_and_every_process_gets_its_verdicts(setup, monkeypatch, tmp_path):
  """Two processes simulated in one: process 0's broadcasts are recorded, then replayed to process 1."""
  from jax.experimental import multihost_utils
  trainer, tokenizer, state, frozen = setup
  sent = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda tree, tiled: jax.device_get(tree))

  def run_as(index, broadcast, stats):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    judge = Recorder()
    source = on_policy.make_source(trainer, tokenizer, rollout_filter=judge, stats_path=stats)
    return source, judge, _draw(source, state, frozen, 2)

  def record(x):
    sent.append(np.asarray(x).copy())
    return x

  replay = iter(sent)

  def receive(x):
    want = next(replay)
    assert np.shape(x) == want.shape and np.asarray(x).dtype == want.dtype  # every process passes the same shape
    return want

  first, judge0, batches0 = run_as(0, record, str(tmp_path / "p0.json"))
  second, judge1, batches1 = run_as(1, receive, str(tmp_path / "p1.json"))
  assert len(judge0.calls) == 2 * trainer.config.train.batch_size and not judge1.calls
  assert len(sent) == 4 and next(replay, None) is None  # a length and the verdicts per step
  assert second.get_state() == first.get_state()
  for a, b in zip(batches0, batches1):
    np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
  assert os.path.exists(tmp_path / "p0.json") and not os.path.exists(tmp_path / "p1.json")


class BatchRecorder(Recorder):
  """The batch protocol: one call per step's rollouts; `collective`: every process judges."""

  collective = True

  def __init__(self):
    super().__init__()
    self.batches = []

  def batch(self, records, texts, finish_reasons):
    self.batches.append(len(records))
    return [self(r, t, f) for r, t, f in zip(records, texts, finish_reasons)]


def test_a_batch_filter_judges_a_step_at_once_and_a_collective_one_on_every_process(setup, monkeypatch):
  from jax.experimental import multihost_utils
  trainer, tokenizer, state, frozen = setup
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda tree, tiled: jax.device_get(tree))
  verdicts = json.dumps(["listed"] + [None] * (trainer.config.train.batch_size - 1)).encode()
  payload = iter([np.int32(len(verdicts)), np.frombuffer(verdicts, np.uint8)] * 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: next(payload))
  judge = BatchRecorder()
  source = on_policy.make_source(trainer, tokenizer, rollout_filter=judge)
  _draw(source, state, frozen, 2)
  # Process 1 judged too (a judge model is a collective), in one batch per step; process 0's verdicts count.
  assert judge.batches == [trainer.config.train.batch_size] * 2
  assert source.get_state()["rollouts"]["rejected"] == {"listed": 2}
