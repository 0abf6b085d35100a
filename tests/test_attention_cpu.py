"""The CPU attention (hand-written FlashAttention-style backward) against
jax.nn.dot_product_attention's XLA implementation: values and gradients, with GQA,
padding/segment masks and causal masking. dot_product_attention picks our version only on
CPU, so these run on CPU (conftest)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_host_cpu import force

from llm_jax.models.attention import causal_blocks, dot_product_attention, segment_mask


def assert_matches_library(q, k, v, mask, causal, cot):
    """Values and gradients of dot_product_attention (the CPU one here) against the library's
    XLA implementation."""
    ours = lambda q, k, v: dot_product_attention(q, k, v, mask, causal)  # noqa: E731
    ref = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=mask, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(lambda *a: (ours(*a) * cot).sum(), (0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: (ref(*a) * cot).sum(), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_matches_library(causal, heads, kv_heads, masked):
    rng = np.random.default_rng(heads * 10 + kv_heads + 100 * causal + 1000 * masked)
    b, t, d = 2, 12, 8
    q = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
    # two packed documents and two padding positions in row 0; one document in row 1
    seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [1] * t])
    mask = segment_mask(seg, seg) if masked else None
    cot = jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32)
    assert_matches_library(q, k, v, mask, causal, cot)


@pytest.mark.parametrize("t,kv_heads,causal", [(128, 2, True), (256, 2, True),
                                               (256, 4, True), (64, 2, False)])
def test_long_attention_matches_library(t, kv_heads, causal):
    """Long enough for query blocks that skip the masked upper triangle (2 and 4 blocks)
    and for dK and dV to contract a split query dim (`layers._contract`)."""
    if causal:
        assert causal_blocks(t) == t // 64
    rng = np.random.default_rng(t + kv_heads)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, kv_heads, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 4, size=(2, t)), axis=1))  # documents, padding
    mask = segment_mask(seg, seg)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    assert_matches_library(q, k, v, mask, causal, cot)


@pytest.mark.parametrize("t,s", [(6, 5), (64, 48)])
def test_fully_masked_rows_match_library(t, s):
    """Cross-attention: padding queries whose keys hold no padding see no key at all (at
    t = 64 through the split query-dim contraction of dK and dV)."""
    rng = np.random.default_rng(7 + t)
    q = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, s, 2, 8)), jnp.float32) for _ in range(2))
    half = t // 2  # row 0: one document, then padding; row 1: two documents, one padding
    q_seg = jnp.asarray([[1] * half + [0] * (t - half), [1] * 2 + [2] * (t - 3) + [0]])
    kv_seg = jnp.asarray([[1] * s, [1] * 2 + [2] * (s - 2)])
    mask = segment_mask(q_seg, kv_seg)
    assert not mask[0, 0, half:].any()  # the case under test
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    assert_matches_library(q, k, v, mask, False, cot)


def test_cpu_attention_bf16_close_to_f32():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(3))
    f32 = dot_product_attention(q, k, v, None, True)
    bf = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), None, True)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf.astype(jnp.float32), f32, atol=3e-2)


@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("kv_heads,causal,dtype", [(4, True, jnp.bfloat16),
                                                   (2, True, jnp.bfloat16),
                                                   (4, False, jnp.bfloat16),
                                                   (2, True, jnp.float16)])
def test_cpu_attention_16_bit_grads_close_to_f32(monkeypatch, kv_heads, causal, dtype, upcast):
    """16-bit inputs take the uint16 head-slice path (and 16-bit dK, dV without GQA) on a CPU
    with native 16-bit dots, and run in f32 on one without (upcast)."""
    force(monkeypatch, upcast)
    rng = np.random.default_rng(kv_heads)
    q = jnp.asarray(rng.normal(size=(2, 128, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 128, kv_heads, 8)), jnp.float32) for _ in range(2))
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(*a):
        return (dot_product_attention(*a, None, causal).astype(jnp.float32) * cot).sum()

    want = jax.grad(loss, (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss, (0, 1, 2)))(*(a.astype(dtype) for a in (q, k, v)))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(g.astype(jnp.float32) / scale, w / scale, atol=3e-2)


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_attention_is_f32_attention_rounded(monkeypatch, upcast):
    """Without native 16-bit dots, bf16 attention and its gradients are the f32 ones of the
    same (bf16) inputs and cotangent, rounded to bf16 once; the native 16-bit path rounds
    P and dS on the way, so it is not."""
    force(monkeypatch, upcast)
    rng = np.random.default_rng(7)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(2, 128, 4, 8)), jnp.bfloat16)
                    for _ in range(4))

    def fwd_grads(*a):
        out, vjp = jax.vjp(lambda *x: dot_product_attention(*x, None, True), *a)
        return (out, *vjp(cot.astype(out.dtype)))

    got = jax.jit(fwd_grads)(q, k, v)
    wide = jax.jit(fwd_grads)(*(a.astype(jnp.float32) for a in (q, k, v)))
    same = [np.array_equal(np.asarray(g, np.float32), np.asarray(w.astype(g.dtype), np.float32))
            for g, w in zip(got, wide)]
    if upcast:
        # rounded to nearest, each is within half a bf16 ulp (at most 2^-8 relative) of the
        # f32 value; XLA may order an f32 sum otherwise in one of the two builds
        for g, w in zip(got, wide):
            np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2 ** -8, atol=0)
        assert sum(same) >= 3, same
    else:
        assert not all(same), same
