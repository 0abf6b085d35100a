"""Ahead-of-time compilation of the train step, to learn per-device memory before running.

`python -m llm_jax.train --config ... --compile_only` compiles the step for the configured
mesh (on CPU, a mesh larger than the machine is made of fake host devices) and prints
where each device's memory goes. Nothing is trained, no data is read.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from llm_jax import metrics, objectives, sharding, trainer
from llm_jax.config import ConfigError


def mesh_devices(mesh_cfg: ml_collections.ConfigDict) -> int:
    """Devices the mesh asks for (a -1 counts as 1: it takes whatever is present)."""
    return math.prod(max(mesh_cfg[a], 1) for a in sharding.MESH_AXES)


def per_device_bytes(abstract: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
    return total


# HBM per chip, bytes, keyed by a substring of device_kind (metrics.by_device_kind).
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30,
             "TPU v6 lite": 32 * 2**30}



def tpu_devices(topology: str) -> list[jax.Device]:
    """Compile-only devices of a TPU pod, e.g. 'v5p:4x4x4', through libtpu's AOT path;
    works on a CPU-only machine with the `jax[tpu]` extra installed."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology={topology} needs libtpu: pip install "
                          f"'jax[tpu]=={jax.__version__}' (or: pip install -e '.[tpu]')")
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # compiling only: no chip to lock
        os.environ.setdefault(key, value)  # no TPU VM here: skip the metadata lookups
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # libtpu's message names what it could not parse
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(f"--topology={topology!r} is not a TPU topology libtpu knows "
                          f"({reason}); use a name like v5p:4x4x4 or v5e:16x16") from None


def compile_report(config: ml_collections.ConfigDict,
                   topology: str | None = None) -> dict[str, Any]:
    """Compiles the train step for config's mesh (on a TPU pod's compile-only devices with
    `topology`); returns per-device memory in bytes."""
    devices = tpu_devices(topology) if topology else None
    tr = trainer.Trainer(config, "", vocab_size=trainer.synthetic_vocab(config),
                         devices=devices)
    t = config.train
    mesh, rules, model, tx, lr, batch_sh = tr.mesh, tr.rules, tr.model, tr.tx, tr.lr, tr.batch_sh
    with nn.logical_axis_rules(rules):  # outside set_mesh: optax's init runs eagerly
        _, state_sh, abstract = trainer.state_init(model, tx, tr.example, t.seed, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = {k: jax.ShapeDtypeStruct((t.batch_size, *shape), np.int32, sharding=batch_sh)
                 for k, shape in objectives.feature_shapes(config).items()}
        step = trainer.jit_train_step(model, tr.objective, tx, lr, t, state_sh, batch_sh)
        start = time.perf_counter()
        compiled = step.lower(abstract, batch).compile()
        seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    params = per_device_bytes(abstract.params)
    opt = per_device_bytes(abstract.opt_state)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    kind = mesh.devices.flat[0].device_kind
    return {
        "mesh": dict(mesh.shape), "device_kind": kind,
        "hbm_bytes": metrics.by_device_kind(HBM_BYTES, kind),
        "params": n_params, "compile_s": seconds,
        "model_flops_per_token": tr.flops_per_token(),
        "params_bytes": params, "optimizer_bytes": opt,
        "batch_bytes": per_device_bytes(batch),
        # XLA's buffer assignment: activations kept for the backward pass and scratch space
        "temporaries_bytes": int(mem.temp_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        "total_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                           - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
    }


def format_report(r: dict[str, Any]) -> str:
    mb = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [("mesh", str(r["mesh"])), ("device kind", r["device_kind"]),
            ("parameters", f"{r['params']:,}"), ("compile", f"{r['compile_s']:.1f} s"),
            ("params / device", mb(r["params_bytes"])),
            ("optimizer state / device", mb(r["optimizer_bytes"])),
            ("batch / device", mb(r["batch_bytes"])),
            ("activations + temporaries / device", mb(r["temporaries_bytes"])),
            ("total / device", mb(r["total_bytes"]))]
    if r.get("hbm_bytes"):
        share = (r["total_bytes"] + r["generated_code_bytes"]) / r["hbm_bytes"]
        # the runtime reserves some HBM too: past 90% a step may still run out
        verdict = "fits" if share <= 0.9 else "tight: may not fit" if share <= 1 else \
            "DOES NOT FIT"
        rows.append(("HBM per chip", f"{mb(r['hbm_bytes'])}: {share:.0%} used with the "
                     f"program, {verdict}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
