"""BERT masked-LM corruption: exact budgets, 80/10/10 statistics, whole words, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from llm_jax.data import masking

MASK, LOW, HIGH = 3, 5, 1005  # mask id outside the random range, so the three cases separate
ROWS, LEN = 2000, 128


def _row(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A row of uniform ids with [CLS] at 0, [SEP] and padding at the end (~10% special)."""
    tokens = rng.integers(LOW, HIGH, LEN, dtype=np.int32)
    special = np.zeros(LEN, bool)
    n_real = LEN - int(rng.integers(0, 24))
    special[0] = special[n_real - 1] = True
    special[n_real:] = True
    return tokens, special


def _corrupt_many(word_start_prob: float | None = None, seed: int = 0):
    out = []
    for r in range(ROWS):
        rng = np.random.default_rng([seed, r])
        tokens, special = _row(rng)
        ws = None if word_start_prob is None else rng.random(LEN) < word_start_prob
        res = masking.mask_tokens(tokens, rng, special=special, mask_id=MASK, random_low=LOW,
                                  random_high=HIGH, word_start=ws)
        out.append((tokens, special, ws, *res))
    return out


@pytest.fixture(scope="module")
def rows():
    return _corrupt_many()


def _within(count: int, n: int, p: float, k: float = 4.0) -> bool:
    """count ~ Binomial(n, p) lies within k standard errors of its mean."""
    return abs(count - n * p) <= k * np.sqrt(n * p * (1 - p))


def test_exact_budget_specials_untouched_and_layout(rows):
    for tokens, special, _, inputs, targets, weights in rows:
        chosen = weights == 1.0
        assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
        assert set(np.unique(weights)) <= {0.0, 1.0}
        assert chosen.sum() == max(1, round(0.15 * (~special).sum()))
        assert not (chosen & special).any()
        np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
        np.testing.assert_array_equal(targets[chosen], tokens[chosen])
        assert (targets[~chosen] == 0).all()


def test_mask_random_keep_proportions(rows):
    tokens = np.concatenate([r[0][r[5] == 1] for r in rows])
    inputs = np.concatenate([r[3][r[5] == 1] for r in rows])
    n = len(tokens)
    # P(mask)=0.8; a random id equals the (uniform) original with prob 1/V, so it looks kept.
    v = HIGH - LOW
    assert _within(int((inputs == MASK).sum()), n, 0.8)
    assert _within(int((inputs == tokens).sum()), n, 0.1 + 0.1 / v)
    replaced = (inputs != MASK) & (inputs != tokens)
    assert _within(int(replaced.sum()), n, 0.1 * (1 - 1 / v))
    # Random ids lie in range and are roughly uniform over 10 equal bins.
    rand = inputs[replaced]
    assert ((rand >= LOW) & (rand < HIGH)).all()
    counts = np.bincount((rand - LOW) * 10 // v, minlength=10)
    assert all(_within(int(c), len(rand), 0.1, k=4.5) for c in counts)  # 4.5: ten bins tested


def test_no_candidates_and_single_candidate():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 20, dtype=np.int32)
    inputs, targets, weights = masking.mask_tokens(
        tokens, rng, special=np.ones(10, bool), mask_id=MASK, random_low=LOW, random_high=HIGH)
    np.testing.assert_array_equal(inputs, tokens)
    assert weights.sum() == 0 and (targets == 0).all()
    special = np.ones(10, bool)
    special[4] = False  # round(0.15) = 0, but BERT always predicts at least one token
    _, targets, weights = masking.mask_tokens(
        tokens, rng, special=special, mask_id=MASK, random_low=LOW, random_high=HIGH,
        word_start=np.ones(10, bool))
    assert np.flatnonzero(weights).tolist() == [4] and targets[4] == 14


def test_same_seed_same_output_different_seed_differs():
    tokens, special = _row(np.random.default_rng(1))
    kw = dict(special=special, mask_id=MASK, random_low=LOW, random_high=HIGH)
    a = masking.mask_tokens(tokens, np.random.default_rng([7, 3]), **kw)
    b = masking.mask_tokens(tokens, np.random.default_rng([7, 3]), **kw)
    c = masking.mask_tokens(tokens, np.random.default_rng([7, 4]), **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])


def _reference_words(special: np.ndarray, word_start: np.ndarray) -> list[list[int]]:
    """Words by a plain loop: start at word_start or after a special; specials end words."""
    words: list[list[int]] = []
    prev_special = True
    for i in range(len(special)):
        if special[i]:
            prev_special = True
            continue
        if word_start[i] or prev_special:
            words.append([])
        words[-1].append(i)
        prev_special = False
    return words


def test_whole_word_masking_chooses_whole_words_near_budget():
    total_chosen = total_budget = 0
    for tokens, special, ws, inputs, _, weights in _corrupt_many(word_start_prob=0.5, seed=1):
        chosen = weights == 1.0
        budget = max(1, round(0.15 * (~special).sum()))
        assert chosen.sum() <= budget and not (chosen & special).any()
        for word in _reference_words(special, ws):
            assert chosen[word].all() or not chosen[word].any(), word
        np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
        total_chosen += int(chosen.sum())
        total_budget += budget
    # Unchosen one-token words fill any gap, so nearly every row meets its budget exactly.
    assert total_chosen >= 0.99 * total_budget
