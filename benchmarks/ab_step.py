"""A/B two builds of a config's train step in one process, alternating, for small speed-ups.

On a shared VM whose speed drifts by ±10% over an hour, separate benchmark runs cannot
resolve a few-% change; two compiled steps timed in alternating rounds (ABBA...) drift
together. A/A runs of bench_small read -1.1% to +1.4% with 6-8 rounds (README,
Performance): a difference inside about ±2% is noise.

    python benchmarks/ab_step.py --config configs/bench_small.py \
        --b model.document_mask=false [--xla xla_cpu_ftz=true] [--rounds 8] [--steps 4]

B is the config with the --b overrides, compiled with the --xla compiler options; with
neither, B equals A (the A/A check).
"""
import argparse
import ast
import statistics
import time

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax import objectives, trainer


def typed(raw: str, current: object) -> object:
    """raw as the type of the value it replaces ('true'/'false' for bools)."""
    if isinstance(current, bool) or raw.lower() in ("true", "false"):
        return raw.lower() in ("true", "1")
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def with_overrides(config, items: list[str]):
    """config with each KEY=VALUE in items set (typed as the value it replaces)."""
    for item in items:
        key, _, raw = item.partition("=")
        parent, _, leaf = key.rpartition(".")
        try:
            node = config_lib.get(config, parent) if parent else config
            known = leaf in node
        except (KeyError, TypeError, AttributeError):  # a missing or non-dict parent
            known = False
        if not known:
            raise SystemExit(f"--b {item}: unknown key; closest valid keys: "
                             f"{config_lib.closest_keys(key, config)}")
        node[leaf] = typed(raw, node[leaf])
    return config


def build(config, compiler_options: dict):
    """The compiled train step, its initial state and a synthetic batch."""
    import flax.linen as nn
    tr = trainer.Trainer(config, "", vocab_size=trainer.synthetic_vocab(config))
    t = config.train
    batch = jax.device_put(objectives.dummy_batch(config, t.batch_size, np.random.default_rng(0),
                                                  tr.model_cfg.vocab_size), tr.batch_sh)
    with jax.set_mesh(tr.mesh), nn.logical_axis_rules(tr.rules):
        state, state_sh, _ = trainer.init_state(tr.model, tr.tx, tr.example, t.seed, tr.mesh,
                                                tr.rules)
        fn = trainer.jit_train_step(tr.model, tr.objective, tr.tx, tr.lr, t, state_sh,
                                    tr.batch_sh)
        return fn.lower(state, batch).compile(compiler_options or None), state, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for B, e.g. model.document_mask=false")
    p.add_argument("--xla", nargs="*", default=[], metavar="OPTION=VALUE",
                   help="XLA compiler options for B, e.g. xla_cpu_ftz=true")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="steps per build and round")
    args = p.parse_args()
    if args.rounds < 2:
        p.error(f"--rounds={args.rounds}: use 2 or more (A and B alternate in order)")
    config_a = config_lib.load_file(args.config)
    config_b = with_overrides(config_lib.load_file(args.config), args.b)
    options = {k: typed(v, None) for k, _, v in (o.partition("=") for o in args.xla)}
    builds = {"A": build(config_a, {}), "B": build(config_b, options)}
    states = {k: b[1] for k, b in builds.items()}
    times: dict[str, list[float]] = {"A": [], "B": []}

    def run(k: str, n: int, record: bool) -> None:
        compiled, _, batch = builds[k]
        for _ in range(n):
            start = time.perf_counter()
            states[k], metrics = compiled(states[k], batch)
            jax.block_until_ready((states[k], metrics))
            if record:
                times[k].append(time.perf_counter() - start)

    for k in "AB":  # warm-up: the first steps after compiling run slower
        run(k, 3, False)
    for r in range(args.rounds):
        for k in ("AB" if r % 2 == 0 else "BA"):
            run(k, args.steps, True)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    n = args.steps  # each round's own A/B ratio; their middle half shows the noise
    per_round = [100 * (statistics.median(times["A"][i:i + n])
                        / statistics.median(times["B"][i:i + n]) - 1)
                 for i in range(0, len(times["A"]), n)]
    q1, _, q3 = statistics.quantiles(per_round, n=4)
    print(f"A {a * 1e3:.1f} ms, B {b * 1e3:.1f} ms per step (medians of {len(times['A'])}); "
          f"B's tokens/s {100 * (a / b - 1):+.1f}% vs. A's (middle half of the rounds: "
          f"{q1:+.1f}% to {q3:+.1f}%)")


if __name__ == "__main__":
    main()
