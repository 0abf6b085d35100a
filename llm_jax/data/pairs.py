"""Pure-numpy BERT next-sentence-prediction pairs, with code blocks as "sentences".

``code_sentences`` cuts source text into blocks of consecutive non-blank lines;
``document_pairs`` builds (A, B, is_next) pairs from one document's tokenized sentences
the way BERT's create_instances_from_document does; ``encode_pair`` lays a pair out as
``[CLS] A [SEP] B [SEP]`` with token types, segment ids and positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def code_sentences(text: bytes) -> list[bytes]:
    """Blocks of consecutive non-blank lines, each carrying the blank lines that follow it.

    Leading blank lines belong to the first block, so ``b"".join(result) == text``.
    """
    blocks: list[bytes] = []
    current: list[bytes] = []
    seen_text = after_blank = False
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        # A non-blank line after a blank one starts a new block once some text was seen.
        if not blank and seen_text and after_blank:
            blocks.append(b"".join(current))
            current = []
        current.append(line)
        seen_text |= not blank
        after_blank = blank
    if current:
        blocks.append(b"".join(current))
    return blocks


def truncate_pair(
    a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's truncate_seq_pair in closed form: same distribution, O(1) random draws.

    BERT drops one token at a time from the longer side (ties: b), front or back by a coin
    flip. That removes the length gap from the longer side, then alternates starting with
    b; each side's front removals are Binomial(its removals, 1/2).
    """
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    gap = abs(len(a) - len(b))
    first = min(excess, gap)
    drop_a, drop_b = (first, 0) if len(a) > len(b) else (0, first)
    rest = excess - first
    drop_a, drop_b = drop_a + rest // 2, drop_b + (rest + 1) // 2
    front_a, front_b = int(rng.binomial(drop_a, 0.5)), int(rng.binomial(drop_b, 0.5))
    a = a[front_a : len(a) - (drop_a - front_a)]
    b = b[front_b : len(b) - (drop_b - front_b)]
    return a, b


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def document_pairs(
    sentences: list[np.ndarray],
    rng: np.random.Generator,
    *,
    max_tokens: int,
    random_document: Callable[[], Sequence[np.ndarray]],
    next_prob: float = 0.5,
    short_seq_prob: float = 0.1,
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """(A, B, is_next) pairs from one document, as BERT's create_instances_from_document.

    ``max_tokens`` bounds len(A) + len(B) (the caller reserves [CLS]/[SEP] room). As in
    BERT, the target length is drawn once per document: max_tokens, or with probability
    short_seq_prob uniform in [2, max_tokens]. Sentences accumulate into a chunk until it
    reaches the target or the document ends; A is a random prefix of the chunk's sentences.
    B is the rest of the chunk (is_next) with probability next_prob, else (or when the
    chunk holds one sentence) sentences of ``random_document()`` from a random start,
    filled to the target, and the chunk's unused sentences go back to the document. A
    one-sentence chunk (a block as long as the target) is cut inside the sentence, so it
    too has a true continuation: the is_next rate stays next_prob, and with next_prob=1
    every B truly follows A. Pairs are truncated to max_tokens; a pair with an empty side
    is skipped.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))

    pairs: list[tuple[np.ndarray, np.ndarray, bool]] = []
    chunk: list[np.ndarray] = []
    length = 0
    i = 0
    while i < len(sentences):
        chunk.append(np.asarray(sentences[i], np.int32))
        length += len(chunk[-1])
        if i < len(sentences) - 1 and length < target:
            i += 1
            continue
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        a = _concat(chunk[:a_end])
        rest = _concat(chunk[a_end:])
        if len(chunk) == 1:
            # One sentence as long as the target (common for code blocks): cut it inside,
            # so its true continuation exists and the 50/50 balance holds.
            cut = int(rng.integers(1, min(len(a), target))) if len(a) >= 2 else len(a)
            a, rest = a[:cut], a[cut:]
        if rng.random() >= next_prob or (not len(rest) and next_prob < 1):
            other = random_document()
            b_parts: list[np.ndarray] = []
            b_len = 0
            start = int(rng.integers(len(other))) if other else 0
            for sentence in other[start:]:
                b_parts.append(np.asarray(sentence, np.int32))
                b_len += len(sentence)
                if b_len >= target - len(a):
                    break
            b, is_next = _concat(b_parts), False
            i -= len(chunk) - a_end  # put the chunk's unused sentences back
        else:
            b, is_next = rest, True
        a, b = truncate_pair(a, b, max_tokens, rng)
        if len(a) and len(b):
            pairs.append((a, b, is_next))
        chunk, length = [], 0
        i += 1
    return pairs


def encode_pair(
    a: np.ndarray, b: np.ndarray, *, cls_id: int, sep_id: int, pad_id: int, seq_len: int
) -> dict[str, np.ndarray]:
    """Lay out ``[CLS] a [SEP] b [SEP]`` + padding as int32 arrays of length seq_len.

    Keys: tokens; token_types (0 for [CLS], a and the first [SEP], 1 for b and the last
    [SEP], 0 on padding); segment_ids (1 on real tokens, 0 on padding); positions
    (0..n-1 on real tokens, 0 on padding).
    """
    n = len(a) + len(b) + 3
    if n > seq_len:
        raise ValueError(f"pair of {len(a)}+{len(b)} tokens + 3 specials exceeds seq_len {seq_len}")
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:n] = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]])
    token_types = np.zeros(seq_len, np.int32)
    token_types[len(a) + 2 : n] = 1
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(seq_len, np.int32)
    positions[:n] = np.arange(n)
    return {"tokens": tokens, "token_types": token_types, "segment_ids": segment_ids,
            "positions": positions}
