"""Schedules and the weight-decay mask, against the formulas written out."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import optim
from llm_jax.config import base_config


def opt_cfg(**kw):
    o = base_config().optim
    o.update(kw)
    return o


@pytest.mark.parametrize("kind", ["cosine", "linear", "rsqrt", "constant"])
def test_schedule_warms_up_then_decays(kind):
    o = opt_cfg(schedule=kind, learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1)
    lr = optim.schedule(o, 110)
    assert float(lr(0)) == 0.0 and math.isclose(float(lr(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(lr(10)), 1.0, rel_tol=1e-6)
    later = [float(lr(s)) for s in range(10, 111, 10)]
    assert all(a >= b - 1e-7 for a, b in zip(later, later[1:]))
    expected_end = {"cosine": 0.1, "linear": 0.1, "rsqrt": (10 / 110) ** 0.5, "constant": 1.0}
    assert math.isclose(later[-1], expected_end[kind], rel_tol=1e-4)
    if kind == "cosine":  # halfway through the decay: (1 + cos(pi/2)) / 2 between end and peak
        assert math.isclose(float(lr(60)), 0.1 + 0.9 * 0.5, rel_tol=1e-4)


def test_weight_decay_skips_norms_and_biases():
    o = opt_cfg(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5,
                grad_clip=0.0)
    tx, _ = optim.make(o, 10)
    params = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones((3,)), "bias": jnp.ones((3,))}
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], 0.0)
    np.testing.assert_allclose(updates["bias"], 0.0)


def test_decay_mask_on_a_real_scanned_model():
    """Scanned layers stack norm scales to [layers, d]: they must still not decay."""
    import jax

    from llm_jax.models import build
    from llm_jax.models.layers import ModelConfig
    cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2,
                      head_dim=8, mlp_dim=32, max_len=8, use_bias=True, qkv_conv=3,
                      positions="rope", tie_embeddings=False)
    t = jnp.zeros((1, 8), jnp.int32)
    batch = {"tokens": t, "positions": t, "segment_ids": t + 1}
    params = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), batch))["params"]
    params = jax.tree.map(lambda b: b.value, params, is_leaf=lambda x: hasattr(x, "names"))
    flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    decayed = {jax.tree_util.keystr(k) for k, v in flat if v}
    kept = {jax.tree_util.keystr(k) for k, v in flat if not v}
    assert any("attn_norm']['scale" in k for k in kept)  # [layers, d], not decayed
    assert any("bias" in k for k in kept) and any("taps" in k for k in kept)
    assert all("kernel" in k or "embedding" in k for k in decayed)
    assert any("lm_head" in k for k in decayed) and any("mlp']['wi" in k for k in decayed)
