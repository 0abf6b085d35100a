"""Token cross-entropy, summed over weighted items, from logits or straight from an LM head.

`head_sums` scores hidden states against a [vocab, embed] head without keeping the logits:
on CPU it runs over chunks of tokens and computes the head's gradients in the forward pass,
so the [tokens, vocab] logits never reach memory and no transposed copy of them is made
(1.4-2x faster than logits + softmax on XLA:CPU; benchmarks/README.md). Elsewhere it is the
plain logits path, which XLA fuses well on GPU and TPU.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax.models.layers import _contract, cpu_dot_operands, matmul

Array = jax.Array
CHUNK = 512  # tokens per chunk on CPU (measured alike from 256 to 1,024 at vocab 8192)


def logit_sums(logits: Array, labels: Array, w: Array) -> tuple[Array, Array]:
    """(Σ w·cross-entropy, Σ w·hit) over items; hit: the label's logit is the largest."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    label_logit = jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    # label logit >= max rather than argmax == label: XLA:CPU's argmax over a large vocab
    # costs ~8% of a step; they differ only on exact float ties
    hit = (label_logit >= logits.max(-1)).astype(jnp.float32)
    return jnp.sum(loss * w), jnp.sum(hit * w)


def head_sums(hidden: Array, head: Array, labels: Array, w: Array,
              dtype: Any) -> tuple[Array, Array]:
    """`logit_sums` of the logits hidden · headᵀ (inputs in `dtype`, f32 accumulation), for
    hidden [..., embed], head [vocab, embed], labels and w [...]."""
    def plain() -> tuple[Array, Array]:
        logits = matmul(hidden, head, 1, dtype, w_in_last=True)
        if logits.ndim == 3:  # keep the vocab sharded where the rules say so
            logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logit_sums(logits, labels, w)

    def chunked() -> tuple[Array, Array]:
        d = hidden.shape[-1]
        x, y, wt = hidden.reshape(-1, d), labels.reshape(-1), w.reshape(-1).astype(jnp.float32)
        pad = -x.shape[0] % CHUNK  # padding rows weigh 0
        x, y, wt = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(y, (0, pad)), jnp.pad(wt, (0, pad))
        n = x.shape[0] // CHUNK
        return _chunked_sums(x.reshape(n, CHUNK, d), head, y.reshape(n, CHUNK),
                             wt.reshape(n, CHUNK), jnp.dtype(dtype))

    with jax.named_scope("lm_head_loss"):  # names its ops in profiles (op_profile.py)
        return jax.lax.platform_dependent(cpu=chunked, default=plain)


def _chunk_stats(xc: Array, wb: Array, yc: Array, wc: Array):
    """One chunk's loss sum, hit sum and d(loss sum)/d(logits) (computed in f32)."""
    logits = _contract(xc, wb, (1,), (1,))
    mx = logits.max(-1, keepdims=True)
    e = jnp.exp(logits - mx)
    total = jnp.sum(e, -1, keepdims=True)
    lse = mx + jnp.log(total)
    label_logit = jnp.take_along_axis(logits, yc[:, None], -1)
    onehot = jnp.arange(logits.shape[-1])[None, :] == yc[:, None]
    dlogits = (e / total - onehot) * wc[:, None]
    hit = (label_logit >= mx)[:, 0].astype(jnp.float32)
    return jnp.sum((lse - label_logit)[:, 0] * wc), jnp.sum(hit * wc), dlogits


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_sums(x: Array, head: Array, y: Array, w: Array, dtype: Any) -> tuple[Array, Array]:
    """x [chunks, chunk, embed]; without gradients, only the sums."""
    wb, = cpu_dot_operands(head.astype(dtype))  # once, not per chunk

    def body(acc, xs):
        loss, hit, _ = _chunk_stats(*cpu_dot_operands(xs[0].astype(dtype)), wb, xs[1], xs[2])
        return (acc[0] + loss, acc[1] + hit), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero), (x, y, w))[0]


def _chunked_fwd(x: Array, head: Array, y: Array, w: Array, dtype: Any):
    wb, = cpu_dot_operands(head.astype(dtype))  # once, not per chunk

    def body(acc, xs):
        xc, = cpu_dot_operands(xs[0].astype(dtype))
        loss, hit, dlogits = _chunk_stats(xc, wb, xs[1], xs[2])
        dlogits, = cpu_dot_operands(dlogits.astype(dtype))
        dx = _contract(dlogits, wb, (1,), (0,), "outer").astype(x.dtype)
        # headᵀ's gradient [embed, vocab]: XLA:CPU copies a dot's first operand transposed,
        # and the chunk [chunk, embed] is vocab/embed times smaller than its logits; one
        # transpose at the end
        dhead_t = acc[2] + _contract(xc, dlogits, (0,), (0,), "inner")
        return (acc[0] + loss, acc[1] + hit, dhead_t), dx

    zero = jnp.zeros((), jnp.float32)
    (loss, hit, dhead_t), dx = jax.lax.scan(
        body, (zero, zero, jnp.zeros(head.shape[::-1], jnp.float32)), (x, y, w))
    return (loss, hit), (dx, dhead_t.T.astype(head.dtype))


def _chunked_bwd(dtype: Any, res, g):
    dx, dhead = res
    g_loss = g[0]  # the hit sum is a count: no gradient
    return ((dx.astype(jnp.float32) * g_loss).astype(dx.dtype),
            (dhead * g_loss).astype(dhead.dtype), None, None)


_chunked_sums.defvjp(_chunked_fwd, _chunked_bwd)
