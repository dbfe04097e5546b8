"""Shared test setup: 8 fake CPU devices (set before jax is imported) and tiny configs."""

import os
import sys

# Must happen before the first `import jax` anywhere in the test process. Most tests are bound by
# XLA:CPU compiles of tiny programs; without LLVM's optimisation passes those compile in about half
# the time (the matmuls stay library calls, so the numerics are the same and runs are barely slower).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests (and the `python -m emjax.main` children they start) compile the same tiny step;
# JAX's persistent compilation cache lets each distinct program compile once per test session.
# A fresh directory per session unless the caller names one, so no run depends on an older one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache_dir = tempfile.mkdtemp(prefix="emjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_overrides):
  """A 2-layer model on the built-in synthetic mixture; seconds per run on CPU."""
  from emjax.train import settings

  c = settings.base_config()
  c.model.update(family="llama", vocab_size=288, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  c.data.seq_len = 32
  c.train.update(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1)
  c.train.update(**train_overrides)
  c.checkpoint.update(every_steps=2, keep=3, async_save=False)
  return c


def subprocess_env(num_devices: int = 1) -> dict:
  """Environment for a child `python -m emjax.main`: its own device count, repo on the path."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  return env


@pytest.fixture
def one_device_mesh():
  import jax
  from emjax import sharding

  return sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def jaxpr_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (scan, custom_vjp, pjit)."""
  from jax.extend import core
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, core.ClosedJaxpr):
          yield from jaxpr_eqns(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          yield from jaxpr_eqns(sub)
