"""Where a step's time goes: the XLA ops of a jax.profiler trace, summed by model scope.

`python -m llm_jax.benchmark --profile DIR` traces 3 train steps and prints this table.
Each op's self time (without the ops nested in it) is taken from the trace and grouped by
the scope in its HLO metadata, layer numbers folded and forward apart from backward:
`DecoderLM/decoder/layer_*/mlp/wi dot_general (bwd)`; "bwd" is every op of the backward
pass, forward ops that remat recomputes there included; the optimizer's ops carry no tag.
Loops and conditionals are left out: their time is their body's. On accelerators only
device-side events count; on CPU, ops that run side by side on the host's threads each
count in full, so shares are of the summed op time, not of the wall clock.
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
from typing import NamedTuple

# metadata path parts that wrap the model's own scopes: jvp(NAME) is the scope NAME
_WRAPPED = re.compile(r"(?:transpose\()?(?:jvp|vmap)\(([^()]+)\)\)?")
_WRAPPERS = re.compile(r"^(jit|jvp|transpose|vmap|pjit|remat|checkpoint|rematted_computation|"
                       r"cond|branch_\d+_fun|while|body|closed_call|shard_map|custom_vjp_call)\b")
_CONTROL_FLOW = re.compile(r"(?<![\w-])(while|conditional|call)\(%")  # not custom-call(


class Profile(NamedTuple):
    rows: list[tuple[str, float, float]]  # (scope, ms per step and device, share), largest first
    runs: int  # executions of the module found in the trace
    devices: int


def op_scopes(hlo_text: str) -> dict[str, str | None]:
    """HLO instruction name -> 'scope primitive (fwd|bwd)' from its op_name metadata; None
    for loops and conditionals, whose time is their body's."""
    scopes: dict[str, str | None] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        if _CONTROL_FLOW.search(line):
            scopes[m.group(1)] = None
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        if not op:
            continue
        # ops XLA merged carry "a;b" or ".../(a:b)": the first name names them
        name = re.sub(r"/\(([^:]*?):.*", r"/\1", op.group(1).split(";")[0])
        *path, prim = name.split("/")
        parts = [w.group(1) if (w := _WRAPPED.fullmatch(p)) else p for p in path]
        parts = [re.sub(r"^(layer|layers)_\d+$", r"\1_*", p)
                 for p in parts if p and not _WRAPPERS.match(p)]
        # autodiff wraps the forward in jvp(...) and the backward in transpose(...); the
        # optimizer's and the metrics' ops are neither
        side = " (bwd)" if "transpose(" in name else " (fwd)" if "jvp(" in name else ""
        scopes[m.group(1)] = f"{'/'.join(parts) or '(top)'} {prim}{side}"
    return scopes


def self_times(trace: dict, module: str) -> tuple[dict[str, float], int, int]:
    """Self seconds per hlo_op of `module` in a Chrome trace, summed over its executions
    and devices; the number of executions (told apart by run_id; 0 if events carry none)
    and of devices. Device-side events count when there are any, else the host's."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in trace["traceEvents"] if e.get("ph") == "X"
           and e.get("args", {}).get("hlo_module") == module and "hlo_op" in e["args"]]
    on_device = [e for e in ops
                 if re.match(r"/device:(GPU|TPU)", str(names.get(e["pid"], "")))]
    ops = on_device or ops
    totals: dict[str, float] = collections.defaultdict(float)
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[e["pid"], e["tid"]].append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, op, self microseconds]
        for e in events + [None]:
            while stack and (e is None or e["ts"] >= stack[-1][0]):
                _, op, own = stack.pop()
                totals[op] += own / 1e6
            if e is None:
                break
            if stack:  # nested: the parent's time is not its own while this one runs
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["args"]["hlo_op"], e["dur"]])
    runs = len({e["args"]["run_id"] for e in ops if "run_id" in e["args"]})
    devices = len({(e["pid"], e["args"].get("device_ordinal")) for e in ops})
    return dict(totals), runs, max(devices, 1)


def summarize(trace_dir: str, hlo_text: str, steps: int, since: float = 0.0) -> Profile:
    """The op time by scope of the newest trace under trace_dir written at or after `since`
    (a time.time()), per execution (`steps` if the trace does not tell them apart)."""
    files = sorted((p for p in pathlib.Path(trace_dir).rglob("*.trace.json.gz")
                    if p.stat().st_mtime >= since), key=lambda p: p.stat().st_mtime)
    if not files:
        return Profile([], 0, 0)
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    module = re.search(r"HloModule ([\w.\-]+)", hlo_text).group(1)
    scopes = op_scopes(hlo_text)
    seconds, runs, devices = self_times(trace, module)
    by_scope: dict[str, float] = collections.defaultdict(float)
    for op, s in seconds.items():
        scope = scopes.get(op, f"(no metadata) {re.sub(r'[.0-9]+$', '', op)}")
        if scope is not None:
            by_scope[scope] += s
    total = sum(by_scope.values())
    per_step = 1e3 / ((runs or steps) * devices)
    rows = [(k, v * per_step, v / total if total else 0.0)
            for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])]
    return Profile(rows, runs, devices)


def format_rows(rows: list[tuple[str, float, float]], top: int = 15) -> str:
    """The `top` scopes, then '(other)' and '(all ops)'."""
    shown = list(rows[:top])
    if rows[top:]:
        shown.append(("(other)", sum(r[1] for r in rows[top:]), sum(r[2] for r in rows[top:])))
    shown.append(("(all ops)", sum(r[1] for r in rows), 1.0))
    width = max(len(r[0]) for r in shown)
    head = f"{'op scope':<{width}}  ms/step   share"
    return "\n".join([head] + [f"{k:<{width}}  {ms:7.1f}  {share:6.1%}" for k, ms, share in shown])
