"""Orbax checkpoints: train state, the data iterator's state and the resolved config.

Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never listed and never restored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable workdir): stop the run."""


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
        self.directory = os.path.abspath(directory)
        self._pending: int | None = None
        if jax.default_backend() == "cpu":
            # CPU devices share host memory: splitting replicated arrays among them only
            # compiles a slice per device and shape (64 compiles, ~3 s, in the tiny run's
            # first save). Orbax itself turns this off on GPU.
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                override=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict,
             config: ml_collections.ConfigDict) -> None:
        """Starts an async save once the previous one is durable; failures stop the run."""
        self.wait()  # an error of the previous save is reported against its own step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
                config=ocp.args.JsonSave(config.to_dict())), force=True)
        except Exception as e:  # never train on without checkpoints
            raise CheckpointError(f"saving checkpoint {step} in {self.directory} failed: "
                                  f"{type(e).__name__}: {_short(e)}; the earlier "
                                  "checkpoints are intact") from e
        self._pending = step

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """State onto the shardings in `abstract_state`, and the data iterator's state."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(_IteratorState())))
        return out.state, out.data.state

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """The newest checkpoint that reads back whole, or None if there is none.

        Newer ones that fail while an older one succeeds are damaged (a crash mid-write,
        a truncated file): they are moved to WORKDIR/damaged_checkpoints with a one-line
        warning. If none succeeds, nothing is moved and the run stops: a code or topology
        change must not silently restart training from step 0.
        """
        failed: list[tuple[int, str]] = []
        restored = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = (*self.restore(step, abstract_state), step)
                break
            except Exception as e:  # judged below, against the older checkpoints
                failed.append((step, f"{type(e).__name__}: {_short(e)[:200]}"))
        if failed and restored is None:
            step, why = failed[0]
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored; the "
                                  f"newest, {step}, fails with {why}")
        if failed:
            self._quarantine([step for step, _ in failed])
            for step, why in failed:
                if jax.process_index() == 0:
                    print(f"warning: checkpoint {step} is unreadable ({why}); moved to "
                          f"damaged_checkpoints/, resuming from {restored[2]}", flush=True)
        return restored

    def _quarantine(self, steps: list[int]) -> None:
        """Moves damaged steps out of the manager's sight (kept, not deleted)."""
        multihost_utils.sync_global_devices("checkpoint: before quarantine")
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                shutil.move(os.path.join(self.directory, str(step)),
                            os.path.join(aside, f"{step}-{int(time.time())}"))
        multihost_utils.sync_global_devices("checkpoint: after quarantine")
        self.manager.reload()

    def saved_config(self) -> dict | None:
        """The config stored with the newest checkpoint that has a readable one."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.manager.restore(
                    step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            except Exception:  # damaged: restore_latest reports it; look further back
                continue
        return None

    def wait(self) -> None:
        """Blocks until the last save is durable; raises CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"saving checkpoint {self._pending} in {self.directory} "
                                  f"failed: {type(e).__name__}: {_short(e)}; the earlier "
                                  "checkpoints are intact") from e

    def wait_and_latest(self) -> int | None:
        self.wait()
        return self.latest_step()

    def close(self) -> None:
        """Waits for the last save, then closes; raises CheckpointError if the save failed."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _short(e: BaseException) -> str:
    """One line, led by the OS error's own words where the message gives only its number;
    long messages keep their head and their tail, where the OS error usually is, and the
    OS error itself when it sits in the middle (a long spec after it)."""
    text = " ".join(str(e).split())
    code = re.search(r"\[os_error_code='?(\d+)'?\]", text)
    if code and (reason := os.strerror(int(code.group(1)))) not in text:
        text = f"{reason}: {text}"  # tensorstore may name the OS error by its number only
    if len(text) <= 320:
        return text
    tail = text[-180:]
    os_error = re.search(r"[^:\[]*\[os_error_code='?\d+'?\]", text)
    if os_error and os_error.group(0) not in tail:
        tail = f"{os_error.group(0).strip()} ... {tail}"
    return f"{text[:120]} ... {tail}"
