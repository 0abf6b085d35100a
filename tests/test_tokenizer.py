"""Tokenizer: exact byte round trip, byte accounting, fixed special ids, caching."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_fixtures import data_cfg, make_cfg, tok  # noqa: F401  (fixtures)

from llm_jax.data import sources, tokenizer


def _check_round_trip(tok, text: bytes) -> np.ndarray:  # noqa: F811
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert int(tok.token_bytes[ids].sum()) == len(text)
    return ids


def test_validation_split_round_trips(data_cfg, tok):  # noqa: F811
    source = sources.load_source(data_cfg, "validation")
    total_bytes = total_ids = 0
    for record in source:
        text = sources.document_bytes(record, data_cfg)
        total_bytes += len(text)
        total_ids += len(_check_round_trip(tok, text))
    assert total_bytes > 0 and total_ids > 0


def test_non_utf8_documents_round_trip(data_cfg, tok):  # noqa: F811
    found = 0
    for split in ("train", "validation"):
        for record in sources.load_source(data_cfg, split):
            text = sources.document_bytes(record, data_cfg)
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                _check_round_trip(tok, text)
                found += 1
    if not found:
        pytest.skip("no non-UTF-8 documents in this stdlib")


EDGE_CASES = [
    b"",
    b"\x00",
    b"a\x00b\x00",
    "\u2581x \u2581\u2581".encode(),  # SentencePiece's own space symbol, literally
    b"\xe2\x96",  # truncated U+2581
    b"  \n\t\r\n    \x0b\x0c",
    "h\u00e9llo w\u00f6rld \u65e5\u672c \U0001f600".encode(),
    "\ufeffbom".encode(),
    b"\xed\xa0\x80",  # an encoded surrogate (invalid UTF-8)
    b"\xf4\x90\x80\x80",  # above U+10FFFF (invalid UTF-8)
    b"\xff" * 1000,
    "\u3000\u00a0\u2028".encode(),
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_round_trip(tok, text):  # noqa: F811
    _check_round_trip(tok, text)


def test_random_bytes_round_trip(tok):  # noqa: F811
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 17, 256, 5000):
        for _ in range(20):
            _check_round_trip(tok, rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    for _ in range(50):  # random code points: long valid runs mixed with rare pieces
        chars = [chr(c) for c in rng.integers(0, 0x3100, 40) if not 0xD800 <= c < 0xE000]
        _check_round_trip(tok, "".join(chars).encode())


def test_str_input_equals_utf8_bytes(tok):  # noqa: F811
    text = "def f(x):\n    return x  # caf\u00e9\n"
    np.testing.assert_array_equal(tok.encode(text), tok.encode(text.encode()))


def test_special_ids_are_fixed_and_distinct(tok):  # noqa: F811
    specials = (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
    assert specials == (0, 1, 2, 3)
    # 512 pieces, then [CLS] [SEP] [MASK] and 100 sentinels appended after them
    assert tok.num_pieces == 512 and tok.vocab_size == 512 + 3 + 100
    appended = [tok.cls_id, tok.sep_id, tok.mask_id, *tok.sentinel_ids]
    assert appended == list(range(512, 615)) and tok.token_bytes.shape == (615,)
    assert (tok.token_bytes[list(specials) + appended] == 0).all()
    assert (tok.token_bytes[4:512] > 0).all()  # every other piece decodes to bytes
    ids = tok.encode(bytes(range(256)) * 3)
    assert not np.isin(ids, specials).any() and ids.max() < 512


def test_cached_model_is_reused(data_cfg, tok, monkeypatch):  # noqa: F811
    path = tokenizer.cache_path(data_cfg)
    assert os.path.isfile(path)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]

    def no_training(_):
        raise AssertionError("retrained despite a cached model")

    monkeypatch.setattr(tokenizer, "train", no_training)
    again = tokenizer.load_or_train(data_cfg)
    assert again.serialized_model() == tok.serialized_model()
    # An explicit path loads that file.
    explicit = tokenizer.load_or_train(make_cfg(data_cfg.data_dir, tokenizer_path=path))
    np.testing.assert_array_equal(explicit.token_bytes, tok.token_bytes)


def test_cache_key_depends_on_settings(data_cfg):  # noqa: F811
    base = tokenizer.cache_path(data_cfg)
    assert tokenizer.cache_path(make_cfg(data_cfg.data_dir, vocab_size=1024)) != base
    assert tokenizer.cache_path(make_cfg(data_cfg.data_dir, tokenizer_train_bytes=1)) != base


def test_missing_tokenizer_path_is_one_line_error(tmp_path):
    cfg = make_cfg(tmp_path, tokenizer_path=str(tmp_path / "nope.model"))
    with pytest.raises(sources.DataError) as err:
        tokenizer.load_or_train(cfg)
    assert "nope.model" in str(err.value) and "\n" not in str(err.value)


def test_training_chunks_keep_lines_and_respect_cap():
    text = ("    x = 1\n" * 1000 + "y" * 20000 + "\n" + "z = '\u00e9'\n" * 10).encode()
    chunks = list(tokenizer.training_chunks(text, max_bytes=512))
    assert "".join(chunks).encode() == text
    assert max(len(c.encode()) for c in chunks) <= 512
    assert any(c.count("\n") > 10 for c in chunks)  # many lines per sentence


def test_too_small_vocab_is_one_line_error(data_cfg):  # noqa: F811
    cfg = make_cfg(data_cfg.data_dir, vocab_size=200)
    with pytest.raises(sources.DataError) as err:
        tokenizer.train(cfg)
    assert "vocab_size=200" in str(err.value) and "\n" not in str(err.value)
