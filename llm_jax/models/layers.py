"""Shared Transformer parts: config, dense, embeddings, norms, MLP, rotary positions.

Every parameter is created with logical axis names; `sharding.py` maps them to the mesh.
Matmuls take inputs in the compute dtype (on a CPU without native 16-bit dots, in f32:
`cpu_dot_operands`) and accumulate in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from llm_jax import host_cpu

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model hyper-parameters (hashable, so Flax modules can hold it)."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int
    activation: str = "gelu"
    norm: str = "layernorm"
    positions: str = "learned"
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    use_bias: bool = False
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str | None = None
    document_mask: bool = True  # decoder: attend only within a packed document
    max_segments: int = 0  # >0: attention_impl cudnn_packed, with this many documents per row
    qkv_conv: int = 0
    num_decoder_layers: int = 0  # encoder_decoder: decoder depth (0: num_layers)
    left_to_right: bool = False  # encoder: causal attention (BERT's LTR ablation)
    type_vocab_size: int = 2  # encoder: sentence A/B embeddings
    heads: tuple[str, ...] = ()  # encoder outputs: "mlm" (also the LM head), "nsp", "cls"
    num_classes: int = 2

    @property
    def decoder_depth(self) -> int:
        """Layers of the encoder_decoder's decoder."""
        return self.num_decoder_layers or self.num_layers

    @classmethod
    def from_config(cls, m: ml_collections.ConfigDict, vocab_size: int,
                    seq_len: int, heads: tuple[str, ...] = (),
                    max_segments_per_row: int = 0) -> "ModelConfig":
        packed = m.attention_impl == "cudnn_packed"
        return cls(
            vocab_size=vocab_size, num_layers=m.num_layers, d_model=m.d_model,
            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
            head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim,
            max_len=m.max_len or seq_len, activation=m.activation, norm=m.norm,
            positions=m.positions, rope_theta=m.rope_theta, dropout=m.dropout,
            tie_embeddings=m.tie_embeddings, use_bias=m.use_bias,
            dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
            scan_layers=m.scan_layers, remat=m.remat,
            # cudnn_packed is the decoder's Packed mask (max_segments), else auto
            attention_impl=None if m.attention_impl in ("auto", "cudnn_packed")
            else m.attention_impl,
            document_mask=m.document_mask, max_segments=max_segments_per_row if packed else 0,
            qkv_conv=m.qkv_conv, num_decoder_layers=m.num_decoder_layers or m.num_layers,
            left_to_right=m.left_to_right, heads=heads, num_classes=m.num_classes)


def init_std(cfg: ModelConfig, residual_out: bool = False) -> float:
    """GPT-2 init: N(0, 0.02), with residual projections scaled by 1/sqrt(2 * layers)."""
    return 0.02 / (2 * cfg.num_layers) ** 0.5 if residual_out else 0.02


_SPLIT = 16  # parts of a split contraction; 4-256 measured alike on this CPU


def _contract(a: Array, b: Array, a_dims: tuple[int, ...], b_dims: tuple[int, ...],
              split: str | None = None, batch: int = 0) -> Array:
    """dot_general over a_dims of `a` and b_dims of `b`, in f32, with the leading `batch`
    dims of both as batch dims; the result's dims: batch, then a's free, then b's free.

    split ("outer" or "inner") first reshapes a single contracted dim n into (16, n/16) or
    (n/16, 16), a free reshape of row-major arrays: XLA:CPU runs a bf16 dot that contracts
    two dims 2-2.5x faster than the same dot over one long dim, and an f32 step 9% faster
    on an AVX2-only host (benchmarks/README.md).
    "inner" keeps a sharded batch dim's shards whole.
    """
    assert batch <= min(a_dims + b_dims), (batch, a_dims, b_dims)  # batch dims lead
    if split and len(a_dims) == 1:
        (da,), (db,) = a_dims, b_dims
        n = a.shape[da]
        if n % _SPLIT == 0 and n > _SPLIT:
            two = (_SPLIT, n // _SPLIT) if split == "outer" else (n // _SPLIT, _SPLIT)
            a = a.reshape(a.shape[:da] + two + a.shape[da + 1:])
            b = b.reshape(b.shape[:db] + two + b.shape[db + 1:])
            a_dims, b_dims = (da, da + 1), (db, db + 1)
    shared = tuple(range(batch))
    return jax.lax.dot_general(a, b, ((a_dims, b_dims), (shared, shared)),
                               preferred_element_type=jnp.float32)


def _w_dims(w: Array, n_in: int, w_in_last: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(contracted, output) dims of w: its first n_in dims, or its last with w_in_last."""
    dims = tuple(range(w.ndim))
    return (dims[-n_in:], dims[:-n_in]) if w_in_last else (dims[:n_in], dims[n_in:])


def cpu_dot_operands(*xs: Array) -> tuple[Array, ...]:
    """xs as operands of a dot on this host's CPU: a 16-bit float type it has no native dot
    for (bf16 without avx512_bf16 or amx_bf16) goes in as f32, which XLA:CPU multiplies
    1.3x faster on an AVX2-only host (benchmarks/README.md). A product of two 16-bit floats is
    exact in f32, so only the order of the f32 sums changes."""
    return tuple(x.astype(host_cpu.dot_dtype(x.dtype)) for x in xs)


def _forward(x: Array, w: Array, n_in: int, w_in_last: bool, out_dtype: Any) -> Array:
    x_in = tuple(range(x.ndim - n_in, x.ndim))
    dot = lambda x, w: jax.lax.dot_general(  # noqa: E731
        x, w, ((x_in, _w_dims(w, n_in, w_in_last)[0]), ((), ())), preferred_element_type=out_dtype)
    if host_cpu.dot_dtype(x.dtype) == x.dtype:
        return dot(x, w)
    return jax.lax.platform_dependent(cpu=lambda: dot(*cpu_dot_operands(x, w)),
                                      default=lambda: dot(x, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def matmul(x: Array, w: Array, n_in: int, dtype: Any, w_in_last: bool = False,
           out_dtype: Any = jnp.float32) -> Array:
    """x · w over x's last n_in dims and w's first n_in dims (last, with w_in_last, as for a
    tied [vocab, embed] table): inputs in `dtype`, f32 accumulation, result in `out_dtype`.

    The backward pass returns dx in x's dtype and dw in w's dtype (f32 parameters get f32
    weight gradients); on CPU it contracts split dims (see `_contract`).
    """
    return _forward(x.astype(dtype), w.astype(dtype), n_in, w_in_last, out_dtype)


def _matmul_fwd(x: Array, w: Array, n_in: int, dtype: Any, w_in_last: bool, out_dtype: Any):
    xc, wc = x.astype(dtype), w.astype(dtype)
    # residuals must be arrays: empty ones carry the input dtypes
    return _forward(xc, wc, n_in, w_in_last, out_dtype), (xc, wc, jnp.zeros(0, x.dtype),
                                                          jnp.zeros(0, w.dtype))


def _matmul_grads(n_in: int, dtype: Any, w_in_last: bool, res, g: Array,
                  cpu: bool) -> tuple[Array, Array]:
    """(dx, dw); on CPU with split contractions (see `_contract`)."""
    xc, wc, x_like, w_like = res
    g = g.astype(dtype)
    if cpu:
        g, xc, wc = cpu_dot_operands(g, xc, wc)
    n_batch = xc.ndim - n_in
    # dx: contract the output dims of g and w
    g_out, w_out = tuple(range(n_batch, g.ndim)), _w_dims(wc, n_in, w_in_last)[1]
    if cpu:
        dx = _contract(g, wc, g_out, w_out, "outer")
    else:  # written in x's dtype directly: half the bytes of f32 for bf16 activations
        dx = jax.lax.dot_general(g, wc, ((g_out, w_out), ((), ())),
                                 preferred_element_type=x_like.dtype)
    # dw: contract the batch dims of x and g, flattened into one
    x2, g2 = xc.reshape((-1,) + xc.shape[n_batch:]), g.reshape((-1,) + g.shape[n_batch:])
    first, second = (g2, x2) if w_in_last else (x2, g2)
    if cpu and math.prod(first.shape[1:]) > math.prod(second.shape[1:]):
        # XLA:CPU copies the first operand transposed: make that the smaller one, then
        # transpose the (weight-sized) result; the barrier keeps XLA from folding it back
        dw = jax.lax.optimization_barrier(_contract(second, first, (0,), (0,), "inner"))
        ns = second.ndim - 1
        dw = dw.transpose(tuple(range(ns, dw.ndim)) + tuple(range(ns)))
    else:
        dw = _contract(first, second, (0,), (0,), "inner" if cpu else None)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


def _matmul_bwd(n_in: int, dtype: Any, w_in_last: bool, out_dtype: Any, res, g: Array):
    grads = functools.partial(_matmul_grads, n_in, dtype, w_in_last, res, g)
    return jax.lax.platform_dependent(cpu=lambda: grads(True), default=lambda: grads(False))


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def project(x: Array, w: Array, bias: Array | None, n_in: int, dtype: Any,
            out_dtype: Any) -> Array:
    """x · w (+ bias, added in f32) in `out_dtype`. On CPU the dot writes f32 (XLA:CPU runs
    bf16-output dots slower); elsewhere it writes `out_dtype`, half the bytes of f32 for
    bf16 (+6% tokens/s for llama_1b on an H200, README Performance), so a bias is added to
    the rounded product and the sum rounded again. Accumulation is f32 either way."""
    def run(dot_dtype: Any) -> Array:
        y = matmul(x, w, n_in, dtype, out_dtype=dot_dtype)
        return (y if bias is None else y.astype(jnp.float32) + bias).astype(out_dtype)

    if jnp.dtype(out_dtype) == jnp.float32:
        return run(jnp.float32)
    return jax.lax.platform_dependent(cpu=lambda: run(jnp.float32),
                                      default=lambda: run(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def activation(z: Array, fn: Callable[[Array], Array], dtype: Any) -> Array:
    """fn(z) computed in f32, returned in `dtype`; the backward recomputes fn's derivative
    from a `dtype` copy of z. XLA:CPU runs bf16 elementwise math ~3x slower than f32, and
    autodiff of fn in f32 would keep f32 residuals (benchmarks/README.md)."""
    return fn(z.astype(jnp.float32)).astype(dtype)


def _activation_fwd(z: Array, fn: Callable[[Array], Array], dtype: Any):
    return activation(z, fn, dtype), (z.astype(dtype), jnp.zeros(0, z.dtype))


def _activation_bwd(fn: Callable[[Array], Array], dtype: Any, res, g: Array):
    zc, z_like = res
    _, vjp = jax.vjp(fn, zc.astype(jnp.float32))
    return (vjp(g.astype(jnp.float32))[0].astype(z_like.dtype),)


activation.defvjp(_activation_fwd, _activation_bwd)


class Dense(nn.Module):
    """y = x · W (+ b) over the last `len(in_axes)` dims of x, with logical kernel axes."""

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    std: float = 0.02
    use_bias: bool = False
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    out_dtype: Any = None  # default: the compute dtype; float32 for logits

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_axes)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.std),
                                         self.in_axes + self.out_axes),
            x.shape[-n_in:] + tuple(self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, self.out_axes), tuple(self.features),
            self.param_dtype) if self.use_bias else None
        # bf16 inputs with f32 accumulation: fast and accurate on GPU, TPU and CPUs with
        # native bf16 dots (elsewhere the CPU multiplies them in f32: `cpu_dot_operands`)
        return project(x, kernel, bias, n_in, self.dtype, self.out_dtype or self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits."""

    num: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
            (self.num, self.features), self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Logits x · Eᵀ in float32."""
        return matmul(x, self.embedding, 1, self.dtype, w_in_last=True)

    def table(self) -> Array:
        """The table as an output head [vocab, embed]."""
        return self.embedding


def norm(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """LayerNorm or RMSNorm; statistics are computed in float32 by Flax."""
    scale = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                          scale_init=scale, name=name)
    bias = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    return nn.LayerNorm(epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        scale_init=scale, bias_init=bias, use_bias=True, name=name)


class Mlp(nn.Module):
    """Position-wise feed-forward: GELU/ReLU, or SwiGLU (gated, as in LLaMA)."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dense = lambda feats, ins, outs, name, std=init_std(cfg), out=None: Dense(  # noqa: E731
            (feats,), ins, outs, std=std, use_bias=cfg.use_bias, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, out_dtype=out, name=name)
        fn = {"swiglu": nn.silu, "gelu": nn.gelu, "relu": nn.relu}[cfg.activation]
        # the activation reads wi's f32 output: one pass, f32 math (see `activation`)
        h = activation(dense(cfg.mlp_dim, ("embed",), ("mlp",), "wi", out=jnp.float32)(x), fn,
                       cfg.dtype)
        if cfg.activation == "swiglu":
            h = h * dense(cfg.mlp_dim, ("embed",), ("mlp",), "wg")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return dense(cfg.d_model, ("mlp",), ("embed",), "wo", init_std(cfg, True))(h)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (RoFormer), x: [batch, length, heads, head_dim]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq  # [batch, length, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
