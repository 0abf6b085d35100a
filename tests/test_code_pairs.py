"""The code_pairs corpus: labels recomputed from the stdlib files, split hygiene, balance."""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import sysconfig

import pytest
import tensorflow_datasets as tfds
from data_fixtures import make_cfg

from llm_jax.data import sources
from llm_jax.data.corpora import code_pairs


@pytest.fixture(scope="module")
def line_files() -> tuple[dict[str, set[str]], set[str]]:
    """Independently: stripped line (>= 20 chars) -> files holding it; the non-UTF-8 files."""
    root = sysconfig.get_paths()["stdlib"]
    where: dict[str, set[str]] = collections.defaultdict(set)
    not_utf8 = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in {"site-packages", "dist-packages"}]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            with open(os.path.join(root, rel), "rb") as f:
                raw = f.read()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                not_utf8.add(rel)
            for line in raw.decode("utf-8", errors="replace").splitlines():
                if len(line.strip()) >= 20:
                    where[line.strip()].add(rel)
    return where, not_utf8


def _split(rel: str) -> str:
    digest = int(hashlib.sha256(rel.encode()).hexdigest(), 16)
    return "validation" if digest % 100 < 5 else "train"


def _read(builder, split: str) -> list[tuple[str, str, int]]:
    source = builder.as_data_source(split)
    rows = source.__getitems__(range(len(source)))
    return [(r["text_a"].decode(), r["text_b"].decode(), int(r["label"])) for r in rows]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, list[tuple[str, str, int]]]:
    cfg = make_cfg(tmp_path_factory.mktemp("data"), name="code_pairs", text_feature="text_a")
    sources.load_source(cfg, "validation")  # prepares it as a training run would (~2 s)
    builder = tfds.builder("code_pairs", data_dir=cfg.data_dir, file_format="array_record")
    return {s: _read(builder, s) for s in ("train", "validation")}


def _file(snippet: str, where: dict[str, set[str]]) -> str:
    """The one file holding every line of a snippet."""
    files = {f for line in snippet.split("\n") for f in where[line]}
    assert len(files) == 1 and len(snippet.split("\n")) == code_pairs.SNIPPET_LINES
    return files.pop()


def test_labels_match_the_files_and_splits(pairs, line_files):
    where, not_utf8 = line_files
    for split, rows in pairs.items():
        for a, b, label in rows:
            file_a, file_b = _file(a, where), _file(b, where)  # each line is in one file
            assert a != b and label == int(file_a == file_b)
            assert _split(file_a) == _split(file_b) == split
            assert file_a not in not_utf8 and file_b not in not_utf8


def test_sizes_balance_and_no_repeats(pairs):
    for split, target in (("train", 40_000), ("validation", 4_000)):
        rows = pairs[split]
        assert 0.9 * target < len(rows) <= 1.05 * target
        labels = collections.Counter(label for _, _, label in rows)
        assert abs(labels[1] - labels[0]) <= 0.01 * len(rows)
        assert len({frozenset((a, b)) for a, b, _ in rows}) == len(rows)
        # Labels are interleaved, not in blocks.
        first_half = sum(label for _, _, label in rows[: len(rows) // 2])
        assert abs(first_half - len(rows) / 4) < 0.05 * len(rows)


def test_large_files_do_not_dominate(pairs, line_files):
    where, _ = line_files
    uses = collections.Counter()
    for a, b, _ in pairs["train"]:
        uses.update(_file(x, where) for x in (a, b))
    assert uses.most_common(1)[0][1] / sum(uses.values()) < 0.01


def test_build_is_deterministic(pairs, tmp_path):
    builder = tfds.builder("code_pairs", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    assert {s: _read(builder, s) for s in pairs} == pairs


def test_make_pairs_ignores_dict_order():
    lines = {f"f{i}.py": [f"line {j} of file number {i}" for j in range(3 + i)] for i in range(6)}
    shuffled = dict(reversed(list(lines.items())))
    first = code_pairs.make_pairs(lines, 20, seed=1)
    assert first == code_pairs.make_pairs(shuffled, 20, seed=1) and len(first) == 20


@pytest.fixture(scope="module")
def next_pairs(tmp_path_factory) -> dict[str, list[tuple[str, str, int]]]:
    builder = tfds.builder("code_next", data_dir=str(tmp_path_factory.mktemp("next")),
                           file_format="array_record")
    builder.download_and_prepare()
    return {s: _read(builder, s) for s in ("train", "validation")}


def test_code_next_labels_follow_the_files(next_pairs, line_files):
    """is_next == B's lines are the next usable lines after A's in A's file (first
    occurrences), recomputed from the file text; otherwise B comes from another file of
    the split."""
    where, _ = line_files
    root = sysconfig.get_paths()["stdlib"]

    @functools.cache
    def file_index(rel: str) -> tuple[dict[str, int], list[int]]:
        """Stripped line -> its first index in the file; first occurrences of usable lines."""
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            first: dict[str, int] = {}
            for i, s in enumerate(ln.strip() for ln in f.read().splitlines()):
                first.setdefault(s, i)
        return first, [i for s, i in first.items() if len(s) >= 20 and len(where[s]) == 1]

    for split, rows in next_pairs.items():
        for a, b, label in rows[:: 7 if split == "train" else 1]:
            file_a, file_b = _file(a, where), _file(b, where)
            assert _split(file_a) == _split(file_b) == split
            assert label == int(file_a == file_b)
            # the builder keeps each line's first occurrence in a file
            first, new_usable = file_index(file_b)
            first_b = first[b.split("\n")[0]]
            assert first_b != new_usable[0]  # B is never a file's first snippet, either label
            if label:
                last_a = first[a.split("\n")[-1]]
                assert last_a < first_b
                assert not any(last_a < i < first_b for i in new_usable)


def test_code_next_is_balanced_per_text_a(next_pairs):
    for split, target in (("train", 40_000), ("validation", 4_000)):
        rows = next_pairs[split]
        assert 0.85 * target < len(rows) <= 1.05 * target
        by_a = collections.defaultdict(list)
        for a, _, label in rows:
            by_a[a].append(label)
        # every A is asked twice, once with its next snippet and once with another file's
        assert all(sorted(labels) == [0, 1] for labels in by_a.values())
