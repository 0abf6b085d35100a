"""Masks and multi-head (grouped-query) attention.

Attention is softmax(QKᵀ/√d_k)V. On GPU and TPU it is `jax.nn.dot_product_attention`, with
cuDNN flash attention on NVIDIA GPUs; on CPU it is our own with a FlashAttention-style
backward, which XLA:CPU runs faster (benchmarks/README.md).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.models.layers import Dense, ModelConfig, _contract, cpu_dot_operands, init_std, rotary

Array = jax.Array
ATTENTION_RESIDUALS = "attention_residuals"  # the CPU forward's saved outputs, for remat


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array) -> Array:
    """[batch, 1, q, kv] True where query and key lie in the same packed document.

    Padding (segment 0) attends to padding, so no self-attention row is fully masked. In
    cross-attention a padding query may find no padding key; such a row averages V (as
    jax.nn.dot_product_attention does: no NaNs) and carries no loss weight.
    """
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


class Packed(NamedTuple):
    """The documents of each row as cuDNN's packed (THD) attention takes them: segment i of
    row b covers positions offsets[b, i] ..< offsets[b, i] + seqlen[b, i]; unused slots hold
    -1 in both (jax's wrapper moves the non-negative entries of each to the front, so a
    length 0 would pair with the next row's offset). A pytree, so it travels through the
    scanned layers as a mask."""

    seqlen: Array  # [batch, max_segments] int32
    offsets: Array  # [batch, max_segments + 1] int32


def packed_segments(segment_ids: Array, max_segments: int) -> Packed:
    """The runs of equal segment id in each row [batch, t], padding's run included, so every
    position lies in one segment and gets a defined output. The data pipeline packs at most
    data.max_segments_per_row documents per row, one run less than `max_segments`; in a row
    with more runs the last segment runs to the row's end, so the row's excess documents
    see each other but no other row's segments shift."""
    b, t = segment_ids.shape
    new = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jax.vmap(lambda row: jnp.flatnonzero(row, size=max_segments, fill_value=t))(new)
    used = starts < t
    ends = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), t, starts.dtype)], 1)
    return Packed(jnp.where(used, ends - starts, -1).astype(jnp.int32),
                  jnp.pad(jnp.where(used, starts, -1), ((0, 0), (0, 1)),
                          constant_values=-1).astype(jnp.int32))


def packed_mask(p: Packed, length: int) -> Array:
    """[batch, 1, q, kv] True where query and key lie in the same segment of `p`; a position
    outside every segment attends to nothing (cuDNN leaves its output undefined)."""
    pos = jnp.arange(length)[None, :, None]
    start = p.offsets[:, None, :-1]
    inside = (start >= 0) & (start <= pos) & (pos < start + p.seqlen[:, None, :])  # [b, t, M]
    seg = jnp.where(inside.any(-1), jnp.argmax(inside, -1), -1)
    return segment_mask(seg, seg) & (seg >= 0)[:, None, None, :]


@functools.cache
def _kv_offsets_follow_kv_heads() -> bool:
    """Whether jax's cuDNN wrapper scales the kv offsets by the key's heads: jax 0.10.2's
    `_fix_seqlen_offsets` uses the query's, which with GQA points cuDNN at the wrong keys.
    Asked of the wrapper itself, on two one-token segments."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    try:
        with jax.ensure_compile_time_eval():
            q, k = jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 1, 1))
            seqlen, offsets = jnp.array([[1, 1]]), jnp.array([[0, 1, -1]])
            kv = cudnn._fix_seqlen_offsets(seqlen, seqlen, offsets, offsets, q, k)[3]
            return int(kv[0, 1]) == 1  # token 1 at 1 key head of width 1
    except (AttributeError, TypeError, ValueError):  # another wrapper: assume the old bug
        return False


def _cudnn_packed(q: Array, k: Array, v: Array, p: Packed, causal: bool) -> Array:
    # jax.nn.dot_product_attention takes no segment offsets yet (jax PR #29731); its cuDNN
    # path is this function, which takes them since jax PR #25812 (Hopper and later)
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    kind = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    if k.shape[2] != q.shape[2] and not _kv_offsets_follow_kv_heads():
        # GQA as MHA: each query head gets its group's key and value head
        k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    return cudnn.dot_product_attention(q, k, v, q_seqlen=p.seqlen, kv_seqlen=p.seqlen,
                                       q_offsets=p.offsets, kv_offsets=p.offsets,
                                       scale=q.shape[-1] ** -0.5, mask_type=kind)


def causal_mask(length: int) -> Array:
    """[1, 1, q, kv] True where the key is not in the future of the query."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def _bits(x: Array) -> Array:
    """16-bit floats as uint16 for the head loop: XLA:CPU has no bf16 dynamic slices, so
    it would convert the whole array to f32 for each one and hoist that out of the loop."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _float(x: Array, dtype: jnp.dtype) -> Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def _head(x: Array, i: Array, dtype: jnp.dtype) -> Array:
    """Head i of x [b, t, heads, d] (see `_bits`) as [b, t, d] in dtype."""
    return _float(jax.lax.dynamic_index_in_dim(x, i, 2, keepdims=False), dtype)


def _put(x: Array, y: Array, i: Array, dtype: jnp.dtype) -> Array:
    """x (see `_bits`) with head i set to y [b, t, d] in dtype."""
    return jax.lax.dynamic_update_index_in_dim(x, _bits(y.astype(dtype)), i, 2)


def _scores(q: Array, k: Array, mask: Array) -> Array:
    """Masked, scaled logits [b, q, kv] in f32 for one head."""
    s = jnp.einsum("btd,bsd->bts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, s * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)


def _probs(s: Array, row_max: Array, row_sum: Array) -> Array:
    # max and sum kept apart: a fully masked row (s = min everywhere) then averages V, as
    # jax.nn.dot_product_attention does, where exp(s - logsumexp) would sum it
    return jnp.exp(s - row_max) * (1 / row_sum)  # one division per row, not per score


def _rows(xs: list[Array]) -> Array:
    """The query blocks' results joined along the length axis."""
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, 1)


def _spans(t: int, s: int, blocks: int) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of each query block: with `blocks` > 1 (causal,
    t == s) block r sees only keys before its end, skipping the masked upper triangle."""
    if blocks == 1:
        return [(0, t, s)]
    assert t == s and t % blocks == 0, (t, s, blocks)
    c = t // blocks
    return [(r * c, (r + 1) * c, (r + 1) * c) for r in range(blocks)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_cpu(q: Array, k: Array, v: Array, mask: Array, blocks: int = 1) -> Array:
    """Attention for q [b, t, heads, d], k and v [b, s, kv_heads, d] and mask [b or 1, 1,
    t, s], one head at a time in a loop: XLA:CPU runs the heads' 16-bit dots 1.5-3x slower
    side by side (each wants both cores) or batched over heads (their transposes make f32
    copies); f32 inputs unroll the loop (`_unroll`). 16-bit inputs run in f32 on a CPU
    without native 16-bit dots (`layers.cpu_dot_operands`), and stay 16-bit as residuals.
    With `blocks` > 1 (causal only) query block r attends to keys of blocks 0..r only."""
    return _attention_fwd(q, k, v, mask, blocks)[0]


def _unroll(q: Array) -> bool:
    """Whether the head loop runs unrolled, the heads' results stacked once at the end: for
    f32 inputs, whose heads' dots XLA:CPU then runs side by side faster (+14% for f32
    bench_small on an AVX2-only host; benchmarks/README.md). Written into one array head by
    head instead, XLA:CPU read each element of dQ through the chain of updates (~18 ms per
    bench_small layer). 16-bit heads run one at a time in a loop."""
    return q.dtype == jnp.float32


def _attention_fwd(q: Array, k: Array, v: Array, mask: Array, blocks: int = 1):
    inputs, out_dtype = (q, k, v), q.dtype
    q, k, v = cpu_dot_operands(q, k, v)  # once per call, not per head (benchmarks/README.md)
    heads, group = q.shape[2], q.shape[2] // k.shape[2]
    m = mask[:, 0]
    spans = _spans(q.shape[1], k.shape[1], blocks)
    qs, ks, vs = _bits(q), _bits(k), _bits(v)

    def head(i):
        """Head i's output [b, t, d] in q's dtype and its softmax rows' max and sum."""
        j = i // group
        qi, ki, vi = _head(qs, i, q.dtype), _head(ks, j, k.dtype), _head(vs, j, v.dtype)
        outs, mxs, totals = [], [], []
        for lo, hi, end in spans:
            s = _scores(qi[:, lo:hi], ki[:, :end], m[:, lo:hi, :end])
            mx = s.max(-1, keepdims=True)
            e = jnp.exp(s - mx)
            total = e.sum(-1, keepdims=True)
            p = (e * (1 / total)).astype(vi.dtype)
            outs.append(jnp.einsum("bts,bsd->btd", p, vi[:, :end],
                                   preferred_element_type=jnp.float32))
            mxs.append(mx)
            totals.append(total)
        return _rows(outs).astype(q.dtype), _rows(mxs), _rows(totals)

    if _unroll(q):
        o, row_max, row_sum = zip(*(head(i) for i in range(heads)))
        o, row_max, row_sum = jnp.stack(o, 2), jnp.stack(row_max), jnp.stack(row_sum)
    else:
        def body(i, carry):
            o, row_max, row_sum = carry
            oi, mx, total = head(i)
            return _put(o, oi, i, q.dtype), row_max.at[i].set(mx), row_sum.at[i].set(total)

        stats = jnp.zeros((heads,) + q.shape[:2] + (1,), jnp.float32)
        o, row_max, row_sum = jax.lax.fori_loop(0, heads, body,
                                                (_bits(jnp.zeros_like(q)), stats, stats))
        o = _float(o, q.dtype)
    o = checkpoint_name(o, ATTENTION_RESIDUALS)
    row_max, row_sum = checkpoint_name((row_max, row_sum), ATTENTION_RESIDUALS)
    # inputs saved as they came (16-bit), o as computed (its rowsum with dO must be exact)
    return o.astype(out_dtype), (*inputs, mask, o, row_max, row_sum)


def _attention_bwd(blocks: int, res, do: Array):
    q, k, v, mask, o, row_max, row_sum = res
    dtypes = q.dtype, k.dtype, v.dtype
    q, k, v, do = cpu_dot_operands(q, k, v, do.astype(q.dtype))
    heads, kv_heads = q.shape[2], k.shape[2]
    group = heads // kv_heads
    f32, scale = jnp.float32, q.shape[-1] ** -0.5
    m = mask[:, 0]
    spans = _spans(q.shape[1], k.shape[1], blocks)

    def head(i):
        """Query head i's dQ, and its shares of dK and dV of kv head i // group, in f32."""
        j = i // group
        qi, ki, vi = _head(qs, i, q.dtype), _head(ks, j, k.dtype), _head(vs, j, v.dtype)
        doi, deltai = _head(dos, i, q.dtype), _head(delta, i, f32)
        dqs, dki, dvi = [], jnp.zeros(ki.shape, f32), jnp.zeros(vi.shape, f32)
        for lo, hi, end in spans:
            qb, kb, vb, dob = qi[:, lo:hi], ki[:, :end], vi[:, :end], doi[:, lo:hi]
            mx, total = row_max[i][:, lo:hi], row_sum[i][:, lo:hi]
            mb = m[:, lo:hi, :end]
            p = _probs(_scores(qb, kb, mb), mx, total)
            dp = jnp.einsum("btd,bsd->bts", dob, vb, preferred_element_type=f32)
            # a masked score is a constant: no gradient (matters in fully masked rows)
            ds = jnp.where(mb, p * (dp - deltai[:, lo:hi]) * scale, 0).astype(q.dtype)
            dqs.append(jnp.einsum("bts,bsd->btd", ds, kb, preferred_element_type=f32))
            # dK = dSᵀ·Q and dV = Pᵀ·dO contract the query dim, split in two (`_contract`)
            dki = dki.at[:, :end].add(_contract(ds, qb, (1,), (1,), "inner", batch=1))
            dvi = dvi.at[:, :end].add(_contract(p.astype(q.dtype), dob, (1,), (1,), "inner",
                                                batch=1))
        return _rows(dqs), dki, dvi

    # softmax backward with rowsum(dP ⊙ P) = rowsum(dO ⊙ O): a reduction over head_dim,
    # not over the kv length (FlashAttention's trick; XLA:CPU's reduction over it is slow)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), -1)[..., None]  # [b, t, heads, 1]
    acc_k, acc_v = (f32, f32) if group > 1 else (k.dtype, v.dtype)  # group sums stay f32
    qs, ks, vs, dos = _bits(q), _bits(k), _bits(v), _bits(do)
    if _unroll(q):
        dq, dk, dv = zip(*(head(i) for i in range(heads)))
        # a group's query heads share k and v: their gradients add up
        join = lambda xs: jnp.stack([sum(xs[j * group:(j + 1) * group])  # noqa: E731
                                     for j in range(kv_heads)], 2)
        dq, dk, dv = jnp.stack(dq, 2), join(dk), join(dv)
    else:
        def body(i, carry):
            dq, dk, dv = carry
            j = i // group
            dqi, dki, dvi = head(i)
            if group > 1:
                dki, dvi = _head(dk, j, acc_k) + dki, _head(dv, j, acc_v) + dvi
            return _put(dq, dqi, i, q.dtype), _put(dk, dki, j, acc_k), _put(dv, dvi, j, acc_v)

        init = tuple(_bits(jnp.zeros(x.shape, d))
                     for x, d in ((q, q.dtype), (k, acc_k), (v, acc_v)))
        dq, dk, dv = jax.lax.fori_loop(0, heads, body, init)
        dq, dk, dv = _float(dq, q.dtype), _float(dk, acc_k), _float(dv, acc_v)
    return dq.astype(dtypes[0]), dk.astype(dtypes[1]), dv.astype(dtypes[2]), None


_attention_cpu.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | Packed | None,
                          causal: bool, implementation: str | None = None) -> Array:
    """softmax(QKᵀ/√d)V for q [b, t, heads, d] and k, v [b, s, kv_heads, d].

    `implementation` None picks per platform: cuDNN on NVIDIA GPUs where it applies
    (`cudnn_applies`), on CPU a version with a hand-written, FlashAttention-style backward
    (faster on XLA:CPU, benchmarks/README.md), elsewhere `jax.nn.dot_product_attention`'s
    XLA path; 'xla' or 'cudnn' force that one. A query row whose
    mask hides every key averages V as the library does, except that causal CPU attention
    in query blocks (`causal_blocks`) averages only the keys up to its block's end (the
    masks built here always keep the diagonal, so no row is fully hidden).

    A `Packed` mask (config attention_impl 'cudnn_packed') runs cuDNN's packed attention where
    `cudnn_applies` at compute capability 9.0 or later, else the same mask made dense.
    """
    if isinstance(mask, Packed):
        if cudnn_applies(q, k, v, None, min_capability=9.0):
            return _cudnn_packed(q, k, v, mask, causal)
        mask, implementation = packed_mask(mask, q.shape[1]), None
    if implementation is None and cudnn_applies(q, k, v, mask):
        implementation = "cudnn"
    library = lambda: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=mask, is_causal=causal, implementation=implementation)
    if implementation is not None:
        return library()
    t = q.shape[1]
    full = jnp.ones((1, 1, t, k.shape[1]), bool) if mask is None else mask
    blocks = 1
    if causal:
        full = full & causal_mask(t)
        blocks = causal_blocks(t) if t == k.shape[1] else 1
    return jax.lax.platform_dependent(cpu=lambda: _attention_cpu(q, k, v, full, blocks),
                                      default=library)


def cudnn_applies(q: Array, k: Array, v: Array, mask: Array | None,
                  min_capability: float = 8.0) -> bool:
    """Whether the target devices (the mesh in context, e.g. a TPU pod's for an AOT compile,
    else this process's) are NVIDIA GPUs of compute capability `min_capability` or later
    (9.0 for packed attention) and cuDNN
    flash attention takes these shapes: bf16 or f16, head_dim a multiple of 8 up to 128,
    and even lengths when there is a mask. 2.7x XLA's attention for llama_1b's train step
    on an H200 (README, Performance). Decided when tracing: JAX picks XLA for
    implementation=None, and cuDNN's path cannot even be traced elsewhere."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = jax.devices()[0] if mesh.empty else mesh.abstract_device
    if dev.platform != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", 0)  # the target is this host's
    d, (t, s) = q.shape[-1], (q.shape[1], k.shape[1])
    return ("nvidia" in dev.device_kind.lower() and float(cc or 0) >= min_capability
            and q.dtype in (jnp.bfloat16, jnp.float16) and d == v.shape[-1]
            and d % 8 == 0 and d <= 128 and (mask is None or (t % 2 == 0 and s % 2 == 0)))


def causal_blocks(t: int) -> int:
    """Query blocks for causal CPU attention over t positions: 4 or 2 blocks of at least 64
    (fewer, smaller dots cost more than the skipped upper triangle saves), else 1."""
    return next((n for n in (4, 2) if t % n == 0 and t // n >= 64), 1)


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
    def __call__(self, x_q: Array, x_kv: Array, mask: Array | Packed | None,
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
