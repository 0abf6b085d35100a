"""op_profile: self times from a Chrome trace, grouped by the scopes in the HLO metadata."""
import gzip
import json

import pytest

from llm_jax import op_profile

HLO = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

ENTRY %main {
  %fusion.1 = f32[8,8]{1,0} fusion(%p), kind=kCustom, metadata={op_name="jit(train_step)/jvp(DecoderLM)/decoder/layer_0/mlp/wi/dot_general"}
  %fusion.2 = f32[8,8]{1,0} fusion(%p), kind=kCustom, metadata={op_name="jit(train_step)/jvp(DecoderLM)/decoder/layer_3/mlp/wi/dot_general"}
  %fusion.3 = f32[8,8]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(DecoderLM))/decoder/layer_1/mlp/jvp()/tanh"}
  %while.4 = (f32[8,8]{1,0}, s32[]) while(%tuple.1), condition=%cond, body=%body, metadata={op_name="jit(train_step)/jvp(DecoderLM)/decoder/layer_0/attn/while"}
  %add.5 = f32[8]{0} add(%a, %b), metadata={op_name="jit(train_step)/optimizer/add"}
  %copy.6 = f32[8]{0} copy(%a)
  %fusion.7 = f32[8]{0} fusion(%a), metadata={op_name="jit(train_step)/transpose(jvp(DecoderLM))/decoder/layers/(attn_norm/reduce_sum:mlp/wi/dot_general:jvp(lm_head_loss) reduce_sum)"}
  %mul.8 = f32[8]{0} multiply(%a, %b), metadata={op_name="jit(train_step)/optimizer/mul;jit(train_step)"}
}
"""


def _event(pid, tid, ts, dur, op, module="jit_train_step"):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": op,
            "args": {"hlo_module": module, "hlo_op": op}}


def _trace(events, processes):
    meta = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
            for pid, name in processes.items()]
    return {"traceEvents": meta + events}


def _write(trace_dir, events):
    run = trace_dir / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump(_trace(events, {1: "/host:CPU"}), f)


def test_op_scopes_fold_layers_and_wrappers():
    scopes = op_profile.op_scopes(HLO)
    assert scopes["fusion.1"] == scopes["fusion.2"] == "DecoderLM/decoder/layer_*/mlp/wi dot_general (fwd)"
    assert scopes["fusion.3"] == "DecoderLM/decoder/layer_*/mlp tanh (bwd)"
    assert scopes["while.4"] is None  # a loop's time is its body's
    assert scopes["add.5"] == "optimizer add (fwd)"
    assert "copy.6" not in scopes  # no metadata
    # ops that XLA merged are named by the first of their names
    assert scopes["fusion.7"] == "DecoderLM/decoder/layers/attn_norm reduce_sum (bwd)"
    assert scopes["mul.8"] == "optimizer mul (fwd)"


def test_self_times_subtract_nested_ops_and_prefer_device_events():
    host = [  # a loop of 100 us holding two ops of 30 and 20 us, then an op of another module
        _event(1, 7, 0, 100, "while.4"), _event(1, 7, 10, 30, "fusion.1"),
        _event(1, 7, 50, 20, "fusion.2"), _event(1, 7, 200, 40, "fusion.3", module="jit_other"),
        _event(1, 8, 5, 25, "fusion.1"),  # another thread: counts in full
    ]
    seconds, devices = op_profile.self_times(_trace(host, {1: "/host:CPU"}), "jit_train_step")
    assert devices == 1
    assert seconds == {"while.4": 50e-6, "fusion.1": 55e-6, "fusion.2": 20e-6}
    # with device-side events (two GPUs), the host's launch events no longer count
    device = [_event(2, 1, 0, 40, "fusion.1"), _event(3, 1, 0, 60, "fusion.1")]
    seconds, devices = op_profile.self_times(
        _trace(host + device, {1: "/host:CPU", 2: "/device:GPU:0", 3: "/device:GPU:1"}),
        "jit_train_step")
    assert (seconds, devices) == ({"fusion.1": 100e-6}, 2)


def test_summarize_ranks_scopes_per_step(tmp_path):
    events = [_event(1, 7, 0, 3000, "fusion.1"), _event(1, 7, 3000, 3000, "fusion.2"),
              _event(1, 7, 6000, 1500, "add.5"), _event(1, 7, 8000, 2500, "fusion.3"),
              _event(1, 7, 11000, 50, "while.4")]
    _write(tmp_path / "a", events)
    rows = op_profile.summarize(str(tmp_path / "a"), HLO, steps=2, top=2)
    assert [r[0] for r in rows] == ["DecoderLM/decoder/layer_*/mlp/wi dot_general (fwd)",
                                    "DecoderLM/decoder/layer_*/mlp tanh (bwd)", "(other)",
                                    "(all ops)"]
    # milliseconds per step (2 steps) and shares of the op time, the loop left out
    assert [x for r in rows for x in r[1:]] == pytest.approx([3.0, 0.6, 1.25, 0.25, 0.75, 0.15,
                                                              5.0, 1.0])
    # ops without metadata are summed by kind
    _write(tmp_path / "b", [_event(1, 7, 0, 300, "copy.6"), _event(1, 7, 400, 100, "copy.9")])
    rows = op_profile.summarize(str(tmp_path / "b"), HLO, steps=2)
    assert [r[0] for r in rows] == ["(no metadata) copy", "(all ops)"]
    assert [x for r in rows for x in r[1:]] == pytest.approx([0.2, 1.0, 0.2, 1.0])
    assert op_profile.format_rows(rows).splitlines()[1].split() == [
        "(no", "metadata)", "copy", "0.2", "100.0%"]
    assert op_profile.summarize(str(tmp_path / "none"), HLO, steps=2) == []
