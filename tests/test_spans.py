"""T5 span corruption: exact noise counts, span-length law, exact reconstruction, sizing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llm_jax.data import spans

EOS = 1
SENTINELS = list(range(32099, 31999, -1))  # T5 counts sentinels down from the vocab's end
ROWS, LEN = 4000, 512


def _runs(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Lengths of the non-noise and noise runs of a mask, in order."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    parts = np.split(mask, edges)
    return [len(p) for p in parts if not p[0]], [len(p) for p in parts if p[0]]


@pytest.fixture(scope="module")
def masks():
    return [spans.random_spans_noise_mask(LEN, np.random.default_rng([0, r])) for r in range(ROWS)]


def test_noise_count_span_count_and_interleaving(masks):
    num_noise = round(LEN * 0.15)
    num_spans = round(num_noise / 3.0)
    for mask in masks:
        assert mask.dtype == bool and mask.shape == (LEN,)
        assert mask.sum() == num_noise  # fraction round(L * 0.15) / L exactly
        assert not mask[0] and mask[-1]  # starts with non-noise, ends with noise
        clean, noise = _runs(mask)
        assert len(clean) == len(noise) == num_spans and min(clean + noise) >= 1


@pytest.mark.parametrize("length", [2, 3, 10, 31, 100, 1000])
def test_noise_count_for_other_lengths(length):
    for r in range(20):
        mask = spans.random_spans_noise_mask(length, np.random.default_rng([length, r]))
        assert mask.sum() == min(max(round(length * 0.15), 1), length - 1) and not mask[0]


def test_span_lengths_follow_a_uniform_random_split(masks):
    """A uniform split of n items into k non-empty parts gives one part length j with
    probability C(n - j - 1, k - 2) / C(n - 1, k - 1); test the first span of each row."""
    n_noise = round(LEN * 0.15)
    k = round(n_noise / 3.0)
    for which, n in ((1, n_noise), (0, LEN - n_noise)):  # noise spans, then non-noise spans
        first = np.array([_runs(m)[which][0] for m in masks])
        for j in range(1, 6):
            p = math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)
            se = math.sqrt(ROWS * p * (1 - p))
            assert abs((first == j).sum() - ROWS * p) <= 4.5 * se, (which, j)  # 4.5: 10 tests
        # Mean length n / k (≈ 3 for noise), within 4 standard errors of the sample mean.
        assert abs(first.mean() - n / k) <= 4 * first.std() / math.sqrt(ROWS)
    assert abs(n_noise / k - 3.0) < 0.05


def test_span_corrupt_reconstructs_exactly():
    for r in range(300):
        rng = np.random.default_rng([1, r])
        tokens = rng.integers(2, 32000, int(rng.integers(1, 700)), dtype=np.int32)
        inputs, targets = spans.span_corrupt(tokens, rng, sentinel_ids=SENTINELS, eos_id=EOS)
        assert inputs.dtype == targets.dtype == np.int32
        assert inputs[-1] == EOS and targets[-1] == EOS
        # Split the targets at sentinels: span i follows sentinel i.
        is_sentinel = targets[:-1] >= SENTINELS[-1]
        starts = np.flatnonzero(is_sentinel)
        assert targets[starts].tolist() == SENTINELS[: len(starts)]
        bounds = list(starts) + [len(targets) - 1]
        span_of = {targets[s]: targets[s + 1 : e] for s, e in zip(bounds, bounds[1:])}
        assert all(len(v) >= 1 for v in span_of.values())
        rebuilt = np.concatenate(
            [span_of[t] if t in span_of else [t] for t in inputs[:-1]] or [np.zeros(0)])
        np.testing.assert_array_equal(rebuilt, tokens)
        assert sum(t in span_of for t in inputs[:-1]) == len(starts)  # each sentinel used once


def test_too_few_sentinels_raises():
    with pytest.raises(ValueError, match="sentinel"):
        spans.span_corrupt(np.arange(2, 600), np.random.default_rng(0), sentinel_ids=[7] * 10,
                           eos_id=EOS)


@pytest.mark.parametrize("inputs_length,targets_length",
                         [(512, 114), (512, 1000), (128, 32), (64, 10), (2, 2), (1000, 50)])
def test_raw_length_fits_and_one_more_does_not(inputs_length, targets_length):
    n = spans.raw_length(inputs_length, targets_length)
    if (inputs_length, targets_length) == (512, 114):
        assert n == 568  # T5's published pairing for 512-token inputs
    for seed in range(5):
        rng = np.random.default_rng(seed)
        inp, tgt = spans.span_corrupt(np.arange(2, n + 2), rng, sentinel_ids=SENTINELS,
                                      eos_id=EOS)
        assert len(inp) <= inputs_length and len(tgt) <= targets_length
        inp, tgt = spans.span_corrupt(np.arange(2, n + 3), rng, sentinel_ids=SENTINELS,
                                      eos_id=EOS)
        assert len(inp) > inputs_length or len(tgt) > targets_length


def test_deterministic_for_a_seeded_rng():
    tokens = np.arange(2, 300, dtype=np.int32)
    a = spans.span_corrupt(tokens, np.random.default_rng([5, 9]), sentinel_ids=SENTINELS,
                           eos_id=EOS)
    b = spans.span_corrupt(tokens, np.random.default_rng([5, 9]), sentinel_ids=SENTINELS,
                           eos_id=EOS)
    c = spans.span_corrupt(tokens, np.random.default_rng([5, 10]), sentinel_ids=SENTINELS,
                           eos_id=EOS)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
