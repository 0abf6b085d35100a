"""attention_impl=cudnn_packed: the segments handed to cuDNN's packed attention describe
exactly the document mask, the data never packs more documents than they allow, and off
Hopper GPUs the model computes what the document mask computes. The cuDNN kernel itself is
checked on a GPU by test_packed_attention_matches_the_masked_reference_on_gpu."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ConfigError, base_config, validate
from llm_jax.data import packing
from llm_jax.models import attention, build
from llm_jax.models.attention import Packed, packed_mask, packed_segments, segment_mask
from llm_jax.models.layers import ModelConfig

CFG = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_len=32, dtype=jnp.float32, positions="rope",
                  activation="swiglu", norm="rmsnorm")


def _packed_rows(seed: int, max_per_row: int, seq_len: int = 32) -> np.ndarray:
    """segment_ids of rows packed by our packer from chunks of random lengths (1-20)."""
    rng = np.random.default_rng(seed)
    chunks = [np.zeros(n, np.int32) for n in rng.integers(1, 21, 60)]
    return packing.pack_first_fit(chunks, seq_len, 0, num_bins=4,
                                  max_per_row=max_per_row)["segment_ids"]


def _naive_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of equal ids, written out."""
    runs = []
    for i, s in enumerate(row):
        if i and s == row[i - 1]:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("max_per_row", [1, 3, 8])
def test_packed_segments_are_the_runs_and_rebuild_the_document_mask(max_per_row):
    seg = np.concatenate([_packed_rows(0, max_per_row), np.zeros((1, 32), np.int32)])
    p = jax.tree.map(np.asarray, packed_segments(jnp.asarray(seg), max_per_row + 1))
    assert p.seqlen.shape == (len(seg), max_per_row + 1)
    assert p.offsets.shape == (len(seg), max_per_row + 2)
    for row, seqlen, offsets in zip(seg, p.seqlen, p.offsets):
        runs = _naive_runs(row)
        assert len(runs) <= max_per_row + 1  # the packer's limit, plus padding's run
        n = len(runs)
        assert [(int(o), int(s)) for o, s in zip(offsets[:n], seqlen[:n])] == runs
        assert (offsets[n:] == -1).all() and (seqlen[n:] == -1).all()
    np.testing.assert_array_equal(packed_mask(p, 32), segment_mask(seg, seg))


def test_segments_survive_jax_cudnn_repacking():
    """jax's cuDNN wrapper turns the [batch, M] segments into one list over the batch (its
    `_fix_seqlen_offsets`, plain jnp, so it runs here): each row's runs must come out in
    order, at the row's offset in the flattened batch, with their own lengths."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    seg = np.concatenate([_packed_rows(1, 4, seq_len=32), np.zeros((1, 32), np.int32)])
    b, t, heads, d = len(seg), 32, 2, 8
    p = packed_segments(jnp.asarray(seg), 5)
    q = jnp.zeros((b, t, heads, d))
    seqlen, _, offsets, _ = cudnn._fix_seqlen_offsets(p.seqlen, p.seqlen, p.offsets,
                                                      p.offsets, q, q)
    want = [(r * t + o, n) for r, row in enumerate(seg) for o, n in _naive_runs(row)]
    got = list(zip((np.asarray(offsets).ravel() // (heads * d)).tolist(),
                   np.asarray(seqlen).ravel().tolist()))
    assert len(want) < b * 5 and got[:len(want)] == want


def test_a_row_over_the_segment_limit_keeps_the_other_rows_intact():
    """Two slots, three runs in row 0: its last slot runs to the row's end, and row 1's
    segments keep their own offsets and lengths."""
    seg = jnp.array([[1, 1, 2, 2, 3, 3, 0, 0], [1, 1, 1, 1, 2, 2, 2, 2]])
    p = jax.tree.map(np.asarray, packed_segments(seg, 2))
    np.testing.assert_array_equal(p.seqlen, [[2, 6], [4, 4]])
    np.testing.assert_array_equal(p.offsets, [[0, 2, -1], [0, 4, -1]])


def test_a_position_outside_every_segment_attends_to_nothing():
    p = Packed(jnp.array([[3, 2, -1]]), jnp.array([[0, 3, -1, -1]]))  # positions 5.. left out
    m = np.asarray(packed_mask(p, 8))[0, 0]
    assert m[:5, :5].sum() == 3 * 3 + 2 * 2 and not m[5:].any() and not m[:, 5:].any()


def _logits(cfg: ModelConfig, params, tokens, seg, pos):
    return np.asarray(jax.jit(build(cfg).apply)({"params": params}, {
        "tokens": tokens, "segment_ids": seg, "positions": pos})["logits"])


@pytest.mark.parametrize("scan,remat", [(True, "dots_attention"), (False, "none")])
def test_packed_decoder_off_gpu_computes_the_document_mask(scan, remat):
    """On CPU the Packed mask runs as the dense mask it describes: the same logits as the
    default document mask, through scanned and rematerialized layers."""
    seg = _packed_rows(1, 3)[:4]
    pos = np.concatenate([np.arange(n) for row in seg for _, n in _naive_runs(row)])
    pos = pos.reshape(seg.shape).astype(np.int32)
    tokens = np.random.default_rng(2).integers(0, 97, seg.shape).astype(np.int32)
    base = dataclasses.replace(CFG, scan_layers=scan, remat=remat)
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos}
    params = build(base).init(jax.random.key(0), batch)["params"]
    want = _logits(base, params, tokens, seg, pos)
    got = _logits(dataclasses.replace(base, max_segments=3), params, tokens, seg, pos)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_packed_attention_calls_cudnn_with_the_segments_on_hopper(monkeypatch):
    """Where cuDNN applies at compute capability 9.0, the Packed mask goes to cuDNN's packed
    attention as q/kv offsets and lengths, causal within each segment."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    fake = type("Device", (), {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
                               "compute_capability": "9.0"})()
    monkeypatch.setattr(attention.jax, "devices", lambda *a: [fake])
    seen = {}
    monkeypatch.setattr(cudnn, "dot_product_attention",
                        lambda q, k, v, **kw: seen.update(kw, k=k, v=v) or q)
    q = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
    p = packed_segments(jnp.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4]), 3)
    attention.dot_product_attention(q, q, q, p, causal=True)
    assert seen["mask_type"] == cudnn.MaskType.PADDING_CAUSAL and seen["scale"] == 64 ** -0.5
    for side in ("q", "kv"):
        assert seen[f"{side}_seqlen"] is p.seqlen and seen[f"{side}_offsets"] is p.offsets
    # GQA: key head j serves query heads 2j and 2j+1, repeated for cuDNN where its wrapper
    # would scale the kv offsets by the query's heads (jax 0.10.2, installed here)
    k = jnp.arange(2, dtype=jnp.bfloat16).reshape(1, 1, 2, 1) * jnp.ones((2, 16, 2, 64))
    attention.dot_product_attention(q, k, k, p, causal=True)
    if attention._kv_offsets_follow_kv_heads():
        assert seen["k"] is k
    else:
        assert seen["k"].shape == q.shape
        np.testing.assert_array_equal(seen["k"][0, 0, :, 0], [0, 0, 1, 1])
    fake.compute_capability = "8.0"  # Ampere has no packed layout: the dense mask instead
    seen.clear()
    monkeypatch.setattr(attention.jax.nn, "dot_product_attention",
                        lambda *a, mask=None, **kw: seen.update(mask=mask))
    attention.dot_product_attention(q, q, q, p, causal=True)
    assert seen["mask"].shape == (2, 1, 16, 16)


@pytest.mark.parametrize("change,says", [
    ({}, "data.max_segments_per_row > 0 (now 0)"),
    ({"model.family": "encoder", "task.objective": "mlm", "data.max_segments_per_row": 8},
     "model.family='decoder' (now 'encoder')"),
    ({"model.document_mask": False, "data.max_segments_per_row": 8},
     "model.document_mask=True (now False)")])
def test_cudnn_packed_config_needs_a_decoder_with_a_document_limit(change, says):
    c = base_config()
    c.model.attention_impl = "cudnn_packed"
    for key, value in change.items():
        section, name = key.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(says)):
        validate(c)
    c.model.family, c.task.objective, c.model.document_mask = "decoder", "next_token", True
    c.data.max_segments_per_row = 8
    validate(c)


def _hopper() -> bool:
    d = jax.devices()[0]
    return d.platform == "gpu" and float(getattr(d, "compute_capability", 0) or 0) >= 9.0


@pytest.mark.skipif(not _hopper(), reason="needs an NVIDIA GPU of compute capability 9.0+")
def test_packed_attention_matches_the_masked_reference_on_gpu():
    """cuDNN's packed attention against XLA's with the dense document mask: output and
    gradients, GQA, rows of several documents and padding (experiments/gpu_benchmark)."""
    b, t, heads, kv, d = 4, 256, 8, 2, 64
    seg = _packed_rows(3, 5, seq_len=t)[:b]
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, heads, d), jnp.bfloat16)
    k, v = (jax.random.normal(x, (b, t, kv, d), jnp.bfloat16) for x in ks[1:3])
    g = jax.random.normal(ks[3], (b, t, heads, d), jnp.bfloat16)
    p = packed_segments(jnp.asarray(seg), 6)
    dense = segment_mask(jnp.asarray(seg), jnp.asarray(seg))

    def run(mask, impl):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, True, impl)  # noqa
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(g))

    got = jax.jit(lambda: run(p, None))()
    want = jax.jit(lambda: run(dense, "xla"))()
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   rtol=2e-2, atol=2e-2, err_msg=name)
