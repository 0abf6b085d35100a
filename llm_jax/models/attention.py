"""Masks and multi-head (grouped-query) attention.

Attention is softmax(QKᵀ/√d_k)V. On GPU and TPU it is `jax.nn.dot_product_attention`, so
`implementation='cudnn'` gives flash attention on NVIDIA GPUs; on CPU it is our own with
a FlashAttention-style backward, which XLA:CPU runs faster (README, Performance).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.layers import Dense, ModelConfig, init_std, rotary

Array = jax.Array


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """[batch, 1, q, kv] True where query and key lie in the same packed document.

    Padding (segment 0) attends to padding, so no self-attention row is fully masked. In
    cross-attention a padding query may find no padding key; such a row averages V (as
    jax.nn.dot_product_attention does: no NaNs) and carries no loss weight.
    """
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def causal_mask(length: int) -> Array:
    """[1, 1, q, kv] True where the key is not in the future of the query."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def _scores(q: Array, k: Array, mask: Array) -> Array:
    """Masked, scaled logits [b, kv_heads, group, q, kv] in f32 (q grouped per kv head)."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, :, None], s * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)


def _probs(s: Array, row_max: Array, row_sum: Array) -> Array:
    # max and sum kept apart: a fully masked row (s = min everywhere) then averages V, as
    # jax.nn.dot_product_attention does, where exp(s - logsumexp) would sum it
    return jnp.exp(s - row_max) / row_sum


@jax.custom_vjp
def _attention_grouped(q: Array, k: Array, v: Array, mask: Array) -> Array:
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q: Array, k: Array, v: Array, mask: Array):
    s = _scores(q, k, mask)
    row_max = s.max(-1, keepdims=True)
    e = jnp.exp(s - row_max)
    row_sum = e.sum(-1, keepdims=True)
    p = e / row_sum  # = _probs(s, row_max, row_sum), without a second exp
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
    return o, (q, k, v, mask, o, row_max, row_sum)


def _attention_bwd(res, do: Array):
    q, k, v, mask, o, row_max, row_sum = res
    p = _probs(_scores(q, k, mask), row_max, row_sum)  # recomputed, not kept per layer
    do = do.astype(q.dtype)
    f32, scale = jnp.float32, q.shape[-1] ** -0.5
    dv = jnp.einsum("bkgts,btkgd->bskd", p.astype(q.dtype), do, preferred_element_type=f32)
    dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=f32)
    # softmax backward with rowsum(dP ⊙ P) = rowsum(dO ⊙ O): a reduction over head_dim,
    # not over the kv length (FlashAttention's trick; XLA:CPU's T² reduction is slow)
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(f32), o.astype(f32))[..., None]
    # a masked score is a constant: no gradient (matters in fully masked rows)
    ds = jnp.where(mask[:, :, None], p * (dp - delta) * scale, 0).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_grouped.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, causal: bool,
                          implementation: str | None = None) -> Array:
    """softmax(QKᵀ/√d)V for q [b, t, heads, d] and k, v [b, s, kv_heads, d].

    `implementation` None picks per platform: on CPU a version with a hand-written,
    FlashAttention-style backward (faster on XLA:CPU, README Performance), elsewhere
    `jax.nn.dot_product_attention`; 'xla' or 'cudnn' force that one.
    """
    library = lambda: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=mask, is_causal=causal, implementation=implementation)
    if implementation is not None:
        return library()
    b, t, h, d = q.shape
    full = jnp.ones((1, 1, t, k.shape[1]), bool) if mask is None else mask
    if causal:
        full = full & causal_mask(t)

    def grouped() -> Array:
        qg = q.reshape(b, t, k.shape[2], h // k.shape[2], d)
        return _attention_grouped(qg, k, v, full).reshape(b, t, h, d)

    return jax.lax.platform_dependent(cpu=grouped, default=library)


class DepthwiseConv(nn.Module):
    """y_t = Σ_j w_j ⊙ x_{t-j} per channel, within a document (Primer, So et al. 2021).

    Causal: j = 0..width-1 (the past). Bidirectional (encoders): j centred on 0, e.g.
    -1, 0, 1, so a masked position also sees the token after it. Initialized to the
    identity, so attention starts out unchanged; mixing in the neighbours' keys lets
    copying ("induction") heads form in a few hundred steps.
    """

    width: int
    axes: tuple[str, str]
    causal: bool = True

    @nn.compact
    def __call__(self, x: Array, positions: Array) -> Array:
        first = 0 if self.causal else -(self.width // 2)
        offsets = range(first, first + self.width)
        init = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[-first].set(1.0)  # noqa
        w = self.param("taps", nn.with_logical_partitioning(init, (None,) + self.axes),
                       (self.width,) + x.shape[2:], jnp.float32)
        length = x.shape[1]
        y = jnp.zeros(x.shape, jnp.float32)
        for i, j in enumerate(offsets):
            if j == 0:
                y = y + x.astype(jnp.float32) * w[i]
                continue
            pad = ((0, 0), (j, 0), (0, 0), (0, 0)) if j > 0 else ((0, 0), (0, -j), (0, 0), (0, 0))
            shifted = jnp.pad(x, pad)[:, :length] if j > 0 else jnp.pad(x, pad)[:, -j:]
            pos_pad = ((0, 0), (j, 0)) if j > 0 else ((0, 0), (0, -j))
            neighbour = (jnp.pad(positions, pos_pad, constant_values=-1)[:, :length] if j > 0
                         else jnp.pad(positions, pos_pad, constant_values=-1)[:, -j:])
            inside = (neighbour == positions - j)[:, :, None, None]  # never cross documents
            y = y + jnp.where(inside, shifted, 0).astype(jnp.float32) * w[i]
        return y.astype(x.dtype)


class Attention(nn.Module):
    """Self- or cross-attention with GQA, optional rotary positions and logical axes."""

    cfg: ModelConfig
    causal: bool = False
    use_rope: bool = True

    @nn.compact
    def __call__(self, x_q: Array, x_kv: Array, mask: Array | None,
                 q_positions: Array | None = None, kv_positions: Array | None = None) -> Array:
        cfg = self.cfg
        proj = lambda heads, axis, name: Dense(  # noqa: E731
            (heads, cfg.head_dim), ("embed",), (axis, "head_dim"), std=init_std(cfg),
            use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
        q = proj(cfg.num_heads, "heads", "query")(x_q)
        k = proj(cfg.num_kv_heads, "kv_heads", "key")(x_kv)
        v = proj(cfg.num_kv_heads, "kv_heads", "value")(x_kv)
        if cfg.qkv_conv and self.use_rope:  # self-attention only
            conv = lambda axes, name: DepthwiseConv(  # noqa: E731
                cfg.qkv_conv, axes, causal=self.causal, name=name)
            q = conv(("heads", "head_dim"), "q_conv")(q, q_positions)
            k = conv(("kv_heads", "head_dim"), "k_conv")(k, kv_positions)
            v = conv(("kv_heads", "head_dim"), "v_conv")(v, kv_positions)
        if cfg.positions == "rope" and self.use_rope:
            q = rotary(q, q_positions, cfg.rope_theta)
            k = rotary(k, kv_positions, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        out = dot_product_attention(q, k, v, mask, self.causal, cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return Dense((cfg.d_model,), ("heads", "head_dim"), ("embed",),
                      std=init_std(cfg, residual_out=True), use_bias=cfg.use_bias,
                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out")(out)
