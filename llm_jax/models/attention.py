"""Masks and multi-head (grouped-query) attention.

Attention is softmax(QKᵀ/√d_k)V, computed by `jax.nn.dot_product_attention` so that
`implementation='cudnn'` gives flash attention on NVIDIA GPUs and 'xla' runs anywhere.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.layers import Dense, ModelConfig, init_std, rotary

Array = jax.Array


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """[batch, 1, q, kv] True where query and key lie in the same packed document.

    Padding (segment 0) attends to padding so no row is fully masked (no NaNs).
    """
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def causal_mask(length: int) -> Array:
    """[1, 1, q, kv] True where the key is not in the future of the query."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


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
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=self.causal, implementation=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return Dense((cfg.d_model,), ("heads", "head_dim"), ("embed",),
                      std=init_std(cfg, residual_out=True), use_bias=cfg.use_bias,
                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out")(out)
