"""emjax.workdir: one status, settings and launch record for every job, on a disk or in a bucket."""

import json
import os
import subprocess

import pytest

from conftest import ROOT
from fake_gcs import fake_gcs
from emjax import paths, workdir as workdir_lib


@pytest.fixture(params=["local", "bucket"])
def wd(request, tmp_path):
  if request.param == "local":
    yield str(tmp_path / "run")
    return
  with fake_gcs(str(tmp_path / "gcs")):
    yield "gs://bucket/run"


def _names(wd):
  p = paths.path(wd)
  return sorted(x.name for x in p.iterdir()) if p.exists() else []


def test_a_run_is_complete_or_failed_never_both(wd):
  workdir_lib.makedirs(wd)
  workdir_lib.write_text(f"{wd}/results.json", "{}")
  workdir_lib.mark_failed(wd, RuntimeError("first attempt died"))
  assert workdir_lib.FAILED_FILE in _names(wd) and not workdir_lib.is_complete(wd)
  workdir_lib.clear_status(wd)  # the rerun starts
  assert workdir_lib.FAILED_FILE not in _names(wd)
  workdir_lib.mark_complete(wd, {"steps": 3})
  assert workdir_lib.is_complete(wd) and workdir_lib.FAILED_FILE not in _names(wd)
  assert json.loads((paths.path(wd) / "COMPLETED").read_text()) == {"steps": 3}
  # An error after the run ended (a tracker's upload) or before a rerun changed anything (a bad flag)
  # leaves the finished run as it was: COMPLETED, and no FAILED beside it.
  workdir_lib.mark_failed(wd, ConnectionError("wandb: network down"))
  assert workdir_lib.is_complete(wd) and workdir_lib.FAILED_FILE not in _names(wd)


def test_a_rerun_with_other_settings_is_refused_before_anything_changes(wd):
  assert workdir_lib.check_settings(wd, {"lr": 0.1, "model": {"d": 64}}) is False  # written: a new run
  assert workdir_lib.check_settings(wd, {"lr": 0.1, "model": {"d": 64}}) is True
  workdir_lib.mark_complete(wd, {})
  before = {n: (paths.path(wd) / n).read_text() for n in _names(wd)}
  with pytest.raises(workdir_lib.SettingsMismatch, match=r"settings.json holds other settings \(model.d: 64 -> 128\)"):
    workdir_lib.check_settings(wd, {"lr": 0.1, "model": {"d": 128}})
  try:
    workdir_lib.check_settings(wd, {"lr": 0.2, "model": {"d": 64}}, may_change="only x may change")
  except ValueError as e:  # what emjax.main does with a job's ValueError
    assert "only x may change" in str(e)
    workdir_lib.mark_failed(wd, e)
  assert {n: (paths.path(wd) / n).read_text() for n in _names(wd)} == before


def test_a_settings_refusal_wrapped_in_another_error_marks_nothing(tmp_path):
  wd = str(tmp_path / "run")
  workdir_lib.makedirs(wd)
  try:
    try:
      raise workdir_lib.SettingsMismatch("other settings")
    except ValueError as inner:
      raise RuntimeError("the sub-run failed") from inner
  except RuntimeError as e:
    workdir_lib.mark_failed(wd, e)
  assert _names(wd) == []


def test_every_launch_records_the_code_it_ran(wd):
  for job in ("train", "eval"):
    workdir_lib.record_launch(wd, job, argv=["emjax", f"--job={job}"])
  rows = [json.loads(l) for l in (paths.path(wd) / workdir_lib.LAUNCHES_FILE).read_text().splitlines()]
  assert [r["job"] for r in rows] == ["train", "eval"]
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
  if head:  # a source tree without git records None, not a guess
    assert rows[0]["commit"] == head and isinstance(rows[0]["dirty"], bool)
  assert rows[1]["argv"] == ["emjax", "--job=eval"] and rows[1]["processes"] == 1


def test_whole_file_writes_leave_no_partial_file(tmp_path):
  p = str(tmp_path / "a" / "b.json")
  workdir_lib.write_json(p, {"x": 1})
  assert workdir_lib.read_json(p) == {"x": 1} and os.listdir(tmp_path / "a") == ["b.json"]


def test_a_staged_bucket_workdir_is_pulled_pushed_and_marked_in_the_bucket(tmp_path, monkeypatch):
  import time
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  bucket = tmp_path / "gcs" / "b" / "run"
  with fake_gcs(str(tmp_path / "gcs")):
    paths.path("gs://b/run/old/kept.txt").write_text("from an earlier launch")
    paths.path("gs://b/run/old/dropped.txt").write_text("the job deletes it")
    paths.path("gs://b/run/COMPLETED").write_text("{}")
    with workdir_lib.staged("gs://b/run", sync_seconds=0.2) as wd:
      assert open(os.path.join(wd, "old", "kept.txt")).read() == "from an earlier launch"
      workdir_lib.clear_status(wd)  # the bucket's status is cleared, not only the copy's
      assert not (bucket / "COMPLETED").exists()
      os.remove(os.path.join(wd, "old", "dropped.txt"))
      os.makedirs(os.path.join(wd, "sub"))
      with open(os.path.join(wd, "sub", "rows.jsonl"), "w") as f:
        f.write("a\n")
      deadline = time.time() + 10
      while not (bucket / "sub" / "rows.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
      assert (bucket / "sub" / "rows.jsonl").read_text() == "a\n"  # pushed while the job runs
      with open(os.path.join(wd, "sub", "COMPLETED"), "w") as f:  # a sub-run's marker travels as a file
        f.write("{}")
      with open(os.path.join(wd, "late.txt"), "w") as f:
        f.write("written just before the end")
      workdir_lib.mark_complete(wd, {"ok": True})
      # COMPLETED vouches for everything: what was written before it is in the bucket already.
      assert json.loads((bucket / "COMPLETED").read_text()) == {"ok": True} and (bucket / "late.txt").exists()
    assert not (bucket / "old" / "dropped.txt").exists() and (bucket / "old" / "kept.txt").exists()
    assert (bucket / "sub" / "COMPLETED").exists()


def test_a_staged_job_that_fails_keeps_what_it_wrote_and_says_so_in_the_bucket(tmp_path, monkeypatch):
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  bucket = tmp_path / "gcs" / "b" / "run"
  with fake_gcs(str(tmp_path / "gcs")):
    with pytest.raises(RuntimeError):
      with workdir_lib.staged("gs://b/run", sync_seconds=3600) as wd:
        workdir_lib.clear_status(wd)
        with open(os.path.join(wd, "partial.jsonl"), "w") as f:
          f.write("judged so far\n")
        raise RuntimeError("preempted")
    workdir_lib.mark_failed("gs://b/run", RuntimeError("preempted"))  # as emjax.main does, after the push
    assert (bucket / "partial.jsonl").read_text() == "judged so far\n"
    assert (bucket / "FAILED").exists() and not (bucket / "COMPLETED").exists()


def test_an_earlier_sessions_copy_is_moved_aside_never_pushed(tmp_path, monkeypatch):
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  bucket = tmp_path / "gcs" / "b" / "run"
  with fake_gcs(str(tmp_path / "gcs")):
    paths.path("gs://b/run/settings.json").write_text('{"x": 2}')
    paths.path("gs://b/run/keep.tmp").write_text("a writer's temporary object: not the stage's")
    local = workdir_lib.scratch_dir("gs://b/run")
    os.makedirs(os.path.join(local, "sub"))
    for rel, text in (("settings.json", '{"x": 1}'), ("results.json", "stale"), ("sub/COMPLETED", "{}")):
      with open(os.path.join(local, rel), "w") as f:
        f.write(text)
    with workdir_lib.staged("gs://b/run") as wd:
      assert sorted(os.listdir(wd)) == ["settings.json"]  # the bucket's files only
      assert workdir_lib.check_settings(wd, {"x": 2}) is True
    assert sorted(p.name for p in bucket.iterdir()) == ["keep.tmp", "settings.json"]
    aside = [d for d in os.listdir(tmp_path / "scratch") if ".earlier-" in d]
    assert len(aside) == 1 and open(tmp_path / "scratch" / aside[0] / "results.json").read() == "stale"
  assert workdir_lib.scratch_dir("gs://b/run_1") != workdir_lib.scratch_dir("gs://b/run/1")


def test_settings_naming_sub_runs_in_the_staged_copy_survive_a_relaunch_with_other_scratch(tmp_path, monkeypatch):
  """A study's eval sub-run records the checkpoint it reads, a path in the staged copy: relaunched on a
  machine whose scratch is elsewhere, the same settings are the same settings."""
  with fake_gcs(str(tmp_path / "gcs")):
    for scratch in ("first_vm", "second_vm"):
      monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / scratch))
      with workdir_lib.staged("gs://b/study") as wd:
        sub = os.path.join(wd, "eval", "cell")
        settings = {"model": {"checkpoint": os.path.join(wd, "sft", "cell"), "step": 3}, "sets": [wd]}
        existed = workdir_lib.check_settings(sub, settings)
        assert existed == (scratch == "second_vm")
    recorded = json.loads(paths.path("gs://b/study/eval/cell/settings.json").read_text())
    assert recorded == {"model": {"checkpoint": "gs://b/study/sft/cell", "step": 3}, "sets": ["gs://b/study"]}
    monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "third_vm"))
    with workdir_lib.staged("gs://b/study") as wd:  # and other settings are still refused
      with pytest.raises(workdir_lib.SettingsMismatch, match="checkpoint"):
        workdir_lib.check_settings(os.path.join(wd, "eval", "cell"),
                                   {"model": {"checkpoint": os.path.join(wd, "sft", "other"), "step": 3}, "sets": [wd]})


def test_a_setting_added_later_at_its_default_does_not_refuse_an_older_workdir(tmp_path):
  wd = str(tmp_path / "run")
  workdir_lib.check_settings(wd, {"checkpoint": {"keep": 3}, "sample": {"t": 1.0}})
  # An upgrade adds checkpoint.keep_every (off) and sample.edit (empty): the same run.
  assert workdir_lib.check_settings(wd, {"checkpoint": {"keep": 3, "keep_every": 0},
                                         "sample": {"t": 1.0, "edit": {"direction": "", "ablate": ""}}}) is True
  # Turned on, they are other settings.
  with pytest.raises(workdir_lib.SettingsMismatch, match=r"checkpoint.keep_every: None -> 5"):
    workdir_lib.check_settings(wd, {"checkpoint": {"keep": 3, "keep_every": 5}, "sample": {"t": 1.0}})
  with pytest.raises(workdir_lib.SettingsMismatch, match=r"sample.edit"):
    workdir_lib.check_settings(wd, {"checkpoint": {"keep": 3}, "sample": {"t": 1.0, "edit": {"ablate": "all"}}})


def test_a_failed_last_push_does_not_hide_the_jobs_own_error(tmp_path, monkeypatch):
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  with fake_gcs(str(tmp_path / "gcs")):
    def down(self):
      raise OSError("network unreachable")
    with pytest.raises(KeyboardInterrupt):  # a preemption, a stop: a BaseException the caller must see
      with workdir_lib.staged("gs://b/run") as wd:
        monkeypatch.setattr(workdir_lib.Stage, "push", down)
        raise KeyboardInterrupt
    monkeypatch.undo()


def test_sigterm_stops_a_staged_job_and_what_it_wrote_is_pushed(tmp_path, monkeypatch):
  import signal
  monkeypatch.setenv("EMJAX_SCRATCH", str(tmp_path / "scratch"))
  before = signal.getsignal(signal.SIGTERM)
  with fake_gcs(str(tmp_path / "gcs")):
    with pytest.raises(workdir_lib.Stopped):
      with workdir_lib.staged("gs://b/run", sync_seconds=3600) as wd:
        with open(os.path.join(wd, "rows.jsonl"), "w") as f:
          f.write("judged\n")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler raises at the next bytecode
          pass
    assert (tmp_path / "gcs" / "b" / "run" / "rows.jsonl").read_text() == "judged\n"
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is the stage's only while it runs


def test_a_bucket_workdir_on_several_processes_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="runs on 2 processes"):
    with workdir_lib.staged("gs://b/run"):
      pass


def test_a_refusal_after_the_run_started_is_a_failure(tmp_path):
  from emjax.train import checkpoint as ckpt_lib
  wd = str(tmp_path / "run")
  workdir_lib.makedirs(wd)
  # Before the run clears its status (resume=False in a used, unfinished workdir): nothing is marked.
  workdir_lib.mark_failed(wd, ckpt_lib.CheckpointsExistError("holds steps [2, 4]"))
  assert _names(wd) == []
  # After (a nested job refusing): the run did start, so it failed.
  workdir_lib.clear_status(wd)
  workdir_lib.mark_failed(wd, workdir_lib.SettingsMismatch("the sample job's settings differ"))
  assert _names(wd) == ["FAILED"]
