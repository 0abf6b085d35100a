"""Command line: python -m llm_jax.train --config configs/NAME.py --workdir DIR [--config.a.b=v]

Thin on purpose: flags in, `trainer.run(config, workdir)` out. User errors (bad keys,
values, meshes, missing data) end with exit code 2 and one line; tracebacks mean bugs.
Exit codes: 0 done, 2 user error, 3 non-finite loss, 4 a checkpoint or the metrics could
not be written while training, or no checkpoint restores, 75 preempted by SIGTERM after
saving (rerun to continue).
"""
from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from llm_jax import console
from llm_jax.overrides import UserError, parse_flags

EXIT_USER = 2
EXIT_NONFINITE = 3  # the loss or gradients became NaN/inf (train.on_nonfinite=stop)
EXIT_CHECKPOINT = 4  # a checkpoint or the metrics could not be written, or none restores


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                    lock_config=True, flag_values=fv)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.",
                        flag_values=fv)
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "jax.distributed.initialize(): auto = when a coordinator or a "
                      "multi-process cluster (SLURM, Open MPI, multi-host TPU) is detected.",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Processes in the job.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
    flags.DEFINE_bool("compile_only", False, "Compile the train step for the configured mesh "
                      "and report per-device memory; train nothing.", flag_values=fv)
    flags.DEFINE_string("topology", None, "With --compile_only: compile for this TPU pod "
                        "(e.g. v5p:4x4x4, v5e:16x16) through libtpu and report per-chip HBM "
                        "use; needs the jax[tpu] extra.", flag_values=fv)


def parse_args(argv: list[str], fv: flags.FlagValues) -> tuple[ml_collections.ConfigDict, str]:
    """Flags → (config, workdir); a bad override raises UserError with one line."""
    parse_flags(argv, fv)
    if fv.config is None:
        raise UserError("--config=configs/NAME.py is needed")
    if not fv.workdir and not (fv.compile_only or fv.topology):  # compiling writes nothing
        raise UserError("--workdir=DIR is needed to train (--compile_only needs none)")
    return fv.config, fv.workdir


def _flags_parser(argv: list[str]) -> list[str]:
    try:
        parse_args(argv, flags.FLAGS)
    except UserError as e:
        console.error(str(e))
        sys.exit(EXIT_USER)
    return argv[:1]


def _multi_process_env() -> bool:
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_NTASKS", "1")) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def _initialize_distributed(fv: flags.FlagValues) -> None:
    """Joins a multi-process job; JAX detects TPU pods, SLURM and Open MPI by itself."""
    import jax
    if fv.distributed == "off":
        return
    if fv.distributed == "on" or fv.coordinator_address or _multi_process_env():
        jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                                   num_processes=fv.num_processes, process_id=fv.process_id)


def main(argv: list[str]) -> None:
    del argv
    fv = flags.FLAGS
    if not fv["verbosity"].present:
        console.quiet_libraries()
    if fv.compile_only or fv.topology:
        _compile_only(fv.config, fv.topology)
        return
    _initialize_distributed(fv)
    from llm_jax import trainer  # heavy imports after the flags are known to be good
    from llm_jax.checkpoint import CheckpointError
    from llm_jax.config import ConfigError
    from llm_jax.data.sources import DataError
    from llm_jax.metrics import WriteError
    from llm_jax.preemption import EXIT_PREEMPTED, Preempted
    codes = ((ConfigError, EXIT_USER), (DataError, EXIT_USER),
             (trainer.NonFiniteError, EXIT_NONFINITE), (CheckpointError, EXIT_CHECKPOINT),
             (WriteError, EXIT_CHECKPOINT),
             (Preempted, EXIT_PREEMPTED))
    try:
        trainer.run(fv.config, fv.workdir)
    except tuple(c for c, _ in codes) as e:
        console.error(str(e))
        code = next(code for c, code in codes if isinstance(e, c))
        if code == EXIT_CHECKPOINT:  # failed writer threads and atexit flushes would print
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)


def _compile_only(config: ml_collections.ConfigDict, topology: str | None) -> None:
    import jax

    from llm_jax import aot
    from llm_jax.config import ConfigError
    # On CPU, a mesh bigger than this machine is made of fake host devices (set before
    # JAX starts; accelerators ignore it).
    need = aot.mesh_devices(config.mesh)
    jax.config.update("jax_num_cpu_devices", max(need, 1))
    backend = jax.default_backend()
    if not topology and backend != "cpu" and need > jax.device_count():
        console.error(f"config.mesh asks for {need} devices and this {backend} host has "
                      f"{jax.device_count()}; plan the larger mesh on fake host devices: "
                      "JAX_PLATFORMS=cpu python -m llm_jax.train ... --compile_only (CPU "
                      "code paths: a rough guide to accelerator memory)")
        sys.exit(EXIT_USER)
    try:
        print(aot.format_report(aot.compile_report(config, topology)), flush=True)
    except ConfigError as e:
        console.error(str(e))
        sys.exit(EXIT_USER)


define_flags(flags.FLAGS)

if __name__ == "__main__":
    app.run(main, flags_parser=_flags_parser)
