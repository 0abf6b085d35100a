"""What this host's CPU can do for matmuls, read from /proc/cpuinfo.

XLA:CPU multiplies bf16 natively only with avx512_bf16 or amx_bf16 (~10x the bf16 speed
of an AVX2-only host); elsewhere its bf16 dots run slower than f32 ones (an AVX2-only AMD
EPYC: 86-106 vs. 126-175 GFLOP/s; benchmarks/README.md), so the model's CPU dots take such
operands in f32 there (`layers.cpu_dot_operands`).
"""
from __future__ import annotations

import functools
import os
import platform
import re

import jax.numpy as jnp

# the vector extensions that decide XLA:CPU's matmul speed, as the benchmark reports them
CPU_MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
# x86 flags, or ARM features, that multiply 16-bit floats natively (by the instruction
# sets; measured only for bf16 on x86: AVX2-only, avx512_bf16 and AMX hosts)
_NATIVE = {"bfloat16": ("avx512_bf16", "amx_bf16", "bf16"),
           "float16": ("avx512_fp16", "amx_fp16", "fphp")}


def _read(cpuinfo: str) -> str | None:
    try:
        with open(cpuinfo) as f:
            return f.read()
    except OSError:  # not Linux
        return None


def _flags(text: str) -> set[str] | None:
    """The CPU's flags (x86) or features (ARM), None if the text names neither."""
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else None


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host's CPU model, its core count and which of CPU_MATMUL_FLAGS it has, e.g.
    'AMD EPYC, 2 cores, avx2 fma (no avx512f avx512_bf16 amx_bf16)'; CPU figures compare
    only between hosts with the same flags."""
    text = _read(cpuinfo)
    if text is None:
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    have = _flags(text) or set()
    yes = [f for f in CPU_MATMUL_FLAGS if f in have]
    no = [f for f in CPU_MATMUL_FLAGS if f not in have]
    return (f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores, "
            f"{' '.join(yes) or 'no AVX2'}" + (f" (no {' '.join(no)})" if no else ""))


@functools.cache
def dot_dtype(dtype: jnp.dtype, cpuinfo: str = "/proc/cpuinfo") -> jnp.dtype:
    """The dtype this host's CPU should multiply `dtype` operands in: float32 for a 16-bit
    float it has no native dot for, else `dtype` itself (also where the flags cannot be
    read: nothing is changed on a guess)."""
    dtype = jnp.dtype(dtype)
    if dtype.name not in _NATIVE:
        return dtype
    text = _read(cpuinfo)
    flags = _flags(text) if text is not None else None
    if flags is None or flags & set(_NATIVE[dtype.name]):
        return dtype
    return jnp.dtype(jnp.float32)
