"""Checks `--config.a.b=value` overrides before absl parses them, for one-line errors."""
from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections
from absl import flags

from llm_jax.config import closest_keys, flat_keys, get
from llm_jax.console import one_line


class UserError(ValueError):
    """A mistake on the command line; reported in one line with exit code 2."""


def load(path: str) -> ml_collections.ConfigDict:
    """get_config() of a config file; UserError in one line if it is missing or broken."""
    if not os.path.isfile(path):
        raise UserError(f"--config={path}: no such file; pick one in configs/")
    spec = importlib.util.spec_from_file_location("_llm_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise UserError(f"--config={path} failed to load: {type(e).__name__}: {e}") from None


def check_key(config: ml_collections.ConfigDict, key: str, flag: str = "--config.") -> None:
    """UserError naming the closest valid keys if `key` is not one of the config's."""
    if key not in flat_keys(config):
        raise UserError(f"{flag}{key}: unknown key; closest valid keys: "
                        f"{closest_keys(key, config)}")


def parse_value(raw: str, current: object, key: str, flag: str = "--config.") -> object:
    """raw as the type of the value it overrides; UserError if it cannot be one."""
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"{flag}{key}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1")
    if isinstance(current, (int, float)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(current, int) and ok and not float(value).is_integer():
            ok = False
        if not ok:
            kind = type(current).__name__
            raise UserError(f"{flag}{key}={raw!r}: expected {kind} (now {current!r})")
        return type(current)(value)
    return raw


def check_overrides(argv: list[str]) -> None:
    """Validates every --config.KEY=VALUE in argv against the config file's keys and types."""
    path, overrides = None, []
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config":
            path = next(args, None)
        elif arg.startswith("--config."):
            key, sep, raw = arg[len("--config."):].partition("=")
            if not sep:  # "--config.a.b value" form
                raw = next(args, "")
            overrides.append((key, raw))
    if path is None:
        if overrides:
            raise UserError("--config.* overrides need --config=configs/NAME.py")
        return
    config = load(path)
    for key, raw in overrides:
        check_key(config, key)
        parse_value(raw, get(config, key), key)


def parse_flags(argv: list[str], fv: flags.FlagValues) -> None:
    """Checks the --config overrides, then parses argv into fv; UserError in one line."""
    check_overrides(argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise UserError(one_line(e)) from None
