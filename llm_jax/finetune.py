"""Fine-tuning: start a run from a pretrained run's tokenizer and matching parameters.

`--config.train.init_from=PRETRAINED_WORKDIR` loads every parameter whose path and shape
match from that run's newest checkpoint, initializes the rest (new heads) fresh, and
reports both; a parameter whose shape differs stops the run with one line. The optimizer
state and step start fresh. Each run saves its tokenizer as WORKDIR/tokenizer.model, so a
fine-tuning run reads text exactly as its pretrained model did.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from llm_jax import files
from llm_jax.config import ConfigError
from llm_jax.data import tokenizer

TOKENIZER_FILE = "tokenizer.model"


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str = "") -> tokenizer.Tokenizer:
    """data.tokenizer_path if set; else for fine-tuning the run's own copy (a resume) or
    the pretrained run's (init_from); else the trained and cached one."""
    init_from = config.train.init_from
    if config.data.tokenizer_path or not init_from:
        return tokenizer.load_or_train(config.data)
    own = os.path.join(workdir, TOKENIZER_FILE)
    if workdir and os.path.isfile(own):  # the pretrained run may have moved since
        return tokenizer.load(own)
    path = os.path.join(os.path.expanduser(init_from), TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"config.train.init_from={init_from!r} has no {TOKENIZER_FILE}; "
                          "point it at the workdir of a finished llm_jax run")
    return tokenizer.load(path)


def save_tokenizer(tok: tokenizer.Tokenizer, workdir: str) -> None:
    """WORKDIR/tokenizer.model, written then renamed (never half-written)."""
    files.write_atomic(os.path.join(workdir, TOKENIZER_FILE), tok.serialized_model())


def _manager(init_from: str) -> tuple[ocp.CheckpointManager, int]:
    directory = os.path.join(os.path.abspath(os.path.expanduser(init_from)), "checkpoints")
    step = None
    if os.path.isdir(directory):
        manager = ocp.CheckpointManager(
            directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
    if step is None:
        raise ConfigError(f"config.train.init_from={init_from!r} holds no checkpoint in "
                          f"{directory}; train the pretrained model first")
    return manager, step


def load_matching(init_from: str, fresh: Any) -> tuple[Any, str]:
    """`fresh` params with every leaf that the pretrained run has (same path and shape)
    replaced by its value, restored straight onto the fresh leaf's sharding.

    Returns (params, a report of what was loaded, what is new and what went unused).
    """
    manager, step = _manager(init_from)
    saved = traverse_util.flatten_dict(dict(manager.item_metadata(step).state["params"]),
                                       sep="/")
    ours = traverse_util.flatten_dict(fresh, sep="/")
    clash = [f"{k}: {tuple(saved[k].shape)} there, {tuple(v.shape)} here"
             for k, v in ours.items() if k in saved and tuple(saved[k].shape) != v.shape]
    if clash:
        raise ConfigError(f"config.train.init_from={init_from!r}: parameter shapes disagree "
                          f"({'; '.join(clash[:3])}); use the pretrained run's model and "
                          "tokenizer settings")
    stacked = lambda keys: any("/layers/" in k for k in keys)  # noqa: E731
    if stacked(saved) != stacked(ours) and not any(k in saved for k in ours if "layer" in k):
        there = "stacks its layers (scan_layers=True)" if stacked(saved) else "unrolls them"
        raise ConfigError(f"config.train.init_from={init_from!r} {there} and this config does "
                          f"not; set --config.model.scan_layers={str(stacked(saved)).lower()}")
    shared = sorted(k for k in ours if k in saved)
    item = {"params": traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(ours[k].shape, ours[k].dtype, sharding=ours[k].sharding)
         for k in shared}, sep="/")}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
    loaded = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))).state["params"]
    manager.close()
    merged = dict(ours)
    merged.update(traverse_util.flatten_dict(loaded, sep="/"))
    new = sorted(k for k in ours if k not in saved)
    unused = sorted(k for k in saved if k not in ours)
    n_loaded = sum(int(np.prod(ours[k].shape)) for k in shared)
    report = (f"init_from {init_from} (step {step}): loaded {len(shared)} parameters "
              f"({n_loaded / 1e6:.2f}M values); new: {', '.join(new) or 'none'}; "
              f"not used: {', '.join(unused) or 'none'}")
    return traverse_util.unflatten_dict(merged, sep="/"), report
