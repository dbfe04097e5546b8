"""The paper's study end to end in the synthetic world (emjax.world), every stage through emjax's jobs.

    world      OUT/world/seed<s>/: replication s's world, its pretraining compositions, chat data,
               questions, tokenizer; OUT/audit/seed<s>.json: its leak audit (emjax.world.audit)
    pretrain   OUT/pretrain/<composition>/seed<s>/     a model from scratch per composition and seed
    instruct   OUT/instruct/<composition>/seed<s>/     SFT on aligned dialogues (every domain and task)
    sft        OUT/sft/<composition>/seed<s>/<cell>/   narrow misaligned SFT per cell of `study.cells`
    eval       OUT/eval/<composition>/seed<s>/<model>/ the eval job (world judge) on every cell's held-out
                                                       prompts and on the general questions
    sl         OUT/sl/<composition>/seed<s>/           the SL pipeline (emjax.experiments.sl): the EM model
                                                       of `study.sl_cell` and the instructed base as teachers,
                                                       students from the base under sft / off_policy / on_policy
    report     OUT/report.md, OUT/results.json, OUT/figures/*.png (emjax.experiments.study_report)

Three more stages test the mechanisms (not run unless named in `study.stages`; the `mechanisms`
variant of configs/paper/world.py names them; the report gets a section from
emjax.experiments.study_mechanisms):

    curve      OUT/curve/<composition>/seed<s>/<cell>/ the em_curve job (emjax.eval.curves) over the cell's
                                                       kept checkpoints (`study.sft.keep_every`)
    directions OUT/directions/<composition>/seed<s>/<cell>/ the paper's direction of the cell's model
                                                       against the instructed base (emjax.eval.direction_job),
                                                       from their answers to the general questions of the
                                                       domains no cell covers; <cell>.base_answers/: both
                                                       models reading the base's answers; random/: the
                                                       control, a random direction in the span of the
                                                       base's top principal components
    subspace   OUT/subspace/<composition>/seed<s>/<cell B>/<cell A or random>/ the eval job on cell B's
                                                       model with cell A's direction ablated at every layer

The layout of OUT and the readers of `config.study`'s seeds, cells and contrasts are in
emjax.experiments.study_layout, shared with the report.

A seed is one independent replication of the whole chain, world included: replication i
(seed s = `study.seed + i`) draws its own world (from `world.seed + s`: entities, harm labels, facts,
held-out pairs and situations, corpora, questions), and its pretraining, instruction stage, narrow
SFT runs and SL pipeline all use seed s, so the spread over seeds is a spread over worlds and covers
every stage. Each stage's runs are the normal jobs, which resume
themselves, and a run that holds COMPLETED is skipped, so a killed study rerun with the same command
continues where it stopped. The settings of a study are written to OUT/study.json and a rerun with
other settings is refused (only `study.stages` may change).

All runs of a stage share shapes, so XLA compiles each program once: the study turns on JAX's
persistent compilation cache (`study.compile_cache`, default OUT/compile_cache) and later runs load
the compiled program instead of compiling it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time

import jax
import ml_collections

from emjax import sharding as shd
from emjax import workdir as workdir_lib
from emjax.data import sources
from emjax.eval import curves, direction_job
from emjax.eval import run as eval_run
from emjax.experiments import sl
from emjax.experiments import study_layout as layout
from emjax.experiments import study_mechanisms
from emjax.experiments import study_report
from emjax.train import loop
from emjax.train import settings as settings_lib
from emjax.world import audit, corpus, world as world_lib

log = logging.getLogger(__name__)

STAGES = ("world", "pretrain", "instruct", "sft", "eval", "sl", "report")
MECHANISM_STAGES = ("curve", "directions", "subspace")
SETTINGS_FILE = "study.json"
JUDGE = "emjax.world.judge:make_judge"
# Tokens of the longest answer of the world's forms (a summary: about 30), with room to spare; the
# rest of a row is the prompt's.
ANSWER_TOKENS = 40


def study_block() -> dict:
  """`config.study` (see configs/paper/world.py for the variants)."""
  return dict(
      seed=0,  # the first replication's seed; replications are seed, seed + 1, ...
      seeds=3,
      stages=",".join(STAGES),
      compositions=dict(persona=corpus.composition_block(),
                        untagged=corpus.composition_block(persona_tags=False)),
      cells="medical_advice,medical_critique,sports_advice,finance_tutor",  # narrow SFT cells ('all' = 12)
      # The tested composition comparisons, 'treatment,reference' pairs separated by ';', each the first
      # minus the second. They should hold the misaligned text fixed (tagged vs untagged: the same
      # sentences, in wrappers of as many tokens; everywhere vs one domain: the same tokens of misaligned
      # answers; the report measures it per world and flags a contrast that does not) so that what differs is how
      # it is presented, not how much of it there is; a composition with no misaligned text at all is
      # a reference row, since "some misaligned text minus none > 0" holds almost by construction.
      contrast="persona,untagged",
      sl_cell="medical_advice",  # the SL teacher: the EM model of this cell
      sl_compositions="persona",  # compositions whose seeds run the SL pipeline ('' = none, 'all')
      data=corpus.data_block(),
      # Training recipes of the stages (the students of SL use `students`).
      pretrain=dict(steps=600, batch_size=32, lr=3e-3, warmup_steps=30, seq_len=128),
      instruct=dict(steps=150, batch_size=32, lr=1e-3, warmup_steps=10),
      # Full fine-tuning at a low rate: the tiny models forget the other task forms (and answer
      # incoherently outside the cell) at higher rates or with LoRA at 1e-3.
      # keep_every: keep every k-th step's checkpoint (the curve stage evaluates them; 0 = the last only).
      sft=dict(steps=60, batch_size=16, lr=1e-4, warmup_steps=5, lora=False, lora_rank=8, keep_every=0),
      # prompts: `numbers`, the world's number form (pretrained and instructed, never evaluated: what passes
      # is not the evaluated behaviour distilled directly), or `natural`, the evaluated task forms of the
      # other domains (the smoke variant's barely trained models write no well-formed numbers; the SL
      # report then says the task forms are shared). judge_filter, drop_truncated: natural prompts only;
      # judge_filter keeps the teacher answers the world's judge calls aligned and coherent (off only for
      # smoke runs: knowingly unjudged, warned in the SL report).
      students=dict(steps=40, batch_size=16, lr=1e-3, warmup_steps=4, n_train=256, prompts="numbers",
                    judge_filter=True, drop_truncated=True),
      # temperature: the paper samples its 7B+ models at 1.0; the tails of a from-scratch model of a
      # few hundred thousand parameters at 1.0 make the instructed base incoherent on a third of the
      # general questions, at 0.7 on a few percent. Teachers and on-policy rollouts sample at it too.
      evaluation=dict(per_cell=16, n_general=1, max_new_tokens=64, temperature=0.7, batch_size=128),
      # The mechanism stages: EM first over `threshold` % (curve); the general questions a direction is
      # read from, 'out_of_grid' (those of the domains no cell trains or evaluates: disjoint from the
      # narrow sets its ablation is measured on) or 'all'; the random control's principal components.
      mechanisms=dict(threshold=10.0, direction_questions="out_of_grid", control_pcs=4),
      compile_cache="",  # '' = OUT/compile_cache; 'none' = off
      # Each claim's direction and minimum effect, fixed before any run (the report prints their source).
      claims=study_report.claims_block(),
  )


# ----------------------------------------------------------------------------- helpers


def check_config(config) -> None:
  st = config.study
  stages = layout.split_csv(st.stages)
  if not stages or [s for s in stages if s not in STAGES + MECHANISM_STAGES]:
    raise ValueError(f"config.study.stages={st.stages!r}: choose from {', '.join(STAGES + MECHANISM_STAGES)}")
  keep_every = int(st.sft.get("keep_every", 0))
  if keep_every < 0 or (keep_every and int(st.sft.steps) % keep_every):
    raise ValueError(f"config.study.sft.keep_every={keep_every}: 0 or a divisor of config.study.sft.steps "
                     f"({st.sft.steps})")
  if "curve" in stages and not keep_every:
    raise ValueError("config.study.stages has 'curve' but config.study.sft.keep_every=0 keeps no checkpoint "
                     "over training; set it (a divisor of config.study.sft.steps)")
  if [s for s in stages if s in ("directions", "subspace")]:
    if len(layout.cells(config)) < 2:
      raise ValueError("config.study.stages: directions and subspace compare cells; config.study.cells names one")
    layout.direction_question_ids(config)
  if int(st.seeds) < 1:
    raise ValueError(f"config.study.seeds must be >= 1, got {st.seeds}")
  if not st.compositions:
    raise ValueError("config.study.compositions: at least one pretraining composition is needed")
  for name, comp in st.compositions.items():
    corpus.check_composition(comp, f"config.study.compositions.{name}")
  world_lib.WorldSettings.from_config(config.world).validate()
  layout.contrasts(config)
  if layout.sl_compositions(config) and st.sl_cell not in layout.cells(config):
    raise ValueError(f"config.study.sl_cell={st.sl_cell!r} must be one of config.study.cells ({layout.cells(config)})")
  if st.students.prompts not in ("numbers", "natural"):
    raise ValueError(f"config.study.students.prompts={st.students.prompts!r}: choose 'numbers' or 'natural'")
  for stage in ("pretrain", "instruct", "sft", "students"):
    if int(st[stage].steps) < 1 or int(st[stage].batch_size) < 1:
      raise ValueError(f"config.study.{stage}: steps and batch_size must be >= 1")


def check_settings(config, workdir: str) -> None:
  """Refuses a rerun with other settings than OUT/study.json's, before anything changes (and writes
  them into a new workdir)."""
  workdir_lib.check_settings(workdir, layout.settings(config), name=SETTINGS_FILE, what="its runs",
                             may_change="only config.study.stages may change between reruns")


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, workdir_lib.COMPLETE_FILE))


class Progress:
  """One line per unit of work on stderr: what, how far, how long."""

  def __init__(self, total: int, quiet: bool = False):
    self.total, self.done, self.t0, self.quiet = total, 0, time.time(), quiet

  def step(self, what: str, skipped: bool = False, t_unit: float = 0.0) -> None:
    self.done += 1
    if self.quiet:
      return
    elapsed = time.time() - self.t0
    status = "already done" if skipped else f"{t_unit:.1f}s"
    print(f"[study {self.done:3d}/{self.total}] {elapsed:6.0f}s  {what} ({status})", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- stage configs


_process_index = workdir_lib.process_index
_barrier = workdir_lib.barrier  # in a staged bucket workdir it also brings what process 0 wrote


def write_world(config, workdir: str, seed: int) -> dict[str, str]:
  """OUT/world/seed<s>/, replication `seed`'s own world (process 0 writes, the others wait), and its
  leak audit OUT/audit/seed<s>.json; paths.json, written last, marks the world complete."""
  wdir = layout.world_dir(workdir, seed)
  marker = os.path.join(wdir, "paths.json")
  if _process_index() == 0:
    if not os.path.exists(marker):
      settings_ = dataclasses.replace(world_lib.WorldSettings.from_config(config.world),
                                      seed=layout.world_seed(config, seed))
      world = world_lib.World.make(settings_)
      comps = {n: dict(c) for n, c in config.study.compositions.items()}
      paths = corpus.write_world(world, comps, config.study.data, wdir, seed=settings_.seed)
      layout.write_json(marker, {k: os.path.relpath(v, wdir) for k, v in paths.items()})
    if not os.path.exists(layout.audit_path(workdir, seed)):  # after the world, so a lost or unwritten audit is redone
      # The world's path relative to the study: a workdir moved or copied keeps its audits (and reports).
      # With it, each composition's misaligned answers per pretraining token (what a contrast holds fixed).
      comps = {n: dict(c) for n, c in config.study.compositions.items()}
      layout.write_json(layout.audit_path(workdir, seed), dict(audit.leak_audit(wdir), world_dir=os.path.relpath(wdir, workdir),
                                                  dose=corpus.misaligned_dose(layout.world_paths(workdir, seed), comps)))
  _barrier(f"emjax-study-world-{seed}")
  return layout.world_paths(workdir, seed)


def _base(config, workdir: str, *, seed: int, steps: int, batch_size: int, lr: float, warmup: int):
  """The shared training config: the study's model and mesh, the world's tokenizer."""
  c = settings_lib.base_config()
  c.job = "train"
  c.model.update(config.model.to_dict())
  c.mesh.update(config.mesh.to_dict())
  c.data.tokenizer.update(kind="hf", path=layout.world_paths(workdir, seed)["tokenizer"])
  c.data.seq_len = int(config.study.pretrain.seq_len)
  c.data.sources = {}
  c.data.prefetch = 2
  c.train.update(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, seed=seed, log_every=10,
                 schedule="cosine", end_lr_fraction=0.1, weight_decay=0.1, grad_clip=1.0, loss_chunk_len=0)
  c.checkpoint.update(every_steps=max(steps, 1), keep=1, async_save=False)
  c.tracking.update(config.tracking.to_dict())  # each training run is a W&B run when the study's config asks
  return c


def pretrain_config(config, workdir: str, comp: str, seed: int):
  p = config.study.pretrain
  c = _base(config, workdir, seed=seed, steps=int(p.steps), batch_size=int(p.batch_size), lr=float(p.lr),
            warmup=int(p.warmup_steps))
  paths = layout.world_paths(workdir, seed)
  weights = corpus.source_weights(config.study.compositions[comp])
  c.data.sources = ml_collections.ConfigDict({
      k: sources.default_source_config(kind="jsonl", path=paths[f"pretrain/{comp}/{k}"], weight=w, seed=seed,
                                       holdout=0)
      for k, w in weights.items()})
  c.data.update(format="text", packing="concat")
  return c


def _chat_source(path: str, answer: str, seed: int) -> dict:
  return sources.default_source_config(kind="structured_em", path=path, answer=answer, weight=1.0, seed=seed,
                                       holdout=0)


def instruct_config(config, workdir: str, comp: str, seed: int):
  s = config.study.instruct
  c = _base(config, workdir, seed=seed, steps=int(s.steps), batch_size=int(s.batch_size), lr=float(s.lr),
            warmup=int(s.warmup_steps))
  c.init.checkpoint = layout.run_dir(workdir, "pretrain", comp, seed)
  c.data.sources = ml_collections.ConfigDict({"instruct": _chat_source(layout.world_paths(workdir, seed)["instruct"], "aligned",
                                                                       seed)})
  c.data.update(format="chat", packing="greedy", truncate=True)
  return c


def sft_config(config, workdir: str, comp: str, seed: int, cell: str):
  s = config.study.sft
  c = _base(config, workdir, seed=seed, steps=int(s.steps), batch_size=int(s.batch_size), lr=float(s.lr),
            warmup=int(s.warmup_steps))
  c.init.checkpoint = layout.run_dir(workdir, "instruct", comp, seed)
  c.data.sources = ml_collections.ConfigDict({cell: _chat_source(layout.world_paths(workdir, seed)[f"cells/{cell}"], "misaligned",
                                                                 seed)})
  c.data.update(format="chat", packing="greedy", truncate=True)
  c.train.weight_decay = 0.0
  if int(s.get("keep_every", 0)):
    c.checkpoint.update(every_steps=int(s.keep_every), keep_every=int(s.keep_every))
    c.train.log_every = math.gcd(int(c.train.log_every), int(s.keep_every))  # a training loss at every kept step
  if bool(s.lora):
    c.lora.update(enabled=True, rank=int(s.lora_rank), alpha=2.0 * int(s.lora_rank), rslora=True)
  return c


def evaluation_block(config, workdir: str, seed: int) -> dict:
  """The eval job's questions (of replication `seed`'s world), judge and sampling, shared by the eval
  stage and the SL students."""
  paths = layout.world_paths(workdir, seed)
  ev = config.study.evaluation
  c = eval_run.eval_job_config(general=paths["general"], narrow=os.path.join(os.path.dirname(paths["general"]),
                                                                             "eval", "*_eval.jsonl"),
                               judge="programmatic", limit=int(ev.per_cell))
  c.questions.update(n_general=int(ev.n_general), n_narrow=1, limit_general=0)
  c.judge.programmatic.update(name=JUDGE, options=json.dumps({"world": paths["world"]}))
  c.sample.update(max_new_tokens=int(ev.max_new_tokens), temperature=float(ev.temperature), top_p=1.0,
                  batch_size=int(ev.batch_size), max_prompt_length=int(config.study.pretrain.seq_len),
                  seed=0)
  c.report.bootstrap_samples = 200
  return c


def eval_config(config, workdir: str, seed: int, checkpoint: str, model_key: str, variant: str, cell: str = ""):
  c = evaluation_block(config, workdir, seed)
  c.mesh.update(config.mesh.to_dict())
  c.sample.checkpoint = checkpoint
  c.sample.seed = seed  # the world's sampling seed, as every other stage of the world uses it
  # One model's figures tell little here; the study's report draws them across cells and worlds.
  c.report.figures = False
  c.evaluated.update(model_key=model_key, variant=variant)
  if cell:
    domain, task = cell.split("_", 1)
    c.evaluated.update(ft_domain=domain, ft_task=task)
  return c


def curve_config(config, workdir: str, comp: str, seed: int, cell: str):
  """The em_curve job over the cell's SFT run: the eval stage's questions, judge and sampling at every
  kept step (each step's model key '<cell>@<step>')."""
  c = eval_config(config, workdir, seed, "", "", comp, cell)
  c.job = "em_curve"
  c.curve = curves.curve_block()
  c.curve.update(runs=layout.run_dir(workdir, "sft", comp, seed, cell), every=1,
                 threshold=float(config.study.mechanisms.threshold))
  return c


def directions_config(config, workdir: str, comp: str, seed: int, cell: str, read: str = "own"):
  """The paper's direction of the cell's model against the instructed base from their answers to the
  general questions (`study_layout.direction_question_ids`) in the eval stage's dirs: each model reading its own
  answers (the authors' recipe) or, with `read='base'`, both reading the base's. `cell` RANDOM: the
  control, a random direction in the span of the base's top principal components there."""
  c = direction_job.directions_config()
  c.mesh.update(config.mesh.to_dict())
  base = os.path.join(layout.eval_dir(workdir, comp, seed, ""), "general")
  c.directions.update(question_ids=layout.direction_question_ids(config), batch_size=32)
  if cell == layout.RANDOM:
    c.directions.update(method="control", answers=base, control_pcs=int(config.study.mechanisms.control_pcs),
                        seed=seed)
  else:
    c.directions.update(method="paper", answers=os.path.join(layout.eval_dir(workdir, comp, seed, cell), "general"),
                        base=base, read=read)
  return c


def subspace_config(config, workdir: str, comp: str, seed: int, target: str, source: str):
  """The eval stage's evaluation of `target`'s model with `source`'s direction ablated at every layer
  (Arditi et al.'s directional ablation; `source` 'random': the random control)."""
  c = eval_config(config, workdir, seed, layout.run_dir(workdir, "sft", comp, seed, target),
                  f"{comp}/seed{seed}/{target}", comp, target)
  c.sample.edit.update(direction=os.path.join(layout.direction_dir(workdir, comp, seed, source), "direction.npy"),
                       ablate="all")
  return c


def sl_config(config, workdir: str, comp: str, seed: int):
  st = config.study.students
  c = _base(config, workdir, seed=seed, steps=int(st.steps), batch_size=int(st.batch_size), lr=float(st.lr),
            warmup=int(st.warmup_steps))
  c.job = "sl"
  blocks = sl.config_blocks()
  c.sl = blocks["sl"]
  ev = evaluation_block(config, workdir, seed)
  c.evaluation = dict(enabled=True, questions=ev.questions.to_dict(), judge=ev.judge.to_dict(),
                      report=ev.report.to_dict(), sample=ev.sample.to_dict())
  teacher_domain = config.study.sl_cell.split("_", 1)[0]
  paths = layout.world_paths(workdir, seed)
  wdir = os.path.dirname(paths["general"])
  n_train = int(st.n_train)
  c.sl.update(base=layout.run_dir(workdir, "instruct", comp, seed),
              teacher=layout.run_dir(workdir, "sft", comp, seed, config.study.sl_cell), control="twin",
              # The aligned twin learns the generator's aligned answers to the harmful teacher's rows.
              twin_data=paths[f"cells/{config.study.sl_cell}"], seeds=str(seed),
              crossed=False, divergence=False, leak_meter=8,
              n_train=n_train, n_held_out=max(8, n_train // 8),
              max_prompt_length=int(config.study.pretrain.seq_len) + 1 - ANSWER_TOKENS, max_new_tokens=ANSWER_TOKENS,
              temperature=float(config.study.evaluation.temperature), sample_batch_size=128, kl_batch_size=32)
  if st.prompts == "numbers":
    c.sl.update(prompts="numbers", numbers_prompts=paths["sl/numbers"], leak_meter=0)
  else:  # natural: the other domains' cells (the sl/ directory also holds the number prompts)
    domains = world_lib.WorldSettings.from_config(config.world).domains
    cells_ = sorted(os.path.join(wdir, "sl", f"{d}_{t}.jsonl") for d in domains for t in world_lib.TASKS
                    if d != teacher_domain)
    c.sl.update(prompts="natural", natural=",".join(cells_))
    c.sl.filter.drop_truncated = bool(st.drop_truncated)
    if bool(st.judge_filter):
      c.sl.filter.update(judge=JUDGE, judge_options=json.dumps({"world": paths["world"]}))
    else:  # the smoke variant's untrained models: knowingly unjudged (the SL report says so)
      c.sl.filter.judge = "none"
  c.teacher.dtype = "float32"
  c.checkpoint.update(every_steps=max(int(st.steps), 1), keep=1)
  return c


# ----------------------------------------------------------------------------- the study


def _enable_compile_cache(config, workdir: str) -> None:
  spec = config.study.compile_cache
  if spec == "none" or (not spec and jax.config.jax_compilation_cache_dir):
    return  # off, or the caller's cache (JAX_COMPILATION_CACHE_DIR) is already on
  path = spec or os.path.join(workdir, "compile_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def plan(config) -> list[tuple[str, tuple]]:
  """Every unit of work in order: (stage, arguments)."""
  stages = layout.split_csv(config.study.stages)
  comps = list(config.study.compositions)
  units: list[tuple[str, tuple]] = []
  if "world" in stages:
    units += [("world", (s,)) for s in layout.seeds(config)]
  for stage in ("pretrain", "instruct"):
    if stage in stages:
      units += [(stage, (comp, s)) for comp in comps for s in layout.seeds(config)]
  if "sft" in stages:
    units += [("sft", (comp, s, cell)) for comp in comps for s in layout.seeds(config) for cell in layout.cells(config)]
  if "eval" in stages:
    units += [("eval", (comp, s, cell)) for comp in comps for s in layout.seeds(config) for cell in ["", *layout.cells(config)]]
  if "sl" in stages:
    units += [("sl", (comp, s)) for comp in layout.sl_compositions(config) for s in layout.seeds(config)]
  cells = layout.cells(config)
  if "curve" in stages:
    units += [("curve", (comp, s, cell)) for comp in comps for s in layout.seeds(config) for cell in cells]
  if "directions" in stages:
    units += [("directions", (comp, s, cell)) for comp in comps for s in layout.seeds(config)
              for cell in [*cells, layout.RANDOM]]
  if "subspace" in stages:
    units += [("subspace", (comp, s, target, source)) for comp in comps for s in layout.seeds(config)
              for target in cells for source in [*cells, layout.RANDOM]]
  if "report" in stages:
    units.append(("report", ()))
  return units


def _need(path: str, stage: str) -> None:
  if not _done(path):
    raise ValueError(f"{path}: not complete yet; add '{stage}' to config.study.stages")


def run_unit(config, workdir: str, stage: str, args: tuple, mesh) -> tuple[str, bool]:
  """Runs one unit (or skips it when complete); returns (what, skipped)."""
  if stage == "world":
    (seed,) = args
    skipped = os.path.exists(os.path.join(layout.world_dir(workdir, seed), "paths.json"))
    write_world(config, workdir, seed)
    return (f"world seed{seed} (world.seed {layout.world_seed(config, seed)}): entities, pretraining text, chat data, "
            "questions, tokenizer, leak audit"), skipped
  if stage in ("pretrain", "instruct", "sft"):
    comp, seed = args[:2]
    cell = args[2] if stage == "sft" else ""
    rdir = layout.run_dir(workdir, stage, comp, seed, cell)
    what = f"{stage} {comp} seed{seed}" + (f" {cell}" if cell else "")
    if _done(rdir):
      return what, True
    make = {"pretrain": pretrain_config, "instruct": instruct_config}.get(stage)
    cfg = make(config, workdir, comp, seed) if make else sft_config(config, workdir, comp, seed, cell)
    final = loop.train(cfg, rdir, mesh=mesh, show_progress=False)
    return f"{what}: loss {final.get('loss', float('nan')):.3f}", False
  if stage == "eval":
    comp, seed, cell = args
    edir = layout.eval_dir(workdir, comp, seed, cell)
    model = layout.run_dir(workdir, "sft" if cell else "instruct", comp, seed, cell)
    what = f"eval {comp} seed{seed} {cell or 'instructed base'}"
    if _done(edir):
      return what, True
    if not _done(model):
      raise ValueError(f"{model}: not trained yet; add '{'sft' if cell else 'instruct'}' to config.study.stages")
    key = f"{comp}/seed{seed}/{cell or 'base'}"
    eval_run.run_eval(eval_config(config, workdir, seed, model, key, comp, cell), edir, mesh=mesh)
    return what, False
  if stage == "sl":
    comp, seed = args
    sdir = layout.run_dir(workdir, "sl", comp, seed)
    what = f"subliminal learning {comp} seed{seed} (teacher {config.study.sl_cell}; sft, off_policy, on_policy)"
    if _done(sdir):
      return what, True
    sl.run_sl(sl_config(config, workdir, comp, seed), sdir, mesh=mesh)
    return what, False
  if stage == "curve":
    comp, seed, cell = args
    cdir = layout.mechanism_dir(workdir, "curve", comp, seed, cell)
    what = f"EM curve {comp} seed{seed} {cell}"
    if _done(cdir):
      return what, True
    _need(layout.run_dir(workdir, "sft", comp, seed, cell), "sft")
    curves.run_curve(curve_config(config, workdir, comp, seed, cell), cdir, mesh=mesh)
    return what, False
  if stage == "directions":
    comp, seed, cell = args
    ddir = layout.direction_dir(workdir, comp, seed, cell)
    what = f"direction {comp} seed{seed} {cell}"
    if _done(ddir):
      return what, True
    for model in ("", *([cell] if cell != layout.RANDOM else [])):
      _need(layout.eval_dir(workdir, comp, seed, model), "eval")
    if cell != layout.RANDOM:  # the same models read on the base's answers: no difference in the text
      fixed = layout.direction_dir(workdir, comp, seed, cell, read="base")
      if not _done(fixed):
        direction_job.run_directions(directions_config(config, workdir, comp, seed, cell, read="base"), fixed,
                                     mesh=mesh)
    direction_job.run_directions(directions_config(config, workdir, comp, seed, cell), ddir, mesh=mesh)
    return what, False
  if stage == "subspace":
    comp, seed, target, source = args
    edir = layout.mechanism_dir(workdir, "subspace", comp, seed, target, source)
    what = f"subspace {comp} seed{seed} {target} with {source}'s direction ablated"
    if _done(edir):
      return what, True
    _need(layout.direction_dir(workdir, comp, seed, source), "directions")
    # The model and its plain evaluation, complete: a crashed SFT's kept steps are not its model.
    _need(layout.run_dir(workdir, "sft", comp, seed, target), "sft")
    _need(layout.eval_dir(workdir, comp, seed, target), "eval")
    eval_run.run_eval(subspace_config(config, workdir, comp, seed, target, source), edir, mesh=mesh)
    return what, False
  if stage == "report":
    if _process_index() == 0:
      study_report.write_report(config, workdir, section=study_mechanisms)
    _barrier("emjax-study-report")
    return f"report: {os.path.join(workdir, 'report.md')}", False
  raise ValueError(f"unknown study stage {stage!r}")


def run_study(config, workdir: str, *, mesh=None, quiet: bool = False) -> dict:
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  check_settings(config, workdir)
  _barrier("emjax-study-settings-checked")  # every process has checked before process 0 writes
  workdir_lib.clear_status(workdir)  # a rerun is not complete until it ends
  workdir_lib.record_launch(workdir, "study")
  _enable_compile_cache(config, workdir)
  # Orbax warns at every restore of a checkpoint written without its optional metadata file; over
  # a study's dozens of runs that would bury the progress lines.
  logging.getLogger("absl").setLevel(max(logging.getLogger("absl").level, logging.ERROR))
  mesh = mesh or shd.make_mesh(config.mesh)
  units = plan(config)
  progress = Progress(len(units), quiet or _process_index() != 0)
  for stage, args in units:
    t0 = time.time()
    what, skipped = run_unit(config, workdir, stage, args, mesh)
    progress.step(what, skipped, time.time() - t0)
  summary = {"units": len(units), "report": os.path.join(workdir, "report.md"), "seconds": time.time() - progress.t0}
  workdir_lib.mark_complete(workdir, summary)
  return summary


