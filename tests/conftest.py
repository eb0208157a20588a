import os

# Eight host devices so multi-device tests run on CPU; single-device code still uses device 0.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# f32 parity with PyTorch needs full-precision matmuls on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each module's compiled programs and arrays when it ends, so a long run does not
  accumulate them (the suite compiles hundreds of programs in each worker)."""
  yield
  from valuedist.studies import engine
  engine.clear_programs()
  jax.clear_caches()
  gc.collect()
