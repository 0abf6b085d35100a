"""Command line: python -m llm_jax.train --config configs/NAME.py --workdir DIR [--config.a.b=v]

Thin on purpose: flags in, `trainer.run(config, workdir)` out. User errors (bad keys,
values, meshes, missing data) end with exit code 2 and one line; tracebacks mean bugs.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from llm_jax.overrides import UserError, check_overrides, one_line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


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
    from llm_jax import trainer  # heavy imports after the flags are known to be good
    from llm_jax.config import ConfigError
    from llm_jax.data.sources import DataError
    try:
        trainer.run(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, DataError) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
