"""Pure-numpy chunking and packing of token sequences into fixed-length rows.

A row holds several chunks: ``segment_ids`` numbers them 1, 2, ... (0 = padding) and
``positions`` counts 0, 1, ... within each. The model predicts ``tokens[t + 1]`` from
position ``t`` wherever ``segment_ids[t + 1] == segment_ids[t] != 0`` (see ``target_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FEATURES = ("tokens", "segment_ids", "positions")


def chunk_document(ids: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> list[np.ndarray]:
    """Split ``[bos] + ids + [eos]`` into chunks of at most seq_len tokens.

    Consecutive chunks overlap by one token (chunk k starts at ``k * (seq_len - 1)``), so
    every token after bos is a target exactly once: the overlapping token is the last
    target of one chunk and the first input of the next. An empty document gives
    ``[bos, eos]``.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream = np.concatenate([[bos_id], np.asarray(ids, np.int32), [eos_id]]).astype(np.int32)
    step = seq_len - 1
    # A chunk must hold at least one target, so the last start is len(stream) - 2.
    return [stream[s : s + seq_len] for s in range(0, len(stream) - 1, step)]


def target_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Boolean mask over positions 1..: True where tokens[..., 1:] is a prediction target."""
    return (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., 1:] != 0)


def pack_first_fit(
    chunks: Sequence[np.ndarray], seq_len: int, pad_id: int, num_bins: int | None = None,
    max_per_row: int = 0,
) -> dict[str, np.ndarray]:
    """Pack chunks, in order, into rows [num_rows, seq_len] by first fit.

    Each chunk goes into the first open row with room. With ``num_bins`` set, at most
    that many rows are open: when a chunk fits none, they are all emitted and a new
    group starts (the semantics of ``grain.experimental.FirstFitPackIterDataset`` with
    ``shuffle_bins=False``). ``num_bins=None`` keeps every row open: tightest, but
    quadratic in the number of rows. ``max_per_row`` > 0 fills a row once it holds that
    many chunks (grain's ``max_sequences_per_bin``).
    """
    rows: list[list[np.ndarray]] = []
    group_start = 0  # rows before this index are closed
    used = np.zeros(len(chunks) + 1, np.int64)
    for chunk in chunks:
        n = len(chunk)
        if n > seq_len:
            raise ValueError(f"chunk of {n} tokens exceeds seq_len={seq_len}")
        open_used = used[group_start : len(rows)]
        room = open_used + n <= seq_len
        if max_per_row:
            room &= np.array([len(r) < max_per_row for r in rows[group_start:]], bool)
        fits = np.flatnonzero(room)
        if fits.size:
            row = group_start + int(fits[0])
        else:
            if num_bins is not None and len(rows) - group_start >= num_bins:
                group_start = len(rows)
            row = len(rows)
            rows.append([])
        rows[row].append(chunk)
        used[row] += n
    return rows_to_arrays(rows, seq_len, pad_id)


def rows_to_arrays(
    rows: Sequence[Sequence[np.ndarray]], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Lay out rows of chunks as int32 ``tokens``/``segment_ids``/``positions``."""
    out = {
        "tokens": np.full((len(rows), seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((len(rows), seq_len), np.int32),
        "positions": np.zeros((len(rows), seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        offset = 0
        for segment, chunk in enumerate(row, start=1):
            n = len(chunk)
            out["tokens"][r, offset : offset + n] = chunk
            out["segment_ids"][r, offset : offset + n] = segment
            out["positions"][r, offset : offset + n] = np.arange(n)
            offset += n
    return out


def padding_rows(num_rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """All-padding rows (segment id 0 everywhere: no targets)."""
    return rows_to_arrays([[]] * num_rows, seq_len, pad_id)
