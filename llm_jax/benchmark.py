"""python -m llm_jax.benchmark --config configs/NAME.py [--steps N] [--warmup N] [--json OUT]
                              [--nopipeline] [--profile DIR]

Times the real train step (model, optimizer, shardings, donation) and eval step on
synthetic tokens of the configured shapes, and the input pipeline alone. With --profile,
also traces 3 train steps and prints their time by op scope (op_profile.py).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from llm_jax import console, files, host_memory
from llm_jax.overrides import UserError, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps after the first (3 untimed in all, as in "
    "benchmarks/torch_reference.py): the first steps after compiling run slower.")
_JSON = flags.DEFINE_string("json", None, "Write the results as one JSON object here.")
_PIPELINE = flags.DEFINE_bool("pipeline", True, "Also time the input pipeline alone.")
_PROFILE = flags.DEFINE_string(
    "profile", None, "Also trace 3 more train steps with jax.profiler into this directory "
    "(open it with XProf or TensorBoard's profile plugin) and print their time by op scope; "
    "the timed steps stay untraced.")


def time_steps(fn, args_fn, steps: int, warmup: int = 0) -> tuple[float, list[float], object]:
    """First-call seconds, per-step seconds for `steps` calls after `warmup` more untimed
    ones, and the last output."""
    import jax
    start = time.perf_counter()
    out = fn(*args_fn(None))
    jax.block_until_ready(out)
    first = time.perf_counter() - start
    for _ in range(warmup):
        out = fn(*args_fn(out))
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = fn(*args_fn(out))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return first, times, out


def benchmark(config, steps: int, pipeline: bool, warmup: int = 2,
              profile_dir: str | None = None) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from llm_jax import host_cpu, metrics, op_profile, trainer

    t, seq = config.train, config.data.seq_len
    res: dict = {"config": config.model.to_dict(), "devices": jax.device_count(),
                 "device_kind": jax.devices()[0].device_kind, "batch_size": t.batch_size,
                 "seq_len": seq, "steps": steps, "warmup_steps": warmup,
                 "host_cpu": host_cpu.host_cpu()}
    logging.info("benchmark: %d %s device(s); initializing and compiling the train step",
                 jax.device_count(), res["device_kind"])
    (tr, compiled, state, state_sh, batch, res["compile_s"],
     res["init_s"]) = trainer.compile_train_step(config)
    cfg = tr.model_cfg
    mem = compiled.memory_analysis()  # XLA's buffer assignment; what a step allocates afresh
    if mem is not None:
        res["step_temp_mb"] = mem.temp_size_in_bytes / 2**20
    with jax.set_mesh(tr.mesh), nn.logical_axis_rules(tr.rules):
        logging.info("benchmark: compiled in %.1f s; timing %d train steps", res["compile_s"],
                     steps)
        holder = {"state": state}

        def train_args(out):
            if out is not None:
                holder["state"] = out[0]
            return holder["state"], batch

        # a CPU's peak, measured on both sides of the timed steps, the higher counting: a
        # shared VM slowed during one measurement read MFU 119.5%
        peak_before = metrics.peak_flops(t.peak_flops, cfg.dtype)
        first, times, last = time_steps(compiled, train_args, steps, warmup)
        train_args(last)
        if profile_dir:
            since = time.time()
            with jax.profiler.trace(profile_dir):  # 3 executions: the first and 2 more
                first_traced, traced, last = time_steps(compiled, train_args, 2)
            train_args(last)
            res["profile_step_s"] = statistics.median([first_traced] + traced)
            try:  # a trace it cannot read (another profiler version) must not cost the figures
                prof = op_profile.summarize(profile_dir, compiled.as_text(), 3, since)
                res.update(profile_ops=[{"scope": k, "ms_per_step": ms, "share": share}
                                        for k, ms, share in prof.rows], profile_runs=prof.runs,
                           profile_devices=prof.devices)
            except Exception as e:  # noqa: BLE001
                logging.exception("benchmark: could not summarize the trace in %s", profile_dir)
                res["profile_error"] = repr(e)
        res["first_step_s"] = res["init_s"] + res["compile_s"] + first
        logging.info("benchmark: train step median %.3f s; timing the eval step",
                     statistics.median(times))
        eval_fn = trainer.jit_eval_step(tr.model, tr.objective, np.ones(cfg.vocab_size),
                                        state_sh.params, tr.batch_sh)
        _, eval_times, _ = time_steps(eval_fn, lambda _: (holder["state"].params, batch), steps,
                                      warmup)
    tokens_per_step = tr.tokens_per_step
    med = statistics.median(times)
    flops = tr.flops_per_token()
    peak, peak_src = max(peak_before, metrics.peak_flops(t.peak_flops, cfg.dtype))
    res.update({
        "step_time_median_s": med, "step_time_min_s": min(times), "step_time_max_s": max(times),
        "tokens_per_sec": tokens_per_step / med,
        "tokens_per_sec_min": tokens_per_step / max(times),
        "tokens_per_sec_max": tokens_per_step / min(times),
        "model_flops_per_token": flops, "peak_flops": peak, "peak_source": peak_src,
        "mfu": tokens_per_step / med * flops / peak if peak else None,
        "eval_tokens_per_sec": tokens_per_step / statistics.median(eval_times),
        "eval_mfu": (tokens_per_step / statistics.median(eval_times)
                     * tr.flops_per_token(training=False) / peak)
        if peak else None,
    })
    if jax.devices()[0].platform != "cpu":
        stats = [d.memory_stats() or {} for d in jax.local_devices()]
        res["device_peak_mem_mb"] = max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**20
    res["peak_host_mem_mb"] = host_memory.peak_rss_mb()  # the steps', before the pipeline's
    if pipeline:
        from llm_jax import finetune
        from llm_jax.config import ConfigError
        from llm_jax.data import tasks
        from llm_jax.data.sources import DataError
        try:
            res["pipeline_tokens_per_sec"] = tasks.throughput(
                config, finetune.load_tokenizer(config), tr.tokens_per_step)
            res["pipeline_vs_train"] = res["pipeline_tokens_per_sec"] / res["tokens_per_sec"]
        except (ConfigError, DataError, OSError) as e:  # the step's figures still count
            res["pipeline_error"] = console.one_line(e)
    return res


def format_table(res: dict) -> str:
    rows = [
        ("host CPU", res.get("host_cpu", "?")),
        ("init (s)", f"{res['init_s']:.1f}"),
        ("compile (s)", f"{res['compile_s']:.1f}"),
        ("time to first step (s)", f"{res['first_step_s']:.1f}"),
        ("train tokens/s (median)", f"{res['tokens_per_sec']:,.0f}"),
        ("train tokens/s (min-max)",
         f"{res['tokens_per_sec_min']:,.0f}-{res['tokens_per_sec_max']:,.0f}"),
        ("step time median (s)", f"{res['step_time_median_s']:.3f}"),
        ("model MFLOP/token", f"{res['model_flops_per_token'] / 1e6:.1f}"),
        ("peak GFLOP/s", f"{res['peak_flops'] / 1e9:,.0f} ({res['peak_source']})"),
        ("MFU", f"{res['mfu']:.1%}" if res["mfu"] is not None else "n/a (unknown device)"),
        ("eval tokens/s", f"{res['eval_tokens_per_sec']:,.0f}"),
        ("peak host memory (MB)", f"{res['peak_host_mem_mb']:,.0f}"),
    ]
    if "step_temp_mb" in res:
        rows.append(("step temporaries per device (MB)", f"{res['step_temp_mb']:,.0f}"))
    if "device_peak_mem_mb" in res:
        rows.append(("peak device memory (MB)", f"{res['device_peak_mem_mb']:,.0f}"))
    if "pipeline_tokens_per_sec" in res:
        rows.append(("input pipeline tokens/s", f"{res['pipeline_tokens_per_sec']:,.0f} "
                     f"({res['pipeline_vs_train']:.0f}x training)"))
    elif "pipeline_error" in res:
        rows.append(("input pipeline", f"not measured: {res['pipeline_error']}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def check_flags(fv: flags.FlagValues) -> None:
    """UserError, in one line, for flags that would fail only after compiling and timing."""
    if fv.config is None:
        raise UserError("--config=configs/NAME.py is needed")
    if fv.steps < 1:
        raise UserError(f"--steps={fv.steps}: time 1 or more steps")
    if fv.warmup < 0:
        raise UserError(f"--warmup={fv.warmup}: use 0 or more untimed steps")
    if fv.json and (why := files.unwritable(fv.json)):
        raise UserError(f"--json={fv.json}: cannot write there ({why}); name a file in an "
                        "existing, writable directory")
    if fv.profile and (why := files.unwritable(fv.profile, directory=True)):
        raise UserError(f"--profile={fv.profile}: cannot write a trace there ({why}); name a "
                        "writable directory")


def _flags_parser(argv: list[str]) -> list[str]:
    try:
        parse_flags(argv, flags.FLAGS)
        check_flags(flags.FLAGS)
    except UserError as e:
        console.error(str(e))
        sys.exit(2)
    return argv[:1]


def main(argv: list[str]) -> None:
    del argv
    from llm_jax.config import ConfigError
    try:
        res = benchmark(_CONFIG.value, _STEPS.value, _PIPELINE.value, _WARMUP.value,
                        _PROFILE.value)
    except ConfigError as e:
        console.error(str(e))
        sys.exit(2)
    print(format_table(res))
    if hint := host_memory.allocator_hint(res["peak_host_mem_mb"], res.get("step_temp_mb", 0)):
        print(f"note: {hint}")
    if "profile_step_s" in res:
        from llm_jax import op_profile
        print(f"\n3 traced train steps ({res['profile_step_s']:.3f} s each, the tracer's cost "
              "included), time by op scope (self time; op_profile.py):")
        if res.get("profile_ops"):
            print(op_profile.format_rows([(r["scope"], r["ms_per_step"], r["share"])
                                          for r in res["profile_ops"]]))
        elif "profile_error" in res:
            print(f"could not summarize the trace ({res['profile_error']}): open "
                  f"{_PROFILE.value} in XProf")
        else:
            print(f"no XLA op events with an hlo_op in the trace: open {_PROFILE.value} in XProf")
    if _JSON.value:
        files.write_atomic(_JSON.value, json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    app.run(main, flags_parser=_flags_parser)
