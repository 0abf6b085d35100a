"""Pure-numpy BERT masked-LM corruption (Devlin et al. 2019, create_masked_lm_predictions).

A row's non-special positions are candidates; a fixed budget of them is chosen (whole
words at a time when ``word_start`` is given), and each chosen position becomes
``mask_id``, a uniform random id or stays as it is. Randomness comes only from the
``np.random.Generator`` argument, so a caller can seed per example statelessly.
"""

from __future__ import annotations

import numpy as np


def _words(candidate: np.ndarray, word_start: np.ndarray) -> list[np.ndarray]:
    """Candidate positions grouped into words; a word never spans a non-candidate position."""
    idx = np.flatnonzero(candidate)
    if idx.size == 0:
        return []
    prev_candidate = np.concatenate([[False], candidate[:-1]])
    # A word starts at a word_start token or right after a special (or at position 0).
    starts = (word_start | ~prev_candidate)[idx]
    starts[0] = True
    return np.split(idx, np.flatnonzero(starts)[1:])


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    special: np.ndarray,
    mask_id: int,
    random_low: int,
    random_high: int,
    word_start: np.ndarray | None = None,
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corrupt one 1-D row for masked-LM; returns (inputs, targets, weights).

    Exactly ``max(1, round(prob * n_candidates))`` non-special positions are chosen (0 when
    there are no candidates). With ``word_start``, whole words are visited in random order
    and added while the chosen total stays within that budget (words that would exceed it
    are skipped, as in BERT). Each chosen position independently becomes ``mask_id`` with
    probability ``mask_frac``, a uniform id in ``[random_low, random_high)`` with
    probability ``random_frac``, else keeps its token. ``targets`` holds the original token
    at chosen positions (0 elsewhere) and ``weights`` is 1.0 there (0.0 elsewhere).
    """
    tokens = np.asarray(tokens, np.int32)
    special = np.asarray(special, bool)
    if tokens.ndim != 1 or special.shape != tokens.shape:
        raise ValueError(f"tokens and special must be 1-D of equal shape, got {tokens.shape}")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(f"need mask_frac, random_frac >= 0 summing to <= 1, got "
                         f"{mask_frac}, {random_frac}")
    candidate = ~special
    n_candidates = int(candidate.sum())
    # Python's round (half to even) is what BERT's reference uses.
    budget = max(1, round(prob * n_candidates)) if n_candidates else 0

    if word_start is None:
        chosen = rng.choice(np.flatnonzero(candidate), size=budget, replace=False)
    else:
        word_start = np.asarray(word_start, bool)
        words = _words(candidate, word_start)
        picked: list[np.ndarray] = []
        total = 0
        for w in rng.permutation(len(words)):
            if total >= budget:
                break
            if total + len(words[w]) > budget:  # BERT skips a word that would overshoot
                continue
            picked.append(words[w])
            total += len(words[w])
        chosen = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    chosen = np.sort(chosen)

    # One uniform draw per chosen position decides mask / random / keep.
    u = rng.random(chosen.size)
    replacement = rng.integers(random_low, random_high, size=chosen.size, dtype=np.int32)
    new = tokens[chosen].copy()
    new[u < mask_frac] = mask_id
    use_random = (u >= mask_frac) & (u < mask_frac + random_frac)
    new[use_random] = replacement[use_random]

    inputs = tokens.copy()
    inputs[chosen] = new
    targets = np.zeros_like(tokens)
    targets[chosen] = tokens[chosen]
    weights = np.zeros(tokens.shape, np.float32)
    weights[chosen] = 1.0
    return inputs, targets, weights
