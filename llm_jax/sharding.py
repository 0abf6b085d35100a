"""Device mesh (data, fsdp, tensor) from the config, and shardings from logical axes."""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves the one allowed -1 and checks the product equals the device count."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed sizes' product {known} "
                f"does not divide the {num_devices} device(s) present; use sizes whose product "
                f"divides {num_devices}, or `llm_jax.train --compile_only` to plan a larger mesh")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are present; set one of mesh.data/fsdp/tensor to -1, or use "
            f"`llm_jax.train --compile_only` to plan a larger mesh")
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: GSPMD propagates shardings from the logical constraints we place.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules(mesh_cfg: ml_collections.ConfigDict) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_cfg.rules)


def axis_size(mesh: Mesh, logical: str, rule_table: tuple) -> int:
    """How many ways a logical axis is split on this mesh."""
    for name, axes in rule_table:
        if name == logical:
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            return math.prod(mesh.shape[a] for a in axes)
    return 1


def check_fits(config: ml_collections.ConfigDict, mesh: Mesh, rule_table: tuple) -> None:
    """Stops before compiling if the batch or the heads cannot be split on this mesh."""
    m, t = config.model, config.train
    batch_ways = axis_size(mesh, "batch", rule_table)
    micro = t.batch_size // t.microbatches
    if micro % batch_ways:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} (microbatch {micro}) is not divisible by "
            f"the {batch_ways} devices the batch is split over (mesh data x fsdp); "
            f"use a multiple of {batch_ways}")
    if micro % jax.process_count():
        raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by "
                          f"{jax.process_count()} processes")
    kv = m.num_kv_heads or m.num_heads
    for key, n, logical in (("num_heads", m.num_heads, "heads"),
                            ("num_kv_heads", kv, "kv_heads")):
        ways = axis_size(mesh, logical, rule_table)
        if n % ways:
            raise ConfigError(
                f"config.model.{key}={n} is not divisible by the {ways}-way split of "
                f"'{logical}' (mesh.tensor={mesh.shape['tensor']}); change one of them")
    for key, n, logical in (("mlp_dim", m.mlp_dim, "mlp"), ("d_model", m.d_model, "embed")):
        ways = axis_size(mesh, logical, rule_table)
        if n % ways:
            raise ConfigError(f"config.model.{key}={n} is not divisible by the {ways}-way "
                              f"split of '{logical}' on mesh {dict(mesh.shape)}")


def logical_shardings(abstract_tree: Any, mesh: Mesh, rule_table: tuple) -> Any:
    """NamedShardings for a tree of LogicallyPartitioned (boxed) abstract values."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def batch_sharding(mesh: Mesh, rule_table: tuple) -> NamedSharding:
    """Rows over the 'batch' logical axis; any further dims (sequence) replicated, so one
    sharding serves [batch] labels and [batch, length] tokens alike."""
    spec = nn.logical_to_mesh_axes(("batch",), rule_table)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
