"""Shared data fixtures: one stdlib_source build and one tiny tokenizer per test session.

Import the fixtures into a test module (``from data_fixtures import data_cfg, tok``);
a module-level cache makes them session-wide even when several modules import them.
"""

from __future__ import annotations

import ml_collections
import pytest

from llm_jax.data import sources, tokenizer

_CACHE: dict[str, object] = {}


def make_cfg(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """A small data config: tiny vocab and training sample so tests stay fast."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="stdlib_source",
            data_dir=str(data_dir),
            text_feature="text",
            train_split="train",
            eval_split="validation",
            seq_len=128,
            vocab_size=512,
            tokenizer_path="",
            tokenizer_train_bytes=300_000,
            tokenizer_pieces="spans",
            worker_threads=1,
            max_segments_per_row=0,
            prefetch=2,
        )
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory) -> ml_collections.ConfigDict:
    """Config whose data_dir holds a prepared stdlib_source (built once)."""
    if "cfg" not in _CACHE:
        cfg = make_cfg(tmp_path_factory.mktemp("data"))
        sources.load_source(cfg, "validation")  # prepares the corpus on first use
        _CACHE["cfg"] = cfg
    return _CACHE["cfg"].copy_and_resolve_references()


@pytest.fixture(scope="session")
def tok(data_cfg) -> tokenizer.Tokenizer:
    """A 512-piece tokenizer trained on 300 kB of the train split (~0.2 s)."""
    if "tok" not in _CACHE:
        _CACHE["tok"] = tokenizer.load_or_train(data_cfg)
    return _CACHE["tok"]
