"""Which documents a file source holds out (emjax.data.sources, "Held-out split").

Its own module so that the SFT splits (emjax.data.sft.split_rows) and the file sources, which
dispatch to emjax.data.sft, hold out the same rows without importing each other.
"""

from __future__ import annotations

import numpy as np


def held_out_indices(num_docs: int, holdout: int, seed: int) -> np.ndarray:
  """The held-out documents of a file source: `default_rng(seed).permutation(num_docs)[:holdout]`."""
  if not 0 <= holdout <= num_docs:
    raise ValueError(f"holdout={holdout} must be between 0 and the number of documents ({num_docs})")
  if holdout == 0:
    return np.zeros(0, np.int64)
  return np.random.default_rng(seed).permutation(num_docs)[:holdout].astype(np.int64)
