"""Orbax checkpoints: train state, the data iterator's state and the resolved config.

Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never listed and never restored.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp


class _IteratorState:
    """Adapts a plain state dict to grain's per-process checkpoint handler."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # grain's handler calls it after restoring
        pass


class Checkpointer:
    """Saves and restores {state, data, config} under WORKDIR/checkpoints."""

    def __init__(self, directory: str, max_to_keep: int = 3, keep_every: int = 0,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict,
             config: ml_collections.ConfigDict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
            config=ocp.args.JsonSave(config.to_dict())), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """State onto the shardings in `abstract_state`, and the data iterator's state."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(_IteratorState())))
        return out.state, out.data.state

    def saved_config(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
