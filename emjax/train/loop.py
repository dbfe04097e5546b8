"""The one training loop: every channel is an objective plus a batch source.

    batches (grain) -> put on the mesh -> jitted step (donated state) -> metrics
                                                 \\-> orbax checkpoint (+ data position)

The step is a pure function `(state, batch) -> (state, metrics)` compiled once
with explicit in/out shardings. The model graph is split off once; inside the
step `nnx.merge` only happens at trace time, so no per-step Python work grows
with the model.

A preemption (SIGTERM on one process; jax's preemption sync point on several) saves
the step reached, waits for the save, and ends the run resumable: neither COMPLETED
nor FAILED, exit status 75 (`PreemptionWatch`, `train`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from emjax import config as config_lib
from emjax import paths
from emjax import sharding as shd
from emjax import tracking
from emjax import weights as weights_lib
from emjax import workdir as workdir_lib
from emjax.data import chat
from emjax.data import pipeline as data_pipeline
from emjax.data import sft
from emjax.data import sources as sources_lib
from emjax.data import tokenizers
from emjax.models import lora as lora_lib
from emjax.models import transformer
from emjax.train import batches as batches_lib
from emjax.train import checkpoint as ckpt_lib
from emjax.train import objectives as objectives_lib
from emjax.train import perf
from emjax.train import settings
from emjax.train import state as state_lib

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- preemption

# sysexits.h EX_TEMPFAIL ("try again later"): the run stopped on request at a saved step; rerun the same
# command to resume. Not 0 (a chain `train && eval` must not go on with a half-trained model), not 1 (FAILED).
EXIT_PREEMPTED = 75


class Preempted(BaseException):
  """Training stopped on a preemption: `step` is saved and final (unless `saved` is False: nothing was trained
  since the checkpoint the run started from, or since step 0), and neither COMPLETED nor FAILED was written.

  A BaseException, as KeyboardInterrupt is: a stop on request, not an error for `except Exception` to swallow.
  emjax.main turns it into exit status EXIT_PREEMPTED (`train(exit_on_preemption=True)` exits there itself).
  """

  def __init__(self, step: int, *, saved: bool, cause: str, checkpoints: str, resume_step: int | None,
               started: float | None = None):
    super().__init__(step)
    self.step, self.saved, self.cause, self.checkpoints = step, saved, cause, checkpoints
    self.resume_step = step if saved else resume_step
    self.started = time.perf_counter() if started is None else started  # the save's start: `save_s` times it
    self.save_s = 0.0

  def __str__(self) -> str:
    if self.saved:
      done = f"step {self.step} saved in {self.checkpoints} ({self.save_s:.1f} s, waited for)"
    else:
      done = f"stopped before step {self.step + 1}, nothing new to save"
    resume = (f"rerun the same command to resume from step {self.resume_step}" if self.resume_step is not None
              else "rerun the same command to start it again")
    return (f"preemption ({self.cause}): {done}; the run stops with neither COMPLETED nor FAILED, exit status "
            f"{EXIT_PREEMPTED}: {resume}")


class PreemptionWatch:
  """Whether training must stop at this step boundary, saving the step first: `reached(step)`.

  * jax.distributed initialised (every multi-process job): jax's preemption service (on unless
    `jax_enable_preemption_service` is off) takes SIGTERM on any process, tells every other one, and
    sets a sync point, the step after the fastest process's; `reached` is
    `multihost_utils.reached_preemption_sync_point`, called by every process at every step, so all stop
    and save at the same step.
  * otherwise (one process): a SIGTERM handler, installed in the main thread here and restored by
    `close`, sets a flag that `reached` reads: the step being computed when the signal came is saved.

  SIGINT is left as it is: Ctrl-C (and launch/tpu/stop.sh) stops at once and writes FAILED.
  """

  def __init__(self):
    self.mode = "none"
    self._received: float | None = None
    self._previous = None
    if jax.distributed.is_initialized():
      if not getattr(jax.config, "jax_enable_preemption_service", True):
        log.warning("preemption: jax_enable_preemption_service is off, so nothing takes SIGTERM: it ends this "
                    "job without a checkpoint")
        return
      self.mode = "sync"
      log.info("preemption: SIGTERM to any process (jax's preemption service) makes every process save the "
               "same step and stop, resumable (exit status %d)", EXIT_PREEMPTED)
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self.mode = "signal"
      log.info("preemption: SIGTERM saves the step being trained and stops the run, resumable (exit status %d)",
               EXIT_PREEMPTED)
    else:
      log.warning("preemption: training outside the main thread, where no signal handler can be installed: "
                  "SIGTERM ends the process without a checkpoint")

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame  # no logging here: a handler may interrupt a write to the same stream
    if self._received is None:
      self._received = time.time()

  @property
  def cause(self) -> str:
    if self.mode == "sync":
      return "jax's preemption sync point: a process of this job was sent SIGTERM, every process stops here"
    when = time.strftime("%H:%M:%S", time.localtime(self._received)) if self._received else "?"
    return f"SIGTERM received at {when}"

  def reached(self, step: int) -> bool:
    """True when training must stop after `step` (every process must call this at every step, in order)."""
    if self.mode == "sync":
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # the preemption service is off: SIGTERM is not caught, nothing to watch
        log.warning("preemption: %s; a SIGTERM ends this job without a checkpoint", e)
        self.mode = "none"
        return False
    return self._received is not None

  def close(self) -> None:
    if self.mode == "signal":
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self.mode = "none"


def _exit_preempted() -> NoReturn:
  """Ends the process now with EXIT_PREEMPTED: past the job's error handling, which would record the stop as
  a failure (FAILED), and past nested jobs (a grid's, a study's) that would go on to their next run."""
  if jax.distributed.is_initialized():
    try:  # together: every process stopped at the same step, so none sees the coordinator vanish first
      jax.distributed.shutdown()
    except Exception as e:  # noqa: BLE001 -- leaving anyway
      log.warning("preemption: jax.distributed.shutdown failed (%s); exiting anyway", e)
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 -- a closed stream
      pass
  os._exit(EXIT_PREEMPTED)


def _global_norm(tree) -> jax.Array:
  # optax.tree.norm replaced optax.global_norm; support both.
  tree_utils = getattr(optax, "tree", None)
  return tree_utils.norm(tree) if hasattr(tree_utils, "norm") else optax.global_norm(tree)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model the objective reads: its own graph and parameters (any size, any dtype).

  Its parameters are an argument of the step beside the train state: never
  donated, never differentiated, never in the optimizer or a checkpoint.
  """

  graphdef: Any
  abstract: dict  # ShapeDtypeStructs with shardings
  shardings: dict


def micro_batches(batch: Mapping[str, jax.Array], grad_accum_steps: int, mesh: Mesh | None) -> dict:
  """[B, ...] -> [grad_accum_steps, B / grad_accum_steps, ...], each device keeping its own rows.

  The global batch is split over the batch axes in contiguous blocks, one per
  device. Micro-batch k takes the rows i with i % grad_accum_steps == k, so every
  device's micro-batch rows come from its own block and no row crosses devices
  (a contiguous split would hand micro-batch k to a few devices and reshuffle
  the whole batch every step).
  """
  def split(x):
    b = x.shape[0]
    y = x.reshape(b // grad_accum_steps, grad_accum_steps, *x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(
          y, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES)))
    return y
  return {k: split(v) for k, v in batch.items()}


def derive_loss_chunk_len(chunk_len: int, budget_bytes: int, rows_per_device: int, vocab_size: int, seq_len: int) -> int:
  """The positions the loss unembeds at a time (`config.train.loss_chunk_len` / `loss_chunk_bytes`).

  `chunk_len` > 0 is honoured as given. 0 derives it from the vocabulary: the longest chunk whose
  float32 logits on one device, rows_per_device x chunk x vocab_size x 4 bytes, stay within
  `budget_bytes`, whatever the sequence length; of the chunk counts that fit, the fewest, with the
  positions spread evenly over them (no chunk longer than the budget allows, little padding).
  Returns `seq_len` (one chunk) when the whole sequence fits or `budget_bytes` is 0.
  """
  if chunk_len > 0:
    return int(chunk_len)
  if budget_bytes <= 0:
    return int(seq_len)
  per_position = max(1, int(rows_per_device)) * int(vocab_size) * 4
  longest = max(1, int(budget_bytes) // per_position)
  if longest >= seq_len:
    return int(seq_len)
  n_chunks = -(-int(seq_len) // longest)
  return -(-int(seq_len) // n_chunks)


def make_loss_sums(graphdef, objective: objectives_lib.Objective, mesh: Mesh | None, loss_chunk_len: int,
                   teacher_graphdef=None, unroll: bool = False) -> Callable:
  """`(params, frozen, batch, teacher_params, dropout_key) -> (loss_sum, ObjectiveOutput)` for one batch.

  `unroll`: the loss chunks unrolled instead of scanned (same arithmetic; see `Trainer`).
  """

  def loss_sums(params, frozen, batch, teacher_params=None, dropout_key=None):
    model = nnx.merge(graphdef, state_lib.merge_trees(frozen, params))
    with shd.activation_sharding(mesh):
      hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)
      t_hidden = t_unembed = None
      if teacher_graphdef is not None:
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        t_hidden = jax.lax.stop_gradient(
            teacher.hidden(batch["inputs"], batch["positions"], batch["segment_ids"]))
        t_unembed = teacher.logits
      out = objectives_lib.chunked_sums(objective, model.logits, hidden, batch, loss_chunk_len,
                                        teacher_unembed=t_unembed, teacher_hidden_BxLxD=t_hidden, unroll=unroll)
    return out.loss_sum, out

  return loss_sums


def make_train_step(graphdef, objective: objectives_lib.Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int, mesh: Mesh | None,
                    use_dropout: bool = False, loss_chunk_len: int = 0, teacher_graphdef=None,
                    unroll: bool = False) -> Callable:
  """The pure step `(state, frozen, batch, teacher_params) -> (state, metrics)`.

  Exact token-mean gradients over all micro-batches, then one update of the
  trainable parameters; `frozen` and `teacher_params` are only read. The teacher
  runs on each micro-batch beside the student. `unroll`: the micro-batch and loss-chunk loops
  unrolled instead of scanned (same arithmetic; see `Trainer`).
  """
  loss_sums = make_loss_sums(graphdef, objective, mesh, loss_chunk_len, teacher_graphdef, unroll)
  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

  def step(state, frozen, batch, teacher_params=None):
    params = state["params"]
    step_key = jax.random.fold_in(state["rng"], state["step"]) if use_dropout else None
    if grad_accum_steps == 1:
      (loss_sum, out), grads = grad_fn(params, frozen, batch, teacher_params, step_key)
      weight, extra = out.weight, out.metrics
    else:
      micro = micro_batches(batch, grad_accum_steps, mesh)

      def accumulate(carry, xs):
        mb, index = xs
        key = None if step_key is None else jax.random.fold_in(step_key, index)
        (l, o), g = grad_fn(params, frozen, mb, teacher_params, key)
        return jax.tree.map(jnp.add, carry, (g, l, o.weight, o.metrics)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      first = jax.tree.map(lambda x: x[0], micro)
      _, o_shape = jax.eval_shape(loss_sums, params, frozen, first, teacher_params)
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), o_shape.metrics))
      (grads, loss_sum, weight, extra), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(grad_accum_steps)),
                                                         unroll=unroll)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = _global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), "loss_tokens": weight}
    metrics.update({k: v / denom for k, v in extra.items()})
    return new_state, metrics

  return step


def batch_abstract(objective: objectives_lib.Objective, batch_size: int, seq_len: int, mesh: Mesh) -> dict:
  """ShapeDtypeStructs of the batch the step is compiled for: the model inputs plus the objective's keys."""
  out = {}
  for k, (trailing, dtype) in sorted(objective.full_batch_spec().items()):
    shape = (batch_size, seq_len, *trailing)
    out[k] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shd.batch_sharding(mesh, len(shape)))
  return out


class Trainer:
  """Static pieces of a run (mesh, layout, jitted step) built from a config, nothing materialised.

  `unroll_loops`: the step's own loops (micro-batches, loss chunks) unrolled, for XLA's cost
  analysis, which counts a loop body once whatever its trip count (emjax.train.aot's plans).
  """

  def __init__(self, config, mesh: Mesh | None = None, *, unroll_loops: bool = False):
    settings.validate(config)
    self.config = config
    if config.init.hf:
      _adopt_hf_architecture(config)
    self.model_cfg = transformer.TransformerConfig.from_config(config.model)
    resolve_epochs(config)
    self.mesh = mesh or shd.make_mesh(config.mesh)
    dp = shd.data_parallel_size(self.mesh)
    tc = config.train
    if tc.batch_size % (dp * tc.grad_accum_steps):
      raise ValueError(
          f"config.train.batch_size={tc.batch_size} must be divisible by the data-parallel size "
          f"(mesh.data*mesh.fsdp={dp}) times train.grad_accum_steps={tc.grad_accum_steps}")
    self.lora_cfg = lora_lib.LoRAConfig.from_config(config.lora) if config.lora.enabled else None
    self.schedule = state_lib.make_schedule(tc)
    self.tx = state_lib.make_optimizer(tc, self.schedule)
    self.layout = state_lib.build_layout(self.model_cfg, self.tx, self.mesh, self.lora_cfg,
                                         base_dtype=config.lora.base_dtype)
    # A token mask reads the tokenizer's text of every id; loaded only then.
    tokenizer = tokenizers.load_tokenizer(config.data.tokenizer) if tc.distill.get("mask") else None
    self.objective = objectives_lib.get_objective(tc.objective, tc.distill, tokenizer, self.model_cfg.vocab_size)
    top_k = int(tc.distill.top_k)
    if top_k > self.model_cfg.vocab_size:
      raise ValueError(f"config.train.distill.top_k={top_k} is larger than the vocabulary "
                       f"({self.model_cfg.vocab_size} tokens)")
    # A precomputed teacher (top-k log-probs read with the batch) needs no model in the step.
    self.teacher = self._teacher_layout() if self.objective.needs_teacher else None
    if self.objective.needs_teacher and self.teacher is None:
      raise ValueError(f"config.train.objective={tc.objective!r} needs a teacher: set config.teacher.path")
    teacher_graphdef = self.teacher.graphdef if self.teacher is not None else None
    self.rows_per_device = max(1, tc.batch_size // (dp * tc.grad_accum_steps))
    self.loss_chunk_len = derive_loss_chunk_len(int(tc.loss_chunk_len), int(tc.get("loss_chunk_bytes", 0)),
                                                self.rows_per_device, self.model_cfg.vocab_size,
                                                int(config.data.seq_len))
    log.info("the loss unembeds %d of %d positions at a time (%d rows per device, vocabulary %d)",
             self.loss_chunk_len, int(config.data.seq_len), self.rows_per_device, self.model_cfg.vocab_size)
    step = make_train_step(self.layout.graphdef, self.objective, self.tx, self.schedule,
                           tc.grad_accum_steps, self.mesh,
                           use_dropout=self.lora_cfg is not None and self.lora_cfg.dropout > 0,
                           loss_chunk_len=self.loss_chunk_len, teacher_graphdef=teacher_graphdef,
                           unroll=unroll_loops)
    self.batch_abstract = batch_abstract(self.objective, tc.batch_size, config.data.seq_len, self.mesh)
    self.batch_shardings = {k: v.sharding for k, v in self.batch_abstract.items()}
    self.batch_keys = tuple(self.batch_abstract)
    teacher_shardings = self.teacher.shardings if self.teacher is not None else None
    self.step_fn = jax.jit(
        step, in_shardings=(self.layout.shardings, self.layout.frozen_shardings, self.batch_shardings,
                            teacher_shardings),
        out_shardings=(self.layout.shardings, shd.replicated(self.mesh)), donate_argnums=(0,))
    # Held-out batches are fixed sequences: the sampled-token estimator's surrogate means nothing
    # there (no sampling log-probs), the exact reverse KL it estimates does.
    self.eval_objective = (objectives_lib.get_objective("reverse_kl", tc.distill)
                           if tc.objective == "sampled_reverse_kl" else self.objective)
    loss_sums = make_loss_sums(self.layout.graphdef, self.eval_objective, self.mesh, self.loss_chunk_len,
                               teacher_graphdef)

    def eval_sums(params, frozen, batch, teacher_params=None):
      _, out = loss_sums(params, frozen, batch, teacher_params)
      return out.loss_sum, out.weight

    eval_abstract = batch_abstract(self.eval_objective, tc.batch_size, config.data.seq_len, self.mesh)
    self.eval_batch_keys = tuple(eval_abstract)
    self.eval_fn = jax.jit(eval_sums, in_shardings=(self.layout.shardings["params"], self.layout.frozen_shardings,
                                                    {k: v.sharding for k, v in eval_abstract.items()},
                                                    teacher_shardings))

  def _teacher_layout(self) -> Teacher | None:
    """The teacher's graph, shapes and shardings from `config.teacher` (nothing loaded)."""
    tcfg = self.config.teacher
    if not tcfg.path:
      return None
    source = weights_lib.resolve(tcfg.path, key="config.teacher.path", base=tcfg.get("peft_base", ""),
                                 base_key="config.teacher.peft_base")
    if source.model_cfg is None:
      raise FileNotFoundError(f"config.teacher.path={tcfg.path}: no config.json in {source.directory} to take the "
                              "teacher's architecture and tokenizer from")
    model_cfg = source.model_cfg
    check_teacher_tokenizer(source, self.config.data.tokenizer)
    model_cfg = dataclasses.replace(model_cfg, param_dtype=tcfg.dtype or model_cfg.param_dtype,
                                    dtype=tcfg.dtype or self.model_cfg.dtype, remat="none")
    if model_cfg.vocab_size != self.model_cfg.vocab_size:
      raise ValueError(f"config.teacher.path={tcfg.path}: the teacher's vocabulary ({model_cfg.vocab_size}) "
                       f"differs from the student's ({self.model_cfg.vocab_size}); they must share a tokenizer")
    self.teacher_model_cfg = model_cfg
    self.teacher_source = source
    graphdef, _ = transformer.split_model(transformer.abstract_model(model_cfg))
    abstract_params = weights_lib.abstract_params(model_cfg, self.mesh)
    return Teacher(graphdef=graphdef, abstract=abstract_params,
                   shardings=jax.tree.map(lambda a: a.sharding, abstract_params))

  def load_teacher(self) -> dict | None:
    """The teacher's parameters on the mesh in `config.teacher.dtype` (None without a teacher)."""
    if self.teacher is None:
      return None
    loaded = weights_lib.load_weights(self.teacher_source, mesh=self.mesh,
                                      dtype=self.teacher_model_cfg.param_dtype, key="config.teacher.path")
    got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), loaded.params)
    want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), self.teacher.abstract)
    if got != want:
      raise ValueError(f"config.teacher.path={self.config.teacher.path}: loaded parameters do not match "
                       "the teacher's model config")
    return jax.device_put(loaded.params, self.teacher.shardings)

  def compile(self, compiler_options: Mapping[str, Any] | None = None):
    """Lower and compile from abstract shapes alone (ahead of time; no parameter materialised)."""
    teacher = self.teacher.abstract if self.teacher is not None else None
    return self.step_fn.lower(self.layout.abstract, self.layout.frozen_abstract, self.batch_abstract,
                              teacher).compile(compiler_options=compiler_options)

  def init_state(self, workdir: str | None = None) -> tuple[dict, dict]:
    """(train state, frozen params) for step 0, from `config.init` (random when unset).

    `workdir`: the run's; a LoRA run's base is pinned there (WORKDIR/base.json, see emjax.weights):
    recorded the first time, checked (and its pinned step loaded) every time after. A LoRA run from a
    PEFT adapter (config.init.hf) starts from that adapter, on its base.
    """
    base = weights_lib.load_init_params(self.config.init, self.model_cfg, self.layout.base_abstract, self.mesh,
                                        pin=workdir if self.lora_cfg is not None else None, lora=self.lora_cfg)
    adapters = weights_lib.init_adapters(self.config.init, self.lora_cfg, self.layout.abstract["params"])
    return state_lib.init_state(self.model_cfg, self.tx, self.layout, self.config.train.seed,
                                self.lora_cfg, base, adapters)

  def step_flops(self) -> dict[str, float]:
    """Model FLOPs of one step by what computes them (the MFU numerator): the trained model; the
    teacher's forward when it runs in the step; the student's rollouts when batches are on-policy
    (each step's expected share: mix_lambda of the steps sample, max_prompt_length +
    max_new_tokens tokens a row, as the static decode loop runs)."""
    seq = int(self.config.data.seq_len)
    tokens = int(self.config.train.batch_size) * seq
    cfg = self.model_cfg
    adapters = 0
    if self.lora_cfg is not None:
      adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(self.layout.abstract["params"]))
      out = {"train": cfg.lora_flops_per_token(seq, adapters) * tokens}
    else:
      out = {"train": cfg.flops_per_token(seq) * tokens}
    if self.teacher is not None:
      out["teacher_forward"] = self.teacher_model_cfg.forward_flops_per_token(seq) * tokens
    oc = self.config.get("on_policy")
    if oc is not None and oc.enabled:
      rollout = int(oc.max_prompt_length) + int(oc.max_new_tokens)
      per_token = cfg.forward_flops_per_token(rollout) + 2.0 * adapters
      out["rollouts"] = float(oc.mix_lambda) * int(self.config.train.batch_size) * rollout * per_token
    return out

  def flops_per_step(self) -> float:
    return sum(self.step_flops().values())


def check_teacher_tokenizer(teacher: weights_lib.Source, student_tokenizer) -> None:
  """Refuses a teacher whose tokenizer or chat template is not the student's (`data.tokenizer`).

  Distillation compares the two models' distributions token id by token id, and a
  chat template that differs shifts every teacher log-prob onto other text, so the
  pair must share both; the error names the first difference.
  """
  teacher_cfg = teacher.tokenizer
  if teacher_cfg is None:
    raise ValueError(f"config.teacher.path={teacher.path}: its run records no tokenizer (no data.tokenizer in "
                     f"{teacher.directory}/config.json), so it cannot be checked against the student's")
  if dict(teacher_cfg) == dict(student_tokenizer):
    return
  chat.check_same_tokenizer(tokenizers.load_tokenizer(teacher_cfg), tokenizers.load_tokenizer(student_tokenizer),
                            ("teacher (config.teacher.path)", "student (config.data.tokenizer)"))


def _adopt_hf_architecture(config) -> None:
  """config.model <- the Hugging Face checkpoint's architecture (runtime choices such as dtype kept)."""
  hf_cfg = weights_lib.model_config(config.init.hf, key="config.init.hf", base=config.init.get("peft_base", ""),
                                    base_key="config.init.peft_base")
  keep = {k: config.model[k] for k in weights_lib.RUNTIME_MODEL_KEYS}
  config.model.update({**dataclasses.asdict(hf_cfg), **keep})


def resolve_epochs(config) -> None:
  """train.epochs > 0: train.steps = ceil(epochs * rows / batch_size), rows counted over the sources.

  Exact when every row is one example (data.packing='none', as SFT recipes count
  examples per batch); with packing, rows hold several examples and an "epoch"
  of rows covers more than the data, so that combination is refused.
  """
  tc = config.train
  if not tc.epochs:
    return
  if config.data.packing != "none":
    raise ValueError("config.train.epochs needs config.data.packing='none' (one example per row); "
                     "with packing, set train.steps instead")
  rows = sum(len(sources_lib.make_source(name, src)) for name, src in config.data.sources.items()
             if float(src.weight) > 0)
  tc.steps = max(1, math.ceil(tc.epochs * rows / tc.batch_size))
  log.info("train.epochs=%s over %d examples at batch %d: %d steps", tc.epochs, rows, tc.batch_size, tc.steps)


class MetricsWriter:
  """metrics.jsonl and eval.jsonl (one object per logged step), TensorBoard events and, when
  config.tracking enables it, the experiment tracker (emjax.tracking); process 0 only.

  Everything goes through emjax.paths, so the workdir may be a bucket (gs://...).
  """

  def __init__(self, workdir: str, resume_step: int, tracker: tracking.Tracker | None = None):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._tracker = tracker
    if not self.enabled:
      return
    self._root = root = paths.path(workdir)
    self._logs = {}  # opened at their first row: eval.jsonl exists only when eval.every_steps > 0
    for name in ("metrics.jsonl", "eval.jsonl"):
      _truncate_metrics(root / name, resume_step)
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # optional: metrics.jsonl is the record
      log.warning("tensorboardX not installed: no TensorBoard events")
      return
    if paths.is_remote(root):
      paths.register_tensorboard_schemes()
    self._tb = SummaryWriter(os.fspath(root / "tensorboard"))

  def write(self, row: dict) -> None:
    self._write("metrics.jsonl", row)

  def write_eval(self, row: dict) -> None:
    self._write("eval.jsonl", row)

  def _write(self, name: str, row: dict) -> None:
    if not self.enabled:
      return
    if name not in self._logs:
      self._logs[name] = paths.AppendLog(self._root / name)
    self._logs[name].write(json.dumps(row) + "\n")
    scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, row["step"])
    if self._tracker is not None:
      self._tracker.log(scalars, row["step"])

  def close(self) -> None:
    if self.enabled:
      for f in self._logs.values():
        f.close()
      if self._tb is not None:
        self._tb.close()


def _truncate_metrics(path, resume_step: int) -> None:
  """Keep rows up to the resumed step; rows after it (recomputed now) are kept aside, not lost."""
  path = paths.path(path)
  if not paths.log_exists(path):
    return
  lines = paths.read_log(path).splitlines(keepends=True)
  keep, later = [], []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut by a kill: set aside
      later.append(line)
      continue
    (keep if row.get("step", 0) <= resume_step else later).append(line)
  if later:
    aside = path.parent / f"{path.name}.after_step_{resume_step}"
    earlier = aside.read_text() if aside.exists() else ""
    paths.write_text(aside, earlier + "".join(later))
    log.info("metrics: %d rows after step %d moved to %s (they are recomputed now)", len(later), resume_step, aside)
    paths.replace_log(path, "".join(keep))


def _last_good(last_good_ckpt: int | None, ckpt_dir: str) -> str:
  return (f"the last good checkpoint is step {last_good_ckpt} in {ckpt_dir}" if last_good_ckpt is not None
          else "no checkpoint was written before it")


def _finite_or_raise(rows: list[dict], last_good_ckpt: int | None, ckpt_dir: str) -> None:
  """A NonFiniteLossError at the first row whose loss or grad_norm is not finite.

  The loss is computed before the step's update, so a non-finite gradient shows in grad_norm first:
  the parameters it updated are already non-finite while the loss is not. Called on a save step's
  rows before it is saved, so such a step is never saved.
  """
  for row in rows:
    for key in ("loss", "grad_norm"):
      if key in row and not math.isfinite(row[key]):
        raise NonFiniteLossError(
            f"{key} became {row[key]} at step {row['step']}; training stopped and nothing from that step "
            f"on was saved; {_last_good(last_good_ckpt, ckpt_dir)}. Lower train.lr or check the data.")


def _all_finite(tree) -> jax.Array:
  """True when every floating-point value of `tree` is finite (one scalar)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def train(config, workdir: str, *, mesh: Mesh | None = None, show_progress: bool = True,
          make_batch_source: Callable[..., batches_lib.BatchSource] | None = None,
          exit_on_preemption: bool = False) -> dict:
  """Run (or resume) the configured training job in `workdir`; returns the final metrics row.

  Batches come from `make_batch_source(trainer, tokenizer)` (default: the grain
  pipeline of `config.data`). A source with a `set_weights(params, frozen)` method
  is handed the current weights before every batch it produces (on-policy data).

  Preemption (`PreemptionWatch`): after SIGTERM (one process) or at jax's preemption sync point (several),
  the step reached is saved (the NaN guard first, as for every save), the save is waited for, and the run
  stops with neither COMPLETED nor FAILED: `Preempted` (a BaseException) is raised, through nested jobs (a
  grid's, a study's: none goes on to its next run, and a staged bucket workdir is pushed on the way out)
  to emjax.main, which exits with EXIT_PREEMPTED (75) and marks nothing; with `exit_on_preemption=True`
  the process ends here instead. Rerunning resumes from that step, bit for bit. A preemption at the last
  step completes the run as usual.
  """
  watch = PreemptionWatch()
  try:
    return _train(config, workdir, watch, mesh=mesh, show_progress=show_progress,
                  make_batch_source=make_batch_source)
  except Preempted as stop:
    stop.save_s = time.perf_counter() - stop.started
    log.warning("%s", stop)
    if exit_on_preemption:
      _exit_preempted()
    raise
  finally:
    watch.close()


def _train(config, workdir: str, watch: PreemptionWatch, *, mesh: Mesh | None, show_progress: bool,
           make_batch_source: Callable[..., batches_lib.BatchSource] | None) -> dict:
  if watch.mode == "sync":
    # jax's sync point is the step after the last one any process passed it. The step this run resumes from
    # (the newest in the directory) is passed now, so that a notice while it starts up lands on a step it
    # will reach, not on step 1.
    watch.reached(max(ckpt_lib.existing_steps(paths.path(workdir) / "checkpoints"), default=0))
  if not config.checkpoint.resume:  # before anything is written: an earlier run's checkpoints stay as they are
    ckpt_lib.refuse_fresh_start(paths.path(workdir) / "checkpoints")
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  workdir_lib.clear_status(workdir)
  workdir_lib.record_launch(workdir, str(config.job))
  trainer = Trainer(config, mesh)
  tc, mesh = config.train, trainer.mesh
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > trainer.model_cfg.vocab_size:
    raise ValueError(f"config.model.vocab_size={trainer.model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}, config.data.tokenizer)")
  config_lib.write_config(config, workdir)
  # Every batch a rollout (lambda = 1): config.data is never read, so it is not checked either.
  only_rollouts = config.on_policy.enabled and float(config.on_policy.mix_lambda) >= 1.0
  if config.data.format == "chat" and not only_rollouts:
    _report_chat_data(config, tokenizer, workdir)

  if make_batch_source is None and config.on_policy.enabled:
    raise ValueError("config.on_policy.enabled: on-policy batches come from the sampler, which the training loop "
                     "does not import; pass make_batch_source=emjax.train.on_policy.make_source (python -m "
                     "emjax.main does)")
  if make_batch_source is None and tc.distill.precomputed:
    # The store's reader sits above the loop (the teacher_top_k job that writes it builds on the Trainer).
    raise ValueError("config.train.distill.precomputed: the rows of a stored teacher come from the store's reader, "
                     "which the training loop does not import; pass make_batch_source="
                     "emjax.train.precompute.make_source (python -m emjax.main does)")
  if make_batch_source is None:
    batches = batches_lib.GrainBatchSource(config.data, tokenizer, tc.batch_size, seed=tc.seed)
  else:
    batches = make_batch_source(trainer, tokenizer)
  wants_weights = hasattr(batches, "set_weights")
  checkpointer = ckpt_lib.Checkpointer(paths.path(workdir) / "checkpoints", keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save,
                                       keep_every=int(config.checkpoint.get("keep_every", 0)))
  restored = checkpointer.restore_latest(trainer.layout.abstract) if config.checkpoint.resume else None
  if restored is not None:
    start_step, state, data_state = restored
    batches.set_state(data_state)
    # Frozen weights are not checkpointed: rebuild them from config.init (deterministic).
    frozen = trainer.init_state(workdir)[1] if trainer.lora_cfg is not None else {}
    log.info("resumed from step %d (%s)", start_step, checkpointer.directory)
  else:
    start_step, (state, frozen) = 0, trainer.init_state(workdir)
  last_saved = start_step if restored is not None else None
  teacher = trainer.load_teacher()

  compiled = trainer.compile()
  _log_memory(compiled)
  tracker = tracking.start(config, workdir, job_type=config.job)
  writer = MetricsWriter(workdir, start_step, tracker)
  evaluate = _make_evaluator(trainer, tokenizer, writer, batches)
  if evaluate is not None and start_step == 0:
    evaluate(0, state, frozen, teacher)
  peak = perf.peak_flops_per_device(tc.peak_flops_per_device, mesh.devices.flat[0])
  flops_per_step = trainer.flops_per_step()
  log.info("MFU: %s FLOPs per step (%s) against %s FLOP/s per device (%s)", f"{flops_per_step:.4g}",
           ", ".join(f"{k} {v:.4g}" for k, v in trainer.step_flops().items()), peak,
           perf.peak_source(tc.peak_flops_per_device, mesh.devices.flat[0]) or "unknown device: no MFU")
  tokens_per_step = tc.batch_size * config.data.seq_len
  pending: list[tuple[int, dict]] = []
  last_row: dict = {}
  t_last, steps_since = time.perf_counter(), 0

  state_finite = jax.jit(_all_finite, out_shardings=shd.replicated(mesh))  # checked before every save
  progress = _progress(start_step, tc.steps, show_progress)

  def preempted(step: int, saved: bool, started: float | None = None) -> Preempted:
    return Preempted(step, saved=saved, cause=watch.cause, checkpoints=checkpointer.directory,
                     resume_step=last_saved, started=started)

  outcome = "failed"
  try:
    if watch.reached(start_step):  # before any step: the state is the checkpoint it started from (or step 0)
      raise preempted(start_step, saved=False)
    for step in range(start_step + 1, tc.steps + 1):
      if wants_weights:
        batches.set_weights(state["params"], frozen)
      batch = _device_batch(next(batches), trainer)
      state, metrics = compiled(state, frozen, batch, teacher)
      pending.append((step, metrics))
      steps_since += 1
      # Asked on every step by every process (jax's sync point needs each step); at the last step the run
      # simply completes.
      stop = watch.reached(step) and step < tc.steps
      should_save = step % config.checkpoint.every_steps == 0 or step == tc.steps or stop
      if step % tc.log_every == 0 or should_save:
        rows = [dict(step=s, **{k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        elapsed = time.perf_counter() - t_last
        step_time = elapsed / steps_since
        t_last, steps_since = time.perf_counter(), 0
        _finite_or_raise(rows, last_saved, checkpointer.directory)
        for row in rows:
          row.update(tokens_per_s=tokens_per_step / step_time, step_time_s=step_time,
                     mfu=perf.mfu(flops_per_step, step_time, mesh.size, peak))
          if row["step"] % tc.log_every == 0 or row["step"] == tc.steps:
            writer.write(row)
        last_row = rows[-1]
        progress.set_postfix(loss=f"{last_row['loss']:.4f}", refresh=False)
      if evaluate is not None and (step % config.eval.every_steps == 0 or step == tc.steps):
        evaluate(step, state, frozen, teacher)
      if should_save:
        # This step's loss and grad_norm were checked above; an update can still overflow.
        if not bool(jax.device_get(state_finite(state))):
          raise NonFiniteLossError(
              f"the parameters or optimizer state became non-finite at step {step} while its loss and gradient "
              f"were finite (the update overflowed); training stopped and step {step} was not saved; "
              f"{_last_good(last_saved, checkpointer.directory)}. Lower train.lr.")
        save_started = time.perf_counter()
        checkpointer.save(step, state, batches.get_state())
        last_saved = step
      progress.update(1)
      if stop:  # saved above; `checkpointer.close()` below waits until the save is final
        raise preempted(step, saved=True, started=save_started)
    outcome = "completed"
  except Preempted:
    outcome = "preempted"
    raise
  finally:
    progress.close()
    checkpointer.close()  # waits for the last save: a preempted run's step is final before the process ends
    writer.close()
    batches.close()
    if tracker is not None:
      tracker.finish(failed=outcome == "failed")
  final = {"step": tc.steps, **{k: v for k, v in last_row.items() if k != "step"}}
  workdir_lib.mark_complete(workdir, final)
  return final


def _device_batch(local: Mapping[str, Any], trainer: Trainer) -> dict:
  """A source's batch as the step's global arrays: process-local numpy rows, or arrays already on the mesh."""
  batch = _model_batch(local, trainer.batch_keys)
  if all(isinstance(v, jax.Array) for v in batch.values()):  # e.g. on-policy rollouts, assembled on device
    return jax.device_put(batch, trainer.batch_shardings)
  return shd.put_local_batch(batch, trainer.mesh)


def _model_batch(local: Mapping[str, np.ndarray], keys) -> dict:
  missing = [k for k in keys if k not in local]
  if missing:
    raise ValueError(f"the step (config.train.objective) reads batch keys {missing} that the batch source "
                     f"does not give (it gives {sorted(local)})")
  return {k: local[k] for k in keys}


def _report_chat_data(config, tokenizer, workdir: str) -> None:
  """Per chat source: conversations, how many are truncated to data.seq_len, tokens trained on."""
  examples = sft.ChatExample(tokenizer, config.data.seq_len, config.data.truncate)
  stats = {}
  for name, src in config.data.sources.items():
    if float(src.weight) > 0:
      source = sources_lib.make_source(name, src)
      # Row i of the source's split (its file's row i when nothing is held out).
      stats[name] = sft.sft_stats(examples, [source[i] for i in range(len(source))],
                                  f"data.sources.{name} {source!r}")
      log.info("data %s: %s", name, stats[name])
      if stats[name]["truncated"] and not config.data.truncate:
        raise ValueError(f"data.sources.{name}: {stats[name]['truncated']} conversations are longer than "
                         f"data.seq_len + 1 = {config.data.seq_len + 1} tokens and data.truncate is off")
  if jax.process_index() == 0:
    paths.write_text(paths.path(workdir) / "data_stats.json", json.dumps(stats, indent=2))


def held_out_data_config(config):
  """config.data reading each source's `eval.split` in a fixed order: the evaluator's held-out batches."""
  if config.eval.split not in sources_lib.PARTITIONS:
    raise ValueError(f"config.eval.split={config.eval.split!r}: expected one of {list(sources_lib.PARTITIONS)}")
  data_cfg = copy.deepcopy(config.data)
  data_cfg.shuffle = False
  data_cfg.prefetch = 0
  for name, src in data_cfg.sources.items():
    # Any other partition would train on the documents eval.jsonl measures.
    if float(src.weight) > 0 and (src.split or "train") != "train":
      raise ValueError(f"data.sources.{name}.split={src.split!r}: with config.eval.every_steps > 0 training "
                       "must read only each source's 'train' split, which excludes the held-out documents")
    src.split = config.eval.split
  return data_cfg


def _make_evaluator(trainer: Trainer, tokenizer, writer: MetricsWriter, batch_source=None):
  """Held-out loss every `eval.every_steps` over `eval.batches` fixed batches, to eval.jsonl (`writer`).

  The held-out batches come from the training sources with `split` set to
  `eval.split` ('eval': each source's held-out documents, emjax/data/sources.py
  "Held-out split") and no shuffling, so every evaluation sees the same tokens.
  With `eval.by_source`, each source alone gets its own `eval.batches` batches too
  (`eval_loss_by_source`, `eval_tokens_by_source`), whatever its training weight. With a stored
  teacher (`train.distill.precomputed`) the same held-out rows come from the store, which holds the
  teacher's top-k on them (`batch_source`: the run's, the store's reader, `eval_batches`).
  """
  config = trainer.config
  if config.eval.every_steps <= 0:
    return None

  def fixed_batches(cfg):
    it = iter(data_pipeline.make_batches(cfg, tokenizer, config.train.batch_size, seed=config.train.seed))
    return [shd.put_local_batch(_model_batch(b, trainer.eval_batch_keys), trainer.mesh)
            for b in (next(it) for _ in range(config.eval.batches))]

  by_source = {}
  if config.train.distill.precomputed:
    # A stored teacher: the same held-out rows with the teacher's top-k, stored by the teacher_top_k job
    # (checked against config.eval when the batch source opened the store).
    if not hasattr(batch_source, "eval_batches"):
      raise ValueError("config.train.distill.precomputed with config.eval.every_steps > 0: the held-out rows come "
                       "from the store, through the batch source's eval_batches (emjax.train.precompute.make_source); "
                       f"this run's batch source ({type(batch_source).__name__}) has none")
    held_out = [shd.put_local_batch(_model_batch(b, trainer.eval_batch_keys), trainer.mesh)
                for b in batch_source.eval_batches(int(config.eval.batches))]
  else:
    data_cfg = held_out_data_config(config)
    held_out = fixed_batches(data_cfg)
  if config.eval.by_source and not config.train.distill.precomputed:
    # A source's rows do not depend on the other sources' weights, so these are the same tokens for
    # any mixture of the same sources.
    for name in sorted(data_cfg.sources):
      alone = copy.deepcopy(data_cfg)
      for other, src in alone.sources.items():
        src.weight = 1.0 if other == name else 0.0
      by_source[name] = fixed_batches(alone)

  def loss_and_tokens(batches, state, frozen, teacher) -> tuple[float, float]:
    sums = [trainer.eval_fn(state["params"], frozen, b, teacher) for b in batches]
    loss_sum, weight = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    return loss_sum / max(weight, 1.0), weight

  def evaluate(step: int, state, frozen, teacher=None) -> float:
    loss, weight = loss_and_tokens(held_out, state, frozen, teacher)
    row = {"step": step, "eval_loss": loss, "eval_tokens": weight}
    if by_source:
      per_source = {name: loss_and_tokens(b, state, frozen, teacher) for name, b in by_source.items()}
      row["eval_loss_by_source"] = {name: v[0] for name, v in per_source.items()}
      row["eval_tokens_by_source"] = {name: v[1] for name, v in per_source.items()}
    writer.write_eval(row)
    log.info("step %d: held-out loss %.4f over %d tokens", step, row["eval_loss"], weight)
    return row["eval_loss"]

  return evaluate


def _progress(start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc="train", disable=not enabled or jax.process_index() != 0,
              dynamic_ncols=True)


def _log_memory(compiled) -> None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports it
    return
  if mem is not None:
    log.info("compiled step memory per device: %s", format_memory(mem))


def format_memory(mem) -> str:
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes")
  return ", ".join(f"{f.replace('_size_in_bytes', '')}={getattr(mem, f, 0) / 2**20:.1f} MiB" for f in fields)
