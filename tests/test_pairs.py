"""NSP pairs: code blocks round trip, is_next rate, contiguity, budgets, pair layout."""

from __future__ import annotations

import math
import pathlib
import sysconfig

import numpy as np
import pytest

from llm_jax.data import pairs

RANDOM_BASE = 10_000_000  # random documents use ids above this, real documents below


@pytest.mark.parametrize("text", [
    b"", b"\n", b"\n\n  \n", b"x", b"x\n", b"a\nb\n\nc\n", b"\n\na\n  \n\t\nb\nc",
    b"def f():\r\n    return 1\r\n\r\n\r\nclass A:\r\n    pass   \r\n", b"a  \n   \nb\rc\r\rd",
])
def test_code_sentences_round_trip(text):
    blocks = pairs.code_sentences(text)
    assert b"".join(blocks) == text
    assert (blocks == []) == (text == b"")
    for block in blocks[1:]:
        assert block.splitlines()[0].strip()  # later blocks start with a non-blank line
    for block in blocks:
        lines = block.splitlines()
        body = [i for i, line in enumerate(lines) if line.strip()]
        if body:  # a block's non-blank lines are one consecutive run
            assert body == list(range(body[0], body[-1] + 1))


def test_code_sentences_blocks():
    assert pairs.code_sentences(b"\n\na\nb\n\n  \nc\n\nd") == [b"\n\na\nb\n\n  \n", b"c\n\n", b"d"]


def _expected_block_count(text: bytes) -> int:
    """Blocks start at each non-blank line that follows a blank one, after the first text."""
    blank = [not line.strip() for line in text.splitlines()]
    first = blank.index(False) if False in blank else len(blank)
    return int(bool(blank)) + sum(blank[i - 1] and not blank[i]
                                  for i in range(first + 1, len(blank)))


def test_code_sentences_on_stdlib_files():
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for name in ("os.py", "textwrap.py", "json/encoder.py", "this.py"):
        text = (stdlib / name).read_bytes()
        blocks = pairs.code_sentences(text)
        assert b"".join(blocks) == text
        assert len(blocks) == _expected_block_count(text) > 1


def _document(rng: np.random.Generator, base: int, n_sentences: int, max_len: int):
    """Sentences with globally unique ids (base, base + 1, ...), so positions are findable."""
    lengths = rng.integers(1, max_len + 1, n_sentences)
    stream = np.arange(base, base + lengths.sum(), dtype=np.int32)
    return np.split(stream, np.cumsum(lengths)[:-1]), stream


def _find_run(stream: np.ndarray, part: np.ndarray) -> int:
    """Start of ``part`` as a contiguous run of ``stream`` (ids are unique); -1 if not."""
    start = int(part[0]) - int(stream[0])
    ok = 0 <= start and start + len(part) <= len(stream)
    return start if ok and np.array_equal(stream[start : start + len(part)], part) else -1


def _make_random_pool(rng: np.random.Generator):
    pool = [_document(rng, RANDOM_BASE + 100_000 * k, int(rng.integers(1, 30)), 20)
            for k in range(50)]
    streams = {int(s[0]): s for _, s in pool}
    draw = lambda: pool[int(rng.integers(len(pool)))][0]
    return draw, streams


def _in_pool(b: np.ndarray, streams: dict[int, np.ndarray]) -> bool:
    base = RANDOM_BASE + 100_000 * ((int(b[0]) - RANDOM_BASE) // 100_000)
    return int(b[0]) >= RANDOM_BASE and _find_run(streams[base], b) >= 0


@pytest.mark.parametrize("next_prob", [0.5, 0.8])
def test_pairs_budget_labels_and_sources(next_prob):
    rng = np.random.default_rng(0)
    draw, streams = _make_random_pool(rng)
    max_tokens, docs = 64, 3000
    first_is_next = 0
    for d in range(docs):
        # Sentences shorter than a third of the budget: a document's first chunk has >= 2.
        sentences, stream = _document(rng, 100_000 * d, int(rng.integers(2, 40)), 20)
        out = pairs.document_pairs(sentences, np.random.default_rng([1, d]),
                                   max_tokens=max_tokens, random_document=draw,
                                   next_prob=next_prob)
        assert out
        first_is_next += out[0][2]
        for a, b, is_next in out:
            assert 1 <= len(a) and 1 <= len(b) and len(a) + len(b) <= max_tokens
            assert a.dtype == b.dtype == np.int32
            sa = _find_run(stream, a)
            assert sa >= 0  # A is a run of this document
            if is_next:  # B follows A (truncation may drop A's tail or B's head)
                sb = _find_run(stream, b)
                assert sb >= sa + len(a)
            else:
                assert _in_pool(b, streams)
    se = math.sqrt(docs * next_prob * (1 - next_prob))
    assert abs(first_is_next - docs * next_prob) <= 4 * se


def test_true_pairs_are_contiguous_without_truncation():
    rng = np.random.default_rng(1)
    n_pairs = 0
    for d in range(500):
        sentences, stream = _document(rng, 100_000 * d, int(rng.integers(2, 8)), 10)
        out = pairs.document_pairs(sentences, np.random.default_rng([2, d]), max_tokens=1000,
                                   random_document=lambda: [], next_prob=0.7,
                                   short_seq_prob=0.0)
        for a, b, is_next in out:
            assert is_next  # empty random documents give no random pairs
            ab = np.concatenate([a, b])
            # No truncation, and every chunk runs to the document's end (it fits the budget);
            # a skipped random pair puts sentences back, so A may start later than 0.
            np.testing.assert_array_equal(ab, stream[len(stream) - len(ab) :])
            n_pairs += 1
    assert n_pairs > 100


def test_nsp_off_every_b_follows_a_and_single_sentences_split():
    rng = np.random.default_rng(2)
    never = lambda: pytest.fail("random_document called with next_prob=1")
    n_pairs = 0
    for d in range(500):
        sentences, stream = _document(rng, 100_000 * d, int(rng.integers(1, 12)), 80)
        out = pairs.document_pairs(sentences, np.random.default_rng([3, d]), max_tokens=48,
                                   random_document=never, next_prob=1.0)
        if len(sentences) == 1 and len(sentences[0]) >= 2:
            assert len(out) == 1
        for a, b, is_next in out:
            assert is_next and len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= 48
            sa, sb = _find_run(stream, a), _find_run(stream, b)
            assert sa >= 0 and sb >= sa + len(a)
            n_pairs += 1
    assert n_pairs > 500
    one = [np.array([5], np.int32)]
    assert pairs.document_pairs(one, rng, max_tokens=8, random_document=never,
                                next_prob=1.0) == []


def test_long_sentences_truncate_and_short_targets():
    rng = np.random.default_rng(3)
    sentences = [np.arange(1000 * k, 1000 * k + 500, dtype=np.int32) for k in range(6)]
    for seed in range(50):
        out = pairs.document_pairs(sentences, np.random.default_rng(seed), max_tokens=30,
                                   random_document=lambda: sentences, short_seq_prob=0.5)
        assert out and all(len(a) + len(b) <= 30 and len(a) and len(b) for a, b, _ in out)
    assert pairs.document_pairs([], rng, max_tokens=30, random_document=lambda: []) == []


def _bert_truncated_lengths(la: int, lb: int, max_tokens: int) -> tuple[int, int]:
    """BERT's truncate_seq_pair loop: drop from the longer side (ties: b) until it fits."""
    while la + lb > max_tokens:
        la, lb = (la - 1, lb) if la > lb else (la, lb - 1)
    return la, lb


def test_truncation_matches_bert_lengths_and_is_contiguous():
    rng = np.random.default_rng(4)
    for la in range(1, 25):
        for lb in range(1, 25):
            for m in (2, 3, 10, 17, 30):
                a, b = np.arange(la), np.arange(100, 100 + lb)
                ta, tb = pairs.truncate_pair(a, b, m, rng)
                assert (len(ta), len(tb)) == _bert_truncated_lengths(la, lb, m)
                assert _find_run(a, ta) >= 0 and _find_run(b, tb) >= 0
    # Front vs back drops are fair coins: 40 drops from a, front share ~ 1/2.
    fronts = [int(pairs.truncate_pair(np.arange(50), np.arange(10), 20, rng)[0][0])
              for _ in range(2000)]
    assert abs(np.mean(fronts) - 20) <= 4 * math.sqrt(40 * 0.25 / 2000)  # Binomial(40, 1/2) mean


def test_encode_pair_layout():
    a, b = np.array([11, 12, 13]), np.array([21, 22])
    out = pairs.encode_pair(a, b, cls_id=1, sep_id=2, pad_id=0, seq_len=10)
    assert out["tokens"].tolist() == [1, 11, 12, 13, 2, 21, 22, 2, 0, 0]
    assert out["token_types"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert out["segment_ids"].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert out["positions"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]
    assert all(v.dtype == np.int32 and v.shape == (10,) for v in out.values())
    full = pairs.encode_pair(a, b, cls_id=1, sep_id=2, pad_id=0, seq_len=8)
    assert full["segment_ids"].tolist() == [1] * 8
    with pytest.raises(ValueError):
        pairs.encode_pair(a, b, cls_id=1, sep_id=2, pad_id=0, seq_len=7)
