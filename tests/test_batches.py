"""Batch sources: the grain pipeline behind the protocol, and positions that refuse another batch order."""

import numpy as np
import pytest

from conftest import tiny_config
from emjax.data import tokenizers
from emjax.train import batches as batches_lib
from emjax.train import loop


def _source(config, **kw):
  return batches_lib.GrainBatchSource(config.data, tokenizers.load_tokenizer(config.data.tokenizer),
                                      config.train.batch_size, seed=0, **kw)


def test_grain_source_state_round_trip_continues_exactly():
  config = tiny_config()
  config.data.prefetch = 0
  a = _source(config)
  assert isinstance(a, batches_lib.BatchSource)
  for _ in range(3):
    next(a)
  state = a.get_state()
  expected = [next(a) for _ in range(2)]
  b = _source(config)
  b.set_state(state)
  for want in expected:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  a.close()
  b.close()


@pytest.mark.parametrize("change, match", [
    (dict(num_workers=1), r"num_workers=0, this run has 1 \(config.data.num_workers\)"),
    (dict(process_count=2, process_index=1), r"process_count=1, this run has 2"),
    (dict(shards=2), r"shards=1, this run has 2 \(config.data.shards\)"),
])
def test_a_position_saved_under_another_batch_order_is_refused(change, match):
  config = tiny_config()
  config.data.prefetch = 0
  state = _source(config).get_state()
  config.data.num_workers = change.pop("num_workers", 0)
  config.data.shards = change.pop("shards", 0)
  other = _source(config, **change)
  with pytest.raises(ValueError, match=match):
    other.set_state(state)


def test_resuming_with_another_num_workers_is_an_error_not_other_data(tmp_path, one_device_mesh):
  config = tiny_config(steps=2)
  loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
  config.train.steps = 4
  config.data.num_workers = 1
  with pytest.raises(ValueError, match=r"config.data.num_workers.*Resume with the same setting"):
    loop.train(config, str(tmp_path), mesh=one_device_mesh, show_progress=False)
