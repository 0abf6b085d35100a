"""op_profile: self times from a Chrome trace, grouped by the scopes in the HLO metadata."""
# ruff: noqa: E501  (HLO text lines are long)
import gzip
import json
import os

import pytest

from llm_jax import op_profile

_DEC, _BWD = "jit(train_step)/jvp(DecoderLM)/decoder", "jit(train_step)/transpose(jvp(DecoderLM))"
HLO = f"""HloModule jit_train_step, entry_computation_layout={{()->f32[]}}

ENTRY %main {{
  %fusion.1 = f32[8,8]{{1,0}} fusion(%p), kind=kCustom, metadata={{op_name="{_DEC}/layer_0/mlp/wi/dot_general"}}
  %fusion.2 = f32[8,8]{{1,0}} fusion(%p), kind=kCustom, metadata={{op_name="{_DEC}/layer_3/mlp/wi/dot_general"}}
  %fusion.3 = f32[8,8]{{1,0}} fusion(%p), kind=kLoop, metadata={{op_name="{_BWD}/decoder/layer_1/mlp/jvp()/tanh"}}
  %while.4 = (f32[8,8]{{1,0}}, s32[]) while(%tuple.1), condition=%cond, body=%body, metadata={{op_name="{_DEC}/layer_0/attn/while"}}
  %add.5 = f32[8]{{0}} add(%a, %b), metadata={{op_name="jit(train_step)/optimizer/add"}}
  %copy.6 = f32[8]{{0}} copy(%a)
  %fusion.7 = f32[8]{{0}} fusion(%a), metadata={{op_name="{_BWD}/decoder/layers/(attn_norm/reduce_sum:mlp/wi/dot_general:jvp(lm_head_loss) reduce_sum)"}}
  %mul.8 = f32[8]{{0}} multiply(%a, %b), metadata={{op_name="jit(train_step)/optimizer/mul;{_BWD}/x"}}
  %custom-call.9 = f32[8,8]{{1,0}} custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={{op_name="{_DEC}/layer_2/mlp/wo/dot_general"}}
  %fusion.10 = f32[8]{{0}} fusion(%a), metadata={{op_name="{_DEC}/layer_2/attn/cond/branch_0_fun/closed_call"}}
}}
"""


def _event(pid, tid, ts, dur, op, module="jit_train_step", **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": op,
            "args": {"hlo_module": module, "hlo_op": op, **args}}


def _trace(events, processes):
    meta = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
            for pid, name in processes.items()]
    return {"traceEvents": meta + events}


def _write(trace_dir, events, name="run1"):
    run = trace_dir / "plugins" / "profile" / name
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(_trace(events, {1: "/host:CPU"}), f)
    return run / "host.trace.json.gz"


def test_op_scopes_fold_layers_and_wrappers():
    scopes = op_profile.op_scopes(HLO)
    assert scopes["fusion.1"] == scopes["fusion.2"] == "DecoderLM/decoder/layer_*/mlp/wi dot_general (fwd)"
    assert scopes["fusion.3"] == "DecoderLM/decoder/layer_*/mlp tanh (bwd)"
    assert scopes["while.4"] is None  # a loop's time is its body's
    assert scopes["add.5"] == "optimizer add"
    assert "copy.6" not in scopes  # no metadata
    # ops that XLA merged are named by the first of their names, forward or backward too
    assert scopes["fusion.7"] == "DecoderLM/decoder/layers/attn_norm reduce_sum (bwd)"
    assert scopes["mul.8"] == "optimizer mul"
    # a custom call (cuBLAS, cuDNN) is an op, not control flow
    assert scopes["custom-call.9"] == "DecoderLM/decoder/layer_*/mlp/wo dot_general (fwd)"
    # the last part names the operation even where it is a wrapper's name
    assert scopes["fusion.10"] == "DecoderLM/decoder/layer_*/attn closed_call (fwd)"


def test_self_times_subtract_nested_ops_and_prefer_device_events():
    host = [  # a loop of 100 us holding two ops of 30 and 20 us, then an op of another module
        _event(1, 7, 0, 100, "while.4"), _event(1, 7, 10, 30, "fusion.1"),
        _event(1, 7, 50, 20, "fusion.2"), _event(1, 7, 200, 40, "fusion.3", module="jit_other"),
        _event(1, 8, 5, 25, "fusion.1"),  # another thread: counts in full
    ]
    seconds, runs, devices = op_profile.self_times(_trace(host, {1: "/host:CPU"}),
                                                   "jit_train_step")
    assert (runs, devices) == (0, 1)
    assert seconds == {"while.4": 50e-6, "fusion.1": 55e-6, "fusion.2": 20e-6}
    # with device-side events (two GPUs), the host's launch events no longer count
    device = [_event(2, 1, 0, 40, "fusion.1"), _event(3, 1, 0, 60, "fusion.1")]
    processes = {1: "/host:CPU", 2: "/device:GPU:0", 3: "/device:GPU:1",
                 4: "/device:CUSTOM:Megascale Trace"}
    assert op_profile.self_times(_trace(host + device, processes), "jit_train_step") == (
        {"fusion.1": 100e-6}, 0, 2)
    # CPU devices share the host's process: told apart by device_ordinal, runs by run_id
    cpu = [_event(1, 7, 20 * (3 * d + r), 10, "fusion.1", device_ordinal=str(d), run_id=str(r))
           for d in range(4) for r in range(3)]
    assert op_profile.self_times(_trace(cpu, {1: "/host:CPU"}), "jit_train_step") == (
        {"fusion.1": 120e-6}, 3, 4)


def test_summarize_ranks_scopes_per_step(tmp_path):
    events = [_event(1, 7, 0, 3000, "fusion.1"), _event(1, 7, 3000, 3000, "fusion.2"),
              _event(1, 7, 6000, 1500, "add.5"), _event(1, 7, 8000, 2500, "fusion.3"),
              _event(1, 7, 11000, 50, "while.4")]
    _write(tmp_path / "a", events)
    prof = op_profile.summarize(str(tmp_path / "a"), HLO, steps=2)
    assert (prof.runs, prof.devices) == (0, 1)
    assert [r[0] for r in prof.rows] == ["DecoderLM/decoder/layer_*/mlp/wi dot_general (fwd)",
                                         "DecoderLM/decoder/layer_*/mlp tanh (bwd)",
                                         "optimizer add"]
    # milliseconds per step (2 steps: the trace has no run ids) and shares, the loop left out
    assert [x for r in prof.rows for x in r[1:]] == pytest.approx([3.0, 0.6, 1.25, 0.25, 0.75,
                                                                   0.15])
    lines = op_profile.format_rows(prof.rows, top=2).splitlines()
    assert [line.split()[-2:] for line in lines[-2:]] == [["0.8", "15.0%"], ["5.0", "100.0%"]]
    assert lines[-2].startswith("(other)") and lines[-1].startswith("(all ops)")
    # run ids, where events carry them, count the executions; two devices halve the time
    two = [_event(1, 7, 0, 3000, "fusion.1", run_id="5", device_ordinal="0"),
           _event(1, 8, 0, 1000, "fusion.1", run_id="5", device_ordinal="1"),
           _event(1, 7, 5000, 2000, "add.5", run_id="6", device_ordinal="0")]
    _write(tmp_path / "b", two)
    prof = op_profile.summarize(str(tmp_path / "b"), HLO, steps=3)
    assert (prof.runs, prof.devices) == (2, 2)
    assert [x for r in prof.rows for x in r[1:]] == pytest.approx([1.0, 2 / 3, 0.5, 1 / 3])
    # ops without metadata are summed by kind
    _write(tmp_path / "c", [_event(1, 7, 0, 300, "copy.6"), _event(1, 7, 400, 100, "copy.9")])
    prof = op_profile.summarize(str(tmp_path / "c"), HLO, steps=2)
    assert [r[0] for r in prof.rows] == ["(no metadata) copy"]
    assert prof.rows[0][1] == pytest.approx(0.2)
    assert op_profile.summarize(str(tmp_path / "none"), HLO, steps=2) == ([], 0, 0)


def test_summarize_reads_only_a_trace_written_since(tmp_path):
    old = _write(tmp_path, [_event(1, 7, 0, 1000, "fusion.1")])
    os.utime(old, (1_000_000, 1_000_000))
    assert op_profile.summarize(str(tmp_path), HLO, steps=1, since=2_000_000).rows == []
    _write(tmp_path, [_event(1, 7, 0, 1000, "add.5")], name="run2")
    assert op_profile.summarize(str(tmp_path), HLO, steps=1, since=2_000_000).rows == [
        ("optimizer add", 1.0, 1.0)]
