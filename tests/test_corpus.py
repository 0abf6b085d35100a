"""The stdlib_source corpus: the split rule, exact bytes, deterministic order."""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

import pytest
from data_fixtures import data_cfg  # noqa: F401  (fixture)

from llm_jax.data import sources


def _expected() -> dict[str, dict[str, bytes]]:
    """Independent listing: os.walk, the sha256 rule, raw file bytes."""
    root = sysconfig.get_paths()["stdlib"]
    out: dict[str, dict[str, bytes]] = {"train": {}, "validation": {}}
    for dirpath, _, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if {"site-packages", "dist-packages"} & set(rel_dir.split(os.sep)):
            continue
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.normpath(os.path.join(rel_dir, name))
                digest = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
                split = "validation" if digest % 100 < 5 else "train"
                with open(os.path.join(root, rel), "rb") as f:
                    out[split][rel] = f.read()
    return out


@pytest.fixture(scope="module")
def expected() -> dict[str, dict[str, bytes]]:
    return _expected()


def _records(cfg, split: str) -> list[tuple[str, bytes]]:
    source = sources.load_source(cfg, split)
    return [(r["path"].decode(), sources.document_bytes(r, cfg)) for r in source]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_split_rule_and_exact_bytes(data_cfg, expected, split):  # noqa: F811
    records = _records(data_cfg, split)
    paths = [p for p, _ in records]
    assert paths == sorted(expected[split]), "records must be every file, in sorted-path order"
    assert dict(records) == expected[split]


def test_non_utf8_files_are_kept_as_bytes(data_cfg, expected):  # noqa: F811
    def is_utf8(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    found = 0
    for split in ("train", "validation"):
        stored = dict(_records(data_cfg, split))
        for path, raw in expected[split].items():
            if not is_utf8(raw):
                assert stored[path] == raw
                found += 1
    if not found:
        pytest.skip("this interpreter's stdlib has no non-UTF-8 .py files")


def test_split_sizes_are_sane(expected):
    n_train, n_val = len(expected["train"]), len(expected["validation"])
    assert n_val > 0 and 0.02 < n_val / (n_train + n_val) < 0.08


def test_a_corpus_built_by_another_python_is_refused_in_one_line(tmp_path):
    import json

    from data_fixtures import make_cfg
    cfg = make_cfg(tmp_path)
    sources.load_source(cfg, "validation")
    meta = tmp_path / "stdlib_source" / "1.0.0" / "metadata.json"
    assert json.loads(meta.read_text())["python"] == "%d.%d.%d" % sys.version_info[:3]
    meta.write_text(json.dumps({"python": "3.10.0"}))
    with pytest.raises(sources.DataError, match="built from Python 3.10.0") as err:
        sources.load_source(cfg, "validation")
    assert "\n" not in str(err.value)
