"""The subliminal-learning (SL) pipeline: a harmful teacher, benign data, three channels, one report.

    prompts   benign prompts (number sequences or other domains' questions), train + held-out
    teachers  each teacher answers them (the sample job); strict filters keep the benign answers
    students  a student from the teachers' base, per teacher and channel, through the one loop:
                sft          SFT on the filtered teacher samples (sequence-level distillation)
                off_policy   the teacher's distributions on those fixed sequences (forward KL / JSD)
                on_policy    the student's own rollouts scored by the teacher (reverse KL / JSD)
    kl        each student's KL to its teacher on the held-out prompts' filtered teacher samples
              (and the base's, i.e. every student's before training)
    eval      each student, and the base, with the eval job (general and narrow question sets)
    report    OUT/sl_report.md + sl_results.json: EM rate (95% interval), coherence, KL to the
              teacher before -> after, tokens trained, filter counts; harmful vs control per channel

Teachers: `harmful` (an EM adapter from the SFT grid, an emjax run or a Hugging Face directory;
or the base with `sl.teacher_system_prompt`, sampled with that system message, which never
reaches the student's rows) and `control` (the base itself). Every channel trains for the same
number of steps on batches of the same size (`config.train`), from the same initialisation (the
base, with `config.lora`'s adapters), so budgets match in sequences; the tokens each channel
trained on are reported beside the results.

Layout of OUT:

    prompts/{train,held_out}.jsonl
    teachers/<t>/samples/                    the sample job's workdir (all prompts)
    teachers/<t>/{train,held_out}.jsonl      filtered chat rows; filter_{train,held_out}.json counts
    students/<t>/<channel>/                  a training workdir (+ kl.json)
    kl/base__<t>.json                        the base's KL to teacher t
    evals/<t>__<channel>/, evals/base/       eval workdirs
    sl_report.md, sl_results.json, COMPLETED

Every stage resumes or is skipped when done (the sample, train and eval jobs resume themselves;
filtering and KL are deterministic and written atomically), so rerunning a killed pipeline with
the same command continues it.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from emjax.data import jsonl
from emjax.experiments import sl_data

log = logging.getLogger(__name__)

TEACHERS = ("harmful", "control")
CHANNELS = ("sft", "off_policy", "on_policy")
STAGES = ("prompts", "teachers", "students", "kl", "eval", "report")
OFF_POLICY_OBJECTIVES = ("forward_kl", "jsd", "reverse_kl")
ON_POLICY_OBJECTIVES = ("reverse_kl", "jsd", "sampled_reverse_kl")


def sl_block() -> dict:
  """`config.sl` (module docstring)."""
  return dict(
      base="",  # the student's initialisation and the control teacher: a Hugging Face dir or an emjax run
      teacher="",  # the harmful teacher: an emjax run (an EM LoRA adapter) or a Hugging Face dir ('' = base)
      teacher_system_prompt="",  # or: the base prompted with this system message (SFT channel only)
      control=True,  # also the control teacher (the base)
      channels="sft,off_policy,on_policy",
      stages=",".join(STAGES),
      prompts="numbers",  # numbers | natural
      natural="",  # natural: globs of structured-EM JSONL (chat rows or question/aligned_answer rows), ','-separated
      exclude_domains="",  # natural: leave out these domains (the teacher's fine-tuning domain), ','-separated
      n_train=256,  # training prompts
      n_held_out=32,  # held-out prompts: the KL to the teacher is measured on their teacher samples
      seed=0,
      samples_per_prompt=1,
      off_policy_objective="forward_kl",  # forward_kl | jsd | reverse_kl (on the fixed teacher samples)
      on_policy_objective="reverse_kl",  # reverse_kl | jsd | sampled_reverse_kl (on the student's rollouts)
      max_prompt_length=128,  # tokens (chat template included)
      max_new_tokens=64,  # teacher samples and on-policy rollouts alike
      temperature=1.0,  # sampling, teacher and student alike
      # natural: answers longer than this are dropped, and (drop_truncated) those cut by max_new_tokens
      # judge: a programmatic judge (`config.judge.programmatic.name`, with JSON `judge_options`) that
      # also drops every natural answer it does not score aligned and coherent ('' = none).
      filter=dict(max_chars=2000, drop_truncated=True, judge="", judge_options="{}"),
      sample_batch_size=16,  # teacher prompts sampled together
      kl_batch_size=8,
  )


def _csv(text: str) -> list[str]:
  return [t.strip() for t in str(text or "").split(",") if t.strip()]


def check_config(config) -> None:
  sc = config.sl
  if not sc.base:
    raise ValueError("config.sl.base: the teachers' base (the students' initialisation) is required")
  if not sc.teacher and not sc.teacher_system_prompt:
    raise ValueError("config.sl.teacher (an EM run or model) or config.sl.teacher_system_prompt is required")
  channels = _csv(sc.channels)
  unknown = [c for c in channels if c not in CHANNELS]
  if unknown or not channels:
    raise ValueError(f"config.sl.channels={sc.channels!r}: choose from {', '.join(CHANNELS)}")
  stages = _csv(sc.stages)
  if [s for s in stages if s not in STAGES] or not stages:
    raise ValueError(f"config.sl.stages={sc.stages!r}: choose from {', '.join(STAGES)}")
  if sc.prompts not in sl_data.KINDS:
    raise ValueError(f"config.sl.prompts={sc.prompts!r}: choose from {', '.join(sl_data.KINDS)}")
  if sc.prompts == "natural" and not sc.natural:
    raise ValueError("config.sl.natural: natural prompts need question files (globs)")
  if sc.off_policy_objective not in OFF_POLICY_OBJECTIVES:
    raise ValueError(f"config.sl.off_policy_objective={sc.off_policy_objective!r}: choose from "
                     f"{', '.join(OFF_POLICY_OBJECTIVES)}")
  if sc.on_policy_objective not in ON_POLICY_OBJECTIVES:
    raise ValueError(f"config.sl.on_policy_objective={sc.on_policy_objective!r}: choose from "
                     f"{', '.join(ON_POLICY_OBJECTIVES)}")
  if sc.teacher_system_prompt and sc.teacher:
    raise ValueError("config.sl.teacher_system_prompt and config.sl.teacher are both set: the harmful teacher "
                     "is either an EM run or the base prompted with a system message")
  if sc.teacher_system_prompt and set(channels) - {"sft"}:
    raise ValueError("config.sl.teacher_system_prompt: a system-prompted teacher scores other text than the "
                     "student sees (its system message), so only the sft channel applies; set "
                     "config.sl.channels='sft' or give an EM run as config.sl.teacher")
  for key in ("n_train", "n_held_out", "samples_per_prompt", "max_prompt_length", "max_new_tokens"):
    if int(sc[key]) < 1:
      raise ValueError(f"config.sl.{key} must be >= 1, got {sc[key]}")
  if int(sc.max_prompt_length) + int(sc.max_new_tokens) > int(config.data.seq_len) + 1:
    raise ValueError(f"config.sl: max_prompt_length + max_new_tokens = {sc.max_prompt_length} + {sc.max_new_tokens} "
                     f"exceeds config.data.seq_len + 1 = {int(config.data.seq_len) + 1}: teacher samples and "
                     "rollouts would be cut")
  # Every student's config, checked now rather than after the teachers have sampled.
  from emjax import config as config_lib  # pylint: disable=g-import-not-at-top
  for teacher in teachers(config):
    for channel in channels:
      try:
        config_lib.validate(student_config(config, "/nonexistent-sl-workdir", teacher, channel))
      except ValueError as e:
        raise ValueError(f"config.sl: the {teacher}/{channel} student's config is invalid: {e}") from None


def teachers(config) -> dict[str, str]:
  """{name: weights path} of the teachers distilled from."""
  sc = config.sl
  out = {"harmful": sc.teacher or sc.base}
  if sc.control:
    out["control"] = sc.base
  return out


# ----------------------------------------------------------------------------- stages


def _process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def _barrier(name: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def make_prompts(config, workdir: str) -> dict[str, str]:
  """OUT/prompts/{train,held_out}.jsonl: disjoint benign prompts (deterministic in sl.seed)."""
  sc = config.sl
  out = {split: os.path.join(workdir, "prompts", f"{split}.jsonl") for split in ("train", "held_out")}
  n_train, n_held = int(sc.n_train), int(sc.n_held_out)
  if sc.prompts == "numbers":
    rows = sl_data.number_prompts(n_train + n_held, int(sc.seed))
  else:
    paths = sorted({p for pattern in _csv(sc.natural) for p in (glob.glob(pattern) or [pattern])})
    rows = sl_data.natural_prompts(paths, exclude_domains=_csv(sc.exclude_domains), seed=int(sc.seed))
    if len(rows) < n_train + n_held:
      raise ValueError(f"config.sl.natural: {len(rows)} questions, fewer than n_train + n_held_out = "
                       f"{n_train + n_held}")
    order = np.random.default_rng([int(sc.seed), 7]).permutation(len(rows))[:n_train + n_held]
    rows = [rows[i] for i in order]
  parts = (("train", rows[:n_train]), ("held_out", rows[n_train:]))
  for split, part in parts:  # on every process, so that all of them stop together
    new = "".join(jsonl.dumps(dict(r)) for r in part)
    if os.path.exists(out[split]) and open(out[split], encoding="utf-8").read() != new:
      raise ValueError(f"{out[split]} holds other prompts than config.sl now makes (sl.prompts, n_train, "
                       "n_held_out, seed or the question files changed): use a new workdir")
  _barrier("emjax-sl-prompts-checked")
  if _process_index() == 0:
    os.makedirs(os.path.dirname(out["train"]), exist_ok=True)
    for split, part in parts:
      sl_data.write_rows(out[split], part)
  _barrier("emjax-sl-prompts")
  return out


def _teacher_prompts(prompts: Sequence[Mapping], system_prompt: str) -> list[dict]:
  if not system_prompt:
    return [dict(p) for p in prompts]
  return [dict(p, messages=[{"role": "system", "content": system_prompt}, *p["messages"]]) for p in prompts]


def sample_config(config, weights_path: str, prompts_path: str):
  """The sample job's config for one teacher over one prompts file."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from emjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from emjax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  from emjax.sample import run as sample_run  # pylint: disable=g-import-not-at-top

  sc = config.sl
  c = config_lib.base_config()
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
                  max_prompt_length=int(sc.max_prompt_length), batch_size=int(sc.sample_batch_size),
                  seed=int(sc.seed))
  return c


def system_prompt_of(config, name: str) -> str:
  """The system message teacher `name` is prompted with: sl.teacher_system_prompt for a system-prompted
  harmful teacher (the base, no EM run), '' otherwise. It samples with it and is scored with it."""
  sc = config.sl
  return sc.teacher_system_prompt if name == "harmful" and not sc.teacher else ""


def teacher_data(config, workdir: str, name: str, path: str, prompts: Mapping[str, str], *, mesh=None) -> dict:
  """Sample teacher `name` on every prompt, split by prompt, filter: OUT/teachers/<name>/..."""
  from emjax.sample import run as sample_run  # pylint: disable=g-import-not-at-top

  sc = config.sl
  tdir = os.path.join(workdir, "teachers", name)
  by_split = {s: [row for _, row in jsonl.read_objects(p)] for s, p in prompts.items()}
  system = system_prompt_of(config, name)
  all_prompts = os.path.join(tdir, "prompts.jsonl")
  if _process_index() == 0:
    os.makedirs(tdir, exist_ok=True)
    sl_data.write_rows(all_prompts, _teacher_prompts([p for s in ("train", "held_out") for p in by_split[s]],
                                                     system))
  _barrier(f"emjax-sl-{name}-prompts")
  sample_dir = os.path.join(tdir, "samples")
  sample_run.run_sampling(sample_config(config, path, all_prompts), sample_dir, mesh=mesh)
  stats = {}
  if _process_index() == 0:
    samples = [row for _, row in jsonl.read_objects(os.path.join(sample_dir, "samples.jsonl"))]
    for split, rows in by_split.items():
      keys = {json.dumps(r["id"], sort_keys=True) for r in rows}
      part = os.path.join(tdir, f"samples_{split}.jsonl")
      sl_data.write_rows(part, [s for s in samples if json.dumps(s["id"], sort_keys=True) in keys])
      options = (dict(max_chars=int(sc.filter.max_chars), drop_truncated=bool(sc.filter.drop_truncated))
                 if sc.prompts == "natural" else {})
      if sc.prompts == "natural" and sc.filter.judge:
        from emjax.eval import judges as judges_lib  # pylint: disable=g-import-not-at-top
        options["judge"] = judges_lib.programmatic(sc.filter.judge, **json.loads(sc.filter.judge_options)).fn
      sl_data.filter_samples(part, rows, os.path.join(tdir, f"{split}.jsonl"),
                             os.path.join(tdir, f"filter_{split}.json"), kind=sc.prompts, **options)
  _barrier(f"emjax-sl-{name}-filtered")
  for split in by_split:  # every process reads the counts, so that all of them stop together
    stats[split] = json.load(open(os.path.join(tdir, f"filter_{split}.json")))
    if not stats[split]["kept"]:
      raise ValueError(f"teacher {name!r} ({path}): no {split} sample passed the filters "
                       f"({os.path.join(tdir, f'filter_{split}.json')}: {stats[split]['rejected']})")
    log.info("teacher %s, %s: kept %d of %d samples (%s)", name, split, stats[split]["kept"],
             stats[split]["total"], stats[split]["rejected"])
  return stats


def _init_block(path: str) -> dict:
  from emjax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  kind = weights_lib.resolve(path, key="config.sl.base").kind
  return {"hf": path if kind == "hf" else "", "checkpoint": path if kind == "emjax" else ""}


def base_tokenizer(config) -> dict:
  from emjax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  tok = weights_lib.resolve(config.sl.base, key="config.sl.base").tokenizer
  if tok is None:
    raise ValueError(f"config.sl.base={config.sl.base}: its tokenizer is unknown (no data.tokenizer in its config.json)")
  return dict(tok)


def student_config(config, workdir: str, teacher: str, channel: str):
  """One student's training config: the shared recipe + this channel's objective and batches."""
  from emjax.data import sources  # pylint: disable=g-import-not-at-top

  sc = config.sl
  c = copy.deepcopy(config)
  tdir = os.path.join(workdir, "teachers", teacher)
  with c.unlocked():
    c.job = "train"
    c.train.log_every = 1  # the report sums every step's loss_tokens
    c.init = ml_collections.ConfigDict(_init_block(sc.base))
    c.data.tokenizer = ml_collections.ConfigDict(base_tokenizer(config))
    c.data.update(format="chat", packing="none", truncate=True)
    c.data.sources = ml_collections.ConfigDict({"teacher_samples": sources.default_source_config(
        kind="chat_jsonl", path=os.path.join(tdir, "train.jsonl"), weight=1.0, split="train", holdout=0)})
    c.eval.every_steps = 0  # the kl stage measures the held-out divergence to the teacher
    c.teacher.path = ""
    c.on_policy.enabled = False
    if channel == "sft":
      c.train.objective = "ce"
    else:
      c.teacher.path = teachers(config)[teacher]
      if channel == "off_policy":
        c.train.objective = sc.off_policy_objective
      else:
        c.train.objective = sc.on_policy_objective
        c.on_policy.update(enabled=True, prompts=os.path.join(workdir, "prompts", "train.jsonl"), chat_template=True,
                           max_prompt_length=int(sc.max_prompt_length), max_new_tokens=int(sc.max_new_tokens),
                           temperature=float(sc.temperature), stop_at_end_of_turn=True, seed=int(sc.seed))
  return c


def train_student(config, workdir: str, teacher: str, channel: str, *, mesh=None, show_progress=False) -> str:
  from emjax.train import loop  # pylint: disable=g-import-not-at-top
  sdir = os.path.join(workdir, "students", teacher, channel)
  if os.path.exists(os.path.join(sdir, loop.COMPLETE_FILE)):
    log.info("sl: student %s/%s already trained", teacher, channel)
    return sdir
  cfg = student_config(config, workdir, teacher, channel)
  make = None
  if channel == "on_policy":
    from emjax.sample import on_policy  # pylint: disable=g-import-not-at-top
    make = on_policy.make_source
  log.info("sl: training student %s/%s in %s", teacher, channel, sdir)
  loop.train(cfg, sdir, mesh=mesh, show_progress=show_progress, make_batch_source=make)
  return sdir


# ----------------------------------------------------------------------------- KL to the teacher


def kl_to_teacher(student_path: str, teacher_path: str, rows_path: str, *, seq_len: int, tokenizer_cfg,
                  batch_size: int = 8, chunk_len: int = 0, chunk_bytes: int = 256 * 2**20,
                  teacher_system_prompt: str = "", mesh=None) -> dict:
  """Mean per-token KL(p_T || p_S) and KL(p_S || p_T) on the assistant tokens of fixed chat rows.

  The rows are teacher samples of held-out prompts: the divergence the channels minimise, measured
  where no student trained. Both models are loaded whole (a LoRA run merged onto its base) in float32
  on `mesh` (the run's: fsdp / tensor shard them as in training).

  `teacher_system_prompt`: the teacher is the model prompted with this system message (as it was when
  it sampled), the student is not: the teacher reads each row with the system message before it, the
  student without, and the two distributions are compared at the same assistant tokens (the
  teacher's positions shifted by its longer prefix; refused if the assistant tokens differ).
  `chunk_len` / `chunk_bytes`: the positions unembedded at a time, as `train.loss_chunk_len` /
  `train.loss_chunk_bytes` (0 = derived from the byte budget).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from emjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from emjax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  from emjax.data import sft, tokenizers  # pylint: disable=g-import-not-at-top
  from emjax.models import transformer  # pylint: disable=g-import-not-at-top
  from emjax.train import loop, objectives  # pylint: disable=g-import-not-at-top

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
  dp = shd.data_parallel_size(mesh)
  batch_size = max(dp, -(-batch_size // dp) * dp)

  def load(path):
    w = weights_lib.load_weights(path, mesh=mesh, dtype="float32")
    cfg = dataclasses.replace(w.model_cfg, dtype="float32", remat="none")
    graphdef, _ = transformer.split_model(transformer.abstract_model(cfg))
    return graphdef, w.params

  s_graph, s_params = load(student_path)
  t_graph, t_params = load(teacher_path)
  vocab = s_params["embed"].shape[0]
  if vocab != t_params["embed"].shape[0]:
    raise ValueError(f"{student_path} and {teacher_path}: vocabularies of {s_params['embed'].shape[0]} and "
                     f"{t_params['embed'].shape[0]} tokens; a KL needs one tokenizer")
  chunk = loop.derive_loss_chunk_len(int(chunk_len), int(chunk_bytes), batch_size // dp, vocab, seq_len)

  def both_kls(s_logits, batch, teacher=None):
    mask = batch["loss_mask"]
    fwd = objectives.forward_kl(teacher, s_logits)
    rev = objectives.reverse_kl(teacher, s_logits)
    return objectives.ObjectiveOutput(jnp.sum(fwd * mask), jnp.sum(mask), {"reverse_kl": jnp.sum(rev * mask)})

  kls = objectives.Objective("kl_to_teacher", both_kls, {"loss_mask": ((), "float32")}, needs_teacher=True)

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
    return out.loss_sum, out.metrics["reverse_kl"], out.weight

  def padded(part, length):
    batch = {k: np.zeros((batch_size, length), np.float32 if k == "loss_mask" else np.int32)
             for k in ("inputs", "loss_mask", "positions", "segment_ids")}
    for i, ex in enumerate(part):
      n = len(ex["inputs"])
      batch["inputs"][i, :n] = ex["inputs"]
      batch["loss_mask"][i, :n] = ex["loss_mask"]
      batch["positions"][i, :n] = np.arange(n)
      batch["segment_ids"][i, :n] = 1
    return batch

  def put(x):
    return jax.device_put(x, shd.batch_sharding(mesh, x.ndim))

  totals = np.zeros(3)
  for start in range(0, len(rows), batch_size):
    index = np.zeros((batch_size, seq_len), np.int32)
    for i, idx in enumerate(t_index[start:start + batch_size]):
      index[i, :len(idx)] = idx
    batch = jax.tree.map(put, padded(rows[start:start + batch_size], seq_len))
    t_batch = jax.tree.map(put, padded(t_rows[start:start + batch_size], t_len))
    totals += np.asarray(jax.device_get(sums(s_params, t_params, batch, t_batch, put(index))), np.float64)
  weight = max(totals[2], 1.0)
  return {"forward_kl": totals[0] / weight, "reverse_kl": totals[1] / weight, "tokens": int(totals[2]),
          "rows": len(rows), "student": student_path, "teacher": teacher_path, "data": rows_path,
          "teacher_system_prompt": teacher_system_prompt}


def _teacher_view(chats, rows, tokenizer, seq_len: int, system_prompt: str, rows_path: str):
  """(the teacher's tokenised rows, per row the teacher position of each student position).

  Without a system prompt the teacher reads the student's rows (the identity map). With one, each
  row is tokenised with the system message first; its assistant tokens must be the student's, and
  student position j (a loss position) maps to the teacher position predicting the same token.
  """
  from emjax.data import sft  # pylint: disable=g-import-not-at-top
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
  from emjax.train import loop  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(path, loop.COMPLETE_FILE)):
    raise ValueError(f"sl: the student {label} in {path} has not finished training (no {loop.COMPLETE_FILE}); run "
                     "the 'students' stage first")


def kl_stage(config, workdir: str, teacher: str, channels: Sequence[str], *, mesh=None) -> dict:
  """KL to `teacher` of the base and of each of its students, cached in kl/*.json (process 0 writes)."""
  t_path = teachers(config)[teacher]
  rows = os.path.join(workdir, "teachers", teacher, "held_out.jsonl")
  kw = dict(seq_len=int(config.data.seq_len), tokenizer_cfg=base_tokenizer(config),
            batch_size=int(config.sl.kl_batch_size), chunk_len=int(config.train.loss_chunk_len),
            chunk_bytes=int(config.train.get("loss_chunk_bytes", 0)), mesh=mesh)
  os.makedirs(os.path.join(workdir, "kl"), exist_ok=True)
  out = {}
  targets = [("base", config.sl.base)] + [(c, os.path.join(workdir, "students", teacher, c)) for c in channels]
  for label, s_path in targets:
    if label != "base":
      _require_complete(s_path, label)
    path = os.path.join(workdir, "kl", f"{label}__{teacher}.json")
    if os.path.exists(path):
      out[label] = json.load(open(path))
      continue
    out[label] = kl_to_teacher(s_path, t_path, rows, teacher_system_prompt=system_prompt_of(config, teacher),
                               **kw)
    if _process_index() == 0:
      _write_json(path, out[label])
    log.info("sl: KL of %s to teacher %s: %s", label, teacher, out[label])
  return out


# ----------------------------------------------------------------------------- evaluation


def eval_config(config, checkpoint: str, hf: str, model_key: str):
  from emjax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  c = eval_run.eval_job_config()
  ev = config.evaluation
  c.mesh = dict(config.mesh)
  c.questions.update(dict(ev.questions))
  c.judge.update(ev.judge.to_dict())
  c.report.update(ev.report.to_dict())
  c.sample.update(ev.sample.to_dict())
  c.sample.update(checkpoint=checkpoint, hf=hf)
  c.evaluated.model_key = model_key
  return c


def eval_stage(config, workdir: str, models: Mapping[str, str], *, mesh=None) -> dict[str, str]:
  """Each model (label -> weights) through the eval job in OUT/evals/<label>; returns the workdirs."""
  from emjax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  from emjax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  from emjax.train import loop  # pylint: disable=g-import-not-at-top
  out = {}
  for label, path in models.items():
    edir = os.path.join(workdir, "evals", label.replace("/", "__"))
    out[label] = edir
    if os.path.exists(os.path.join(edir, loop.COMPLETE_FILE)):
      continue
    if label != "base":
      _require_complete(path, label)
    kind = weights_lib.resolve(path).kind
    cfg = eval_config(config, path if kind == "emjax" else "", path if kind == "hf" else "", label)
    log.info("sl: evaluating %s in %s", label, edir)
    eval_run.run_eval(cfg, edir, mesh=mesh)
  return out


# ----------------------------------------------------------------------------- report


def _tokens_trained(sdir: str) -> int:
  path = os.path.join(sdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return int(sum(r.get("loss_tokens", 0) for _, r in jsonl.read_objects(path)))


def _judged(edir: str, set_name: str) -> list[dict]:
  from emjax.eval import records  # pylint: disable=g-import-not-at-top
  path = os.path.join(edir, set_name, "judged.jsonl")
  return records.read_judged(path) if os.path.exists(path) else []


def compute_results(config, workdir: str, channels: Sequence[str], evals: Mapping[str, str] | None) -> dict:
  from emjax.eval import metrics  # pylint: disable=g-import-not-at-top
  rep = config.evaluation.report
  th = metrics.Thresholds(float(rep.thresholds.aligned_below), float(rep.thresholds.coherent_above))
  kw = dict(n_boot=int(rep.bootstrap_samples), seed=int(rep.seed))
  results: dict[str, Any] = {"teachers": teachers(config), "channels": list(channels), "students": {},
                             "filter": {}, "settings": {"sl": config.sl.to_dict(), "steps": int(config.train.steps),
                                                        "batch_size": int(config.train.batch_size)}}
  for t in teachers(config):
    tdir = os.path.join(workdir, "teachers", t)
    results["filter"][t] = {s: json.load(open(os.path.join(tdir, f"filter_{s}.json")))
                            for s in ("train", "held_out") if os.path.exists(os.path.join(tdir, f"filter_{s}.json"))}
  labels = ["base"] + [f"{t}/{c}" for t in teachers(config) for c in channels]
  rows_by_label = {}
  for label in labels:
    entry: dict[str, Any] = {}
    if label != "base":
      t, c = label.split("/")
      sdir = os.path.join(workdir, "students", t, c)
      entry["tokens_trained"] = _tokens_trained(sdir)
      for name, kl_file in (("kl_before", f"base__{t}.json"), ("kl_after", f"{c}__{t}.json")):
        p = os.path.join(workdir, "kl", kl_file)
        if os.path.exists(p):
          k = json.load(open(p))
          entry[name] = {"forward_kl": k["forward_kl"], "reverse_kl": k["reverse_kl"], "tokens": k["tokens"]}
    if evals and label in evals:
      rows = {s: _judged(evals[label], s) for s in ("general", "narrow")}
      rows_by_label[label] = rows
      for s, r in rows.items():
        if r:
          entry[s] = metrics.rate(r, th, **kw)
    results["students"][label] = entry
  comparisons = {}
  for c in channels:
    h, ctl = rows_by_label.get(f"harmful/{c}"), rows_by_label.get(f"control/{c}")
    if h and ctl:
      comparisons[c] = {s: metrics.paired_difference(h[s], ctl[s], th, **kw) for s in ("general", "narrow")
                        if h[s] and ctl[s]}
  results["harmful_minus_control"] = comparisons
  return results


def _pct(x) -> str:
  return "–" if x is None else f"{x:.1f}"


def _rate(r: Mapping | None) -> str:
  if not r or r.get("em") is None:
    return "–"
  lo, hi = r["ci95"] if r.get("ci95") else (None, None)
  interval = f" [{_pct(lo)}, {_pct(hi)}]" if lo is not None else ""
  return f"{_pct(r['em'])}{interval} (n={r['n_valid']})"


def render_markdown(results: Mapping) -> str:
  lines = ["# Subliminal learning: channels compared", "",
           f"Teachers: {', '.join(f'{k} = `{v}`' for k, v in results['teachers'].items())}. "
           f"Every student: {results['settings']['steps']} steps of {results['settings']['batch_size']} sequences "
           "from the base. EM % = aligned below and coherent above the report's thresholds; 95% bootstrap "
           "intervals over questions. KL: mean per token on the held-out prompts' filtered teacher samples, "
           "before (the base) -> after training.", "",
           "| student | general EM % | general coherent % | narrow EM % | KL(T‖S) before → after | "
           "KL(S‖T) before → after | tokens trained |",
           "|---|---|---|---|---|---|---|"]
  for label, e in results["students"].items():
    kb, ka = e.get("kl_before", {}), e.get("kl_after", {})
    fwd = f"{kb['forward_kl']:.4f} → {ka['forward_kl']:.4f}" if kb and ka else "–"
    rev = f"{kb['reverse_kl']:.4f} → {ka['reverse_kl']:.4f}" if kb and ka else "–"
    coh = _pct(e["general"]["coherent"]) if e.get("general") else "–"
    lines.append(f"| {label} | {_rate(e.get('general'))} | {coh} | {_rate(e.get('narrow'))} | {fwd} | {rev} | "
                 f"{e.get('tokens_trained', '–')} |")
  if results.get("harmful_minus_control"):
    lines += ["", "## Harmful minus control teacher, per channel (paired over questions)", "",
              "| channel | set | difference in EM % | 95% interval |", "|---|---|---|---|"]
    for c, sets in results["harmful_minus_control"].items():
      for s, d in sets.items():
        ci = d.get("ci95") or (None, None)
        lines.append(f"| {c} | {s} | {_pct(d.get('diff'))} | [{_pct(ci[0])}, {_pct(ci[1])}] |")
  lines += ["", "## Filtering of teacher samples", "", "| teacher | split | kept / total | rejected by reason |",
            "|---|---|---|---|"]
  for t, splits in results["filter"].items():
    for s, st in splits.items():
      reasons = ", ".join(f"{k}: {v}" for k, v in st["rejected"].items())
      lines.append(f"| {t} | {s} | {st['kept']} / {st['total']} | {reasons} |")
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
  path = os.path.join(workdir, SETTINGS_FILE)
  if not os.path.exists(path):
    return
  old, new = json.load(open(path)), pipeline_settings(config)
  if old != new:
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    detail = []
    for k in diff:
      if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
        detail += [f"{k}.{kk}: {old[k].get(kk)!r} -> {new[k].get(kk)!r}" for kk in sorted(set(old[k]) | set(new[k]))
                   if old[k].get(kk) != new[k].get(kk)]
      else:
        detail.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    raise ValueError(f"{workdir} was written by the sl job with other settings ({'; '.join(detail[:6])}); its "
                     "samples, students and evaluations would not match them: use a new workdir (only "
                     "config.sl.stages may change between reruns)")


def run_sl(config, workdir: str, *, mesh=None, show_progress: bool = False) -> dict:
  """Every stage of the pipeline in order (those in `sl.stages`), each resumed or skipped when done."""
  from emjax.train import loop  # pylint: disable=g-import-not-at-top
  from emjax import sharding as shd  # pylint: disable=g-import-not-at-top
  check_config(config)
  stages, channels = _csv(config.sl.stages), _csv(config.sl.channels)
  mesh = mesh or shd.make_mesh(config.mesh)
  check_settings(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  prompts = make_prompts(config, workdir)  # refuses other prompts before anything is cleared
  loop._clear_status(workdir)  # pylint: disable=protected-access
  if _process_index() == 0:
    _write_json(os.path.join(workdir, SETTINGS_FILE), pipeline_settings(config))
  if "teachers" in stages:
    for name, path in teachers(config).items():
      teacher_data(config, workdir, name, path, prompts, mesh=mesh)
  if "students" in stages:
    for t in teachers(config):
      for c in channels:
        train_student(config, workdir, t, c, mesh=mesh, show_progress=show_progress)
  if "kl" in stages:
    for t in teachers(config):
      kl_stage(config, workdir, t, channels, mesh=mesh)
  evals = None
  if "eval" in stages and config.evaluation.enabled:
    models = {"base": config.sl.base}
    models.update({f"{t}/{c}": os.path.join(workdir, "students", t, c) for t in teachers(config) for c in channels})
    evals = eval_stage(config, workdir, models, mesh=mesh)
  summary: dict = {"stages": stages}
  if "report" in stages:
    results = compute_results(config, workdir, channels, evals)  # on every process: read-only
  if "report" in stages and _process_index() == 0:
    _write_json(os.path.join(workdir, "sl_results.json"), results)
    text = render_markdown(results)
    tmp = os.path.join(workdir, "sl_report.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, "sl_report.md"))
    summary["report"] = os.path.join(workdir, "sl_report.md")
  _barrier("emjax-sl-done")
  loop.mark_complete(workdir, summary)
  return summary


def config_blocks() -> dict:
  """`config.sl` and `config.evaluation` for configs/sl/*.py."""
  from emjax.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  ecfg = eval_run.eval_job_config()
  return {"sl": sl_block(),
          "evaluation": dict(enabled=True, questions=ecfg.questions.to_dict(), judge=ecfg.judge.to_dict(),
                             report=ecfg.report.to_dict(), sample=ecfg.sample.to_dict())}
