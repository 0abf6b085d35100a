"""host_memory: the malloc settings apply on Linux/glibc, and LLM_JAX_MALLOC=0 opts out."""
import logging
import os
import subprocess
import sys

import pytest

from llm_jax import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_settings_apply_and_opt_out_is_respected(monkeypatch):
    monkeypatch.delenv("LLM_JAX_MALLOC", raising=False)
    assert host_memory.keep_freed_memory()
    monkeypatch.setenv("LLM_JAX_MALLOC", "0")
    assert not host_memory.keep_freed_memory()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_hosts_with_an_accelerator_keep_glibc_defaults_unless_forced(monkeypatch):
    monkeypatch.delenv("LLM_JAX_MALLOC", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory.cpu_only_host() and not host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.cpu_only_host()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_only_host()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setenv("LLM_JAX_MALLOC", "1")
    assert host_memory.keep_freed_memory()


@pytest.mark.parametrize("present,cpu_only", [
    ((), True), (("/dev/nvidiactl",), False), (("/dev/accel0",), False),
    (("/dev/vfio/0", "/dev/vfio/vfio"), False), (("/dev/vfio/vfio",), True),
    (("/dev/kfd",), False)])
def test_jax_platforms_unset_reads_the_accelerator_device_files(monkeypatch, present, cpu_only):
    # TPU v5e and later show their chips as /dev/vfio/N; /dev/vfio/vfio alone is no chip
    import fnmatch
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_memory.glob, "glob",
                        lambda pattern: [f for f in present if fnmatch.fnmatch(f, pattern)])
    assert host_memory.cpu_only_host() == cpu_only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
@pytest.mark.parametrize("size", [64 << 20, 2200 << 20])
def test_freed_large_blocks_stay_mapped(size):
    """After the settings, freeing and reallocating a block costs no new page faults (glibc's
    default unmaps it on free, so touching it again faults every page). 2.2 GB: a trim
    threshold of 2**31 - 1 gave a free heap top over 2 GB back to the OS."""
    code = r"""
import ctypes, resource, sys
import os
os.environ["LLM_JAX_MALLOC"] = sys.argv[1] == "on" and "1" or "0"
from llm_jax import host_memory  # the package import applies the settings, or not
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n, touched = int(sys.argv[2]), 64 << 20
def touch():  # only the last 64 MB: the block's pages are all mapped or all given back
    p = libc.malloc(n)
    ctypes.memset(p + n - touched, 1, touched)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {k: v for k, v in os.environ.items() if k != "LLM_JAX_MALLOC"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode, str(size)],
                                       capture_output=True,
                                       text=True, check=True, env=env).stdout.split()[-1])
              for mode in ("on", "off")}
    assert faults["on"] < 100 < (64 << 20) // 4096 // 2 < faults["off"], faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_allocator_hint_only_where_a_tunable_would_halve_the_peak(monkeypatch):
    """bench_small f32 under glibc: 7.8 GB for 1.38 GB of temporaries, 3.7 GB with the
    per-thread cache off (benchmarks/README.md)."""
    monkeypatch.setenv("LLM_JAX_MALLOC", "1")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    hint = host_memory.allocator_hint(7838, 1380)
    assert hint and "GLIBC_TUNABLES=glibc.malloc.tcache_count=0" in hint and "7,838" in hint
    assert host_memory.allocator_hint(3718, 1380) is None  # ~2x: nothing to gain
    assert host_memory.allocator_hint(900, 100) is None  # small steps: not worth a line
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    assert host_memory.allocator_hint(7838, 1380) is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mxfast=0")
    assert host_memory.allocator_hint(7838, 1380)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert host_memory.allocator_hint(7838, 1380) is None
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("LLM_JAX_MALLOC", "0")  # glibc's defaults: the settings are off
    assert host_memory.allocator_hint(7838, 1380) is None


def test_training_reads_the_note_from_the_step_it_already_compiled(monkeypatch, caplog):
    """The training log's note compares the peak with the train step's own temporaries,
    read without compiling the step again."""
    import jax
    import jax.numpy as jnp

    from llm_jax import trainer

    step = jax.jit(lambda s, b: (s + jnp.sort(jnp.tanh(b @ b.T), 0).sum(), s), donate_argnums=0)
    state, batch = jnp.zeros(()), jnp.ones((64, 256))
    state, _ = step(state, batch)
    seen = []
    monkeypatch.setattr(host_memory, "allocator_hint",
                        lambda peak, temp: seen.append((peak, temp)) or "hold less")
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        assert trainer.host_memory_note(step, state, batch) == "hold less"
    assert not [r.getMessage()[:80] for r in caplog.records if "Compiling" in r.getMessage()]
    (peak, temp), = seen
    want = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes / 2**20
    assert temp == want > 0 and peak == pytest.approx(host_memory.peak_rss_mb(), rel=0.01)
