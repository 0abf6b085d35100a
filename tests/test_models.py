"""Model invariants against independent truth: the naive attention formula, causality,
packed-document isolation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_host_cpu import force

from llm_jax.models import build
from llm_jax.models.attention import Attention, causal_mask, segment_mask
from llm_jax.models.layers import ModelConfig

CFG = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                  head_dim=8, mlp_dim=64, max_len=24, dtype=jnp.float32)


def naive_attention(q, k, v, mask):
    """softmax(QKᵀ/√d_k)V written out, with kv heads repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_equals_naive_formula(kv_heads):
    cfg = dataclasses.replace(CFG, num_kv_heads=kv_heads)
    x = jax.random.normal(jax.random.key(0), (2, 10, cfg.d_model))
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 10])
    mask = segment_mask(seg, seg) & causal_mask(10)
    attn = Attention(cfg, causal=False)
    variables = attn.init(jax.random.key(1), x, x, mask)
    out = attn.apply(variables, x, x, mask)
    p = jax.tree.map(np.asarray, variables["params"])
    proj = lambda name: np.einsum("btd,dhk->bthk", x, p[name]["kernel"].value)  # noqa: E731
    ref = naive_attention(proj("query"), proj("key"), proj("value"), np.asarray(mask))
    ref = np.einsum("bthk,hkd->btd", ref, p["out"]["kernel"].value)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def _model_and_params(**overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    model = build(cfg)
    t = jnp.zeros((1, 24), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), _batch(t, t + 1, t))["params"]
    return model, params


def _batch(tokens, segs, positions):
    return {"tokens": tokens, "segment_ids": segs, "positions": positions}


def _logits_of(model, params, tokens, segs, positions):
    return model.apply({"params": params}, _batch(tokens, segs, positions))["logits"]


@functools.cache
def _apply(model):
    # jitted once per model: op by op, every call would compile the attention's loop afresh
    return jax.jit(lambda p, b: model.apply({"params": p}, b)["logits"])


def _logits(model, params, tokens, segs, positions):
    return np.asarray(_apply(model)(params, _batch(tokens, segs, positions)))


@pytest.mark.parametrize("positions,conv", [("learned", 0), ("rope", 0), ("rope", 3)])
@pytest.mark.parametrize("scan", [True, False])
def test_future_tokens_do_not_change_past_logits(positions, conv, scan):
    model, params = _model_and_params(positions=positions, scan_layers=scan, qkv_conv=conv)
    if conv:
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.3 if "conv" in jax.tree_util.keystr(path) else x, params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (2, 24)).astype(np.int32)
    segs, pos = np.ones_like(tokens), np.broadcast_to(np.arange(24), tokens.shape)
    base = _logits(model, params, tokens, segs, pos)
    changed = tokens.copy()
    changed[:, 15:] = rng.integers(0, 97, (2, 9))
    after = _logits(model, params, changed, segs, pos)
    np.testing.assert_allclose(after[:, :15], base[:, :15], rtol=1e-5, atol=1e-5)
    assert np.abs(after[:, 15:] - base[:, 15:]).max() > 1e-3  # the future did change
    past = tokens.copy()
    past[:, 3] = (past[:, 3] + 1) % 97
    later = _logits(model, params, past, segs, pos)
    assert np.abs(later[:, 10] - base[:, 10]).max() > 1e-4  # and the past is used


@pytest.mark.parametrize("positions,conv", [("learned", 0), ("rope", 0), ("rope", 3)])
def test_packed_documents_are_isolated(positions, conv):
    """Perturbing one packed document leaves the other's logits unchanged."""
    model, params = _model_and_params(positions=positions, activation="swiglu",
                                      norm="rmsnorm", num_kv_heads=2, qkv_conv=conv)
    if conv:  # move the conv off its identity init so it really mixes positions
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.3 if "conv" in jax.tree_util.keystr(path) else x, params)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, (1, 24)).astype(np.int32)
    segs = np.array([[1] * 10 + [2] * 14], np.int32)
    pos = np.array([list(range(10)) + list(range(14))], np.int32)
    base = _logits(model, params, tokens, segs, pos)
    changed = tokens.copy()
    changed[0, :10] = rng.integers(0, 97, 10)  # rewrite document 1 entirely
    after = _logits(model, params, changed, segs, pos)
    np.testing.assert_allclose(after[0, 10:], base[0, 10:], rtol=1e-5, atol=1e-5)
    # and a document packed second gives the same logits as that document alone
    alone = _logits(model, params, tokens[:, 10:], segs[:, 10:] * 0 + 1, pos[:, 10:])
    np.testing.assert_allclose(alone[0], base[0, 10:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_document_mask_off_is_one_sequence_per_row(positions):
    """document_mask=False (GPT-2 style packing): a row of two packed documents gives the
    logits of one document spanning the row, at row positions 0..T-1; so the second
    document depends on the first."""
    model, params = _model_and_params(positions=positions, document_mask=False)
    masked, _ = _model_and_params(positions=positions)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 97, (1, 24)).astype(np.int32)
    segs = np.array([[1] * 10 + [2] * 14], np.int32)
    pos = np.array([list(range(10)) + list(range(14))], np.int32)
    base = _logits(model, params, tokens, segs, pos)
    one_doc = _logits(masked, params, tokens, np.ones_like(segs), np.arange(24)[None])
    np.testing.assert_allclose(base, one_doc, rtol=1e-5, atol=1e-5)
    changed = tokens.copy()
    changed[0, :10] = rng.integers(0, 97, 10)
    after = _logits(model, params, changed, segs, pos)
    assert np.abs(after[0, 10:] - base[0, 10:]).max() > 1e-3


def test_scan_and_loop_give_the_same_function():
    model_s, params_s = _model_and_params(scan_layers=True)
    model_l, _ = _model_and_params(scan_layers=False)
    layers = params_s["decoder"]["layers"]
    looped = {k: v for k, v in params_s.items() if k != "decoder"}
    looped["decoder"] = {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], layers)
                         for i in range(CFG.num_layers)}
    tokens = np.arange(24, dtype=np.int32)[None] % 97
    segs, pos = np.ones_like(tokens), np.arange(24)[None]
    np.testing.assert_allclose(_logits(model_l, looped, tokens, segs, pos),
                               _logits(model_s, params_s, tokens, segs, pos),
                               rtol=1e-5, atol=1e-5)


def test_every_parameter_has_logical_axes():
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    model = build(cfg)
    t = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _batch(t, t + 1, t)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(len(x.names) == len(x.value.shape) for x in leaves)


def test_remat_does_not_change_the_gradients():
    tokens = (np.arange(24, dtype=np.int32)[None] * 7) % 97
    segs, pos = np.ones_like(tokens), np.arange(24)[None]
    grads = []
    for remat in ("none", "full", "dots", "dots_attention"):
        model, params = _model_and_params(remat=remat)
        loss = lambda p: jnp.mean(_logits_of(model, p, tokens, segs, pos) ** 2)  # noqa
        grads.append(jax.jit(jax.grad(loss))(params))
    for g in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads[0], g)


def test_dots_attention_remat_does_not_rerun_attention_forward(monkeypatch):
    """dots_no_batch runs the CPU attention's forward again in the backward pass, and
    dots_attention keeps its outputs and statistics instead: counted by the softmax's row
    max, one per head and forward pass (the backward reads the saved one), in the f32
    model's unrolled head loop and in the 16-bit model's scan over heads (16-bit dots forced
    native: upcast to f32, they unroll too)."""
    force(monkeypatch, upcast=False)
    tokens = jnp.zeros((1, 24), jnp.int32)
    layers, heads = CFG.num_layers, CFG.num_heads
    for op, per_pass, dtype in (("reduce_max[", heads, jnp.float32), ("= scan[", 1, jnp.bfloat16)):
        counts = {}
        for remat in ("dots_no_batch", "dots_attention"):
            model, params = _model_and_params(remat=remat, scan_layers=False, dtype=dtype)
            loss = lambda p: jnp.mean(_logits_of(model, p, tokens, tokens + 1, tokens) ** 2)  # noqa
            counts[remat] = str(jax.make_jaxpr(jax.grad(loss))(params)).count(op)
        # dots_no_batch's rerun adds one forward pass; the rest (the backward's loop, the
        # library attention that platform_dependent traces beside ours) is common to both
        assert counts["dots_no_batch"] - counts["dots_attention"] == per_pass * layers, counts
        assert counts["dots_attention"] >= per_pass * layers, counts


@pytest.mark.parametrize("kind,cc,dtype,head_dim,length,want", [
    ("NVIDIA H200", "9.0", jnp.bfloat16, 64, 16, True),
    ("NVIDIA A100-SXM4-80GB", "8.0", jnp.float16, 128, 16, True),
    ("NVIDIA H200", "9.0", jnp.float32, 64, 16, False),  # cuDNN flash takes bf16/f16 only
    ("NVIDIA H200", "9.0", jnp.bfloat16, 256, 16, False),
    ("NVIDIA H200", "9.0", jnp.bfloat16, 60, 16, False),
    ("NVIDIA H200", "9.0", jnp.bfloat16, 64, 15, False),  # odd length with a mask
    ("NVIDIA GeForce RTX 2080 Ti", "7.5", jnp.bfloat16, 64, 16, False),  # pre-Ampere
    ("AMD Instinct MI300X", None, jnp.bfloat16, 64, 16, False),
])
def test_auto_attention_picks_cudnn_only_where_it_applies(monkeypatch, kind, cc, dtype,
                                                          head_dim, length, want):
    """implementation=None hands 'cudnn' to jax.nn.dot_product_attention exactly when the
    device and shapes suit cuDNN flash attention, else leaves JAX's XLA path."""
    from llm_jax.models import attention
    fake = type("Device", (), {"platform": "gpu", "device_kind": kind,
                               "compute_capability": cc})()
    monkeypatch.setattr(attention.jax, "devices", lambda *a: [fake])
    seen = []
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **k: seen.append(implementation))
    q = jnp.zeros((1, length, 2, head_dim), dtype)
    mask = jnp.ones((1, 1, length, length), bool)
    attention.dot_product_attention(q, q, q, mask, True)
    assert (seen == ["cudnn"]) is want  # on CPU, the XLA path is not even traced


def test_auto_attention_stays_off_cudnn_on_cpu():
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    from llm_jax.models import attention
    assert not attention.cudnn_applies(q, q, q, None)


def test_auto_attention_follows_the_mesh_in_context_not_the_host(monkeypatch):
    """An AOT compile for other devices (here a CPU mesh) stays off cuDNN even on a host
    whose own devices are NVIDIA GPUs."""
    from llm_jax.models import attention
    mesh = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    fake = type("Device", (), {"platform": "gpu", "device_kind": "NVIDIA H200",
                               "compute_capability": "9.0"})()
    monkeypatch.setattr(attention.jax, "devices", lambda *a: [fake])
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    assert attention.cudnn_applies(q, q, q, None)
    with jax.set_mesh(mesh):
        assert not attention.cudnn_applies(q, q, q, None)
