"""8 fake CPU devices for every test, set before JAX initializes its backend."""
import os
import pathlib

os.chdir(pathlib.Path(__file__).resolve().parents[1])  # tests use configs/ and run `-m llm_jax`

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
