"""The closed-form FLOPs model against XLA's own count of the compiled step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import metrics, objectives
from llm_jax.config import base_config
from llm_jax.models import build
from llm_jax.models.layers import ModelConfig

BASE = ModelConfig(vocab_size=512, num_layers=2, d_model=128, num_heads=4, num_kv_heads=4,
                   head_dim=32, mlp_dim=512, max_len=64, dtype=jnp.float32,
                   scan_layers=False)  # XLA counts a scanned body once, so unroll here


FAMILIES = {"decoder": "next_token", "encoder": "mlm", "encoder_decoder": "span_corruption"}


def xla_flops(cfg, family, batch, seq, target_len, training):
    config = base_config()
    config.model.family, config.task.objective = family, FAMILIES[family]
    config.data.seq_len, config.data.target_seq_len = seq, target_len
    example = jax.tree.map(jnp.asarray, objectives.dummy_batch(config, batch))
    model = build(cfg, family)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), example))

    def loss(p):  # the token logits: the NSP head is negligible and not modelled
        return jnp.sum(model.apply(p, example)["logits"])

    fn = jax.grad(loss) if training else loss
    cost = jax.jit(fn).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


@pytest.mark.parametrize("family,variant", [
    ("decoder", {}),
    ("decoder", {"activation": "swiglu", "norm": "rmsnorm", "positions": "rope"}),
    ("decoder", {"num_kv_heads": 1}), ("decoder", {"tie_embeddings": False}),
    ("encoder", {"heads": ("mlm",)}), ("encoder", {"heads": ("mlm",), "left_to_right": True}),
    ("encoder_decoder", {}), ("encoder_decoder", {"num_kv_heads": 2, "num_decoder_layers": 3}),
])
@pytest.mark.parametrize("training", [True, False])
def test_flops_model_within_10_percent_of_xla(family, variant, training):
    cfg = dataclasses.replace(BASE, **variant)
    batch, seq = 4, 64
    target = 32 if family == "encoder_decoder" else 0
    positions = batch * (seq + target)
    ours = metrics.flops_per_token(cfg, family, seq, target, training) * positions
    xla = xla_flops(cfg, family, batch, seq, target, training)
    assert np.isclose(ours, xla, rtol=0.10), (ours, xla, ours / xla)


def test_bench_small_figures():
    """The issue's GPT-2-style workload: 89.8 MFLOP per token."""
    cfg = dataclasses.replace(BASE, vocab_size=8192, num_layers=6, d_model=384, num_heads=6,
                              num_kv_heads=6, head_dim=64, mlp_dim=1536, max_len=256)
    assert abs(metrics.flops_per_token(cfg, "decoder", 256) / 1e6 - 89.8) < 0.5


@pytest.mark.parametrize("kind,per_chip", [
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA B200", 0.0)])
def test_peak_flops_by_device_kind(monkeypatch, kind, per_chip):
    class Chip:
        platform, device_kind = "gpu", kind
    monkeypatch.setattr(jax, "devices", lambda: [Chip()] * 4)
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    peak, source = metrics.peak_flops(0, jnp.bfloat16)
    assert peak == 4 * per_chip, source
    if not per_chip:  # reported, not guessed
        assert source == f"unknown device kind {kind!r}"
    else:
        assert source == kind
        assert "bf16 peak" in metrics.peak_flops(0, jnp.float32)[1]


@pytest.mark.parametrize("bf16,f32,peak,source", [
    (950e9, 190e9, 950e9, "measured"),  # avx512_bf16: bf16 inputs are the faster ones
    (90e9, 150e9, 150e9, "measured f32, faster than bfloat16 on this CPU")])  # AVX2 only
def test_cpu_peak_is_the_faster_matmul(monkeypatch, bf16, f32, peak, source):
    measured = {jnp.dtype(jnp.bfloat16): bf16, jnp.dtype(jnp.float32): f32}
    monkeypatch.setattr(metrics, "measure_cpu_peak", lambda d, **_: measured[jnp.dtype(d)])
    assert metrics.peak_flops(0, jnp.bfloat16) == (peak, source)
    assert metrics.peak_flops(0, jnp.float32) == (f32, "measured")
    assert metrics.peak_flops(123e9, jnp.bfloat16) == (123e9, "config")


def test_remeasured_peak_uses_the_dtype_that_won_and_leaves_given_peaks(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "measure_cpu_peak",
                        lambda dtype, **_: calls.append(jnp.dtype(dtype)) or 200e9)
    f32_won = "measured f32, faster than bfloat16 on this CPU"
    assert metrics.remeasure_peak(150e9, f32_won, jnp.bfloat16) == 200e9
    assert metrics.remeasure_peak(250e9, "measured", jnp.bfloat16) == 250e9  # slower: kept
    assert calls == [jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)]
    assert metrics.remeasure_peak(1e11, "config", jnp.bfloat16) == 1e11
    assert metrics.remeasure_peak(989e12, "NVIDIA H200", jnp.bfloat16) == 989e12
    assert len(calls) == 2  # given peaks are never measured
