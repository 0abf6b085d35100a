"""Command line: python -m llm_jax.train --config configs/NAME.py --workdir DIR [--config.a.b=v]

Thin on purpose: flags in, `trainer.run(config, workdir)` out. User errors (bad keys,
values, meshes, missing data) end with exit code 2 and one line; tracebacks mean bugs.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llm_jax.overrides import UserError, check_overrides, one_line

EXIT_NONFINITE = 3  # the loss or gradients became NaN/inf (train.on_nonfinite=stop)
EXIT_CHECKPOINT = 4  # a checkpoint could not be written (disk full, unwritable workdir)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): auto = when a coordinator or a multi-process cluster "
    "(SLURM, Open MPI, multi-host TPU) is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _multi_process_env() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def _initialize_distributed() -> None:
    """Joins a multi-process job; JAX detects TPU pods, SLURM and Open MPI by itself."""
    import jax
    if _DISTRIBUTED.value == "off":
        return
    if _DISTRIBUTED.value == "on" or _COORDINATOR.value or _multi_process_env():
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)


def _parse(argv: list[str]) -> list[str]:
    """Parses flags; a bad override becomes one line and exit code 2, not a traceback."""
    try:
        check_overrides(argv)
        rest = flags.FLAGS(argv)
    except (UserError, flags.Error) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(2)
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.stderr.write("error: both --config=configs/NAME.py and --workdir=DIR are needed\n")
        sys.exit(2)
    return rest


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every file at INFO
        logging.set_verbosity(logging.WARNING)
    _initialize_distributed()
    from llm_jax import trainer  # heavy imports after the flags are known to be good
    from llm_jax.checkpoint import CheckpointError
    from llm_jax.config import ConfigError
    from llm_jax.data.sources import DataError
    from llm_jax.preemption import EXIT_PREEMPTED, Preempted
    codes = ((ConfigError, 2), (DataError, 2), (trainer.NonFiniteError, EXIT_NONFINITE),
             (CheckpointError, EXIT_CHECKPOINT), (Preempted, EXIT_PREEMPTED))
    try:
        trainer.run(_CONFIG.value, _WORKDIR.value)
    except tuple(c for c, _ in codes) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(next(code for c, code in codes if isinstance(e, c)))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
