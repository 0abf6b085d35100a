"""glibc malloc settings that let XLA:CPU reuse its buffers from one step to the next.

XLA:CPU allocates each step's temporaries (hundreds of MB) and outputs afresh. glibc serves
large blocks with mmap and unmaps them on free, so every step faults all of that memory in
again, a page at a time: a train step spent ~10% in the kernel, and a matmul writing a new
25 MB output ran 2.5x slower. One arena that never uses mmap and never trims keeps the
pages mapped (bench_small without remat: 4,100 -> 5,100-5,400 tokens/s;
benchmarks/README.md). One, not glibc's 8 per core: a thread's own arena cannot serve a block over
64 MB without mmap (with 2 arenas, runs were 4,100 or 5,100 by chance).
The cost: the process keeps its peak host memory, several times a step's temporaries: XLA
allocates the next step's a moment before it frees the last one's, and glibc 2.36's
posix_memalign wants 96 bytes more than the freed block, so the heap cycles through 3-5 such
blocks (tcmalloc, by LD_PRELOAD, holds ~2; so does glibc with its per-thread cache off,
GLIBC_TUNABLES=glibc.malloc.tcache_count=0, which lets memalign's freed slivers merge again:
benchmarks/README.md). Hosts with an accelerator keep glibc's defaults (their step buffers
live on the device); LLM_JAX_MALLOC=0 or 1 forces the choice.
It must run before JAX starts its threads, so `llm_jax/__init__.py` calls it.
"""
from __future__ import annotations

import ctypes
import glob
import os
import resource
import sys

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


# device files of accelerators: NVIDIA GPUs; TPU v2-v4 (accel) and v5e and later (vfio);
# AMD GPUs (kfd)
_ACCELERATOR_FILES = ("/dev/nvidiactl", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def cpu_only_host() -> bool:
    """JAX_PLATFORMS names only cpu or, unset, no GPU or TPU device file exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def _wanted() -> bool:
    """On Linux, on CPU-only hosts (LLM_JAX_MALLOC=1: on any host; 0: never)."""
    choice = os.environ.get("LLM_JAX_MALLOC", "")
    if choice == "0" or not sys.platform.startswith("linux"):
        return False
    return choice == "1" or cpu_only_host()


def keep_freed_memory() -> bool:
    """Apply the settings where `_wanted` and the C library is glibc; True if they were
    applied."""
    if not _wanted():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError, TypeError):  # not glibc (e.g. musl): leave it be
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 (SIZE_MAX to glibc) never trims; 2**31 - 1 still trimmed a free top over 2 GB, which
    # two freed 1.4 GB step temporaries make, and the next step faulted it all in again
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocator_hint(peak_mb: float, temp_mb: float) -> str | None:
    """One line on holding host memory down, for a run under these settings whose peak
    exceeds a ~1 GB base by 3 or more times its step temporaries (256 MB or more), unless
    the process already runs with glibc's per-thread cache off or another allocator; else
    None."""
    if not _wanted() or temp_mb < 256 or peak_mb - 1024 < 3 * temp_mb:
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if ("tcache_count=0" in os.environ.get("GLIBC_TUNABLES", "")
            or any(lib in preload for lib in ("tcmalloc", "jemalloc", "mimalloc"))):
        return None
    return (f"host memory peaked at {peak_mb:,.0f} MB for {temp_mb:,.0f} MB of step "
            "temporaries; start the process with GLIBC_TUNABLES=glibc.malloc.tcache_count=0 "
            "(or tcmalloc by LD_PRELOAD) to hold about half that (benchmarks/README.md)")
