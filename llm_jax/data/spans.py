"""Pure-numpy T5 span corruption (Raffel et al. 2020, t5.data.preprocessors).

``random_spans_noise_mask`` follows T5's algorithm: a fixed number of noise tokens is cut
into a fixed number of non-empty spans, the other tokens into as many non-empty spans, and
the two are interleaved starting with non-noise. ``span_corrupt`` turns a mask into T5's
(inputs, targets) pair with sentinels, and ``raw_length`` sizes raw chunks so both fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_SENTINELS = 100  # T5's <extra_id_0..99>; the tokenizer appends this many


def noise_spans(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> int:
    """How many noise spans (so sentinels) a row of ``length`` raw tokens gets."""
    return _noise_counts(length, noise_density, mean_span_length)[1]


def _noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a row of ``length`` tokens (T5's formulas)."""
    if length < 2:
        return 0, 0  # T5 builds a 2-token mask and keeps position 0, which is never noise
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span_length))
    # Each span needs a token of each kind; only binds at extreme densities or span lengths.
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty parts."""
    first_in_segment = np.zeros(num_items, np.int64)
    # Choose num_segments - 1 distinct cut points among the num_items - 1 gaps.
    cuts = rng.choice(num_items - 1, size=num_segments - 1, replace=False)
    first_in_segment[cuts + 1] = 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> np.ndarray:
    """Boolean [length] mask, True on noise; position 0 is never noise, the last span is.

    ``round(length * noise_density)`` (clipped to [1, length - 1]) noise tokens in
    ``max(1, round(num_noise / mean_span_length))`` spans, interleaved with as many
    non-empty non-noise spans, starting with non-noise.
    """
    num_noise, num_spans = _noise_counts(length, noise_density, mean_span_length)
    if num_spans == 0:
        return np.zeros(max(length, 0), bool)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    # Span k of the interleaving covers [starts[k], starts[k+1]); odd k are noise.
    span_index = np.repeat(np.arange(2 * num_spans), interleaved)
    return span_index % 2 == 1


def span_corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one 1-D row; returns int32 (inputs, targets).

    inputs: tokens with noise span i replaced by ``sentinel_ids[i]``, then eos.
    targets: ``sentinel_ids[i]`` followed by noise span i, for each span, then eos.
    """
    tokens = np.asarray(tokens, np.int32)
    noise = random_spans_noise_mask(len(tokens), rng, noise_density, mean_span_length)
    prev = np.concatenate([[False], noise[:-1]])
    span_start = noise & ~prev
    num_spans = int(span_start.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"{num_spans} noise spans but only {len(sentinel_ids)} sentinel ids")
    sentinels = np.asarray(sentinel_ids, np.int32)[:num_spans]
    # Inputs: each span collapses to its sentinel, inserted where the span began.
    nonnoise_before = np.cumsum(~noise) - ~noise
    inputs = np.insert(tokens[~noise], nonnoise_before[span_start], sentinels)
    # Targets: each span's tokens, preceded by its sentinel.
    noise_before = np.cumsum(noise) - noise
    targets = np.insert(tokens[noise], noise_before[span_start], sentinels)
    eos = np.array([eos_id], np.int32)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def raw_length(
    inputs_length: int,
    targets_length: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> int:
    """Largest raw length whose span-corrupted inputs and targets (with eos) both fit.

    Both lengths are non-decreasing in the raw length, so the first failure is final.
    """

    def fits(n: int) -> bool:
        num_noise, num_spans = _noise_counts(n, noise_density, mean_span_length)
        return (n - num_noise + num_spans + 1 <= inputs_length
                and num_noise + num_spans + 1 <= targets_length)

    n = 0
    while fits(n + 1):
        n += 1
    return n
