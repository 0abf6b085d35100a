"""A/B two builds of a config's train step in one process, alternating, for small speed-ups.

On a shared VM whose speed drifts by ±10% over an hour, separate benchmark runs cannot
resolve a few-% change; two compiled steps timed in alternating rounds (ABBA...) drift
together. A/A runs of bench_small read -1.1% to +1.4% with 8 rounds, +0.5% and +1.1% with
20 (the default); one 8-round run read +8.1% for a change that 20-round runs put at +0.5%
and +0.6% (README.md here): a difference inside about ±2% is noise.

    python benchmarks/ab_step.py --config configs/bench_small.py \
        --b model.document_mask=true [--xla xla_cpu_ftz=true] [--rounds 20] [--steps 4]

B is the config with the --b overrides, compiled with the --xla compiler options (XLA flag
names without the leading --); with neither, B equals A (the A/A check).
"""
import llm_jax  # noqa: F401, I001  (first, as `python -m llm_jax.benchmark` loads it)

import argparse
import ast
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections

from llm_jax import config as config_lib
from llm_jax.console import one_line
from llm_jax.trainer import compile_train_step
from llm_jax.overrides import UserError, check_key, load, parse_value


def with_overrides(config: ml_collections.ConfigDict,
                   items: list[str]) -> ml_collections.ConfigDict:
    """config with each KEY=VALUE in items set, typed as the value it replaces."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--b {item}: expected KEY=VALUE, e.g. model.document_mask=true")
        check_key(config, key, flag="--b ")
        parent, _, leaf = key.rpartition(".")
        node = config_lib.get(config, parent) if parent else config
        value = parse_value(raw, node[leaf], key, flag="--b ")
        try:
            # an unset option (None) takes a number, a bool or a string
            node[leaf] = typed_option(raw) if node[leaf] is None else value
        except TypeError as e:  # ml_collections refuses another type (e.g. a tuple's)
            raise UserError(f"--b {item}: {e}") from None
    return config


def typed_option(raw: str) -> Any:
    """An XLA option's value: true/false as bools, numbers as numbers, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--b", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for B, e.g. model.document_mask=true")
    p.add_argument("--xla", nargs="+", action="extend", default=[], metavar="OPTION=VALUE",
                   help="XLA compiler options for B, e.g. xla_cpu_ftz=true")
    p.add_argument("--rounds", type=int, default=20, help="an even number: ABBA...")
    p.add_argument("--steps", type=int, default=4, help="steps per build and round")
    flag = next((a for a in sys.argv[1:] if a.startswith("--xla_")), None)
    if flag:  # argparse would take it for an unknown flag of its own
        p.error(f"{flag}: give XLA options as --xla OPTION=VALUE, the name without the "
                f"leading --, e.g. --xla {flag[2:]}")
    args = p.parse_args()
    if args.rounds < 2 or args.rounds % 2:
        p.error(f"--rounds={args.rounds}: use an even number, 2 or more (ABBA...)")
    if args.steps < 1:
        p.error(f"--steps={args.steps}: use 1 or more")
    options = {}
    platform = jax.devices()[0].platform
    for item in args.xla:
        name, sep, raw = item.partition("=")
        if not sep:
            p.error(f"--xla {item}: expected OPTION=VALUE, the XLA flag's name without "
                    f"the leading --, e.g. xla_cpu_ftz=true")
        options[name] = typed_option(raw)
        target = name.split("_")[1] if name.startswith("xla_") else ""
        if target in ("cpu", "gpu", "tpu") and target != platform.replace("cuda", "gpu"):
            p.error(f"--xla {item}: a {target.upper()} option, and this runs on "
                    f"{platform.upper()}; XLA would ignore it")
    try:
        config_a = load(args.config)
        config_b = with_overrides(load(args.config), args.b)
        for c in (config_a, config_b):
            config_lib.validate(c)
        builds = {"B": compile_train_step(config_b, options)}  # B first: mistakes show at once
    except (UserError, config_lib.ConfigError, jax.errors.JaxRuntimeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)  # sys.stderr: tests capture it
        sys.exit(2)
    builds["A"] = compile_train_step(config_a)
    states = {k: b.state for k, b in builds.items()}
    times: dict[str, list[float]] = {"A": [], "B": []}

    def run(k: str, n: int, record: bool) -> None:
        for _ in range(n):
            start = time.perf_counter()
            states[k], metrics = builds[k].compiled(states[k], builds[k].batch)
            jax.block_until_ready((states[k], metrics))
            if record:
                times[k].append(time.perf_counter() - start)

    for k in "AB":  # warm-up: the first steps after compiling run slower
        run(k, 3, False)
    for r in range(args.rounds):
        for k in ("AB" if r % 2 == 0 else "BA"):
            run(k, args.steps, True)
    # tokens/s of each build's own shapes, in case B changes them
    tokens = {k: builds[k].trainer.tokens_per_step for k in "AB"}
    rate = {k: tokens[k] / statistics.median(times[k]) for k in "AB"}
    n = args.steps  # each round's own B/A ratio; their middle half shows the noise
    per_round = [100 * ((tokens["B"] / statistics.median(times["B"][i:i + n]))
                        / (tokens["A"] / statistics.median(times["A"][i:i + n])) - 1)
                 for i in range(0, len(times["A"]), n)]
    q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
    params = {k: sum(x.size for x in jax.tree.leaves(st.params)) for k, st in states.items()}
    print(f"B: {' '.join(args.b + args.xla) or 'the same as A'}; parameters A "
          f"{params['A']:,}, B {params['B']:,}")
    print(f"A {rate['A']:,.0f}, B {rate['B']:,.0f} tokens/s (medians of {len(times['A'])} "
          f"steps); B {100 * (rate['B'] / rate['A'] - 1):+.1f}% vs. A (middle half of the "
          f"rounds: {q1:+.1f}% to {q3:+.1f}%)")


if __name__ == "__main__":
    main()
