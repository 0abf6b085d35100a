"""8 fake CPU devices for every test, set before JAX initializes its backend."""
import os
import pathlib

os.chdir(pathlib.Path(__file__).resolve().parents[1])  # tests use configs/ and run `-m llm_jax`

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ["XLA_FLAGS"]
# LLVM at -O0 in this process only: its tiny models spend most of their time compiling
# (tests/test_models.py: 59 s instead of 150); HLO passes, and so the numerics, are unchanged.
# Training subprocesses keep the default: they run hundreds of steps, 2.6x slower at -O0
# (the benchmark, A/B and two-process tests, a few tiny steps each, pass -O0 themselves).
os.environ["XLA_FLAGS"] = _flags + " --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.devices()  # XLA parses XLA_FLAGS once, when the backend starts
os.environ["XLA_FLAGS"] = _flags
