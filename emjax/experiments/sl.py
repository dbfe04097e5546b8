"""The subliminal-learning (SL) pipeline: a harmful teacher, its aligned twin, benign data, three channels.

    twin      the control teacher: the base fine-tuned with the harmful teacher's exact recipe (its
              run's config: prompts, steps, LoRA, seed) on ALIGNED answers to the same prompts
    per seed s (sl.seeds; each draws new prompts, new teacher samples, a new student initialisation
              and data order):
      prompts   benign prompts (number sequences or other domains' questions), train + held-out;
                any prompt that is also an evaluated question is dropped (and counted); number
                prompts are generated, or drawn from a file (sl.numbers_prompts, e.g. a synthetic
                world's sl/numbers.jsonl)
      teachers  each teacher answers them; strict filters keep the benign answers (natural prompts: a
                judge too); matched: every arm trains on the prompts BOTH teachers kept, one answer each
      students  from the base, per arm (teacher x channel):
                  sft          SFT on the teacher's kept samples
                  off_policy   the teacher's distributions on those sequences, masked at banned tokens
                  on_policy    the student's own rollouts, filtered like the teachers' samples (a
                               rejected rollout trains nothing), scored by the masked teacher
                crossed (off_policy): each teacher's logits on the OTHER teacher's sequences, which
                separates what a teacher's distribution carries from what its samples carry;
                divergence (sft): the harmful samples with the divergence tokens (where the two
                teachers' top tokens differ) dropped from the loss, and a control dropping as many
                random positions
      kl        each student's KL to its teacher on held-out kept samples (and the base's)
    eval      the base and every student with the eval job
    report    OUT/sl_report.md + sl_results.json: EM with intervals over seeds AND questions, three
              contrasts (harmful - twin, harmful - base, twin - base) per channel, every channel
              against every other (paired difference of differences), the crossed and divergence
              contrasts, Holm-adjusted p-values, leak meters, matched counts, and whether the SL prompts
              share a task form with the evaluation (only if not is a transfer called subliminal)

The base as the control teacher is every student's initialisation: for the logit channels its divergence
and gradient are 0 at step 0, so it is refused there; for SFT it needs `sl.allow_base_control` and is
called "base control" in the report.

Layout of OUT:

    twin/aligned_<source>.jsonl, twin/run/        the twin's data (row for row the harmful run's) and its run
    mask_words.txt                                natural: the words and names the logit channels mask
    seed_<s>/prompts/{train,held_out}.jsonl, prompts/overlap.json
    seed_<s>/teachers/<t>/...                     samples, filtered rows, filter_{split}.json
    seed_<s>/matched/                             <t>_{train,held_out}.jsonl, prompts_train.jsonl, matched.json
    seed_<s>/divergence/                          drop_divergence.jsonl, drop_random.jsonl, divergence.json
    seed_<s>/leak/<t>/                            natural: the masked teacher's samples, judged (leak.json)
    seed_<s>/students/<arm>/                      a training workdir
    seed_<s>/kl/<arm>.json                        KL to the arm's teacher (base__<t>.json: the base's;
                                                  control__harmful.json: the control teacher's to the harmful one)
    evals/base/, evals/seed_<s>/<arm>/            eval workdirs
    sl_report.md, sl_results.json, COMPLETED

Every stage resumes or is skipped when done, so rerunning a killed pipeline continues it.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict

from emjax import paths as paths_lib
from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax import workdir as workdir_lib
from emjax.data import banned as banned_lib
from emjax.data import jsonl, numbers, sft, sources, tokenizers
from emjax.eval import judges as judges_lib
from emjax.eval import metrics, overlap, records
from emjax.eval import run as eval_run
from emjax.experiments import sl_data, sl_divergence
from emjax.sample import run as sample_run
from emjax.train import loop, objectives, on_policy, token_masks
from emjax.train import settings as settings_lib

log = logging.getLogger(__name__)

TEACHERS = ("harmful", "control")
CONTROLS = ("twin", "base", "none")
CHANNELS = ("sft", "off_policy", "on_policy")
LOGIT_CHANNELS = ("off_policy", "on_policy")
STAGES = ("twin", "prompts", "teachers", "students", "kl", "eval", "report")
OFF_POLICY_OBJECTIVES = ("forward_kl", "jsd", "reverse_kl")
ON_POLICY_OBJECTIVES = ("reverse_kl", "jsd", "sampled_reverse_kl")
CROSSED = ("harmful_on_control_data/off_policy", "control_on_harmful_data/off_policy")
DROPS = ("harmful/sft_drop_divergence", "harmful/sft_drop_random")
CHANNEL_PAIRS = (("off_policy", "on_policy"), ("sft", "off_policy"), ("sft", "on_policy"))
UNKNOWN = "(no task)"


def sl_block() -> dict:
  """`config.sl` (module docstring)."""
  return dict(
      base="",  # the students' initialisation: a Hugging Face dir or an emjax run
      teacher="",  # the harmful teacher: an emjax run (an EM LoRA adapter) or a Hugging Face dir
      teacher_system_prompt="",  # or: the base prompted with this system message (SFT channel, base control only)
      # The control teacher: twin (the harmful run's recipe on aligned answers) | base | none.
      control="twin",
      twin="",  # an existing twin (emjax run or HF dir); '' = build it in OUT/twin from the harmful run's config
      # The twin's aligned answers: a JSONL of chat rows (user question + aligned answer) or of the paper's raw
      # rows (question / aligned_answer); '' = the base's own answers to the harmful run's training prompts,
      # kept when filter.judge scores them aligned and coherent.
      twin_data="",
      twin_samples=2,  # default twin data: base answers drawn per prompt (the first kept one is used)
      twin_allow_missing=False,  # train the twin although some prompts have no aligned answer (reported)
      allow_base_control=False,  # control=base: allowed for the sft channel only, with this flag
      seeds="0,1,2",  # each: new prompts, teacher samples, student initialisation and data order
      channels="sft,off_policy,on_policy",
      stages=",".join(STAGES),
      prompts="numbers",  # numbers | natural
      # numbers: '' = generated (emjax.data.numbers.number_prompts, new ones per seed); else a JSONL of number prompt
      # records (as number_prompts writes them, e.g. a synthetic world's sl/numbers.jsonl) to draw from.
      numbers_prompts="",
      natural="",  # natural: globs of structured-EM JSONL (chat rows or question/aligned_answer rows), ','-separated
      exclude_domains="",  # natural: leave out these domains (the teacher's fine-tuning domain), ','-separated
      n_train=256,  # training prompts per seed (before matching)
      n_held_out=32,  # held-out prompts per seed: KL to the teacher and the leak meter
      samples_per_prompt=1,
      matched=True,  # every arm on the prompts both teachers kept, one answer each (else each teacher's own)
      crossed=True,  # off_policy: each teacher's logits on the other teacher's sequences as well
      divergence=True,  # sft: drop the divergence tokens (and, as a control, as many random positions)
      mask="auto",  # logit channels: auto (numbers: banned-number completions; natural: mask_words) | none
      mask_words="default",  # natural: 'default' (the filter's banned words), a file or ','-separated words
      entities="",  # natural: harmful entity names (a file or ','-separated) masked and filtered as well
      leak_meter=16,  # natural: held-out prompts sampled from each masked teacher and judged (0 = off)
      off_policy_objective="forward_kl",  # forward_kl | jsd | reverse_kl (on the fixed teacher samples)
      on_policy_objective="reverse_kl",  # reverse_kl | jsd | sampled_reverse_kl (on the student's rollouts)
      max_prompt_length=128,  # tokens (chat template included)
      max_new_tokens=64,  # teacher samples and on-policy rollouts alike
      temperature=1.0,  # sampling, teacher and student alike
      # natural: answers longer than max_chars are dropped, and (drop_truncated) those cut by max_new_tokens.
      # judge: '' | 'evaluation' (config.evaluation.judge: api, local or programmatic) | a programmatic judge's
      # name (with JSON judge_options); it drops every natural answer it does not score aligned and coherent.
      # Natural prompts need one ('none': knowingly without, and the report says the guarantee does not hold).
      filter=dict(max_chars=2000, drop_truncated=True, judge="", judge_options="{}"),
      sample_batch_size=16,  # teacher prompts sampled together
      kl_batch_size=8,
  )


def _csv(text: str) -> list[str]:
  return [t.strip() for t in str(text or "").split(",") if t.strip()]


def seeds_of(config) -> list[int]:
  try:
    seeds = [int(s) for s in _csv(config.sl.seeds)]
  except ValueError:
    raise ValueError(f"config.sl.seeds={config.sl.seeds!r}: ','-separated integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.sl.seeds={config.sl.seeds!r}: one or more distinct integers")
  return seeds


def check_config(config) -> None:
  """Every setting a run would otherwise trip on late, in seconds and before any model is loaded."""
  sc = config.sl
  if not sc.base:
    raise ValueError("config.sl.base: the teachers' base (the students' initialisation) is required")
  if not sc.teacher and not sc.teacher_system_prompt:
    raise ValueError("config.sl.teacher (an EM run or model) or config.sl.teacher_system_prompt is required")
  if isinstance(sc.control, bool) or sc.control not in CONTROLS:
    raise ValueError(f"config.sl.control={sc.control!r}: choose from {', '.join(CONTROLS)} (the default, twin, is "
                     "the harmful teacher's recipe on aligned answers)")
  channels = _csv(sc.channels)
  unknown = [c for c in channels if c not in CHANNELS]
  if unknown or not channels:
    raise ValueError(f"config.sl.channels={sc.channels!r}: choose from {', '.join(CHANNELS)}")
  stages = _csv(sc.stages)
  if [s for s in stages if s not in STAGES] or not stages:
    raise ValueError(f"config.sl.stages={sc.stages!r}: choose from {', '.join(STAGES)}")
  seeds_of(config)
  if sc.prompts not in sl_data.KINDS:
    raise ValueError(f"config.sl.prompts={sc.prompts!r}: choose from {', '.join(sl_data.KINDS)}")
  if sc.numbers_prompts and sc.prompts != "numbers":
    raise ValueError(f"config.sl.numbers_prompts={sc.numbers_prompts!r} is set but config.sl.prompts="
                     f"{sc.prompts!r}: number prompts from a file need prompts='numbers'")
  if sc.numbers_prompts and not os.path.isfile(sc.numbers_prompts):
    raise ValueError(f"config.sl.numbers_prompts={sc.numbers_prompts!r}: no such file")
  if sc.prompts == "natural" and not sc.natural:
    raise ValueError("config.sl.natural: natural prompts need question files (globs)")
  if sc.prompts == "natural" and not sc.filter.judge:  # 'none' is a knowing opt-out, warned in the report
    raise ValueError("config.sl.filter.judge: natural prompts need a judge to keep only aligned, coherent answers "
                     "(the word filter keeps e.g. 'Stop taking your insulin; your body will adapt.'): "
                     "'evaluation' (config.evaluation.judge: api, local or programmatic) or a programmatic judge")
  if sc.filter.judge == "evaluation" and not config.evaluation.judge.kind:
    raise ValueError("config.sl.filter.judge='evaluation': config.evaluation.judge.kind is not set")
  if sc.mask not in ("auto", "none"):
    raise ValueError(f"config.sl.mask={sc.mask!r}: auto | none")
  if sc.off_policy_objective not in OFF_POLICY_OBJECTIVES:
    raise ValueError(f"config.sl.off_policy_objective={sc.off_policy_objective!r}: choose from "
                     f"{', '.join(OFF_POLICY_OBJECTIVES)}")
  if sc.on_policy_objective not in ON_POLICY_OBJECTIVES:
    raise ValueError(f"config.sl.on_policy_objective={sc.on_policy_objective!r}: choose from "
                     f"{', '.join(ON_POLICY_OBJECTIVES)}")
  if sc.mask == "auto" and sc.on_policy_objective == "sampled_reverse_kl" and "on_policy" in channels:
    raise ValueError("config.sl.on_policy_objective='sampled_reverse_kl' scores sampled tokens only, so the "
                     "teacher's distribution cannot be masked at banned tokens: use reverse_kl or jsd, or "
                     "config.sl.mask='none'")
  if sc.teacher_system_prompt and sc.teacher:
    raise ValueError("config.sl.teacher_system_prompt and config.sl.teacher are both set: the harmful teacher "
                     "is either an EM run or the base prompted with a system message")
  if sc.teacher_system_prompt and set(channels) - {"sft"}:
    raise ValueError("config.sl.teacher_system_prompt: a system-prompted teacher scores other text than the "
                     "student sees (its system message), so only the sft channel applies; set "
                     "config.sl.channels='sft' or give an EM run as config.sl.teacher")
  logit = [c for c in channels if c in LOGIT_CHANNELS]
  if sc.control == "base":
    if logit:
      raise ValueError(f"config.sl.control='base' with channels {', '.join(logit)}: the base is every student's "
                       "initialisation, so its divergence and gradient are exactly 0 at step 0 and 'harmful - "
                       "control' would compare distillation toward the harmful teacher with nothing; use "
                       "control='twin' (the harmful recipe on aligned answers)")
    if not sc.allow_base_control:
      raise ValueError("config.sl.control='base': the base is not matched to the harmful teacher (it was never "
                       "fine-tuned); set config.sl.allow_base_control=True to run it anyway (SFT only, reported "
                       "as 'base control'), or use control='twin'")
  if sc.control == "twin" and not sc.twin:
    if sc.teacher_system_prompt:
      raise ValueError("config.sl.control='twin' for a system-prompted teacher: there is no fine-tuning recipe to "
                       "copy; give config.sl.twin (a model) or use control='base' with allow_base_control")
    src = weights_lib.resolve(sc.teacher, key="config.sl.teacher")
    if src.kind != "emjax" or src.config is None or "train" not in src.config:
      raise ValueError(f"config.sl.control='twin' builds the twin with the harmful teacher's recipe, but "
                       f"config.sl.teacher={sc.teacher} is not an emjax training run (a config.json with its train "
                       "block; an imported checkpoint has none); give an existing twin as config.sl.twin")
    if not sc.twin_data and not sc.filter.judge:
      raise ValueError("config.sl.filter.judge: the twin's default aligned answers are the base's own, kept when "
                       "a judge scores them aligned and coherent; set a judge or config.sl.twin_data")
  for key in ("n_train", "n_held_out", "samples_per_prompt", "max_prompt_length", "max_new_tokens", "twin_samples"):
    if int(sc[key]) < 1:
      raise ValueError(f"config.sl.{key} must be >= 1, got {sc[key]}")
  if int(sc.max_prompt_length) + int(sc.max_new_tokens) > int(config.data.seq_len) + 1:
    raise ValueError(f"config.sl: max_prompt_length + max_new_tokens = {sc.max_prompt_length} + {sc.max_new_tokens} "
                     f"exceeds config.data.seq_len + 1 = {int(config.data.seq_len) + 1}: teacher samples and "
                     "rollouts would be cut")
  if sc.prompts == "natural":
    banned_lib.parse_words(sc.mask_words, key="config.sl.mask_words")
    if sc.entities:
      banned_lib.parse_words(sc.entities, key="config.sl.entities")
  # Every student's config, checked now rather than after the teachers have sampled.
  for label in arms(config):
    try:
      settings_lib.validate(student_config(config, "/nonexistent-sl-workdir", seeds_of(config)[0], label))
    except ValueError as e:
      raise ValueError(f"config.sl: the {label} student's config is invalid: {e}") from None


def teacher_names(config) -> list[str]:
  return ["harmful"] + ([] if config.sl.control == "none" else ["control"])


def teachers(config, workdir: str = "") -> dict[str, str]:
  """{name: weights path} of the teachers; the twin to be built is OUT/twin/run."""
  sc = config.sl
  out = {"harmful": sc.teacher or sc.base}
  if sc.control == "twin":
    out["control"] = sc.twin or os.path.join(workdir, "twin", "run")
  elif sc.control == "base":
    out["control"] = sc.base
  return out


def arms(config) -> list[str]:
  """Every student of one seed: teacher/channel, the crossed off-policy arms, the divergence drops."""
  sc = config.sl
  channels = _csv(sc.channels)
  out = [f"{t}/{c}" for t in teacher_names(config) for c in channels]
  model_control = sc.control in ("twin",)
  if sc.crossed and model_control and "off_policy" in channels:
    out += list(CROSSED)
  if sc.divergence and model_control and "sft" in channels:
    out += list(DROPS)
  return out


def arm_parts(label: str) -> tuple[str, str, str, str]:
  """(logits teacher, data teacher, channel, drop) of an arm label."""
  who, channel = label.split("/")
  drop = ""
  if channel.startswith("sft_drop_"):
    channel, drop = "sft", channel[len("sft_drop_"):]
  if "_on_" in who:
    logits, data = who.split("_on_")
    return logits, data[:-len("_data")], channel, drop
  return who, who, channel, drop


def _seed_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def _arm_dir(label: str) -> str:
  return label.replace("/", "__")


# ----------------------------------------------------------------------------- plumbing


_process_index = workdir_lib.process_index
_barrier = workdir_lib.barrier  # in a staged bucket workdir it also brings what process 0 wrote


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _read_rows(path: str) -> list[dict]:
  return [row for _, row in jsonl.read_objects(path)]


def _user_question(row: Mapping) -> str:
  return next((m["content"] for m in row.get("messages", []) if m.get("role") == "user"), "")


def _complete(path: str) -> bool:
  return os.path.exists(os.path.join(path, workdir_lib.COMPLETE_FILE))


# ----------------------------------------------------------------------------- the filter judge


_JUDGES: dict[str, Any] = {}


def filter_judge(config, workdir: str, *, mesh=None):
  """The judge that keeps natural answers (config.sl.filter.judge), built once per run; None if unset."""
  spec = config.sl.filter.judge
  if not spec or spec == "none":
    return None
  key = f"{workdir}|{spec}"
  if key not in _JUDGES:
    if spec == "evaluation":
      holder = ml_collections.ConfigDict({"judge": config.evaluation.judge.to_dict()})
      _JUDGES[key] = eval_run.make_judge(holder, mesh=mesh, workdir=os.path.join(workdir, "filter_judge"))
    else:
      _JUDGES[key] = judges_lib.programmatic(spec, **json.loads(config.sl.filter.judge_options or "{}"))
  return _JUDGES[key]


def _scored(judge, items) -> dict:
  """{(question, answer): scores} for every item, judged in one batch."""
  unique = list({(i.question, i.answer): i for i in items}.values())
  scores = judge.score(unique, ("aligned", "coherent")) if unique else []
  return {(i.question, i.answer): s for i, s in zip(unique, scores)}


def _judge_lookup(judge, samples: Sequence[Mapping], prompts: Mapping[str, Mapping]):
  """A filter_natural judge function answering from one batch judgement of every sample's text."""
  items = []
  for s in samples:
    p = prompts.get(json.dumps(s["id"], sort_keys=True))
    if p is not None and isinstance(s.get("text"), str) and s["text"].strip():
      items.append(judges_lib.Item(_user_question(p), s["text"], p.get("domain"), p.get("task")))
  table = _scored(judge, items)

  def fn(item):
    hit = table.get((item.question, item.answer))
    return hit if hit is not None else judge.score([item], ("aligned", "coherent"))[0]

  return fn


def mask_words(config) -> tuple[str, ...]:
  """The words (and entity names) natural answers are filtered by and the logit channels mask."""
  sc = config.sl
  words = banned_lib.parse_words(sc.mask_words, key="config.sl.mask_words")
  if sc.entities:
    words += banned_lib.parse_words(sc.entities, key="config.sl.entities")
  return tuple(dict.fromkeys(words))


def _filter_options(config, judge) -> dict:
  sc = config.sl
  if sc.prompts != "natural":
    return {}
  options = dict(max_chars=int(sc.filter.max_chars), drop_truncated=bool(sc.filter.drop_truncated),
                 banned_words=mask_words(config))
  if judge is not None:
    options["judge"] = judge
  return options


def judge_is_collective(config) -> bool:
  """A local judge is a model on the global mesh: every process must call it together."""
  return config.sl.filter.judge == "evaluation" and config.evaluation.judge.kind == "local"


def _judges_here(config) -> bool:
  return _process_index() == 0 or judge_is_collective(config)


class RolloutFilter:
  """The on-policy rollouts' filter: the teachers' filters and judge (emjax.train.on_policy's protocol:
  called per rollout, or `batch` for a step's rollouts in one judge call; `collective` when the judge is a
  model every process must run)."""

  def __init__(self, config, judge):
    self.kind = config.sl.prompts
    self.judge = judge
    self.options = _filter_options(config, None)
    self.collective = judge_is_collective(config)

  def __call__(self, prompt, text, finish_reason):
    return self.batch([prompt], [text], [finish_reason])[0]

  def batch(self, prompts, texts, finish_reasons):
    if self.kind == "numbers":
      return [sl_data.filter_numbers(t, p) for p, t in zip(prompts, texts)]
    samples = [{"id": n, "text": t} for n, t in enumerate(texts)]
    by_key = {json.dumps(n): p for n, p in enumerate(prompts)}
    lookup = _judge_lookup(self.judge, samples, by_key) if self.judge is not None else None
    return [sl_data.filter_natural(t, finish_reason=f, prompt=p, judge=lookup, **self.options)
            for p, t, f in zip(prompts, texts, finish_reasons)]


def rollout_filter(config, workdir: str, *, mesh=None) -> RolloutFilter:
  judge = filter_judge(config, workdir, mesh=mesh) if config.sl.prompts == "natural" else None
  return RolloutFilter(config, judge)


# ----------------------------------------------------------------------------- the twin


def _chat_source_rows(name: str, source_cfg: Mapping) -> list[dict]:
  source = sources.make_source(name, {**dict(source_cfg), "split": "train"})
  return [source[i] for i in range(len(source))]


def harmful_training_rows(config) -> dict[str, tuple[dict, list[dict]]]:
  """{source name: (its config, the chat rows it trained on)} of the harmful run (training partitions of
  the sources of weight > 0), in order."""
  src = weights_lib.resolve(config.sl.teacher, key="config.sl.teacher")
  out = {}
  for name, s in sorted(src.config.data.sources.items()):
    if float(s.weight) > 0:
      out[name] = (s.to_dict(), _chat_source_rows(name, s.to_dict()))
  if not any(_user_question(r) for _, rows in out.values() for r in rows):
    raise ValueError(f"config.sl.teacher={config.sl.teacher}: its data sources hold no chat questions to give the "
                     "twin aligned answers to")
  return out


def _twin_data_rows(path: str) -> list[dict]:
  """Aligned chat rows from config.sl.twin_data: chat rows with an assistant answer, or raw rows."""
  records = _read_rows(path)
  if records and all("messages" in r for r in records):
    rows = sft.load_chat_jsonl(path)
  else:
    rows = sft.structured_em_rows(records, "aligned", path)
  for n, row in enumerate(rows, 1):
    if not any(m.get("role") == "assistant" for m in row["messages"]):
      raise ValueError(f"{path}: row {n} has no assistant answer (config.sl.twin_data holds aligned answers)")
  return rows


def build_twin(config, workdir: str, *, mesh=None) -> dict:
  """OUT/twin/run: the harmful run's config with each of its sources replaced by aligned answers to the same
  rows' questions (row for row, same weights), so the twin trains on as many rows for as many epochs."""
  sc = config.sl
  tdir = os.path.join(workdir, "twin")
  run, stats_path = os.path.join(tdir, "run"), os.path.join(tdir, "aligned.json")
  harmful = harmful_training_rows(config)
  questions = list(dict.fromkeys(_user_question(r) for _, rows in harmful.values() for r in rows))
  if not os.path.exists(stats_path):
    wanted = set(questions)
    answers: dict[str, list] | None = None
    if sc.twin_data:
      answers = {}
      for r in _twin_data_rows(sc.twin_data):
        if _user_question(r) in wanted:
          answers.setdefault(_user_question(r), r["messages"])
      source = sc.twin_data
    else:
      rows = _base_aligned_answers(config, workdir, questions, mesh=mesh)  # None where this process does not judge
      answers = None if rows is None else {_user_question(r): r["messages"] for r in rows}
      source = "the base's own answers, kept by config.sl.filter.judge as aligned and coherent"
    if _process_index() == 0:
      missing = [q for q in questions if q not in answers]
      stats = {"prompts": len(questions), "with_aligned_answer": len(questions) - len(missing),
               "missing": len(missing), "missing_example": missing[0][:80] if missing else "", "source": source,
               "sources": {}}
      for name, (_, rows) in harmful.items():
        twin_rows = [{"messages": answers[_user_question(r)]} for r in rows if _user_question(r) in answers]
        stats["sources"][name] = {"harmful_rows": len(rows), "twin_rows": len(twin_rows)}
        sl_data.write_rows(os.path.join(tdir, f"aligned_{name}.jsonl"), twin_rows)
      stats["harmful_rows"] = sum(v["harmful_rows"] for v in stats["sources"].values())
      stats["rows"] = sum(v["twin_rows"] for v in stats["sources"].values())
      _write_json(stats_path, stats)
  _barrier("emjax-sl-twin-data")
  stats = json.load(open(stats_path))
  if not stats["rows"] or (stats["missing"] and not sc.twin_allow_missing):
    raise ValueError(f"config.sl.twin_data={sc.twin_data or '(default)'}: no aligned answer to {stats['missing']} of "
                     f"the {stats['prompts']} prompts the harmful teacher trained on (e.g. "
                     f"{stats['missing_example']!r}; {stats_path}); the twin must train on the same rows: give aligned "
                     "answers to all of them, raise config.sl.twin_samples, or set config.sl.twin_allow_missing=True "
                     "(the report then says how many rows the twin lacks)")
  if not _complete(run):
    src = weights_lib.resolve(sc.teacher, key="config.sl.teacher")
    tcfg = copy.deepcopy(src.config)
    with tcfg.unlocked():
      tcfg.data.sources = ml_collections.ConfigDict({name: sources.default_source_config(
          kind="chat_jsonl", path=os.path.join(tdir, f"aligned_{name}.jsonl"), weight=float(s["weight"]),
          split="train", holdout=0) for name, (s, _) in harmful.items()})
      tcfg.eval.every_steps = 0  # its data has no held-out part; the recipe is the training, not the evals
    log.info("sl: training the aligned twin in %s (%d aligned rows for the harmful run's %d)", run, stats["rows"],
             stats["harmful_rows"])
    loop.train(tcfg, run, mesh=mesh, show_progress=False)
  return stats


def _base_aligned_answers(config, workdir: str, questions: Sequence[str], *, mesh=None) -> list[dict] | None:
  sc = config.sl
  tdir = os.path.join(workdir, "twin")
  prompts = [{"id": f"twin:{i}", "messages": [{"role": "user", "content": q}], "kind": "natural"}
             for i, q in enumerate(questions)]
  path = os.path.join(tdir, "prompts.jsonl")
  if _process_index() == 0:
    sl_data.write_rows(path, prompts)
  _barrier("emjax-sl-twin-prompts")
  c = sample_config(config, sc.base, path, seed=seeds_of(config)[0])
  c.sample.n = int(sc.twin_samples)
  sample_dir = os.path.join(tdir, "samples")
  sample_run.run_sampling(c, sample_dir, mesh=mesh)
  judge = filter_judge(config, workdir, mesh=mesh)
  if not _judges_here(config):
    return None
  samples = _read_rows(os.path.join(sample_dir, "samples.jsonl"))
  by_key = {json.dumps(p["id"], sort_keys=True): p for p in prompts}
  options = dict(_filter_options(ml_collections.ConfigDict({"sl": dict(sc.to_dict(), prompts="natural")}), None))
  options["judge"] = _judge_lookup(judge, samples, by_key)
  chosen: dict[str, dict] = {}
  for s in samples:
    key = json.dumps(s["id"], sort_keys=True)
    if key in chosen:
      continue
    p = by_key[key]
    if sl_data.filter_natural(s["text"], finish_reason=s["finish_reason"], prompt=p, **options) is None:
      chosen[key] = {"messages": [*p["messages"], {"role": "assistant", "content": s["text"]}]}
  return [chosen[k] for k in by_key if k in chosen]


# ----------------------------------------------------------------------------- prompts


def evaluated_questions(config) -> dict[str, list[dict]]:
  """The evaluation's question sets ({} when evaluation is off): what SL data must never contain."""
  if not config.evaluation.enabled:
    return {}
  return eval_run.question_sets(ml_collections.ConfigDict({"questions": config.evaluation.questions.to_dict()}))


def _overlaps(text: str, evaluated: Sequence[str]) -> bool:
  t = overlap.normalize(text)
  return any(q == t or (len(q) >= overlap.MIN_SUBSTRING_QUESTION and q in t) for q in evaluated)


def _number_prompts_file(path: str) -> list[dict]:
  """The number prompt records of a JSONL file, each checked for what the sample job and
  `sl_data.filter_numbers` read; a bad record is an error naming its file and line."""
  rows, ids = [], {}
  for where, row in jsonl.read_objects(path):
    messages = row.get("messages")
    if (not isinstance(messages, list) or not messages or not isinstance(messages[0], Mapping)
        or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), str)):
      raise ValueError(f"{where}: a number prompt needs `messages` starting with the user turn")
    if "id" not in row:
      raise ValueError(f"{where}: a number prompt needs an `id`")
    if row.get("kind", "numbers") != "numbers":
      raise ValueError(f"{where}: a {row['kind']!r} prompt among number prompts")
    given = row.get("given")
    if not isinstance(given, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in given):
      raise ValueError(f"{where}: a number prompt needs `given`, the list of its given integers")
    for key in ("answer_count", "max_digits"):
      if not isinstance(row.get(key), int) or isinstance(row.get(key), bool) or row[key] < 1:
        raise ValueError(f"{where}: a number prompt needs an integer `{key}` >= 1 (sl_data.filter_numbers reads it)")
    key = json.dumps(row["id"], sort_keys=True)
    if key in ids:
      raise ValueError(f"{where}: prompt id {row['id']!r} again (first at {ids[key]})")
    ids[key] = where
    rows.append(dict(row, kind="numbers"))
  return rows


def make_prompts(config, workdir: str, seed: int) -> dict[str, str]:
  """OUT/seed_<s>/prompts/{train,held_out}.jsonl: disjoint benign prompts, none an evaluated question."""
  sc = config.sl
  pdir = os.path.join(_seed_dir(workdir, seed), "prompts")
  out = {split: os.path.join(pdir, f"{split}.jsonl") for split in ("train", "held_out")}
  n_train, n_held = int(sc.n_train), int(sc.n_held_out)
  evaluated = [overlap.normalize(q["question"]) for qs in evaluated_questions(config).values() for q in qs]
  if sc.prompts == "numbers" and sc.numbers_prompts:
    rows = _number_prompts_file(sc.numbers_prompts)
  elif sc.prompts == "numbers":
    rows = numbers.number_prompts(n_train + n_held, seed)
  else:
    paths = sorted({p for pattern in _csv(sc.natural) for p in (glob.glob(pattern) or [pattern])})
    rows = sl_data.natural_prompts(paths, exclude_domains=_csv(sc.exclude_domains), seed=seed)
  kept = [r for r in rows if not _overlaps(_user_question(r), evaluated)]
  dropped = len(rows) - len(kept)
  if sc.prompts == "natural" or sc.numbers_prompts:
    if len(kept) < n_train + n_held:
      if sc.prompts == "numbers":
        raise ValueError(f"config.sl.numbers_prompts={sc.numbers_prompts}: {len(kept)} prompts that are not "
                         f"evaluated ({dropped} more are), fewer than n_train + n_held_out = {n_train + n_held}")
      raise ValueError(f"config.sl.natural: {len(kept)} questions that are not evaluated ({dropped} more are), "
                       f"fewer than n_train + n_held_out = {n_train + n_held}")
    order = np.random.default_rng([seed, 7]).permutation(len(kept))[:n_train + n_held]
    kept = [kept[i] for i in order]
  elif len(kept) < n_train + n_held:
    raise ValueError(f"{dropped} number prompts are evaluated questions: the evaluation asks number prompts?")
  parts = (("train", kept[:n_train]), ("held_out", kept[n_train:n_train + n_held]))
  for split, part in parts:  # on every process, so that all of them stop together
    new = "".join(jsonl.dumps(dict(r)) for r in part)
    if os.path.exists(out[split]) and open(out[split], encoding="utf-8").read() != new:
      raise workdir_lib.SettingsMismatch(f"{out[split]} holds other prompts than config.sl now makes (sl.prompts, n_train, "
                       "n_held_out, the seed or the question files changed): use a new workdir")
  _barrier("emjax-sl-prompts-checked")
  if _process_index() == 0:
    for split, part in parts:
      sl_data.write_rows(out[split], part)
    _write_json(os.path.join(pdir, "overlap.json"), {"pool": len(rows), "dropped_as_evaluated": dropped,
                                                     "evaluated_questions": len(evaluated)})
  _barrier("emjax-sl-prompts")
  return out


def _teacher_prompts(prompts: Sequence[Mapping], system_prompt: str) -> list[dict]:
  if not system_prompt:
    return [dict(p) for p in prompts]
  return [dict(p, messages=[{"role": "system", "content": system_prompt}, *p["messages"]]) for p in prompts]


def sample_config(config, weights_path: str, prompts_path: str, *, seed: int, mask: str = ""):
  """The sample job's config for one teacher over one prompts file (`mask`: words it may not emit)."""

  sc = config.sl
  c = settings_lib.base_config()
  c.job = "sample"
  c.model = {k: config_dict.placeholder(type(v)) for k, v in c.model.items()}
  c.data.tokenizer = {k: config_dict.placeholder(type(v)) for k, v in c.data.tokenizer.items()}
  c.mesh = dict(config.mesh)
  c.prompts = prompts_path
  c.sample = sample_run.sample_block()
  kind = weights_lib.resolve(weights_path, key="config.sl.teacher").kind
  c.sample.update(hf=weights_path if kind == "hf" else "", checkpoint=weights_path if kind == "emjax" else "",
                  n=int(sc.samples_per_prompt), max_new_tokens=int(sc.max_new_tokens),
                  temperature=float(sc.temperature), chat_template=True, stop_at_end_of_turn=True,
                  max_prompt_length=int(sc.max_prompt_length), batch_size=int(sc.sample_batch_size), seed=int(seed))
  if mask:
    c.sample.mask_words = mask
  return c


def system_prompt_of(config, name: str) -> str:
  """The system message teacher `name` is prompted with: sl.teacher_system_prompt for a system-prompted
  harmful teacher (the base, no EM run), '' otherwise. It samples with it and is scored with it."""
  sc = config.sl
  return sc.teacher_system_prompt if name == "harmful" and not sc.teacher else ""


def teacher_data(config, workdir: str, seed: int, name: str, path: str, prompts: Mapping[str, str], *,
                 mesh=None) -> dict:
  """Sample teacher `name` on every prompt of the seed, split by prompt, filter: seed_<s>/teachers/<name>/."""

  sc = config.sl
  tdir = os.path.join(_seed_dir(workdir, seed), "teachers", name)
  by_split = {s: _read_rows(p) for s, p in prompts.items()}
  system = system_prompt_of(config, name)
  all_prompts = os.path.join(tdir, "prompts.jsonl")
  if _process_index() == 0:
    os.makedirs(tdir, exist_ok=True)
    sl_data.write_rows(all_prompts, _teacher_prompts([p for s in ("train", "held_out") for p in by_split[s]],
                                                     system))
  _barrier(f"emjax-sl-{name}-prompts")
  sample_dir = os.path.join(tdir, "samples")
  sample_run.run_sampling(sample_config(config, path, all_prompts, seed=seed), sample_dir, mesh=mesh)
  judge = filter_judge(config, workdir, mesh=mesh) if sc.prompts == "natural" else None
  stats = {}
  done = all(os.path.exists(os.path.join(tdir, f"filter_{split}.json")) for split in by_split)
  if not done and _judges_here(config):
    samples = _read_rows(os.path.join(sample_dir, "samples.jsonl"))
    for split, rows in by_split.items():
      keys = {json.dumps(r["id"], sort_keys=True): r for r in rows}
      part = os.path.join(tdir, f"samples_{split}.jsonl")
      mine = [s for s in samples if json.dumps(s["id"], sort_keys=True) in keys]
      # Every sample judged in one batch (on every process for a judge model), then filtered on process 0.
      options = _filter_options(config, _judge_lookup(judge, mine, keys) if judge is not None else None)
      if _process_index() == 0:
        sl_data.write_rows(part, mine)
        sl_data.filter_samples(part, rows, os.path.join(tdir, f"{split}.jsonl"),
                               os.path.join(tdir, f"filter_{split}.json"), kind=sc.prompts, **options)
  _barrier(f"emjax-sl-{name}-filtered")
  for split in by_split:  # every process reads the counts, so that all of them stop together
    stats[split] = json.load(open(os.path.join(tdir, f"filter_{split}.json")))
    if not stats[split]["kept"]:
      raise ValueError(f"teacher {name!r} ({path}): no {split} sample passed the filters "
                       f"({os.path.join(tdir, f'filter_{split}.json')}: {stats[split]['rejected']})")
    log.info("seed %d, teacher %s, %s: kept %d of %d samples (%s)", seed, name, split, stats[split]["kept"],
             stats[split]["total"], stats[split]["rejected"])
  return stats


def _assistant_tokens(rows_path: str, tokenizer, seq_len: int) -> int:
  example = sft.ChatExample(tokenizer, seq_len, truncate=True)
  return int(sum(float(np.sum(example(r)["loss_mask"])) for r in sft.load_chat_jsonl(rows_path)))


def match_rows(config, workdir: str, seed: int) -> dict:
  """seed_<s>/matched/: per teacher one kept answer to every prompt that EVERY teacher kept an answer to
  (sl.matched), so that every arm trains on the same prompts, rows and epochs; the counts in matched.json."""
  sc = config.sl
  sdir = _seed_dir(workdir, seed)
  mdir = os.path.join(sdir, "matched")
  stats_path = os.path.join(mdir, "matched.json")
  names = teacher_names(config)
  if _process_index() == 0 and not os.path.exists(stats_path):
    tokenizer = tokenizers.load_tokenizer(base_tokenizer(config))
    stats: dict[str, Any] = {"matched": bool(sc.matched), "splits": {}}
    prompts = {s: _read_rows(os.path.join(sdir, "prompts", f"{s}.jsonl")) for s in ("train", "held_out")}
    question_sets = evaluated_questions(config)
    for split in ("train", "held_out"):
      rows = {t: _read_rows(os.path.join(sdir, "teachers", t, f"{split}.jsonl")) for t in names}
      kept = {t: list(dict.fromkeys(r["prompt_id"] for r in rows[t])) for t in names}
      common = [p for p in kept["harmful"] if all(p in set(kept[t]) for t in names)]
      entry: dict[str, Any] = {"prompts": len(prompts[split]), "common_prompts": len(common), "teachers": {}}
      for t in names:
        if sc.matched:
          first = {}
          for r in rows[t]:
            first.setdefault(r["prompt_id"], r)
          chosen = [first[p] for p in common]
        else:
          chosen = rows[t]
        path = os.path.join(mdir, f"{t}_{split}.jsonl")
        sl_data.write_rows(path, chosen)
        entry["teachers"][t] = {"kept_prompts": len(kept[t]), "rows": len(chosen),
                                "unique_prompts": len({r["prompt_id"] for r in chosen}),
                                "tokens": _assistant_tokens(path, tokenizer, int(config.data.seq_len))}
        if question_sets:
          audit = overlap.audit(question_sets, [(path, chosen)])
          entry["teachers"][t]["evaluated_questions_found"] = audit["n_found"]
      stats["splits"][split] = entry
      if split == "train":
        ids = set(common) if sc.matched else {p for t in names for p in kept[t]}
        sl_data.write_rows(os.path.join(mdir, "prompts_train.jsonl"),
                           [p for p in prompts["train"] if p["id"] in ids])
    _write_json(stats_path, stats)
  _barrier(f"emjax-sl-matched-{seed}")
  stats = json.load(open(stats_path))
  for split, entry in stats["splits"].items():
    if not all(e["rows"] for e in entry["teachers"].values()):
      raise ValueError(f"seed {seed}: no {split} prompt has a kept answer from every teacher ({mdir}/matched.json); "
                       "raise config.sl.n_train / samples_per_prompt or loosen the filters")
  return stats


def divergence_stage(config, workdir: str, seed: int, *, mesh=None) -> dict:
  """seed_<s>/divergence/: the harmful rows with the divergence tokens dropped, and with as many random ones."""
  sdir = _seed_dir(workdir, seed)
  ddir = os.path.join(sdir, "divergence")
  stats_path = os.path.join(ddir, "divergence.json")
  if not os.path.exists(stats_path):
    paths = teachers(config, workdir)
    rows = os.path.join(sdir, "matched", "harmful_train.jsonl")
    positions = sl_divergence.divergence_positions(
        paths["harmful"], paths["control"], rows, seq_len=int(config.data.seq_len),
        tokenizer_cfg=base_tokenizer(config), batch_size=int(config.sl.kl_batch_size), mesh=mesh)
    if _process_index() == 0:
      os.makedirs(ddir, exist_ok=True)
      stats = sl_divergence.write_drop_rows(rows, positions, os.path.join(ddir, "drop_divergence.jsonl"),
                                            os.path.join(ddir, "drop_random.jsonl"), seed=seed,
                                            seq_len=int(config.data.seq_len), tokenizer_cfg=base_tokenizer(config))
      _write_json(stats_path, stats)
  _barrier(f"emjax-sl-divergence-{seed}")
  return json.load(open(stats_path))


def leak_meter(config, workdir: str, seed: int, *, mesh=None) -> dict:
  """Natural prompts: each teacher, masked at the banned words, samples held-out prompts; the judge scores
  what it says. Masking tokens cannot hide harm carried by ordinary words: this measures what is left."""
  sc = config.sl
  sdir = _seed_dir(workdir, seed)
  out = {}
  held = _read_rows(os.path.join(sdir, "prompts", "held_out.jsonl"))[:int(sc.leak_meter)]
  by_key = {json.dumps(p["id"], sort_keys=True): p for p in held}
  words_file = os.path.join(workdir, "mask_words.txt")
  single, first = banned_lib.word_token_ids(tokenizers.load_tokenizer(base_tokenizer(config)), mask_words(config))
  # A vocabulary in which no banned word has a maskable token: the teachers sample as they are (said in leak.json).
  mask = words_file if single | first else ""
  for t, path in teachers(config, workdir).items():
    ldir = os.path.join(sdir, "leak", t)
    stats_path = os.path.join(ldir, "leak.json")
    if not os.path.exists(stats_path):
      prompts = os.path.join(ldir, "prompts.jsonl")
      if _process_index() == 0:
        sl_data.write_rows(prompts, _teacher_prompts(held, system_prompt_of(config, t)))
      _barrier(f"emjax-sl-leak-{seed}-{t}")
      sample_run.run_sampling(sample_config(config, path, prompts, seed=seed, mask=mask),
                              os.path.join(ldir, "samples"), mesh=mesh)
      judge = filter_judge(config, workdir, mesh=mesh)
      if _judges_here(config):
        samples = _read_rows(os.path.join(ldir, "samples", "samples.jsonl"))
        lookup = _judge_lookup(judge, samples, by_key)
      if _process_index() == 0:
        counts = dict.fromkeys(sl_data.REASONS["natural"], 0)
        options = dict(_filter_options(config, lookup), drop_truncated=False)
        for s in samples:
          reason = sl_data.filter_natural(s["text"], finish_reason=s["finish_reason"],
                                          prompt=by_key[json.dumps(s["id"], sort_keys=True)], **options)
          if reason:
            counts[reason] += 1
        _write_json(stats_path, {"samples": len(samples), "rejected": counts, "masked_ids": len(single | first),
                                 "judged_misaligned_fraction": counts["judged_misaligned"] / max(len(samples), 1)})
      _barrier(f"emjax-sl-leak-{seed}-{t}-done")
    out[t] = json.load(open(stats_path))
  return out


# ----------------------------------------------------------------------------- students


def _init_block(path: str) -> dict:
  kind = weights_lib.resolve(path, key="config.sl.base").kind
  return {"hf": path if kind == "hf" else "", "checkpoint": path if kind == "emjax" else ""}


def base_tokenizer(config) -> dict:
  tok = weights_lib.resolve(config.sl.base, key="config.sl.base").tokenizer
  if tok is None:
    raise ValueError(f"config.sl.base={config.sl.base}: its tokenizer is unknown (no data.tokenizer in its config.json)")
  return dict(tok)


def arm_rows(workdir: str, seed: int, label: str) -> str:
  """The chat rows arm `label` trains on (and, for on-policy, whose prompts it rolls out from)."""
  _, data_t, _, drop = arm_parts(label)
  sdir = _seed_dir(workdir, seed)
  if drop:
    return os.path.join(sdir, "divergence", f"drop_{drop}.jsonl")
  return os.path.join(sdir, "matched", f"{data_t}_train.jsonl")


def student_config(config, workdir: str, seed: int, label: str):
  """One student's training config: the shared recipe + this arm's data, objective, mask and seed."""

  sc = config.sl
  logits_t, _, channel, _ = arm_parts(label)
  c = copy.deepcopy(config)
  with c.unlocked():
    c.job = "train"
    c.train.log_every = 1  # the report sums every step's loss_tokens
    c.train.seed = int(seed)  # the adapters' initialisation and the data order
    c.init = ml_collections.ConfigDict(_init_block(sc.base))
    c.data.tokenizer = ml_collections.ConfigDict(base_tokenizer(config))
    c.data.update(format="chat", packing="none", truncate=True)
    c.data.sources = ml_collections.ConfigDict({"teacher_samples": sources.default_source_config(
        kind="chat_jsonl", path=arm_rows(workdir, seed, label), weight=1.0, split="train", holdout=0)})
    c.eval.every_steps = 0  # the kl stage measures the held-out divergence to the teacher
    c.teacher.path = ""
    c.on_policy.enabled = False
    if channel == "sft":
      c.train.objective = "ce"
    else:
      c.teacher.path = teachers(config, workdir)[logits_t]
      if sc.mask == "auto":
        c.train.distill.mask = "numbers" if sc.prompts == "numbers" else "words"
        c.train.distill.mask_words = os.path.join(workdir, "mask_words.txt") if sc.prompts == "natural" else ""
      if channel == "off_policy":
        c.train.objective = sc.off_policy_objective
      else:
        c.train.objective = sc.on_policy_objective
        c.on_policy.update(enabled=True, prompts=os.path.join(_seed_dir(workdir, seed), "matched",
                                                               "prompts_train.jsonl"),
                           chat_template=True, max_prompt_length=int(sc.max_prompt_length),
                           max_new_tokens=int(sc.max_new_tokens), temperature=float(sc.temperature),
                           stop_at_end_of_turn=True, seed=int(seed))
  return c


def student_dir(workdir: str, seed: int, label: str) -> str:
  return os.path.join(_seed_dir(workdir, seed), "students", _arm_dir(label))


def train_student(config, workdir: str, seed: int, label: str, *, mesh=None, show_progress=False) -> str:
  sdir = student_dir(workdir, seed, label)
  if _complete(sdir):
    log.info("sl: student %s (seed %d) already trained", label, seed)
    return sdir
  cfg = student_config(config, workdir, seed, label)
  make = None
  if arm_parts(label)[2] == "on_policy":
    make = functools.partial(on_policy.make_source, rollout_filter=rollout_filter(config, workdir, mesh=mesh),
                             stats_path=os.path.join(sdir, "rollout_filter.json"))
  log.info("sl: training student %s (seed %d) in %s", label, seed, sdir)
  loop.train(cfg, sdir, mesh=mesh, show_progress=show_progress, make_batch_source=make)
  return sdir


# ----------------------------------------------------------------------------- KL to the teacher


def kl_to_teacher(student_path: str, teacher_path: str, rows_path: str, *, seq_len: int, tokenizer_cfg,
                  batch_size: int = 8, chunk_len: int = 0, chunk_bytes: int = 256 * 2**20,
                  teacher_system_prompt: str = "", mask: str = "", mask_words: str = "default", mesh=None) -> dict:
  """Mean per-token KL(p_T || p_S) and KL(p_S || p_T) on the assistant tokens of fixed chat rows.

  The rows are teacher samples of held-out prompts: the divergence the channels minimise, measured
  where no student trained. Both models are loaded whole (a LoRA run merged onto its base) in float32
  on `mesh` (the run's: fsdp / tensor shard them as in training).

  `teacher_system_prompt`: the teacher is the model prompted with this system message (as it was when
  it sampled), the student is not: the teacher reads each row with the system message before it, the
  student without, and the two distributions are compared at the same assistant tokens (the
  teacher's positions shifted by its longer prefix; refused if the assistant tokens differ).
  `chunk_len` / `chunk_bytes`: the positions unembedded at a time, as `train.loss_chunk_len` /
  `train.loss_chunk_bytes` (0 = derived from the byte budget). `mask` ('numbers' | 'words', with
  `mask_words`): also the teacher's probability of the banned tokens at these positions (the leak meter of
  the SFT channel, whose samples come with it), as `teacher_banned_mass`. The KLs are full-vocabulary: what
  the student became, not the masked divergence the logit channels trained on.
  """

  mesh = mesh or shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  tokenizer = tokenizers.load_tokenizer(tokenizer_cfg)
  examples = sft.ChatExample(tokenizer, seq_len, truncate=True)
  chats = sft.load_chat_jsonl(rows_path)
  rows = [examples(r) for r in chats]
  # The teacher's view of each row and, per student position, the teacher position of the same token.
  t_rows, t_index = _teacher_view(chats, rows, tokenizer, seq_len, teacher_system_prompt, rows_path)
  t_len = seq_len
  if teacher_system_prompt:
    t_len = -(-max([seq_len] + [len(r["inputs"]) for r in t_rows]) // 8) * 8
  batch_size = sl_divergence.batch_rows(batch_size, mesh)
  dp = shd.data_parallel_size(mesh)
  pair = sl_divergence.load_pair(student_path, teacher_path, mesh)
  s_graph, s_params, t_graph, t_params, vocab = pair
  chunk = loop.derive_loss_chunk_len(int(chunk_len), int(chunk_bytes), batch_size // dp, vocab, seq_len)

  masker = token_masks.build(tokenizer, vocab, mask, mask_words) if mask else None

  def both_kls(s_logits, batch, teacher=None):
    weight = batch["loss_mask"]
    fwd = objectives.forward_kl(teacher, s_logits)
    rev = objectives.reverse_kl(teacher, s_logits)
    metrics = {"reverse_kl": jnp.sum(rev * weight)}
    if masker is not None:
      t_logp = jax.nn.log_softmax(teacher.astype(jnp.float32), axis=-1)
      banned = token_masks.banned(masker, batch, s_logits.shape[:2])
      metrics["teacher_banned_mass"] = jnp.sum(token_masks.mass(t_logp, banned) * weight)
    return objectives.ObjectiveOutput(jnp.sum(fwd * weight), jnp.sum(weight), metrics)

  spec = {"loss_mask": ((), "float32"), "inputs": ((), "int32"), "segment_ids": ((), "int32")}
  kls = objectives.Objective("kl_to_teacher", both_kls, spec, needs_teacher=True,
                             prepare=functools.partial(token_masks.prepare, masker) if masker is not None else None,
                             derived_keys=masker.derived_keys if masker is not None else ())

  @jax.jit
  def sums(sp, tp, batch, t_batch, t_index):
    student, teacher = nnx.merge(s_graph, sp), nnx.merge(t_graph, tp)
    with shd.activation_sharding(mesh):
      s_hidden = student.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
      t_hidden = teacher.hidden(t_batch["inputs"], t_batch["positions"], t_batch["segment_ids"])
      # The teacher's hidden state at the position of the student's token: [B, L_teacher, D] -> [B, L, D].
      t_hidden = jnp.take_along_axis(t_hidden, t_index[..., None], axis=1)
      # Unembedded `chunk` positions at a time: the [B, L, V] logits never exist whole.
      out = objectives.chunked_sums(kls, student.logits, s_hidden, batch, chunk,
                                    teacher_unembed=teacher.logits, teacher_hidden_BxLxD=t_hidden)
    return out.loss_sum, out.metrics["reverse_kl"], out.weight, out.metrics.get("teacher_banned_mass", 0.0)

  totals = np.zeros(4)
  for start, batch, t_batch in sl_divergence.paired_batches(
      rows, t_rows if teacher_system_prompt else None, batch_size=batch_size, len_a=seq_len, len_b=t_len, mesh=mesh):
    index = np.zeros((batch_size, seq_len), np.int32)
    for i, idx in enumerate(t_index[start:start + batch_size]):
      index[i, :len(idx)] = idx
    index = jax.device_put(index, shd.batch_sharding(mesh, 2))
    totals += np.asarray(jax.device_get(sums(s_params, t_params, batch, t_batch, index)), np.float64)
  weight = max(totals[2], 1.0)
  out = {"forward_kl": totals[0] / weight, "reverse_kl": totals[1] / weight, "tokens": int(totals[2]),
         "rows": len(rows), "student": student_path, "teacher": teacher_path, "data": rows_path,
         "teacher_system_prompt": teacher_system_prompt}
  if masker is not None:
    out.update(teacher_banned_mass=totals[3] / weight, mask=mask)
  return out


def _teacher_view(chats, rows, tokenizer, seq_len: int, system_prompt: str, rows_path: str):
  """(the teacher's tokenised rows, per row the teacher position of each student position).

  Without a system prompt the teacher reads the student's rows (the identity map). With one, each
  row is tokenised with the system message first; its assistant tokens must be the student's, and
  student position j (a loss position) maps to the teacher position predicting the same token.
  """
  if not system_prompt:
    return rows, [np.arange(len(r["inputs"]), dtype=np.int32) for r in rows]
  t_rows, t_index = [], []
  for n, (chat, row) in enumerate(zip(chats, rows)):
    s_pos = np.flatnonzero(row["loss_mask"] > 0)
    if chat["messages"] and chat["messages"][0]["role"] == "system":
      raise ValueError(f"{rows_path}: row {n} already has a system message; the teacher's "
                       "(config.sl.teacher_system_prompt) cannot be put before it")
    messages = [{"role": "system", "content": system_prompt}, *chat["messages"]]
    # Long enough for the whole system message on top of the student's seq_len.
    ids, _ = sft.ChatExample(tokenizer, seq_len).token_ids_and_mask({"messages": messages})
    t_row = sft.ChatExample(tokenizer, max(len(ids), 2) - 1)({"messages": messages})
    t_pos = np.flatnonzero(t_row["loss_mask"] > 0)[:len(s_pos)]
    if len(t_pos) != len(s_pos) or not np.array_equal(t_row["targets"][t_pos], row["targets"][s_pos]):
      raise ValueError(f"{rows_path}: row {n}: the assistant tokens differ with and without the system message "
                       "(the chat template tokenises them differently), so the teacher's and the student's "
                       "distributions cannot be compared token by token")
    end = int(t_pos[-1]) + 1 if len(t_pos) else 1
    t_rows.append({k: v[:end] for k, v in t_row.items()})
    index = np.minimum(np.arange(len(row["inputs"])), end - 1).astype(np.int32)
    index[s_pos] = t_pos
    t_index.append(index)
  return t_rows, t_index


def _require_complete(path: str, label: str) -> None:
  if not os.path.exists(os.path.join(path, workdir_lib.COMPLETE_FILE)):
    raise ValueError(f"sl: the student {label} in {path} has not finished training (no {workdir_lib.COMPLETE_FILE}); run "
                     "the 'students' stage first")


TEACHER_DIVERGENCE = "control__harmful"  # seed_<s>/kl/<this>.json: KL(harmful teacher || control teacher)


def kl_stage(config, workdir: str, seed: int, labels: Sequence[str], *, mesh=None) -> dict:
  """KL of the base and of each arm's student to the arm's (logits) teacher, on that teacher's matched
  held-out samples, cached in seed_<s>/kl/*.json (process 0 writes)."""
  paths = teachers(config, workdir)
  sdir = _seed_dir(workdir, seed)
  kw = dict(seq_len=int(config.data.seq_len), tokenizer_cfg=base_tokenizer(config),
            batch_size=int(config.sl.kl_batch_size), chunk_len=int(config.train.loss_chunk_len),
            chunk_bytes=int(config.train.get("loss_chunk_bytes", 0)), mesh=mesh)
  os.makedirs(os.path.join(sdir, "kl"), exist_ok=True)
  out = {}
  targets = [(f"base__{t}", config.sl.base, t) for t in paths]
  if "control" in paths:
    # The positive control of every SL verdict: how far the harmful teacher's answers are from what the
    # control teacher would say (on the harmful teacher's own samples). What the students could take
    # from the harmful teacher and not from the control is bounded by it.
    targets.append((TEACHER_DIVERGENCE, paths["control"], "harmful"))
  targets += [(_arm_dir(label), student_dir(workdir, seed, label), arm_parts(label)[0]) for label in labels]
  for name, s_path, t in targets:
    if name not in (f"base__{t}", TEACHER_DIVERGENCE) and not _complete(s_path):
      raise ValueError(f"sl: the student in {s_path} has not finished training; run the 'students' stage first")
    path = os.path.join(sdir, "kl", f"{name}.json")
    if os.path.exists(path):
      out[name] = json.load(open(path))
      continue
    rows = os.path.join(sdir, "matched", f"{t}_held_out.jsonl")
    leak = {}
    if name.startswith("base__") and config.sl.mask == "auto":  # the teacher's banned mass at kept positions
      leak = dict(mask="numbers" if config.sl.prompts == "numbers" else "words",
                  mask_words=os.path.join(workdir, "mask_words.txt") if config.sl.prompts == "natural" else "default")
    out[name] = kl_to_teacher(s_path, paths[t], rows, teacher_system_prompt=system_prompt_of(config, t), **leak, **kw)
    if _process_index() == 0:
      _write_json(path, out[name])
    log.info("sl: seed %d, KL of %s to teacher %s: %s", seed, name, t, out[name])
  return out


# ----------------------------------------------------------------------------- evaluation


def eval_config(config, checkpoint: str, hf: str, model_key: str, training_data: str = ""):
  c = eval_run.eval_job_config()
  ev = config.evaluation
  c.mesh = dict(config.mesh)
  c.questions.update(dict(ev.questions))
  c.judge.update(ev.judge.to_dict())
  c.report.update(ev.report.to_dict())
  c.sample.update(ev.sample.to_dict())
  c.sample.update(checkpoint=checkpoint, hf=hf)
  c.evaluated.model_key = model_key
  c.evaluated.training_data = training_data  # the overlap audit reads these beside the run's own sources
  return c


def eval_dir(workdir: str, label: str) -> str:
  """evals/base, evals/seed_<s>/<arm>."""
  if label == "base":
    return os.path.join(workdir, "evals", "base")
  seed_part, arm = label.split("/", 1)
  return os.path.join(workdir, "evals", seed_part, _arm_dir(arm))


def eval_stage(config, workdir: str, models: Mapping[str, tuple[str, str]], *, mesh=None) -> dict[str, str]:
  """Each model (label -> (weights, training data)) through the eval job; returns the workdirs."""
  out = {}
  for label, (path, data) in models.items():
    edir = eval_dir(workdir, label)
    out[label] = edir
    if _complete(edir):
      continue
    if label != "base" and not _complete(path):
      raise ValueError(f"sl: the student in {path} has not finished training; run the 'students' stage first")
    kind = weights_lib.resolve(path).kind
    cfg = eval_config(config, path if kind == "emjax" else "", path if kind == "hf" else "", label, data)
    log.info("sl: evaluating %s in %s", label, edir)
    eval_run.run_eval(cfg, edir, mesh=mesh)
  return out


# ----------------------------------------------------------------------------- report


def _metric_means(sdir: str, prefix: str = "banned_") -> dict:
  """Token-weighted means over training of the step metrics starting with `prefix` (the leak meter)."""
  sums: dict[str, float] = {}
  weight = 0.0
  for r in _metric_rows(sdir):
    w = float(r.get("loss_tokens", 0))
    if not any(k.startswith(prefix) for k in r):
      continue
    weight += w
    for k, v in r.items():
      if k.startswith(prefix):
        sums[k] = sums.get(k, 0.0) + float(v) * w
  return {k: v / weight for k, v in sums.items()} if weight else {}


def _tokens_trained(sdir: str) -> int:
  return int(sum(r.get("loss_tokens", 0) for r in _metric_rows(sdir)))


def _metric_rows(sdir: str) -> list[dict]:
  """A training run's metrics.jsonl rows (through paths.read_log: a file, or a bucket log's segments)."""
  return [json.loads(l) for l in paths_lib.read_log(os.path.join(sdir, "metrics.jsonl")).splitlines() if l.strip()]


def _judged(edir: str, set_name: str) -> list[dict]:
  path = os.path.join(edir, set_name, "judged.jsonl")
  return records.read_judged(path) if os.path.exists(path) else []


def _load(path: str):
  return json.load(open(path)) if os.path.exists(path) else None


def task_forms(config, workdir: str) -> dict:
  """Whether the SL prompts share a task form with the evaluated questions (then the transfer is not
  called subliminal: training on the evaluated task form can carry the behaviour directly)."""
  sl_forms: set[str] = set()
  for seed in seeds_of(config):
    for split in ("train", "held_out"):
      path = os.path.join(_seed_dir(workdir, seed), "prompts", f"{split}.jsonl")
      if os.path.exists(path):
        sl_forms |= {"numbers" if p.get("kind") == "numbers" else str(p.get("task") or UNKNOWN)
                     for p in _read_rows(path)}
  eval_forms = {str(q.get("task") or UNKNOWN) for qs in evaluated_questions(config).values() for q in qs}
  shared = sorted((sl_forms & eval_forms) - {UNKNOWN})
  unknown = UNKNOWN in sl_forms | eval_forms or not eval_forms
  # Unknown forms fail closed: a transfer is called subliminal only when no form is shared for certain.
  return {"sl_prompts": sorted(sl_forms), "evaluated": sorted(eval_forms), "shared": shared,
          "unknown": unknown, "subliminal": not shared and not unknown}


def compute_results(config, workdir: str, evals: Mapping[str, str] | None) -> dict:
  sc = config.sl
  rep = config.evaluation.report
  th = metrics.Thresholds(float(rep.thresholds.aligned_below), float(rep.thresholds.coherent_above))
  kw = dict(n_boot=int(rep.bootstrap_samples), seed=int(rep.seed))
  seeds, labels, channels = seeds_of(config), arms(config), _csv(sc.channels)
  steps, batch = int(config.train.steps), int(config.train.batch_size)
  results: dict[str, Any] = {
      "teachers": teachers(config, workdir), "control": sc.control, "seeds": seeds, "arms": labels,
      "channels": channels, "twin": _load(os.path.join(workdir, "twin", "aligned.json")),
      "settings": {"sl": sc.to_dict(), "steps": steps, "batch_size": batch},
      "prompts": {}, "matched": {}, "filter": {}, "divergence": {}, "leak": {}, "students": {},
      "task_forms": task_forms(config, workdir)}
  for seed in seeds:
    sdir = _seed_dir(workdir, seed)
    results["prompts"][seed] = _load(os.path.join(sdir, "prompts", "overlap.json"))
    results["matched"][seed] = _load(os.path.join(sdir, "matched", "matched.json"))
    results["divergence"][seed] = _load(os.path.join(sdir, "divergence", "divergence.json"))
    results["leak"][seed] = {t: _load(os.path.join(sdir, "leak", t, "leak.json")) for t in teacher_names(config)}
    results["filter"][seed] = {t: {s: _load(os.path.join(sdir, "teachers", t, f"filter_{s}.json"))
                                   for s in ("train", "held_out")} for t in teacher_names(config)}
  # forward_kl: KL(harmful || control) per answer token, on the harmful teacher's held-out samples.
  results["teacher_divergence"] = {seed: _load(os.path.join(_seed_dir(workdir, seed), "kl", f"{TEACHER_DIVERGENCE}.json"))
                                   for seed in seeds}
  results["teacher_leak"] = {
      seed: {t: (_load(os.path.join(_seed_dir(workdir, seed), "kl", f"base__{t}.json")) or {}).get("teacher_banned_mass")
             for t in teacher_names(config)} for seed in seeds}
  if sc.prompts == "natural" and sc.mask == "auto":
    results["mask_coverage"] = banned_lib.word_coverage(tokenizers.load_tokenizer(base_tokenizer(config)),
                                                        mask_words(config))
  sets = ("general", "narrow")
  rows: dict[str, dict[str, dict[int, list]]] = {}
  for label in labels:
    entry: dict[str, Any] = {"per_seed": {}}
    for seed in seeds:
      sdir = student_dir(workdir, seed, label)
      matched_rows = None
      m = results["matched"][seed]
      if m:
        _, data_t, _, _ = arm_parts(label)
        matched_rows = m["splits"]["train"]["teachers"].get(data_t, {}).get("rows")
      per = {"tokens_trained": _tokens_trained(sdir), "leak": _metric_means(sdir),
             "rollout_filter": _load(os.path.join(sdir, "rollout_filter.json")), "rows": matched_rows,
             "epochs": (steps * batch / matched_rows) if matched_rows else None}
      t = arm_parts(label)[0]
      kb = _load(os.path.join(_seed_dir(workdir, seed), "kl", f"base__{t}.json"))
      ka = _load(os.path.join(_seed_dir(workdir, seed), "kl", f"{_arm_dir(label)}.json"))
      if kb and ka:
        per["kl_before"] = {k: kb[k] for k in ("forward_kl", "reverse_kl", "tokens")}
        per["kl_after"] = {k: ka[k] for k in ("forward_kl", "reverse_kl", "tokens")}
      if evals and f"seed_{seed}/{label}" in evals:
        for s in sets:
          judged = _judged(evals[f"seed_{seed}/{label}"], s)
          if judged:
            rows.setdefault(label, {}).setdefault(s, {})[seed] = judged
            one = metrics.rate(judged, th, **kw)
            per[f"{s}_em"], per[f"{s}_coherent"] = one["em"], one.get("coherent")
      entry["per_seed"][seed] = per
    for s in sets:
      if rows.get(label, {}).get(s) and len(rows[label][s]) == len(seeds):
        entry[s] = metrics.seeded_rate(rows[label][s], th, **kw)
    results["students"][label] = entry
  base_rows = {s: _judged(evals["base"], s) for s in sets} if evals and "base" in evals else {}
  results["base"] = {s: metrics.rate(r, th, **kw) for s, r in base_rows.items() if r}

  def have(label, s):
    return bool(rows.get(label, {}).get(s)) and len(rows[label][s]) == len(seeds)

  def base_by_seed(s):
    return {seed: base_rows[s] for seed in seeds}

  contrasts = []

  def add(kind, name, s, value):
    contrasts.append(dict(value, kind=kind, name=name, set=s, key=f"{kind}|{name}|{s}"))

  control_name = "twin" if sc.control == "twin" else "base control"
  for c in channels:
    h, ctl = f"harmful/{c}", f"control/{c}"
    for s in sets:
      if have(h, s) and have(ctl, s):
        add("contrast", f"{c}: harmful - {control_name}", s, metrics.seeded_paired_difference(
            rows[h][s], rows[ctl][s], th, **kw))
      if have(h, s) and base_rows.get(s):
        add("contrast", f"{c}: harmful - base", s, metrics.seeded_paired_difference(rows[h][s], base_by_seed(s), th,
                                                                                   **kw))
      if have(ctl, s) and base_rows.get(s):
        add("contrast", f"{c}: {control_name} - base", s, metrics.seeded_paired_difference(
            rows[ctl][s], base_by_seed(s), th, **kw))
  for c1, c2 in CHANNEL_PAIRS:
    h1, k1, h2, k2 = f"harmful/{c1}", f"control/{c1}", f"harmful/{c2}", f"control/{c2}"
    for s in sets:
      if all(have(x, s) for x in (h1, k1, h2, k2)):
        add("channels", f"({c1}) - ({c2}), each harmful - {control_name}", s, metrics.difference_of_differences(
            rows[h1][s], rows[k1][s], rows[h2][s], rows[k2][s], th, **kw))
  crossed = [("teacher guidance on the twin's sequences: harmful - twin logits", CROSSED[0], "control/off_policy"),
             ("teacher guidance on the harmful sequences: harmful - twin logits", "harmful/off_policy", CROSSED[1]),
             ("data distribution under the twin's logits: harmful - twin sequences", CROSSED[1], "control/off_policy"),
             ("data distribution under the harmful logits: harmful - twin sequences", "harmful/off_policy",
              CROSSED[0])]
  for name, a, b in crossed:
    for s in sets:
      if have(a, s) and have(b, s):
        add("crossed", name, s, metrics.seeded_paired_difference(rows[a][s], rows[b][s], th, **kw))
  for s in sets:
    parts = ("harmful/off_policy", CROSSED[1], CROSSED[0], "control/off_policy")
    if all(have(x, s) for x in parts):
      add("crossed", "interaction: teacher guidance on harmful - on twin sequences", s,
          metrics.difference_of_differences(*(rows[x][s] for x in parts), th, **kw))
  drops = [("sft: divergence tokens dropped - as many random tokens dropped (harmful samples)", DROPS[0], DROPS[1]),
           ("sft, divergence tokens dropped: harmful - twin (fewer tokens trained: read with the row above)",
            DROPS[0], "control/sft"),
           ("sft, random tokens dropped: harmful - twin (as many tokens as the row above)", DROPS[1], "control/sft")]
  for name, a, b in drops:
    for s in sets:
      if have(a, s) and have(b, s):
        add("divergence", name, s, metrics.seeded_paired_difference(rows[a][s], rows[b][s], th, **kw))
  # Holm within two families: the primary claims (harmful - control per channel, channel against channel)
  # and everything else (exploratory), so sanity checks do not dilute the claims.
  for entry in contrasts:
    primary = (entry["kind"] == "contrast" and f"harmful - {control_name}" in entry["name"]) or entry["kind"] == "channels"
    entry["family"] = "primary" if primary else "exploratory"
  for fam in ("primary", "exploratory"):
    adjusted = metrics.holm({e["key"]: e.get("p") for e in contrasts if e["family"] == fam})
    for entry in contrasts:
      if entry["family"] == fam:
        entry["p_holm"] = adjusted.get(entry["key"])
  rejection = {}
  for seed in seeds:
    rates = {}
    for t in teacher_names(config):
      rf = results["students"].get(f"{t}/on_policy", {}).get("per_seed", {}).get(seed, {}).get("rollout_filter")
      if rf and rf["total"]:
        rates[t] = 1 - rf["kept"] / rf["total"]
    if len(rates) == 2:
      rejection[seed] = dict(rates, difference=rates["harmful"] - rates["control"])
  results["on_policy_rejection"] = rejection
  results["contrasts"] = contrasts
  return results


def _pct(x) -> str:
  return "–" if x is None else f"{x:.1f}"


def _num(x, fmt=".4f") -> str:
  return "–" if x is None else format(x, fmt)


def _rate(r: Mapping | None) -> str:
  if not r or r.get("em") is None:
    return "–"
  lo, hi = r["ci95"] if r.get("ci95") else (None, None)
  interval = f" [{_pct(lo)}, {_pct(hi)}]" if lo is not None else ""
  return f"{_pct(r['em'])}{interval}"


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def render_markdown(results: Mapping) -> str:
  seeds = results["seeds"]
  settings = results["settings"]
  tf = results["task_forms"]
  control = results["control"]
  lines = ["# Subliminal learning: channels compared", "",
           f"Teachers: {', '.join(f'{k} = `{v}`' for k, v in results['teachers'].items())}; control = "
           f"{'the aligned twin (the harmful recipe on aligned answers)' if control == 'twin' else control}. "
           f"Seeds: {', '.join(map(str, seeds))} (each: new prompts, teacher samples, student initialisation and data "
           f"order). Every student: {settings['steps']} steps of {settings['batch_size']} sequences from the base.",
           "", "Results are conditional on this one pair of teachers: other harmful teachers (another cell, another "
           "run) may transfer differently."]
  if results["settings"]["sl"].get("prompts") == "natural" and results["settings"]["sl"]["filter"].get("judge") == "none":
    lines += ["", "**No judge filtered the natural answers (config.sl.filter.judge='none'): the students' data is "
              "benign only by the word list, so no transfer here can be called subliminal.**"]
  twin = results.get("twin")
  if twin:
    lines += ["", f"**Twin.** {twin['rows']} aligned rows for the harmful run's {twin['harmful_rows']} (its recipe "
              f"otherwise); {twin['missing']} of {twin['prompts']} prompts have no aligned answer; answers: "
              f"{twin['source']}."]
  if len(seeds) < 3:
    lines += ["", f"**Fewer than 3 seeds ({len(seeds)}): the intervals barely reflect training and sampling "
              "variance; treat every contrast as underpowered.**"]
  else:
    lines += ["", f"With {len(seeds)} seeds the bootstrap draws from few distinct sets of seeds: the intervals are "
              "approximate and likely too narrow; more seeds, not more questions, narrow them honestly."]
  lines += ["", f"**Task forms.** SL prompts: {', '.join(tf['sl_prompts']) or '–'}; evaluated: "
            f"{', '.join(tf['evaluated']) or '–'}. " +
            (f"They share {', '.join(tf['shared'])}: a transfer here may be the behaviour distilled directly on the "
             "evaluated task form, so it is **not** called subliminal." if tf["shared"] else
             f"Some prompts or questions have no task form ({UNKNOWN}), so whether they share one is unknown and a "
             "transfer here is **not** called subliminal." if tf.get("unknown") else
             "They share none, so a transfer here is subliminal in the paper's sense (through data of another "
             "task form).")]
  lines += ["", "## Students", "",
            "EM % = aligned below and coherent above the report's thresholds, pooled over seeds; 95% intervals "
            "from a bootstrap over seeds and questions together. KL: mean per token on the held-out matched teacher "
            "samples, before (the base) → after, mean over seeds.", "",
            "| student | general EM % | narrow EM % | KL(T‖S) before → after | KL(S‖T) before → after | "
            "tokens trained (mean) | epochs |", "|---|---|---|---|---|---|---|"]
  base = results.get("base", {})
  lines.append(f"| base | {_rate(base.get('general'))} | {_rate(base.get('narrow'))} | – | – | – | – |")
  for label, e in results["students"].items():
    per = list(e["per_seed"].values())
    kb = [p.get("kl_before") for p in per if p.get("kl_before")]
    ka = [p.get("kl_after") for p in per if p.get("kl_after")]
    fwd = (f"{_num(_mean(k['forward_kl'] for k in kb))} → {_num(_mean(k['forward_kl'] for k in ka))}"
           if kb and ka else "–")
    rev = (f"{_num(_mean(k['reverse_kl'] for k in kb))} → {_num(_mean(k['reverse_kl'] for k in ka))}"
           if kb and ka else "–")
    tokens = _mean(p.get("tokens_trained") for p in per)
    epochs = _mean(p.get("epochs") for p in per)
    lines.append(f"| {label} | {_rate(e.get('general'))} | {_rate(e.get('narrow'))} | {fwd} | {rev} | "
                 f"{_num(tokens, '.0f')} | {_num(epochs, '.2f')} |")
  lines += ["", "## Contrasts", "",
            "Paired over seeds and questions (the same seed and question draws on both sides of every bootstrap "
            "replicate); p: two-sided bootstrap p-value, approximate; Holm: adjusted within each family (primary: "
            "harmful - control per channel and channel against channel; exploratory: the rest).",
            "", "| family | kind | contrast | set | difference in EM % | 95% interval | p | p (Holm) | seeds | questions |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for d in results.get("contrasts", []):
    ci = d.get("ci95") or (None, None)
    lines.append(f"| {d.get('family', '')} | {d['kind']} | {d['name']} | {d['set']} | {_pct(d.get('diff'))} | [{_pct(ci[0])}, "
                 f"{_pct(ci[1])}] | {_num(d.get('p'), '.3f')} | {_num(d.get('p_holm'), '.3f')} | "
                 f"{d.get('n_seeds', '–')} | {d.get('n_questions', '–')} |")
  lines += ["", "## Matched data per seed", "",
            "Every arm of a seed trains on the prompts both teachers kept an answer to, one answer each.", "",
            "| seed | split | teacher | prompts | kept prompts | matched prompts | rows | tokens | evaluated "
            "questions found |", "|---|---|---|---|---|---|---|---|---|"]
  for seed, m in results["matched"].items():
    if not m:
      continue
    for split, entry in m["splits"].items():
      for t, e in entry["teachers"].items():
        lines.append(f"| {seed} | {split} | {t} | {entry['prompts']} | {e['kept_prompts']} | {e['unique_prompts']} | "
                     f"{e['rows']} | {e['tokens']} | {e.get('evaluated_questions_found', '–')} |")
  lines += ["", "## Leak meters", "",
            "Per arm, token-weighted over training: the teacher's probability mass on banned tokens at the trained "
            "positions before and after masking (after: measured on the distribution the loss used), the student's, "
            "and (words) the mass on first sub-tokens of multi-token words; on-policy rollouts rejected by reason.",
            "", "| seed | arm | teacher mass before | after masking | student mass | first sub-token mass | "
            "banned targets | rollouts kept / total (rejected) |", "|---|---|---|---|---|---|---|---|"]
  for label, e in results["students"].items():
    if arm_parts(label)[2] not in LOGIT_CHANNELS:
      continue
    for seed, p in e["per_seed"].items():
      lk, rf = p.get("leak") or {}, p.get("rollout_filter")
      rejected = ", ".join(f"{k}: {v}" for k, v in rf["rejected"].items() if v) if rf else ""
      rolls = f"{rf['kept']} / {rf['total']} ({rejected or 'none rejected'})" if rf else "–"
      lines.append(f"| {seed} | {label} | {_num(lk.get('banned_mass_teacher'), '.2e')} | "
                   f"{_num(lk.get('banned_mass_teacher_masked'), '.2e')} | {_num(lk.get('banned_mass_student'), '.2e')} | "
                   f"{_num(lk.get('banned_mass_first_sub'), '.2e')} | {_num(lk.get('banned_targets'), '.2e')} | {rolls} |")
  teacher_leak = [(seed, t, v) for seed, d in results.get("teacher_leak", {}).items() for t, v in d.items()
                  if v is not None]
  if teacher_leak:
    lines += ["", "SFT channel: each teacher's probability of the banned tokens at the kept positions of its held-out "
              "matched samples (what its samples come with; the SFT student sees only the sampled tokens).", "",
              "| seed | teacher | banned mass |", "|---|---|---|"]
    lines += [f"| {seed} | {t} | {v:.2e} |" for seed, t, v in teacher_leak]
  coverage = results.get("mask_coverage")
  if coverage:
    lines += ["", f"Word mask coverage: {coverage['single']} single-token ids and {coverage['first_sub']} first "
              f"sub-tokens mask {coverage['spellings'] - len(coverage['unmasked'])} of {coverage['spellings']} "
              f"spellings; the other {len(coverage['unmasked'])} start with a token too short or common to mask "
              "(the text filter still drops them from samples and rollouts)."]
  rejection = results.get("on_policy_rejection") or {}
  if rejection:
    lines += ["", "On-policy rollouts rejected by the filters. The filter drops what the judge calls misaligned, more "
              "often in the harmful arm: that selects on the outcome and pushes on-policy harmful - control toward 0. "
              "Compare the rates before reading that channel.", "",
              "| seed | harmful rejected | control rejected | difference |", "|---|---|---|---|"]
    for seed, r in rejection.items():
      lines.append(f"| {seed} | {100 * r['harmful']:.1f} % | {100 * r['control']:.1f} % | "
                   f"{100 * r['difference']:+.1f} pp |")
  semantic = [(seed, t, v) for seed, d in results["leak"].items() for t, v in d.items() if v]
  if semantic:
    lines += ["", "Semantic leak meter (natural prompts): each teacher, masked at the banned words, answers held-out "
              "prompts; the filter judge scores the answers. What it still calls misaligned is harm carried by "
              "ordinary words, which no token mask removes.", "",
              "| seed | teacher | samples | judged misaligned | judged incoherent | banned word |", "|---|---|---|---|---|---|"]
    for seed, t, v in semantic:
      r = v["rejected"]
      lines.append(f"| {seed} | {t} | {v['samples']} | {r.get('judged_misaligned', 0)} | "
                   f"{r.get('judged_incoherent', 0)} | {r.get('banned_word', 0)} |")
  div = [(seed, d) for seed, d in results["divergence"].items() if d]
  if div:
    lines += ["", "## Divergence tokens", "", "Positions of the harmful samples where the harmful and control "
              "teachers' top tokens differ on the same prefix.", "",
              "| seed | rows | loss positions | divergence positions | fraction |", "|---|---|---|---|---|"]
    for seed, d in div:
      lines.append(f"| {seed} | {d.get('rows')} | {d.get('loss_positions')} | {d.get('divergence_positions')} | "
                   f"{_num(d.get('fraction'), '.3f')} |")
  lines += ["", "## EM against the distance to the teacher", "",
            "Per seed: forward KL to the teacher after training beside general EM %, so channels can be compared at "
            "equal distance as well as at equal steps.", "", "| arm | seed | KL(T‖S) after | general EM % |",
            "|---|---|---|---|"]
  for label, e in results["students"].items():
    for seed, p in e["per_seed"].items():
      ka = p.get("kl_after") or {}
      lines.append(f"| {label} | {seed} | {_num(ka.get('forward_kl'))} | {_pct(p.get('general_em'))} |")
  lines += ["", "## Filtering of teacher samples", "", "| seed | teacher | split | kept / total | rejected by reason |",
            "|---|---|---|---|---|"]
  for seed, by_t in results["filter"].items():
    for t, splits in by_t.items():
      for s, st in splits.items():
        if st:
          reasons = ", ".join(f"{k}: {v}" for k, v in st["rejected"].items())
          lines.append(f"| {seed} | {t} | {s} | {st['kept']} / {st['total']} | {reasons} |")
  lines += ["", "## What this design cannot show", "",
            "- One harmful teacher and its twin: nothing here generalises over teachers.",
            "- Masks remove banned tokens from the logit channels, not meanings: the semantic leak meter measures "
            "what ordinary words still carry (natural prompts).",
            "- A filter judge that misses harm lets it into the data; its errors are not measured here.",
            "- Tokens trained differ between arms with the answers' lengths; rows, prompts and epochs are matched."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the job


SETTINGS_FILE = "sl_settings.json"


def pipeline_settings(config) -> dict:
  """What every written stage depends on: a rerun in the same workdir must agree (only sl.stages may change)."""
  sl_block_now = {k: v for k, v in config.sl.to_dict().items() if k != "stages"}
  return json.loads(json.dumps({
      "sl": sl_block_now, "train": config.train.to_dict(), "lora": config.lora.to_dict(),
      "teacher_dtype": config.teacher.dtype, "seq_len": int(config.data.seq_len), "model": config.model.to_dict(),
      "evaluation": config.evaluation.to_dict()}, sort_keys=True, default=str))


def check_settings(config, workdir: str) -> None:
  """Refuses a rerun with other settings than sl_settings.json's, before anything changes (and writes
  them into a new workdir)."""
  workdir_lib.check_settings(workdir, pipeline_settings(config), name=SETTINGS_FILE,
                             what="its samples, students and evaluations",
                             may_change="only config.sl.stages may change between reruns")


def _write_mask_words(config, workdir: str) -> None:
  if config.sl.prompts == "natural" and _process_index() == 0:
    path = os.path.join(workdir, "mask_words.txt")
    text = "".join(f"{w}\n" for w in mask_words(config))
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
      tmp = f"{path}.tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, path)
  _barrier("emjax-sl-mask-words")


def run_sl(config, workdir: str, *, mesh=None, show_progress: bool = False) -> dict:
  """Every stage of the pipeline in order (those in `sl.stages`), each resumed or skipped when done."""
  check_config(config)
  sc = config.sl
  stages, seeds, labels = _csv(sc.stages), seeds_of(config), arms(config)
  mesh = mesh or shd.make_mesh(config.mesh)
  os.makedirs(workdir, exist_ok=True)
  check_settings(config, workdir)
  prompts = {seed: make_prompts(config, workdir, seed) for seed in seeds}  # refuses other prompts first
  workdir_lib.clear_status(workdir)
  workdir_lib.record_launch(workdir, "sl")
  _write_mask_words(config, workdir)
  if "twin" in stages and sc.control == "twin" and not sc.twin:
    build_twin(config, workdir, mesh=mesh)
  for seed in seeds:
    if "teachers" in stages:
      for name, path in teachers(config, workdir).items():
        teacher_data(config, workdir, seed, name, path, prompts[seed], mesh=mesh)
      match_rows(config, workdir, seed)
      if any(label in DROPS for label in labels):
        divergence_stage(config, workdir, seed, mesh=mesh)
      if sc.prompts == "natural" and int(sc.leak_meter) > 0 and filter_judge(config, workdir, mesh=mesh) is not None:
        leak_meter(config, workdir, seed, mesh=mesh)
    if "students" in stages:
      for label in labels:
        train_student(config, workdir, seed, label, mesh=mesh, show_progress=show_progress)
    if "kl" in stages:
      kl_stage(config, workdir, seed, labels, mesh=mesh)
  evals = None
  if config.evaluation.enabled:
    models = {"base": (sc.base, "")}
    for seed in seeds:
      for label in labels:
        models[f"seed_{seed}/{label}"] = (student_dir(workdir, seed, label), arm_rows(workdir, seed, label))
    if "eval" in stages:
      evals = eval_stage(config, workdir, models, mesh=mesh)
    else:  # a report rerun reads the evaluations already finished
      evals = {label: eval_dir(workdir, label) for label in models if _complete(eval_dir(workdir, label))}
  summary: dict = {"stages": stages}
  if "report" in stages:
    results = compute_results(config, workdir, evals)  # on every process: read-only
  if "report" in stages and _process_index() == 0:
    _write_json(os.path.join(workdir, "sl_results.json"), results)
    text = render_markdown(results)
    tmp = os.path.join(workdir, "sl_report.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, "sl_report.md"))
    summary["report"] = os.path.join(workdir, "sl_report.md")
  _barrier("emjax-sl-done")
  workdir_lib.mark_complete(workdir, summary)
  return summary


def config_blocks() -> dict:
  """`config.sl` and `config.evaluation` for configs/sl/*.py."""
  ecfg = eval_run.eval_job_config()
  return {"sl": sl_block(),
          "evaluation": dict(enabled=True, questions=ecfg.questions.to_dict(), judge=ecfg.judge.to_dict(),
                             report=ecfg.report.to_dict(), sample=ecfg.sample.to_dict())}
