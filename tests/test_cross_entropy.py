"""cross_entropy.head_sums (chunked on CPU, gradients computed in its forward pass) against
a naive log-softmax of full logits, and its gradients against autodiff of that."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import cross_entropy


def naive_sums(hidden, head, labels, w):
    logits = jnp.einsum("btd,vd->btv", hidden.astype(jnp.float32), head)
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(hit * w)


def _case(batch, length, vocab=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(vocab, d)) * 0.3, jnp.float32)
    labels = rng.integers(0, vocab, (batch, length))
    top = np.argmax(np.einsum("btd,vd->btv", hidden, head), -1)
    labels = jnp.asarray(np.where(rng.random((batch, length)) < 0.5, top, labels), jnp.int32)
    w = jnp.asarray(rng.random((batch, length)) < 0.8, jnp.float32)  # some items unscored
    return hidden, head, labels, w


# 2 x 700 tokens: two chunks plus padding; 3 x 5: less than one chunk
@pytest.mark.parametrize("shape", [(2, 700), (3, 5)])
def test_head_sums_and_grads_match_naive_softmax(shape):
    hidden, head, labels, w = _case(*shape)
    ours = jax.jit(lambda h, e: cross_entropy.head_sums(h, e, labels, w, jnp.float32))
    loss, hits = ours(hidden, head)
    ref_loss, ref_hits = naive_sums(hidden, head, labels, w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(hits) == float(ref_hits) and float(hits) > 0
    # the loss the steps build: a part's sum over the batch's total weight
    grads = jax.jit(jax.grad(lambda h, e: ours(h, e)[0] / jnp.sum(w), (0, 1)))(hidden, head)
    ref = jax.grad(lambda h, e: naive_sums(h, e, labels, w)[0] / jnp.sum(w), (0, 1))(
        hidden, head)
    for g, r in zip(grads, ref):
        assert g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    # unscored items get no gradient
    np.testing.assert_array_equal(np.asarray(grads[0])[np.asarray(w) == 0], 0)


def test_bf16_head_sums_close_to_f32():
    hidden, head, labels, w = _case(2, 600, seed=1)
    h16 = hidden.astype(jnp.bfloat16)
    f = jax.jit(jax.value_and_grad(
        lambda h, e, dt: cross_entropy.head_sums(h, e, labels, w, dt)[0], (0, 1)),
        static_argnums=2)
    (l16, (dh16, de16)), (l32, (dh32, de32)) = f(h16, head, jnp.bfloat16), f(
        h16.astype(jnp.float32), head, jnp.float32)
    assert dh16.dtype == jnp.bfloat16 and de16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, rtol=1e-2)
    for a, b in ((dh16, dh32), (de16, de32)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() < 0.03 * np.abs(b).max()


def test_logit_sums_matches_naive():
    hidden, head, labels, w = _case(2, 9)
    logits = jnp.einsum("btd,vd->btv", hidden, head)
    loss, hits = cross_entropy.logit_sums(logits, labels, w)
    ref_loss, ref_hits = naive_sums(hidden, head, labels, w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert float(hits) == float(ref_hits)
