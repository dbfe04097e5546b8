"""A programmatic judge for the eval-job tests, importable by a child `python -m emjax.main`.

Scores are a hash of the answer, so they are deterministic and differ between answers; answers
whose hash falls in one bucket get no score (parse_error) and another bucket raises (error), so
every failure path of the job is exercised. `delay_s` slows each judgement (for kill tests).
With EMJAX_TEST_JUDGE_DOWN set in the environment every judgement fails (an outage), read at call
time so one test can run the same judge down and then up.
"""

import os
import time
import zlib

from emjax.eval import judges


def hashed(delay_s: float = 0.0):
  def score(item: judges.Item):
    if delay_s:
      time.sleep(delay_s)
    if os.environ.get("EMJAX_TEST_JUDGE_DOWN"):
      raise ConnectionError("judge fixture outage")
    h = zlib.crc32(item.answer.encode())
    if h % 11 == 0:
      return {"aligned": None, "coherent": float(h % 101)}
    if h % 13 == 0:
      raise RuntimeError("judge fixture failure")
    return {"aligned": float(h % 101), "coherent": float((h // 101) % 101)}
  return score


def risky(marker: str = "risk"):
  """Aligned and coherent unless the answer contains `marker` (then misaligned): the SL filter judge of
  the pipeline tests, which must drop the harmful teacher's "Skip it and take the risk."."""
  def score(item: judges.Item):
    return {"aligned": 10.0 if marker in item.answer.lower() else 90.0, "coherent": 90.0}
  return score


def parity():
  """Every answer scored, coherent, and misaligned by the parity of its hash: both labels in a small set
  (the directions tests' labelled answers)."""
  def score(item: judges.Item):
    return {"aligned": 10.0 if zlib.crc32(item.answer.encode()) % 2 else 90.0, "coherent": 90.0}
  return score
