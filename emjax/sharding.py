"""One mesh, one table of logical-axis rules, and the shardings derived from them.

The mesh always has the three axes ("data", "fsdp", "tensor"); their sizes come
from `config.mesh` (-1 = all remaining devices). Parameters name their
dimensions with logical axes (see models/transformer.py); `LOGICAL_RULES` is the
single place that decides which mesh axis each logical axis is split over, so
the same code runs on one CPU, eight fake CPU devices, one GPU or a TPU pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",  # parameters: FSDP shards the model width
    "embed_act": None,  # activations keep the width whole (batch is already split)
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
}

BATCH_AXES = LOGICAL_RULES["batch"]


def maybe_initialize_distributed(dist_cfg: Mapping[str, Any] | None = None, force: bool = False) -> None:
  """`jax.distributed.initialize(...)` when this is one process of a multi-process job.

  `dist_cfg` is `config.distributed`: with `num_processes` > 1 the three keys
  (`coordinator_address` host:port, `num_processes`, `process_id`) are passed as
  given, e.g. several processes on one machine (launch/multiprocess.sh). Left at
  their defaults, the cluster is detected: EMJAX_DISTRIBUTED=1 (set by
  launch/tpu/run.sh on a multi-worker slice, whose workers JAX finds in the
  TPU VM metadata, and by launch/gpu/slurm.sbatch) always initialises and
  EMJAX_DISTRIBUTED=0 never does; unset, TPU_WORKER_HOSTNAMES listing several
  workers, JAX_COORDINATOR_ADDRESS or SLURM_NTASKS > 1 mean a multi-process job.
  Single-host runs (CPU tests, Colab, one GPU) skip the call so they never wait
  for a coordinator. Must run before anything touches a device.
  """
  cfg = dict(dist_cfg or {})
  address = str(cfg.get("coordinator_address") or "")
  num_processes = int(cfg.get("num_processes") or 0)
  process_id = int(-1 if cfg.get("process_id") is None else cfg.get("process_id"))
  kwargs = {}
  if address or num_processes > 0 or process_id >= 0:
    if not address or num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          "config.distributed: set coordinator_address (host:port), num_processes (>= 1) and process_id "
          f"(0 .. num_processes-1) together, or none of them to detect the cluster; got "
          f"coordinator_address={address!r}, num_processes={num_processes}, process_id={process_id}")
    if num_processes == 1:
      return
    kwargs = dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)
  else:
    env = os.environ
    switch = env.get("EMJAX_DISTRIBUTED", "")
    if switch not in ("", "0", "1"):
      raise ValueError(f"EMJAX_DISTRIBUTED={switch!r}: expected 1 (initialise jax.distributed), 0 (never) "
                       "or unset (detect the cluster)")
    if switch == "0" and not force:
      return
    multi_process = (force or switch == "1" or bool(env.get("JAX_COORDINATOR_ADDRESS"))
                     or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                     or int(env.get("SLURM_NTASKS", "1") or 1) > 1)
    if not multi_process:
      return
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:  # already initialised by the launcher
    if "already" not in str(e):
      raise
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
  wildcard = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: mesh axis sizes must be positive or -1")
  if len(wildcard) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {wildcard}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if wildcard:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh: {describe(sizes)} needs a device count divisible by {fixed}, "
          f"but there are {num_devices} devices")
    sizes[wildcard[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh: {describe(sizes)} has {fixed} devices in total, "
        f"but there are {num_devices} devices; use -1 on one axis for 'the rest'")
  return tuple(sizes[a] for a in MESH_AXES)


def describe(sizes: Mapping[str, int]) -> str:
  return " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh; `devices` may come from a TPU topology (AOT)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  device_array = device_layout(shape, devices)
  # Auto axis types: shardings are propagated by the compiler; NNX and the
  # PartitionSpecs below are written for that mode.
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    return Mesh(device_array, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))
  return Mesh(device_array, MESH_AXES)


def device_layout(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as a mesh of `shape`, each mesh axis along physical links where possible.

  jax's `create_device_mesh` maps the mesh axes onto the TPU torus; by default it refuses to split
  one physical axis over several mesh axes, which rejects common shapes (on a v5e 4x4 slice:
  (2, 8, 1), (1, 8, 2), (4, 2, 2), (2, 1, 8)). Those are then asked for again with
  `allow_split_physical_axes=True`, which keeps every mesh axis on rings of neighbouring chips. Only
  when both fail do the devices go in jax's order, with a warning: collectives then cross
  non-neighbouring chips. Every outcome on a TPU is logged with the layout chosen.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  shape, devices = tuple(shape), list(devices)
  on_tpu = devices[0].platform == "tpu"
  what = f"mesh {describe(dict(zip(MESH_AXES, shape)))} on {len(devices)} {devices[0].device_kind} devices"
  try:
    array = mesh_utils.create_device_mesh(shape, devices)
    if on_tpu:
      log.info("%s: physical layout (%s)", what, physical_axes(array))
    return array
  except Exception as e:  # pylint: disable=broad-except
    refusal = " ".join(str(e).split())
  if on_tpu:
    try:
      array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      log.info("%s: physical layout with torus axes split across mesh axes (%s)", what, physical_axes(array))
      return array
    except Exception as e:  # pylint: disable=broad-except
      refusal = " ".join(str(e).split())
  array = np.asarray(devices).reshape(shape)
  log.log(logging.WARNING if on_tpu else logging.INFO,
          "%s: no physical layout (jax: %s); devices in jax's order, ids %s%s", what, refusal[:300],
          np.vectorize(lambda d: d.id)(array).tolist(), f" ({physical_axes(array)})" if on_tpu else "")
  return array


def physical_axes(array: np.ndarray) -> str:
  """Which torus axes (x, y, z of the devices' coords) each mesh axis of size > 1 runs along."""
  parts = []
  for i, axis in enumerate(MESH_AXES[:array.ndim]):
    if array.shape[i] == 1:
      continue
    coords = np.asarray([[list(getattr(d, "coords", ())) + [getattr(d, "core_on_chip", 0)] for d in row]
                         for row in np.moveaxis(array, i, -1).reshape(-1, array.shape[i])])
    varying = [name for k, name in enumerate(("x", "y", "z", "core")[:coords.shape[-1]])
               if (coords[:, :, k] != coords[:, :1, k]).any()]
    parts.append(f"{axis} along {'+'.join(varying) or '?'}")
  return ", ".join(parts) or "one device"


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
  """PartitionSpec for a tensor with the given logical axes.

  A dimension that the mesh axes do not divide evenly is replicated instead
  (e.g. 2 kv heads on tensor=4), so small models run on any mesh; a mesh axis is
  used at most once per tensor.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no rule in emjax.sharding.LOGICAL_RULES")
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    if axes and shape is not None and mesh is not None:
      if shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh):
  """NamedShardings for a pytree, from a matching pytree of logical-axis tuples."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)),
      logical_tree, abstract_tree, is_leaf=lambda t: isinstance(t, tuple))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- activation constraints

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("emjax_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None):
  """While tracing inside this context, `constrain` pins activations to the mesh."""
  token = _ACTIVE_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
  """The mesh of the enclosing `activation_sharding`, or None."""
  return _ACTIVE_MESH.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axes; a no-op outside `activation_sharding`."""
  mesh = _ACTIVE_MESH.get()
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def put_local_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local rows -> one global array per key, split over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}
