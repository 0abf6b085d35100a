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


def _head(x: Array, i: Array) -> Array:
    """Head i of x [b, t, heads, d] as [b, t, d]."""
    return jax.lax.dynamic_index_in_dim(x, i, 2, keepdims=False)


def _put(x: Array, y: Array, i: Array) -> Array:
    """x with head i set to y [b, t, d]."""
    return jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), i, 2)


def _scores(q: Array, k: Array, mask: Array, transposed: bool = False) -> Array:
    """Masked, scaled logits [b, q, kv] in f32 for one head, or [b, kv, q] transposed
    (computed as K·Qᵀ, not transposed after: XLA:CPU's transposes are slow)."""
    s = (jnp.einsum("bsd,btd->bst", k, q, preferred_element_type=jnp.float32) if transposed
         else jnp.einsum("btd,bsd->bts", q, k, preferred_element_type=jnp.float32))
    return jnp.where(mask, s * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)


def _probs(s: Array, row_max: Array, row_sum: Array) -> Array:
    # max and sum kept apart: a fully masked row (s = min everywhere) then averages V, as
    # jax.nn.dot_product_attention does, where exp(s - logsumexp) would sum it
    return jnp.exp(s - row_max) / row_sum


@jax.custom_vjp
def _attention_cpu(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Attention for q [b, t, heads, d], k and v [b, s, kv_heads, d] and mask [b or 1, 1,
    t, s], one head at a time in a loop: XLA:CPU runs the heads' dots 1.5-3x slower side by
    side (each wants both cores) or batched over heads (their transposes make f32 copies)."""
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q: Array, k: Array, v: Array, mask: Array):
    heads, group = q.shape[2], q.shape[2] // k.shape[2]
    m = mask[:, 0]

    def head(i, carry):
        o, row_max, row_sum = carry
        j = i // group
        s = _scores(_head(q, i), _head(k, j), m)
        mx = s.max(-1, keepdims=True)
        e = jnp.exp(s - mx)
        total = e.sum(-1, keepdims=True)
        vi = _head(v, j)
        oi = jnp.einsum("bts,bsd->btd", (e / total).astype(vi.dtype), vi,
                        preferred_element_type=jnp.float32)
        return _put(o, oi, i), row_max.at[i].set(mx), row_sum.at[i].set(total)

    stats = jnp.zeros((heads,) + q.shape[:2] + (1,), jnp.float32)
    o, row_max, row_sum = jax.lax.fori_loop(0, heads, head, (jnp.zeros_like(q), stats, stats))
    return o, (q, k, v, mask, o, row_max, row_sum)


def _attention_bwd(res, do: Array):
    q, k, v, mask, o, row_max, row_sum = res
    heads, group = q.shape[2], q.shape[2] // k.shape[2]
    f32, scale = jnp.float32, q.shape[-1] ** -0.5
    m = mask[:, 0]
    m_t = jnp.swapaxes(m, -1, -2)
    do = do.astype(q.dtype)

    def head(i, carry):
        dq, dk, dv = carry
        j = i // group
        qi, ki, vi, doi = _head(q, i), _head(k, j), _head(v, j), _head(do, i)
        mx, total = row_max[i], row_sum[i]
        # softmax backward with rowsum(dP ⊙ P) = rowsum(dO ⊙ O): a reduction over head_dim,
        # not over the kv length (FlashAttention's trick; XLA:CPU's T² reduction is slow)
        delta = jnp.sum(doi.astype(f32) * _head(o, i).astype(f32), -1, keepdims=True)
        # P and dP, and their transposes (computed, not transposed) for dV = Pᵀ·dO, dK = dSᵀ·Q
        p = _probs(_scores(qi, ki, m), mx, total)
        p_t = _probs(_scores(qi, ki, m_t, True), jnp.swapaxes(mx, -1, -2),
                     jnp.swapaxes(total, -1, -2))
        dp = jnp.einsum("btd,bsd->bts", doi, vi, preferred_element_type=f32)
        dp_t = jnp.einsum("bsd,btd->bst", vi, doi, preferred_element_type=f32)
        # a masked score is a constant: no gradient (matters in fully masked rows)
        ds = jnp.where(m, p * (dp - delta) * scale, 0).astype(q.dtype)
        ds_t = jnp.where(m_t, p_t * (dp_t - jnp.swapaxes(delta, -1, -2)) * scale, 0)
        dqi = jnp.einsum("bts,bsd->btd", ds, ki, preferred_element_type=f32)
        dki = jnp.einsum("bst,btd->bsd", ds_t.astype(q.dtype), qi, preferred_element_type=f32)
        dvi = jnp.einsum("bst,btd->bsd", p_t.astype(q.dtype), doi, preferred_element_type=f32)
        # a group's query heads share k and v: their gradients add up
        return (_put(dq, dqi, i), _put(dk, _head(dk, j) + dki, j), _put(dv, _head(dv, j) + dvi, j))

    init = (jnp.zeros_like(q), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    dq, dk, dv = jax.lax.fori_loop(0, heads, head, init)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_cpu.defvjp(_attention_fwd, _attention_bwd)


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
    t = q.shape[1]
    full = jnp.ones((1, 1, t, k.shape[1]), bool) if mask is None else mask
    if causal:
        full = full & causal_mask(t)
    return jax.lax.platform_dependent(cpu=lambda: _attention_cpu(q, k, v, full),
                                      default=library)


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
