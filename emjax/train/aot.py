"""Ahead-of-time compilation of the training step (or the sampler) from abstract shapes alone.

Nothing is materialised: the train state and the batch are `jax.ShapeDtypeStruct`s
carrying their shardings, so the step for a 7B model compiles on a laptop and
the compiled memory analysis says what one chip will need before anyone rents it.

`devices` are the local ones, or those of a TPU slice described by name
(`config.compile.topology`, e.g. v5e-16): libtpu compiles for a slice it is not
running on (`jax.experimental.topologies`), so the `compile` and `plan` jobs
run on a CPU with jax[tpu] installed.

The `plan` job adds, for that slice, what XLA says one device needs and does:

* memory: the compiled program's arguments, outputs, temporaries (peak =
  argument + output + temp - alias) against the chip's HBM. A program that
  does not fit is refused by XLA at compile time; the plan then compiles it
  again with the limit lifted, so the numbers are still printed, and says
  DOES NOT FIT.
* cost: XLA's FLOP and HBM-byte estimates (`compiled.cost_analysis()`). XLA
  counts a loop's body once whatever its trip count, and the TPU compiler
  turns sharded matmuls into loops of its own (windowed einsums), so the
  program itself undercounts. The cost comes from the same step compiled with
  1 and 2 layers, Python-unrolled, the step's own loops unrolled and the
  windowed einsums off (no loop left), extrapolated linearly to the model's
  depth: cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)); every layer
  compiles to the same code, so this is XLA's count for L layers.
* a roofline projection per device:
      step_s = max(flops / peak_bf16_flops, bytes_accessed / hbm_bytes_per_s)
  with the chip's figures (`perf.CHIPS`), and tokens/s = tokens per step /
  step_s. It leaves out inter-chip communication and imperfect overlap, so it
  is a lower bound on the step time (an upper bound on throughput).

For a sampling config (`config.compile.step='sample'`: the sample and eval jobs'
`config.sample`) the programs are the sampler's prefill of a batch at the largest
prompt bucket and its decode loop, whose cost is one decode step (the loop body,
counted once).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from emjax import config as config_lib
from emjax import sharding as shd
from emjax import weights as weights_lib
from emjax.models import transformer
from emjax.sample import run as sample_run
from emjax.sample import sampler as sampler_lib
from emjax.train import loop
from emjax.train import perf
from emjax.train import settings

log = logging.getLogger(__name__)

MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")
# The TPU compiler's windowed einsums (an all-gather or reduce-scatter overlapped with a matmul as
# a loop over shards) hide work from the cost analysis; the cost compiles turn them off.
NO_HIDDEN_LOOPS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                   "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
# What XLA's TPU compiler is told when a program exceeds HBM: compile it anyway, so its memory and
# cost can be reported (the plan says it does not fit).
COMPILE_ANYWAY = {"xla_tpu_no_crash_on_oom": True}
ROOFLINE = ("step_s = max(flops / peak_bf16_flops, bytes_accessed / hbm_bytes_per_s) per device "
            "(chip figures / devices per chip); inter-chip communication not included")
_LIBTPU_NAME = re.compile(r"^(?P<chip>[a-z0-9]+):(?P<dims>\d+(x\d+)*)$")
_SLICE_NAME = re.compile(r"^(?P<chip>[a-z0-9]+)-(?P<count>\d+)$")


# ----------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice to compile for: its chip, shape and compile-only devices."""

  name: str  # as given
  chip: perf.Chip
  dims: tuple[int, ...]  # chips along each torus axis
  devices: tuple[Any, ...]

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def devices_per_chip(self) -> int:
    # One device per chip (v5e, v6e, v5p's megacore); a v4 slice compiles one per TensorCore.
    return max(1, len(self.devices) // self.chips)


def parse_topology(name: str, key: str = "config.compile.topology") -> tuple[perf.Chip, tuple[int, ...]]:
  """'v5e-16' / 'v5litepod-16' / 'v5p-64' / 'v6e-64' / libtpu's 'v5e:4x4' -> (chip, dims).

  Slice names count what Cloud TPU counts: chips on v5e and v6e, TensorCores (two per
  chip) on v4 and v5p, so v5p-64 is 32 chips (2x4x4) and v5e-16 is 16 chips (4x4).
  """
  text = str(name).strip().lower()
  known = (f"known chips: {', '.join(perf.CHIPS)} (also {', '.join(perf.CHIP_ALIASES)}); write e.g. v5e-16 "
           "(16 chips), v5p-64 (64 TensorCores = 32 chips), or libtpu's v5e:4x4")
  m = _LIBTPU_NAME.match(text) or _SLICE_NAME.match(text)
  if m is None:
    raise ValueError(f"{key}={name!r} is not a TPU slice name; {known}")
  chip_name = perf.CHIP_ALIASES.get(m["chip"], m["chip"])
  if chip_name not in perf.CHIPS:
    raise ValueError(f"{key}={name!r}: unknown TPU chip {m['chip']!r}; {known}")
  chip = perf.CHIPS[chip_name]
  if "dims" in m.groupdict() and m["dims"]:
    dims = tuple(int(d) for d in m["dims"].split("x"))
    if len(dims) != chip.torus_dims or min(dims) < 1:
      raise ValueError(f"{key}={name!r}: a {chip.name} slice has {chip.torus_dims} axes, e.g. "
                       f"{chip.name}:{'x'.join(['4'] * chip.torus_dims)}")
    return chip, dims
  count = int(m["count"])
  what = "TensorCores (two per chip)" if chip.cores_per_chip > 1 else "chips"
  if count < chip.cores_per_chip or count % chip.cores_per_chip:
    raise ValueError(f"{key}={name!r}: {chip.name}-N counts {what}, so N must be a multiple of {chip.cores_per_chip}")
  chips = count // chip.cores_per_chip
  if chips & (chips - 1):
    raise ValueError(f"{key}={name!r}: {chips} chips is not a power of two; give the shape as "
                     f"{chip.name}:AxB{'xC' if chip.torus_dims == 3 else ''}")
  return chip, slice_shape(chips, chip.torus_dims)


def slice_shape(chips: int, torus_dims: int) -> tuple[int, ...]:
  """The Cloud TPU shape of a power-of-two slice: 16 -> 4x4, 32 -> 4x8 (2-D); 4 -> 2x2x1, 32 -> 2x4x4 (3-D)."""
  dims = [1] * torus_dims
  while math.prod(dims) < chips:
    dims[dims.index(min(dims))] *= 2
  return tuple(sorted(d for d in dims if d > 1) + [1] * dims.count(1)) if chips > 1 else tuple(dims)


def topology(name: str, key: str = "config.compile.topology") -> Topology:
  """The compile-only devices of a TPU slice (libtpu, from jax[tpu]; no TPU needed)."""
  chip, dims = parse_topology(name, key)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  libtpu_name = f"{chip.name}:{'x'.join(map(str, dims))}"
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it loads, meant for the process
  # that drives the chips; compiling for a topology drives none, so plans may run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(libtpu_name, "tpu")
  except RuntimeError as e:
    if "not installed" in str(e):  # jax finds no libtpu
      raise RuntimeError(f"{key}={name!r}: compiling for a TPU slice needs libtpu: pip install 'jax[tpu]' "
                         f"(the same version as jax {jax.__version__}); jax says: {e}") from None
    if "chips_per_host_bounds" not in str(e):
      raise
    # A slice smaller than one host: the host is the slice.
    bounds = tuple(dims) + (1,) * (3 - len(dims))
    desc = topologies.get_topology_desc(libtpu_name, "tpu", chips_per_host_bounds=bounds)
  return Topology(name=str(name), chip=chip, dims=dims, devices=tuple(desc.devices))


def devices_for(config) -> list | None:
  """`config.compile.topology`'s devices, or None (the local devices)."""
  name = config.compile.topology
  return list(topology(name).devices) if name else None


# ----------------------------------------------------------------------------- compile job


def compile_step(config, devices=None, compiler_options=None, unroll_loops: bool = False):
  mesh = shd.make_mesh(config.mesh, devices)
  trainer = loop.Trainer(config, mesh, unroll_loops=unroll_loops)
  t0 = time.perf_counter()
  compiled = trainer.compile(compiler_options)
  return trainer, compiled, time.perf_counter() - t0


def memory_bytes(compiled) -> dict[str, int] | None:
  """Per-device bytes of a compiled program (XLA's memory analysis) and the peak estimate
  argument + output + temp - alias; None where the platform reports none."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  out = {f: int(getattr(mem, f"{f}_size_in_bytes", 0)) for f in MEMORY_FIELDS}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def compile_and_report(config, workdir: str, devices=None) -> dict:
  devices = devices if devices is not None else devices_for(config)
  trainer, compiled, seconds = compile_step(config, devices)
  per_device = memory_bytes(compiled)
  report = {
      "num_params": trainer.model_cfg.num_params(),
      "mesh": dict(trainer.mesh.shape),
      "devices": trainer.mesh.size,
      "device_kind": trainer.mesh.devices.flat[0].device_kind,
      "topology": config.compile.topology or None,
      "compile_seconds": round(seconds, 2),
      "batch_size": int(config.train.batch_size), "grad_accum_steps": int(config.train.grad_accum_steps),
      "seq_len": int(config.data.seq_len),
      "frozen_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(trainer.layout.frozen_abstract)}),
      "memory_per_device_bytes": ({k: v for k, v in per_device.items() if k != "peak"}
                                  if per_device is not None else None),
  }
  if per_device is not None:
    report["peak_estimate_per_device_gib"] = round(per_device["peak"] / 2**30, 3)
  print(json.dumps(report))
  _write(workdir, "compile.json", report)
  return report


def _write(workdir: str, name: str, report: dict) -> None:
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, name), "w") as f:
      json.dump(report, f, indent=2)


# ----------------------------------------------------------------------------- plan job


def _is_oom(e: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e)


def _compile_or_oom(build: Callable[[dict | None], Any]) -> tuple[Any, str | None]:
  """(compiled, None), or, when XLA refuses the program for HBM, the program compiled anyway and
  XLA's refusal (the plan still reports the numbers of what does not fit). Newer libtpu builds no
  program past HBM even when told to ("Invalid TPU program"): then (None, refusal), and the plan's
  memory comes from the refusal and the arguments' shapes (`_memory_without_program`)."""
  try:
    return build(None), None
  except jax.errors.JaxRuntimeError as e:
    if not _is_oom(e):
      raise
    refusal = " ".join(str(e).split())
  try:
    return build(dict(COMPILE_ANYWAY)), refusal
  except jax.errors.JaxRuntimeError as e:
    if not (_is_oom(e) or "Invalid TPU program" in str(e)):
      raise
    log.warning("XLA compiles no program past HBM here (%s); the plan reports its refusal and the arguments' "
                "bytes", " ".join(str(e).split())[:200])
    return None, refusal


_REFUSAL_BYTES = re.compile(r"(?:memory required[^(]*\(|Used\s+)(\d+(?:\.\d+)?)\s*([KMGT]?)")


def _refusal_bytes(refusal: str) -> int | None:
  """The bytes XLA's HBM refusal says the program needs ("... required ... (38.13G)", "Used 28.5G of ...")."""
  m = _REFUSAL_BYTES.search(refusal or "")
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def per_device_bytes(abstract_trees: Sequence[Any]) -> int:
  """Bytes one device holds of sharded abstract arrays (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_trees):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _memory_without_program(arguments: int | None, refusal: str) -> dict:
  """The per-device bytes of a program XLA refused and did not build: its arguments (from their
  shapes) and the peak the refusal states (at least the arguments); the rest unknown (None)."""
  out: dict[str, Any] = {f: None for f in MEMORY_FIELDS}
  out["argument"] = arguments
  known = [x for x in (_refusal_bytes(refusal), arguments) if x is not None]
  out["peak"] = max(known) if known else None
  out["from"] = "XLA's refusal and the arguments' shapes (no program was built past HBM)"
  return out


def _cost(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0]
  return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
          "loops_left": compiled.as_text().count(" while(")}


def extrapolated_cost(cost_at: Callable[[int, dict], dict], n_layers: int) -> dict:
  """XLA's per-device cost at `n_layers` from compiles at 1 and 2 layers (see the module docstring).

  `cost_at(layers, compiler_options)` compiles the program at that depth and returns `_cost`.
  """
  # Compiled anyway: the cost of a program that does not fit is still what the plan reports (the
  # option only changes what XLA does when HBM runs out).
  options = dict(NO_HIDDEN_LOOPS, **COMPILE_ANYWAY)
  one = cost_at(1, options)
  if n_layers == 1:
    return dict(one, layers_compiled=[1])
  two = cost_at(2, options)
  out = {k: one[k] + (n_layers - 1) * (two[k] - one[k]) for k in ("flops", "bytes_accessed")}
  out["loops_left"] = max(one["loops_left"], two["loops_left"])
  out["layers_compiled"] = [1, 2]
  return out


def roofline(cost: Mapping[str, float], topo: Topology) -> dict:
  """Projected seconds of one program run on one device (see ROOFLINE)."""
  per = topo.devices_per_chip
  compute_s = cost["flops"] / (topo.chip.peak_bf16_flops / per)
  memory_s = cost["bytes_accessed"] / (topo.chip.hbm_bytes_per_s / per)
  return {"compute_s": compute_s, "memory_s": memory_s, "seconds": max(compute_s, memory_s),
          "bound": "compute" if compute_s >= memory_s else "memory"}


def _memory_report(per_device: dict[str, int], hbm: int, refusal: str | None) -> dict:
  return {"per_device_bytes": per_device, "hbm_per_device_bytes": hbm,
          "hbm_fraction": round(per_device["peak"] / hbm, 4) if per_device["peak"] is not None else None,
          "fits": refusal is None, "xla_refusal": refusal}


def _with_layers(config, n_layers: int, teacher_dir: str | None = None):
  """`config` at `n_layers` Python-unrolled layers; a teacher too, rewritten as a run directory
  `teacher_dir` whose config.json describes it at that depth (no weights are read by a plan)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.update(n_layers=n_layers, scan_layers=False)
    if teacher_dir is not None:
      src = weights_lib.resolve(config.teacher.path, key="config.teacher.path")
      teacher = settings.base_config()
      teacher.model.update(dataclasses.asdict(dataclasses.replace(src.model_cfg, n_layers=n_layers,
                                                                  scan_layers=False)))
      teacher.data.tokenizer = dict(src.tokenizer)
      os.makedirs(teacher_dir, exist_ok=True)
      config_lib.write_config(teacher, teacher_dir)
      c.teacher.path = teacher_dir
  return c


def plan_train(config, topo: Topology) -> dict:
  """The training step of `config` on `topo`: memory, XLA's cost, the roofline projection."""
  if config.lora.enabled and str(config.lora.layers).strip():
    raise ValueError("config.lora.layers: adapters on some layers only differ from layer to layer, which the "
                     "plan's per-layer cost extrapolation assumes they do not; plan with lora.layers='' (all)")
  mesh = shd.make_mesh(config.mesh, topo.devices)
  hbm = topo.chip.hbm_bytes // topo.devices_per_chip
  trainer = loop.Trainer(config, mesh)
  t0 = time.perf_counter()
  compiled, refusal = _compile_or_oom(trainer.compile)
  teacher = trainer.teacher.abstract if trainer.teacher is not None else None
  args = per_device_bytes([trainer.layout.abstract, trainer.layout.frozen_abstract, trainer.batch_abstract, teacher])
  if compiled is None:
    memory = _memory_report(_memory_without_program(args, refusal), hbm, refusal)
  else:
    memory = _memory_report(memory_bytes(compiled), hbm, refusal)
  compile_s = time.perf_counter() - t0

  if trainer.teacher is not None and trainer.teacher_model_cfg.n_layers != trainer.model_cfg.n_layers:
    raise ValueError(f"config.teacher.path={config.teacher.path}: a teacher of {trainer.teacher_model_cfg.n_layers} "
                     f"layers and a student of {trainer.model_cfg.n_layers}: the plan's cost extrapolation takes "
                     "both at 1 and 2 layers, so it needs them equally deep")

  with tempfile.TemporaryDirectory(prefix="emjax-plan-") as tmp:
    def cost_at(layers, options):
      teacher_dir = os.path.join(tmp, f"teacher-{layers}") if trainer.teacher is not None else None
      shallow = loop.Trainer(_with_layers(config, layers, teacher_dir), mesh, unroll_loops=True)
      return _cost(shallow.compile(options))

    try:
      cost = extrapolated_cost(cost_at, trainer.model_cfg.n_layers)
    except jax.errors.JaxRuntimeError as e:
      # Even one layer is past HBM, and this libtpu builds no such program: no XLA cost to read. The
      # model's FLOPs and one read of the arguments stand in, both lower bounds, and say so.
      if compiled is not None or not (_is_oom(e) or "Invalid TPU program" in str(e)):
        raise
      cost = {"flops": trainer.flops_per_step() / mesh.size, "bytes_accessed": float(args),
              "from": "lower bounds: the model's FLOPs per device and one read of the arguments (XLA built no "
                      "program past HBM to analyse)"}
  step = roofline(cost, topo)
  tc = config.train
  tokens = int(tc.batch_size) * int(config.data.seq_len)
  report = _header(config, topo, mesh, trainer.model_cfg, "train")
  report.update(
      batch_size=int(tc.batch_size), grad_accum_steps=int(tc.grad_accum_steps), seq_len=int(config.data.seq_len),
      tokens_per_step=tokens, lora=bool(config.lora.enabled), teacher=trainer.teacher is not None,
      memory=memory, cost_per_device=cost,
      projection=dict(step, tokens_per_s=tokens / step["seconds"] if step["seconds"] > 0 else None, formula=ROOFLINE),
      compile_seconds=round(time.perf_counter() - t0, 1), memory_compile_seconds=round(compile_s, 1))
  return report


def _header(config, topo: Topology, mesh, model_cfg, step: str) -> dict:
  return {
      "plan": step, "topology": topo.name, "libtpu_topology": topo.libtpu_name, "chip": topo.chip.name,
      "chips": topo.chips, "devices": len(topo.devices), "devices_per_chip": topo.devices_per_chip,
      "device_kind": topo.devices[0].device_kind, "mesh": dict(mesh.shape),
      "chip_figures": {"hbm_bytes": topo.chip.hbm_bytes, "peak_bf16_flops": topo.chip.peak_bf16_flops,
                       "hbm_bytes_per_s": topo.chip.hbm_bytes_per_s},
      "num_params": model_cfg.num_params(), "n_layers": model_cfg.n_layers, "family": model_cfg.family,
      "jax": jax.__version__,
  }


def sample_model_config(config):
  """The sampled model: `config.model` when every key is set, else the architecture of
  `config.sample.hf` / `.checkpoint` (their config.json only; no weights are read)."""
  if all(v is not None for v in dict(config.model).values()):
    return transformer.TransformerConfig.from_config(config.model)
  if not (config.sample.hf or config.sample.checkpoint):
    unset = sorted(k for k, v in dict(config.model).items() if v is None)
    raise ValueError(f"config.model.{unset[0]} is not set: a sampling plan takes the architecture from config.model "
                     "(every key) or from config.sample.hf / config.sample.checkpoint (config.json only)")
  model_cfg, _ = sample_run.resolve_model_config(config, sample_run.resolve_source(config))
  return model_cfg


def _with_sharding(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def _sampler_programs(model_cfg, mesh, sc, options: dict | None, *, lora=None, weights=None):
  """Compiled (prefill, decode) of the sample job's sampler at its largest prompt bucket.

  `lora` + `weights`: a LoRA student sampled with its adapters applied (the on-policy source's
  sampler), `weights` the abstract `lora.merge_trees(frozen, adapters)` with the train state's
  shardings; default: the full parameters of `model_cfg`, as the sample job loads them."""

  shape = _sampler_shape(mesh, sc)
  bucket, cap, n, prompts, rows = (shape[k] for k in ("prompt_bucket", "max_new_tokens", "n", "prompts", "rows"))
  sampler = sampler_lib.Sampler(model_cfg, mesh=mesh, prompt_buckets=(bucket,), max_new_tokens_cap=cap,
                                prefill_chunk=int(sc.prefill_chunk), top_logprobs=int(sc.top_logprobs),
                                unroll_layers=bool(sc.unroll_layers), lora=lora)
  if weights is None:
    weights = weights_lib.abstract_params(sampler.model_cfg, mesh)
  if sampler.unroll_layers:  # the per-layer layout `prepare_weights` hands the compiled functions
    lowered = sampler.unstack_fn.lower(weights)
    weights = _with_sharding(lowered.out_info, lowered.compile().output_shardings)
  batch = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))  # noqa: E731
  lowered = sampler.prefill_fn.lower(weights, batch((prompts, bucket), jnp.int32), batch((prompts,), jnp.int32), n=n)
  prefill = lowered.compile(compiler_options=options)
  cache = _with_sharding(lowered.out_info, prefill.output_shardings)
  replicated = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=shd.replicated(mesh))  # noqa: E731
  knobs = {"seed": replicated(jnp.uint32), "max_new_tokens": replicated(jnp.int32),
           "temperature": replicated(jnp.float32), "top_k": replicated(jnp.int32), "top_p": replicated(jnp.float32),
           "min_p": replicated(jnp.float32)}
  rules = sampler_lib.SamplingParams(temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p),
                                     min_p=float(sc.min_p)).rules
  stop = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=shd.replicated(mesh))
  decode = sampler.decode_fn.lower(
      weights, cache, batch((rows,), jnp.int32), batch((rows,), jnp.int32), batch((rows,), jnp.bool_),
      batch((rows,), jnp.uint32), batch((rows,), jnp.uint32), stop, knobs, batch((rows,), jnp.int32),
      rules=rules).compile(
          compiler_options=options)
  return prefill, decode, shape


def _sampler_shape(mesh, sc) -> dict:
  """The sample job's largest batch: its prompt bucket, output cap, samples per prompt, prompts and rows."""
  buckets = tuple(sc.prompt_buckets) or sampler_lib.make_buckets(int(sc.max_prompt_length))
  dp = shd.data_parallel_size(mesh) if mesh is not None and mesh.size > 1 else 1
  prompts = -(-int(sc.batch_size) // dp) * dp  # as `Sampler.generate` pads the batch
  return dict(prompt_bucket=max(buckets), max_new_tokens=int(sc.max_new_tokens_cap) or int(sc.max_new_tokens),
              n=int(sc.n), prompts=prompts, rows=prompts * int(sc.n))


def plan_sample(config, topo: Topology) -> dict:
  """The sampler of `config.sample` on `topo`: prefill of a batch + the decode loop."""
  if config.get("sample") is None:
    raise ValueError("config.compile.step='sample' plans config.sample (the sample and eval jobs' sampler); "
                     "this config has no sample block")
  sc = config.sample
  model_cfg = sample_model_config(config)
  mesh = shd.make_mesh(config.mesh, topo.devices)
  hbm = topo.chip.hbm_bytes // topo.devices_per_chip
  t0 = time.perf_counter()
  programs = {}

  def build(options):
    programs["prefill"], programs["decode"], programs["shape"] = _sampler_programs(model_cfg, mesh, sc, options)
    return programs

  built, refusal = _compile_or_oom(build)
  shape = _sampler_shape(mesh, sc)
  memory = {}
  for name in ("prefill", "decode"):
    # No program past HBM (see _compile_or_oom): what the refusal says, for both.
    per_device = memory_bytes(programs[name]) if built is not None else _memory_without_program(None, refusal)
    memory[name] = _memory_report(per_device, hbm, refusal)
  compile_s = time.perf_counter() - t0

  compiled_at: dict[tuple, dict] = {}  # prefill and decode compile together: once per depth

  def cost_of(which):
    def cost_at(layers, options):
      key = (layers, tuple(sorted(options.items())))
      if key not in compiled_at:
        shallow = dataclasses.replace(model_cfg, n_layers=layers)
        prefill, decode, _ = _sampler_programs(shallow, mesh, sc, options)
        compiled_at[key] = {"prefill": _cost(prefill), "decode": _cost(decode)}
      return compiled_at[key][which]
    return cost_at

  cost, projection = {}, {}
  for which in ("prefill", "decode"):
    cost[which] = extrapolated_cost(cost_of(which), model_cfg.n_layers)
    projection[which] = roofline(cost[which], topo)
  decode_s, prefill_s = projection["decode"]["seconds"], projection["prefill"]["seconds"]
  batch_s = prefill_s + shape["max_new_tokens"] * decode_s
  report = _header(config, topo, mesh, model_cfg, "sample")
  report.update(shape)
  report.update(
      memory=memory, fits=refusal is None, cost_per_device=cost,
      projection=dict(projection, decode_tokens_per_s=shape["rows"] / decode_s if decode_s > 0 else None,
                      batch_seconds=batch_s,
                      new_tokens_per_s=shape["rows"] * shape["max_new_tokens"] / batch_s if batch_s > 0 else None,
                      formula=ROOFLINE + "; decode: one step (the loop body); a batch: prefill + "
                      "max_new_tokens decode steps"),
      compile_seconds=round(time.perf_counter() - t0, 1), memory_compile_seconds=round(compile_s, 1))
  return report


PLAN_STEPS = ("train", "sample")


def plan(config, workdir: str) -> dict:
  """The `plan` job: compile for `config.compile.topology`, report, write WORKDIR/plan.json."""
  cc = config.compile
  if not cc.topology:
    raise ValueError("config.compile.topology: the plan job compiles for a TPU slice; name one, e.g. v5e-16, "
                     "v5p-64 or v6e-64")
  if cc.step not in PLAN_STEPS:
    raise ValueError(f"config.compile.step={cc.step!r}: plan one of {', '.join(PLAN_STEPS)}")
  topo = topology(cc.topology)
  report = plan_train(config, topo) if cc.step == "train" else plan_sample(config, topo)
  print(json.dumps(report))
  for line in describe(report):
    print(line)
  if not plan_fits(report):
    log.warning("%s DOES NOT FIT on %s", report["plan"], report["topology"])
  _write(workdir, "plan.json", report)
  return report


def plan_fits(report: Mapping) -> bool:
  return report["memory"]["fits"] if report["plan"] == "train" else report["fits"]


def _pct(fraction: float | None) -> str:
  return "?%" if fraction is None else f"{100 * fraction:.0f}%"


def _gib(x: float | None) -> str:
  return "? GiB" if x is None else f"{x / 2**30:.2f} GiB"


def describe(report: Mapping) -> list[str]:
  """The plan in a few lines of text."""
  head = (f"plan ({report['plan']}) on {report['topology']} ({report['libtpu_topology']}, {report['chips']} chips, "
          f"{report['devices']} devices), mesh {report['mesh']}")
  lines = [head]
  programs = ({"step": (report["memory"], report["cost_per_device"], report["projection"])}
              if report["plan"] == "train" else
              {k: (report["memory"][k], report["cost_per_device"][k], report["projection"][k])
               for k in ("prefill", "decode")})
  for name, (mem, cost, proj) in programs.items():
    b = mem["per_device_bytes"]
    fit = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"  {name}: per device {_gib(b['peak'])} peak of {_gib(mem['hbm_per_device_bytes'])} HBM "
                 f"({_pct(mem['hbm_fraction'])}, {fit}): arguments {_gib(b['argument'])}, "
                 f"temporaries {_gib(b['temp'])}, outputs {_gib(b['output'])} (aliased {_gib(b['alias'])})")
    lines.append(f"  {name}: XLA per device {cost['flops'] / 1e12:.3f} TFLOP, {cost['bytes_accessed'] / 1e9:.2f} GB "
                 f"-> {1e3 * proj['seconds']:.2f} ms ({proj['bound']}-bound: compute {1e3 * proj['compute_s']:.2f} ms, "
                 f"HBM {1e3 * proj['memory_s']:.2f} ms)")
    if not mem["fits"]:
      lines.append(f"  {name}: DOES NOT FIT: {mem['xla_refusal']}")
  p = report["projection"]
  if report["plan"] == "train":
    lines.append(f"  projected {p['tokens_per_s']:,.0f} tokens/s ({report['tokens_per_step']} tokens per step)")
  else:
    lines.append(f"  projected decode {p['decode_tokens_per_s']:,.0f} tokens/s ({report['rows']} rows); a batch "
                 f"of {report['max_new_tokens']} new tokens in {p['batch_seconds']:.2f} s "
                 f"({p['new_tokens_per_s']:,.0f} new tokens/s)")
  lines.append(f"  roofline: {p['formula']}")
  return lines
