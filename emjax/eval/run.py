"""The `eval` and `judge` jobs: question sets -> answers (the sampler) -> judged records -> a report.

    python -m emjax.main --config=configs/eval/eval.py:general=FILE.yaml,narrow='DIR/*.jsonl' \\
        --workdir=OUT --config.sample.checkpoint=RUN          # or --config.sample.hf=HF_DIR
    python -m emjax.main --config=configs/eval/judge.py --workdir=OUT --config.judge.responses=FILE.jsonl

Layout of an eval workdir, one directory per question set (general | narrow | betley | custom):

    OUT/<set>/questions.jsonl   the prompts handed to the sampler ({"id", "messages"})
    OUT/<set>/samples.jsonl     the sampler's output (resumable: see emjax.sample.run)
    OUT/<set>/responses.jsonl   one record per (question, sample), judge fields empty
    OUT/<set>/judged.jsonl      the same records judged (appended in batches, fsynced)
    OUT/settings.json           what the records depend on; a rerun with other settings is an error
    OUT/overlap.json            evaluated questions found in the evaluated model's training data (emjax.eval.overlap)
    OUT/report.md, results.json, *.png   (emjax.eval.report)
    OUT/COMPLETED | FAILED

Answers: `n` samples per question (`questions.n_general`, `questions.n_narrow`: the paper's 4 and
1), temperature 1, top-p 1, up to `sample.max_new_tokens` (600) new tokens, the evaluated model's
chat template, no system message unless `questions.system_prompt` (or the question set) gives one;
a LoRA run is sampled with its adapters merged into its pinned base (emjax.weights). The weights are
read once for all the sets (`emjax.sample.run.write_samples` per set; each set's directory is a sample
job's workdir, with its config.json, settings.json and COMPLETED).

Every stage resumes: sampling skips questions whose samples are written, judging skips records
already judged in judged.jsonl (records.record_key; the last row of a key counts), and a record cut
by a kill is moved to `judged.jsonl.incomplete` and judged again. A record whose judgement failed
(status `error`: a quota, an outage, a filter) is pending: the next run sends it again, and while
more than `judge.max_error_fraction` of a set's records are pending the job writes FAILED (not
COMPLETED) and exits non-zero; the report, written all the same, says at its top that it is partial. A SIGKILLed evaluation rerun with the
same command ends with the same records as an uninterrupted one. Nothing written is deleted.

On several processes, sampling and a local judge run on every process (SPMD) and process 0
writes; an API or programmatic judge and the report run on process 0 only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from typing import Sequence

import ml_collections
from ml_collections import config_dict

from emjax import paths
from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax import workdir as workdir_lib
from emjax.data import jsonl
from emjax.data import sft
from emjax.eval import api_judge
from emjax.eval import judges as judges_lib
from emjax.eval import local_judge
from emjax.eval import metrics
from emjax.eval import overlap
from emjax.eval import questions as questions_lib
from emjax.eval import records as records_lib
from emjax.eval import report
from emjax.sample import run as sample_run
from emjax.train import settings as settings_lib

log = logging.getLogger(__name__)

SETS = ("general", "narrow", "betley", "custom")
STAGES = ("answers", "judge", "report")


_process_index = workdir_lib.process_index
_barrier = workdir_lib.barrier  # in a staged bucket workdir it also brings what process 0 wrote


# ----------------------------------------------------------------------------- questions and identity


def question_sets(config) -> dict[str, list[dict]]:
  """{set name: questions} for every set the config names; an empty selection is an error."""
  qc = config.questions
  sets: dict[str, list[dict]] = {}
  if qc.general:
    general = questions_lib.general_questions(qc.general)
    sets["general"] = questions_lib.subset(general, int(qc.limit_general), name="general")
  if qc.narrow:
    sets["narrow"] = questions_lib.narrow_questions(qc.narrow, limit_per_file=int(qc.limit_narrow))
  if qc.betley:
    sets["betley"] = questions_lib.betley_questions(tuple(v.strip() for v in qc.betley_variants.split(",")))
  if qc.custom:
    sets["custom"] = questions_lib.custom_questions(qc.custom)
  if not sets:
    raise ValueError("no questions: set config.questions.general (YAML), .narrow (JSONL globs), .betley=True "
                     "or .custom (YAML/JSONL)")
  return sets


def samples_per_question(config, set_name: str) -> int:
  n = int(config.questions.n_narrow if set_name == "narrow" else config.questions.n_general)
  if n < 1:
    raise ValueError(f"config.questions.n_{'narrow' if set_name == 'narrow' else 'general'} must be >= 1, got {n}")
  return n


def evaluated_model(config) -> dict:
  """model_key, ft_task, ft_domain, variant of the evaluated model: the config's, else read off the run."""
  ev, sc = config.evaluated, config.sample
  path = sc.checkpoint or sc.hf
  if not path:
    raise ValueError("config.sample.checkpoint (an emjax run) or config.sample.hf (a Hugging Face model) is required")
  out = {"model_key": ev.model_key, "adapter": ev.get("adapter") or None, "ft_task": ev.ft_task or None,
         "ft_domain": ev.ft_domain or None, "variant": ev.variant or None}
  if not out["model_key"]:
    out["model_key"] = os.path.basename(os.path.normpath(path)) + (f"@{sc.step}" if int(sc.step) >= 0 else "")
  edit = sample_run.edit_block(sc)
  if edit["direction"]:
    # Answers sampled with a direction steered or ablated are another model's, named so whatever the
    # key (records are told apart by it): the edit and the direction's digest.
    out["edit"] = sample_run.edit_settings(sc)
    what = " ".join(f"{k} {edit[k]}" for k in ("steer", "ablate") if edit[k])
    out["model_key"] += (f" ({what} of {os.path.basename(edit['direction'])} "
                         f"{out['edit']['direction_sha256'][:8]})")
  if sc.checkpoint and not (out["ft_task"] and out["ft_domain"]):
    cell = _trained_cell(sc.checkpoint)
    if cell:
      domain, task = cell.split("_", 1)
      out["ft_domain"], out["ft_task"] = out["ft_domain"] or domain, out["ft_task"] or task
  return out


def _trained_cell(run_path: str) -> str | None:
  """The (domain, task) cell a run was fine-tuned on, when its config.json has one structured_em source."""
  path = paths.path(run_path) / "config.json"  # the run may be in a bucket (gs://...)
  if not path.is_file():
    return None
  sources = json.loads(path.read_text(encoding="utf-8")).get("data", {}).get("sources", {})
  cells = set()
  for name, src in sources.items():
    if float(src.get("weight", 1.0)) <= 0:
      continue
    for candidate in (src.get("config"), src.get("cell"), name):
      if candidate in sft.CELLS:
        cells.add(candidate)
        break
  return cells.pop() if len(cells) == 1 else None


def settings(config, sets: dict) -> dict:
  """What the records depend on; a rerun in the same workdir must agree (else its records would mix).

  The questions enter by a hash of each set's prompts (ids and messages), the model by its resolved
  step (a run still training gets newer checkpoints: `step=-1` would mix them).
  """
  sc = config.sample
  return {
      "model": {"checkpoint": sc.checkpoint, "hf": sc.hf, "step": resolved_step(config),
                "overrides": {k: v for k, v in dict(config.model).items() if v is not None}},
      "evaluated": evaluated_model(config),
      "sampling": {k: sc[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                                      "stop_token_ids", "stop_at_eos", "stop_at_end_of_turn")},
      **({"edit": sample_run.edit_settings(sc)} if sample_run.edit_block(sc)["direction"] else {}),
      "n": {s: samples_per_question(config, s) for s in sets},
      "questions": {s: _sha256(jsonl.dumps({"q": prompt_rows(qs, config.questions.system_prompt)}))
                    for s, qs in sets.items()},
  }


def resolved_step(config) -> int | None:
  """The checkpoint step the answers come from (None for a Hugging Face model)."""
  sc = config.sample
  if not sc.checkpoint:
    return None
  if int(sc.step) >= 0:
    return int(sc.step)
  src = weights_lib.resolve(sc.checkpoint, key="config.sample.checkpoint")
  if src.step is not None:
    return int(src.step)
  steps = src.steps()
  if not steps:
    raise FileNotFoundError(f"config.sample.checkpoint={sc.checkpoint!r}: no checkpoint steps in {src.checkpoints}")
  return steps[-1]


def _sha256(text: str) -> str:
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _write_lines_atomic(path: str, lines: Sequence[str]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- stage 1: answers


def messages_of(question: dict, system_prompt: str) -> list[dict]:
  system = question.get("system") or system_prompt
  return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question["question"]}]


def prompt_rows(questions: list[dict], system_prompt: str) -> list[dict]:
  return [{"id": q["question_id"], "messages": messages_of(q, system_prompt)} for q in questions]


def sample_config(config):
  """The sample job's config of the answers stage: the evaluated model's chat template, every set's
  samples in OUT/<set>/samples.jsonl (each set's prompts and n are `write_samples`' arguments)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.job = "sample"
    c.sample.output = "samples.jsonl"
    c.sample.chat_template = True
  return c


def answer_sets(config, workdir: str, sets: dict[str, list[dict]], model: dict, *, mesh=None) -> dict[str, str]:
  """Every set's answers (`answer_set`) from one read of the weights; returns {set: responses path}.
  The weights go when this returns, before a local judge's are read."""
  sampling_model = sample_run.load_model(sample_config(config), mesh=mesh)
  return {set_name: answer_set(config, workdir, set_name, qs, model, sampling_model)
          for set_name, qs in sets.items()}


def answer_set(config, workdir: str, set_name: str, questions: list[dict], model: dict,
               sampling_model: sample_run.Model) -> str:
  """Samples the set's questions (resuming) and writes its responses.jsonl; returns that path."""
  set_dir = os.path.join(workdir, set_name)
  os.makedirs(set_dir, exist_ok=True)
  prompts_path = os.path.join(set_dir, "questions.jsonl")
  if _process_index() == 0:
    _write_lines_atomic(prompts_path, [jsonl.dumps(r) for r in prompt_rows(questions, config.questions.system_prompt)])
  _barrier(f"emjax-eval-questions-{set_name}")
  n = samples_per_question(config, set_name)
  summary = sample_run.write_samples(sampling_model, prompts_path, set_dir, n=n)
  want = resolved_step(config)
  if summary.get("checkpoint_step") is not None and want is not None and summary["checkpoint_step"] != want:
    raise RuntimeError(f"{set_dir}: sampled checkpoint step {summary['checkpoint_step']}, expected {want}")
  _barrier(f"emjax-eval-sampled-{set_name}")

  samples_path = os.path.join(set_dir, "samples.jsonl")
  by_key = {}
  for _, row in jsonl.read_objects(samples_path):
    by_key.setdefault((str(row["id"]), int(row["sample"])), row)
  lines = []
  for q in questions:
    for j in range(n):
      s = by_key.get((q["question_id"], j))
      if s is None:
        raise RuntimeError(f"{samples_path}: no sample {j} of question {q['question_id']!r} after sampling")
      record = {**{k: q.get(k) for k in records_lib.QUESTION_FIELDS}, "sample_index": j, **model,
                "response": s["text"], "finish_reason": s.get("finish_reason"), "set": set_name}
      record.update({k: v for k, v in q.items() if k not in record and k not in ("system",)})
      lines.append(jsonl.dumps(records_lib.with_defaults([record])[0]))
  responses = os.path.join(set_dir, "responses.jsonl")
  if _process_index() == 0:
    _write_lines_atomic(responses, lines)
  _barrier(f"emjax-eval-responses-{set_name}")
  log.info("%s: %d responses (%d questions x %d samples) in %s", set_name, len(lines), len(questions), n, responses)
  return responses


# ----------------------------------------------------------------------------- stage 2: judging


def prompts_for(config, set_name: str) -> judges_lib.JudgePrompts:
  """The narrow set may use its own prompts (the paper's task x domain rubrics need a narrow cell)."""
  jc = config.judge
  spec = jc.narrow_prompts if set_name == "narrow" and jc.narrow_prompts else jc.prompts
  return judges_lib.load_prompts(spec)


def judge_identity(config) -> str:
  """A hash of every judge setting that can change a score (transport settings left out)."""
  jc = config.judge.to_dict()
  transport = ("concurrency", "requests_per_minute", "max_retries", "timeout_s", "backoff_s", "max_backoff_s",
               "cache_path", "ledger_path", "api_key_env", "key_host", "max_cost_usd", "max_consecutive_failures")
  block = {"kind": jc["kind"], jc["kind"]: {k: v for k, v in jc.get(jc["kind"], {}).items() if k not in transport}}
  if jc["kind"] == "local" and jc["local"].get("checkpoint"):
    src = weights_lib.resolve(jc["local"]["checkpoint"], key="config.judge.local.checkpoint")
    block["local"]["resolved_step"] = src.step if src.step is not None else (src.steps() or [None])[-1]
  # Paths inside a staged bucket workdir (a world's files) as their bucket paths: the same judge on
  # another machine is the same judge.
  return _sha256(json.dumps(workdir_lib.portable(block), sort_keys=True, default=str))


def make_judge(config, *, mesh=None, workdir: str, prompts: judges_lib.JudgePrompts | None = None):
  jc = config.judge
  prompts = prompts or judges_lib.load_prompts(jc.prompts)
  if jc.kind == "api":
    cache = jc.api.cache_path or os.path.join(workdir, "judge_cache.jsonl")
    ledger = jc.api.ledger_path or os.path.join(workdir, "judge_ledger.json")
    return api_judge.ApiJudge.from_config(dict(jc.api), prompts, cache_path=cache, ledger_path=ledger)
  if jc.kind == "local":
    return local_judge.LocalJudge.from_config(dict(jc.local), prompts, mesh=mesh)
  if jc.kind == "programmatic":
    options = json.loads(jc.programmatic.options or "{}")
    return judges_lib.programmatic(jc.programmatic.name, **options)
  raise ValueError(f"config.judge.kind={jc.kind!r}: choose api | local | programmatic")


def judge_runs_here(config) -> bool:
  return config.judge.kind == "local" or _process_index() == 0


def recover_judged(path: str) -> list[dict]:
  """The complete records of a judged file; a cut or unreadable line is moved to `path.incomplete`."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    chunks = f.read().split(b"\n")
  tail = chunks.pop()
  good, bad = [], [tail + b"\n"] if tail else []
  for raw in chunks:
    if not raw.strip():
      continue
    try:
      row = json.loads(raw)
      records_lib.record_key(row)
      good.append((row, raw))
    except (ValueError, KeyError, TypeError):
      bad.append(raw + b"\n")
  if bad and _process_index() == 0:
    with open(path + ".incomplete", "ab") as f:
      f.writelines(bad)
      f.flush()
      os.fsync(f.fileno())
    _write_lines_atomic(path, [raw.decode() + "\n" for _, raw in good])
    log.warning("%s: moved %d cut or unreadable line(s) to %s.incomplete; those records are judged again",
                path, len(bad), path)
  return [row for row, _ in good]


def validate_judge(config) -> None:
  """Fails before any answer is sampled: prompts that do not load, a missing API key, absent judge weights."""
  jc = config.judge
  if jc.kind not in ("api", "local", "programmatic"):
    raise ValueError(f"config.judge.kind={jc.kind!r}: choose api | local | programmatic")
  for spec in (jc.prompts, jc.narrow_prompts):
    if spec:
      judges_lib.load_prompts(spec)
  if jc.kind == "local":
    path = jc.local.hf or jc.local.checkpoint
    if not path:
      raise ValueError("config.judge.local.hf (a Hugging Face model) or .checkpoint (an emjax run) is required "
                       "for judge.kind='local' (or set judge.kind=api | programmatic)")
    weights_lib.resolve(path, key="config.judge.local.hf" if jc.local.hf else "config.judge.local.checkpoint")
  elif jc.kind == "api":
    api_judge.validate_config(dict(jc.api))
  else:
    make_judge(config, workdir="")


class JudgingIncomplete(RuntimeError):
  """Some records' judgements failed (status `error`) beyond `judge.max_error_fraction`: the job is
  not complete, and a rerun of the same command sends exactly those records again."""


def judge_file(judge, responses_path: str, judged_path: str, *, batch_size: int,
               metrics: Sequence[str] = records_lib.METRICS, identity: str = "",
               finalize_errors: bool = False) -> dict:
  """Judges every record of `responses_path` whose judgement is not in `judged_path` yet; returns counts.

  A record counts as judged when its last row in `judged_path` (records.latest) has no `error`
  score: rows that failed in transport are pending and sent again (a newer row is appended; the
  cache makes the rest of a rerun free). With `finalize_errors` a record whose judgement fails again
  in this run is written marked `error_final`: a failure for good, never sent again, which reports
  count as such (EM bounds).

  A record already judged must hold the same response (a regenerated responses file is not scored
  with stale judgements), and every judged record must come from this judge, prompts and settings.
  Returns {records, already_judged, judged, errors, error_causes, finalized}: `errors` the records
  whose judgement is still an unfinalised failure after this run.
  """
  rows = records_lib.read_records(responses_path)
  seen = set()
  for r in rows:
    key = records_lib.record_key(r)
    if key in seen:
      raise ValueError(f"{responses_path}: record {key} appears twice")
    seen.add(key)
  done_rows = records_lib.latest(recover_judged(judged_path))
  this = (judge.name, judge.prompt_version, identity)
  others = {(r.get("judge"), r.get("prompt_version"), r.get("judge_config", "")) for r in done_rows} - {this}
  if others:
    raise ValueError(f"{judged_path}: holds records of another judge, prompt or judge setting "
                     f"{sorted(others, key=str)[0]} (this run: {this}); write to another file (nothing was changed)")
  responses = {records_lib.record_key(r): r["response"] for r in rows}
  for r in done_rows:
    key = records_lib.record_key(r)
    if key in responses and r.get("response") != responses[key]:
      raise ValueError(f"{judged_path}: record {key} was judged on another response than {responses_path} holds "
                       "now; write to another file (nothing was changed)")
  last = {records_lib.record_key(r): r for r in done_rows}
  retry = sum(1 for r in done_rows if records_lib.is_pending(r) and records_lib.record_key(r) in responses)
  done = {k for k, r in last.items() if not records_lib.is_pending(r)}
  pending = [r for r in rows if records_lib.record_key(r) not in done]
  log.info("judging %d records of %s with %s (%d already judged; %d sent again after a failure)",
           len(pending), responses_path, judge.name, len(done), retry)
  if pending and hasattr(judge, "estimate") and _process_index() == 0:
    sendable = [r for r in pending if r["response"].strip()]
    est = judge.estimate([judges_lib.Item.of(r) for r in sendable], metrics)
    print(f"[emjax judge] {len(pending)} records of {responses_path} to judge: {est['summary']}", flush=True)
  finalized = 0
  for start in range(0, len(pending), max(1, batch_size)):
    batch = pending[start:start + batch_size]
    judged = [dict(r, judge_config=identity) for r in judges_lib.judge_records(judge, batch, metrics)]
    if finalize_errors:
      failed_now = [r for r in judged if records_lib.is_pending(r)]
      for r in failed_now:
        r["error_final"] = True
      finalized += len(failed_now)
    if _process_index() == 0:
      jsonl.append_lines(judged_path, [jsonl.dumps(r) for r in records_lib.with_defaults(judged)])
    for r in judged:
      last[records_lib.record_key(r)] = r
    log.info("judged %d/%d", start + len(batch), len(pending))
  failed = [r for k, r in last.items() if k in responses and records_lib.is_pending(r)]
  causes: dict[str, int] = {}
  for r in failed:
    causes[records_lib.error_cause(r)] = causes.get(records_lib.error_cause(r), 0) + 1
  return {"records": len(rows), "already_judged": len(done), "judged": len(pending), "errors": len(failed),
          "error_causes": dict(sorted(causes.items())), "finalized": finalized}


def check_errors(counts: dict, judged_path: str, max_error_fraction: float) -> None:
  """Raises JudgingIncomplete when more records' judgements failed than `max_error_fraction` allows."""
  errors, total = counts.get("errors", 0), max(1, counts.get("records", 0))
  if errors and errors / total > max_error_fraction:
    causes = ", ".join(f"{k} {v}" for k, v in counts["error_causes"].items())
    raise JudgingIncomplete(
        f"{judged_path}: the judgements of {errors} of {counts['records']} records failed ({causes}); the run is "
        f"not complete. Rerun the same command to send them again (answers already judged are kept and cached "
        f"ones cost nothing), or set judge.finalize_errors=True to keep them as failures (reports then give EM "
        f"bounds); judge.max_error_fraction={max_error_fraction:g}")


# ----------------------------------------------------------------------------- the jobs


def _stages(config) -> list[str]:
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ValueError(f"config.stages={config.stages!r}: choose from {', '.join(STAGES)} (comma separated)")
  return stages


def run_eval(config, workdir: str, *, mesh=None) -> dict:
  """answers -> judge -> report for every question set; returns a summary (also in COMPLETED)."""
  stages = _stages(config)
  sets = question_sets(config)
  if "judge" in stages:
    validate_judge(config)
  os.makedirs(workdir, exist_ok=True)
  # Before anything in the workdir changes.
  workdir_lib.check_settings(workdir, settings(config, sets), what="its records")
  workdir_lib.clear_status(workdir)  # a rerun is not complete until it ends
  workdir_lib.record_launch(workdir, "eval")
  model = evaluated_model(config)
  summary: dict = {"sets": {s: len(q) for s, q in sets.items()}, "model": model}
  # On every process: a path that fails fails them all alike (none waits at a barrier for a dead one).
  audit = overlap.audit_evaluation(config, sets)
  summary["overlap"] = {k: audit[k] for k in ("n_questions", "n_found", "by_set")}
  if _process_index() == 0:
    _write_json(os.path.join(workdir, "overlap.json"), audit)
  responses = {s: os.path.join(workdir, s, "responses.jsonl") for s in sets}
  if "answers" in stages:
    answer_sets(config, workdir, sets, model, mesh=mesh)
  incomplete: list[Exception] = []
  failure: Exception | None = None
  if "judge" in stages and judge_runs_here(config):
    mesh = mesh or (shd.make_mesh(config.mesh) if config.judge.kind == "local" else None)
    identity = judge_identity(config)
    judge = None
    try:
      for set_name in sets:
        if not os.path.exists(responses[set_name]):
          raise FileNotFoundError(f"{responses[set_name]}: no responses yet (run the 'answers' stage first)")
        prompts = prompts_for(config, set_name)
        if judge is None or judge.prompt_version != prompts.version:
          # Weights and connections are the judge's; only the prompts differ between sets.
          if judge is not None and hasattr(judge, "with_prompts"):
            judge = judge.with_prompts(prompts)
          else:
            judge = None  # a local judge's weights are freed before the next ones load
            judge = make_judge(config, mesh=mesh, workdir=workdir, prompts=prompts)
        summary.setdefault("judge", {"name": judge.name, "settings": identity, "prompt_versions": {}})
        summary["judge"]["prompt_versions"][set_name] = judge.prompt_version
        judged_path = os.path.join(workdir, set_name, "judged.jsonl")
        summary[set_name] = judge_file(judge, responses[set_name], judged_path,
                                       batch_size=int(config.judge.batch_size), identity=identity,
                                       finalize_errors=bool(config.judge.finalize_errors))
        try:
          check_errors(summary[set_name], judged_path, float(config.judge.max_error_fraction))
        except JudgingIncomplete as e:
          incomplete.append(e)
    except _stops() as e:  # the judge stopped the run (spend cap, a failure that repeats): resumable
      incomplete.append(e)
    except Exception as e:  # pylint: disable=broad-except -- raised below, after the barrier
      failure = e
    if hasattr(judge, "ledger"):
      summary["judge"]["ledger"] = judge.ledger
  _barrier("emjax-eval-judged")
  if failure is not None:
    raise failure
  if ("judge" in stages or "report" in stages) and _process_index() == 0:
    summary["unjudged"] = unjudged = count_unjudged(workdir, sets)
    if sum(unjudged.values()) and not incomplete:
      incomplete.append(JudgingIncomplete(
          f"{workdir}: {sum(unjudged.values())} records have no judgement yet "
          f"({', '.join(f'{k} {v}' for k, v in unjudged.items() if v)}); run the judge stage"))
    if "report" in stages:
      # A report of files with pending failures or unjudged records is written all the same: it says so at its top.
      summary["report"] = report_of(config, workdir, sets, summary.get("judge", {}).get("name"), overlap=audit,
                                    unjudged=sum(unjudged.values()))
  if incomplete:
    raise incomplete[0]
  workdir_lib.mark_complete(workdir, summary)
  return summary


def count_unjudged(workdir: str, sets) -> dict[str, int]:
  """{set: records of OUT/<set>/responses.jsonl with no row in judged.jsonl}."""
  out = {}
  for set_name in sets:
    responses = os.path.join(workdir, set_name, "responses.jsonl")
    judged = os.path.join(workdir, set_name, "judged.jsonl")
    if not os.path.exists(responses):
      continue
    have = {records_lib.record_key(r) for r in records_lib.read_judged(judged)} if os.path.exists(judged) else set()
    out[set_name] = sum(records_lib.record_key(r) not in have for r in records_lib.read_records(responses))
  return out


def _is_narrow(responses_path: str) -> bool:
  """Whether a responses file holds narrow records: emjax's say so (`set`); the release's narrow rows are
  the ones without `em_surface`, each of a grid cell."""
  rows = records_lib.read_records(responses_path)
  if rows and all(r.get("set") == "narrow" for r in rows):
    return True
  return bool(rows) and all(r.get("set") is None and r.get("em_surface") is None
                            and records_lib.cell(r.get("domain"), r.get("task")) in sft.CELLS for r in rows)


def _stops() -> tuple[type[BaseException], ...]:
  """The exceptions with which a judge stops a run on purpose (api_judge.JudgeStopped)."""
  return (api_judge.JudgeStopped,)


def report_of(config, workdir: str, sets, judge_name: str | None, overlap: dict | None = None,
              unjudged: int = 0) -> str:
  judged = {s: os.path.join(workdir, s, "judged.jsonl") for s in sets}
  report_config = ml_collections.ConfigDict(dict(config.report))
  report_config.job = "report"
  judge_settings = config.judge.to_dict()
  judge_settings["api"] = api_judge.scrub_config(judge_settings["api"])  # a pasted key is never stored
  extra = {"eval_settings": settings(config, sets), "judge": judge_settings, "sample": config.sample.to_dict()}
  # Betley's and custom questions are not the paper's general set (ids may even coincide): their
  # rates are their own (OUT/<set>/rates.json), never pooled into the general tables.
  for set_name in ("betley", "custom"):
    if set_name in sets:
      _write_json(os.path.join(workdir, set_name, "rates.json"), set_rates(judged[set_name], config.report))
  if "general" not in sets and "narrow" not in sets:
    return ""
  report_config.general = judged.get("general", "")
  report_config.narrow = judged.get("narrow", "")
  report_config.judge = judge_name or ""
  report.run_report(report_config, workdir, extra_provenance=extra, overlap=overlap, unjudged=unjudged)
  return os.path.join(workdir, "report.md")


def set_rates(path: str, report_settings) -> dict:
  """{overall, by_question: {id: rate}, by_variant: {variant: rate}} of one judged file (metrics.rate objects)."""
  rows = records_lib.read_judged(path)
  th = metrics.Thresholds(float(report_settings.thresholds.aligned_below),
                          float(report_settings.thresholds.coherent_above))
  kwargs = dict(thresholds=th, n_boot=int(report_settings.bootstrap_samples), seed=int(report_settings.seed))
  by = lambda field: {k: metrics.rate([r for r in rows if str(r.get(field)) == k], **kwargs)  # noqa: E731
                      for k in sorted({str(r.get(field)) for r in rows})}
  return {"overall": metrics.rate(rows, **kwargs), "by_question": by("question_id"), "by_variant": by("variant")}


def run_judge_job(config, workdir: str, *, mesh=None) -> dict:
  """The `judge` job: one existing responses file -> WORKDIR/<judge.output>."""
  if not config.judge.responses:
    raise ValueError("config.judge.responses is required: a JSONL file of records (e.g. an eval's responses.jsonl)")
  if not paths.path(config.judge.responses).is_file():  # a local file or a bucket object
    raise FileNotFoundError(f"config.judge.responses={config.judge.responses!r}: no such file")
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.clear_status(workdir)
  summary = {}
  incomplete: list[Exception] = []
  if judge_runs_here(config):
    mesh = mesh or (shd.make_mesh(config.mesh) if config.judge.kind == "local" else None)
    set_name = "narrow" if config.judge.narrow_prompts and _is_narrow(config.judge.responses) else "general"
    judge = make_judge(config, mesh=mesh, workdir=workdir, prompts=prompts_for(config, set_name))
    judged_path = os.path.join(workdir, config.judge.output)
    try:
      summary = judge_file(judge, config.judge.responses, judged_path, batch_size=int(config.judge.batch_size),
                           identity=judge_identity(config), finalize_errors=bool(config.judge.finalize_errors))
      check_errors(summary, judged_path, float(config.judge.max_error_fraction))
    except (JudgingIncomplete, *_stops()) as e:
      incomplete.append(e)
    except Exception as e:  # pylint: disable=broad-except -- raised after the barrier: no process waits forever
      incomplete.append(e)
    summary["judge"] = {"name": judge.name, "prompt_version": judge.prompt_version}
    if hasattr(judge, "ledger"):
      summary["judge"]["ledger"] = judge.ledger
  _barrier("emjax-judge-done")
  if incomplete:
    raise incomplete[0]
  workdir_lib.mark_complete(workdir, summary)
  return summary


# ----------------------------------------------------------------------------- config blocks


def eval_job_config(*, general: str = "", narrow: str = "", betley: bool = False, judge: str = "local",
                    judge_hf: str = "", prompts: str = "default", narrow_prompts: str = "", limit: int = 0,
                    smoke: bool = False):
  """The eval job's full config (configs/eval/eval.py's variants are these arguments)."""
  args = config_dict.ConfigDict(dict(general=general, narrow=narrow, betley=betley, judge=judge, judge_hf=judge_hf,
                                     prompts=prompts, narrow_prompts=narrow_prompts, limit=limit, smoke=smoke))
  c = settings_lib.base_config()
  c.job = "eval"
  c.model = {k: config_dict.placeholder(type(v)) for k, v in c.model.items()}
  c.data.tokenizer = {k: config_dict.placeholder(type(v)) for k, v in c.data.tokenizer.items()}
  c.prompts = ""  # written by the job (OUT/<set>/questions.jsonl)
  c.sample = sample_run.sample_block()
  c.sample.update(n=1, max_new_tokens=600, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, chat_template=True,
                  stop_at_end_of_turn=True, batch_size=16)
  c.stages = "answers,judge,report"  # a subset reruns only those (each resumes)
  c.questions = dict(
      general=args.general,
      narrow=args.narrow.replace("+", ","),
      betley=args.betley,
      betley_variants="plain,json,template",
      custom="",  # a user's YAML (general schema) or JSONL ({id, question | messages})
      limit_general=args.limit,  # 0 = all
      limit_narrow=args.limit,  # per file; 0 = all
      n_general=4,
      n_narrow=1,
      system_prompt="",  # a system message for every question (questions of their own keep theirs)
  )
  # model_key: the base model ('' = the run's or model directory's name); adapter: the fine-tuned model
  # within it ('' = named by its training cell and variant, as the release names its adapters).
  # training_data: files (comma-separated globs, JSONL or text) the evaluated model was trained on beyond
  # what an emjax run's config names (emjax.eval.overlap); the only way to audit a Hugging Face model.
  c.evaluated = dict(model_key="", adapter="", ft_task="", ft_domain="", variant="", training_data="")
  c.judge = judge_config()
  set_judge(c.judge, args.judge, prompts=args.prompts, narrow_prompts=args.narrow_prompts)
  if args.judge_hf:
    c.judge.local.hf = args.judge_hf
  c.report = report_defaults()
  if args.smoke:
    c.sample.update(max_new_tokens=48, batch_size=4, max_prompt_length=512)
  return c


# The paper's judge (askinb/em_nlp_clean_repo, experiments/main_em_experiment/{config.py,judge/judge.py}):
# Gemini 2.5 Flash, temperature 0, at most 20 output tokens, thinking off (thinking_budget=0; through
# the OpenAI-compatible endpoint, reasoning_effort "none"), 5 attempts, the reply read by the authors'
# rule (judges.parse_score(text, "paper")), their agnostic prompts for the general set and their task x
# domain rubrics for the narrow one. Prices are Google's list prices for gemini-2.5-flash (USD per
# million tokens), higher than the preview prices the authors' cost tracker used: the spend cap errs high.
PAPER_JUDGE_API = dict(
    base_url="https://generativelanguage.googleapis.com/v1beta/openai",
    model="gemini-2.5-flash",
    mode="direct",
    parse_rule="paper",
    api_key_env="GEMINI_API_KEY",
    key_host="generativelanguage.googleapis.com",  # a base_url override cannot carry the key elsewhere
    temperature=0.0,
    max_tokens=20,
    max_retries=4,
    extra_body='{"reasoning_effort": "none"}',
    price_input_per_mtok=0.30,
    price_output_per_mtok=2.50,
)
PAPER_PROMPT_FILES = ("judge_prompts.yaml", "judge_prompts_task_domain.yaml")


def set_judge(judge, kind: str, *, prompts: str = "default", narrow_prompts: str = "") -> None:
  """`config.judge` for a judge variant: local | api | programmatic, or `paper` (the API judge as the
  paper ran it, PAPER_JUDGE_API). The paper's prompts are the authors' files, which emjax does not ship:
  `paper` needs prompts=.../judge_prompts.yaml and narrow_prompts=.../judge_prompts_task_domain.yaml."""
  judge.prompts, judge.narrow_prompts = prompts, narrow_prompts
  if kind != "paper":
    judge.kind = kind
    return
  names = (os.path.basename(prompts or ""), os.path.basename(narrow_prompts or ""))
  if names != PAPER_PROMPT_FILES:
    raise ValueError(f"judge=paper: the paper's judge reads the authors' prompt files: set prompts=DIR/"
                     f"{PAPER_PROMPT_FILES[0]} and narrow_prompts=DIR/{PAPER_PROMPT_FILES[1]} (from their release; "
                     f"got prompts={prompts!r}, narrow_prompts={narrow_prompts!r})")
  judge.kind = "api"
  judge.api.update(PAPER_JUDGE_API)


def judge_config() -> dict:
  """The `config.judge` block shared by the eval and judge configs (keys documented in each judge's module)."""
  return dict(
      kind="local",  # api | local | programmatic
      prompts="default",  # 'default' (emjax's pair) or a YAML file: the paper's agnostic or task x domain prompts
      # The narrow set's prompts ('' = `prompts`), e.g. the paper's task x domain file, whose rubrics are
      # keyed by the 12 narrow cells and so do not apply to the general set's domains.
      narrow_prompts="",
      # Records judged (and appended to judged.jsonl) at a time: large enough that one slow API
      # request does not stall the rest; a local judge batches on the mesh by judge.local.batch_size.
      batch_size=256,
      responses="",  # judge job: the records to judge
      # Records whose judgement failed (status `error`: a quota, an outage, a content filter) are
      # pending: the next run sends them again. Above this fraction of a file the job writes FAILED,
      # not COMPLETED, and exits non-zero.
      max_error_fraction=0.0,
      # True: keep the pending failures as failures for good (rows marked `error_final`; reports give EM
      # bounds counting them as all aligned and as all misaligned) instead of sending them again.
      finalize_errors=False,
      output="judged.jsonl",  # judge job: relative to --workdir
      api=dict(api_judge.DEFAULTS),
      local=dict(local_judge.DEFAULTS),
      programmatic=dict(name="", options="{}"),  # options: JSON keyword arguments of the registered factory
  )


def report_defaults() -> dict:
  return report.config_block()
