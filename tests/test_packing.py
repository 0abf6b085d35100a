"""Chunking and packing: overlap by one, every target exactly once, layout vs references."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from llm_jax.data import packing

BOS, EOS, PAD = 1, 2, 0


def _docs(rng: np.random.Generator, n: int, max_len: int) -> list[np.ndarray]:
    return [rng.integers(4, 500, rng.integers(0, max_len), dtype=np.int32) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [2, 3, 8, 64])
def test_chunks_overlap_by_one_and_cover_the_stream(seq_len):
    rng = np.random.default_rng(seq_len)
    for ids in _docs(rng, 50, 300) + [np.zeros(0, np.int32)]:
        stream = np.concatenate([[BOS], ids, [EOS]])
        chunks = packing.chunk_document(ids, seq_len, BOS, EOS)
        assert all(2 <= len(c) <= seq_len and c.dtype == np.int32 for c in chunks)
        assert all(len(c) == seq_len for c in chunks[:-1])
        for a, b in zip(chunks, chunks[1:]):
            assert a[-1] == b[0]
        # Inputs/targets: chunk c predicts c[1:] from c[:-1]; targets tile stream[1:].
        np.testing.assert_array_equal(np.concatenate([c[1:] for c in chunks]), stream[1:])
        np.testing.assert_array_equal(np.concatenate([c[:-1] for c in chunks]), stream[:-1])


def test_empty_document_is_bos_eos():
    (chunk,) = packing.chunk_document(np.zeros(0, np.int32), 16, BOS, EOS)
    np.testing.assert_array_equal(chunk, [BOS, EOS])


def _naive_first_fit(chunks, seq_len, num_bins, max_per_row=0):
    """Reference: plain Python lists, one group of at most num_bins open rows, each taking
    at most max_per_row chunks (0: any number)."""
    rows, group = [], []
    for c in chunks:
        for row in group:
            if sum(map(len, row)) + len(c) <= seq_len and len(row) < (max_per_row or 1e9):
                row.append(c)
                break
        else:
            if num_bins is not None and len(group) == num_bins:
                rows += group
                group = []
            group.append([c])
    rows += group
    tokens, segs, pos = [], [], []
    for row in rows:
        t = [x for c in row for x in c.tolist()]
        s = [k + 1 for k, c in enumerate(row) for _ in c]
        p = [i for c in row for i in range(len(c))]
        pad = seq_len - len(t)
        tokens.append(t + [PAD] * pad)
        segs.append(s + [0] * pad)
        pos.append(p + [0] * pad)
    return {"tokens": np.array(tokens), "segment_ids": np.array(segs), "positions": np.array(pos)}


def _all_chunks(seq_len: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [c for d in _docs(rng, 60, 200) for c in packing.chunk_document(d, seq_len, BOS, EOS)]


@pytest.mark.parametrize("num_bins", [1, 3, 16, None])
@pytest.mark.parametrize("max_per_row", [0, 2])
def test_pack_first_fit_matches_naive_reference(num_bins, max_per_row):
    chunks = _all_chunks(32)
    got = packing.pack_first_fit(chunks, 32, PAD, num_bins=num_bins, max_per_row=max_per_row)
    want = _naive_first_fit(chunks, 32, num_bins, max_per_row)
    if max_per_row:
        assert got["segment_ids"].max() == max_per_row  # the limit binds on these chunks
    for k in packing.FEATURES:
        assert got[k].dtype == np.int32
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_segments_positions_and_targets():
    seq_len = 32
    rng = np.random.default_rng(1)
    docs = _docs(rng, 40, 150)
    chunks = [c for d in docs for c in packing.chunk_document(d, seq_len, BOS, EOS)]
    rows = packing.pack_first_fit(chunks, seq_len, PAD)
    tokens, segs, pos = rows["tokens"], rows["segment_ids"], rows["positions"]
    for t, s, p in zip(tokens, segs, pos):
        used = s != 0
        n = used.sum()
        assert used[:n].all() and not used[n:].any()  # chunks first, then padding
        assert (t[n:] == PAD).all() and (p[n:] == 0).all()
        assert s[0] == 1 and set(np.diff(s[:n])) <= {0, 1}  # 1, 2, 3, ... in order
        starts = np.flatnonzero(np.diff(s[:n], prepend=0))
        assert (p[starts] == 0).all()
        for a, b in zip(starts, list(starts[1:]) + [n]):
            np.testing.assert_array_equal(p[a:b], np.arange(b - a))
    # Every token after each bos is a target exactly once: same multiset of targets.
    mask = packing.target_mask(segs)
    targets = np.sort(tokens[:, 1:][mask])
    want = np.sort(np.concatenate([np.append(d, EOS) for d in docs]))
    np.testing.assert_array_equal(targets, want)
    assert mask.sum() == sum(len(d) + 1 for d in docs)


@pytest.mark.parametrize("num_bins", [1, 4, 16])
@pytest.mark.parametrize("max_per_row", [0, 2])
def test_grain_first_fit_packer_matches_pure_function(num_bins, max_per_row):
    """The pipeline uses grain's packer; it must lay rows out exactly like ours."""
    seq_len = 32
    chunks = _all_chunks(seq_len, seed=2)
    ds = grain.MapDataset.source([{"tokens": c} for c in chunks]).to_iter_dataset()
    packed = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len},
        num_packing_bins=num_bins,
        shuffle_bins=False,
        padding_struct={"tokens": PAD},
        max_sequences_per_bin=max_per_row or None,
    )
    rows = list(packed)
    want = packing.pack_first_fit(chunks, seq_len, PAD, num_bins=num_bins,
                                  max_per_row=max_per_row)
    for ours, theirs in [("tokens", "tokens"), ("segment_ids", "tokens_segment_ids"),
                         ("positions", "tokens_positions")]:
        np.testing.assert_array_equal(np.stack([r[theirs] for r in rows]), want[ours])


def test_padding_rows():
    rows = packing.padding_rows(3, 8, PAD)
    assert all(v.shape == (3, 8) and v.dtype == np.int32 for v in rows.values())
    assert not packing.target_mask(rows["segment_ids"]).any()
