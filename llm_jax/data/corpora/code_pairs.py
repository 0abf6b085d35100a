"""TFDS builders of two sequence-pair tasks on standard-library code snippets.

``code_pairs``: do two snippets share a file? ``code_next``: is B the snippet right after
A in its file, or one from another file (BERT's next-sentence task, on stripped snippets
instead of blocks, as a downstream task)?

Built from the same files as ``stdlib_source`` with the same split rule, so validation pairs
come only from stdlib_source's validation files. Lines are stripped of leading and trailing
whitespace (indentation would otherwise hint at the file's style); a line is used when it is
at least 20 characters long and occurs in exactly one file (counted over all files, so the
label is never ambiguous and no line is in both splits). A snippet is SNIPPET_LINES such
consecutive usable lines of a file, joined by newlines (single lines gave a small model too
little evidence). Files that are not valid UTF-8 are skipped (their lines still count for
that uniqueness). code_pairs' ``label`` is 1 for two different snippets of one file and 0
for snippets of two different files of the same split; code_next's is 1 when B is the
snippet after A and 0 when B is a snippet of another file. Labels are 50/50: each file
gives ~sqrt(#snippets) positives (capped, so big files do not dominate) and as many
negatives with the same ``text_a``s. Deterministic: fixed seed, sorted file order.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from llm_jax.data.corpora.stdlib_source import list_files, python_version, split_of, stdlib_root

MIN_CHARS = 20
SNIPPET_LINES = 4
SEED = 20240531
TARGET_PAIRS = {"train": 40_000, "validation": 4_000}
_WEIGHT_CAP = 30.0  # sqrt(900): a file's share stops growing beyond 900 usable lines


def file_lines(root: str, paths: list[str]) -> dict[str, list[str]]:
    """Snippets of each UTF-8 file: SNIPPET_LINES consecutive usable stripped lines (each
    unique across files), in file order."""
    per_file: dict[str, list[str]] = {}
    n_files: collections.Counter = collections.Counter()
    for path in paths:
        with open(os.path.join(root, path), "rb") as f:
            raw = f.read()
        try:
            text, utf8 = raw.decode("utf-8"), True
        except UnicodeDecodeError:
            text, utf8 = raw.decode("utf-8", errors="replace"), False
        lines = [s for s in (ln.strip() for ln in text.splitlines()) if len(s) >= MIN_CHARS]
        lines = list(dict.fromkeys(lines))  # once per file, first-occurrence order
        n_files.update(lines)  # every file counts, so shared lines are excluded everywhere
        if utf8:
            per_file[path] = lines
    unique = {p: [s for s in lines if n_files[s] == 1] for p, lines in per_file.items()}
    return {p: ["\n".join(ls[i:i + SNIPPET_LINES])
                for i in range(0, len(ls) - SNIPPET_LINES + 1, SNIPPET_LINES)]
            for p, ls in unique.items()}


def _file_counts(lines: dict[str, list[str]], total: int, rng: np.random.Generator,
                 most: Callable[[np.ndarray], np.ndarray]):
    """Sorted paths with two snippets or more, positives per file (~total/2 shared by
    sqrt(size), at most most(sizes)), and a sampler of another file weighted alike."""
    paths = sorted(p for p, ls in lines.items() if len(ls) >= 2)
    if len(paths) < 2:
        raise ValueError(f"need two files with two snippets each, got {len(paths)}")
    sizes = np.array([len(lines[p]) for p in paths])
    weights = np.minimum(np.sqrt(sizes), _WEIGHT_CAP)
    counts = np.minimum(np.round(total / 2 * weights / weights.sum()), most(sizes)).astype(int)
    cum = np.cumsum(weights)

    def other_file(a: int) -> list[str]:
        while (b := int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))) == a:
            pass
        return lines[paths[b]]

    return paths, counts, other_file


def make_pairs(lines: dict[str, list[str]], total: int, seed: int) -> list[tuple[str, str, int]]:
    """~total shuffled (text_a, text_b, same_file) pairs, half positive, from the files in
    lines."""
    rng = np.random.default_rng(seed)
    paths, counts, other_file = _file_counts(lines, total, rng, lambda n: n * (n - 1) // 2)
    pairs: list[tuple[str, str, int]] = []
    seen: set[frozenset[str]] = set()
    for a, (path, k) in enumerate(zip(paths, counts)):
        own = lines[path]
        for _ in range(k):  # positives: two different lines of this file, new pair each time
            while True:
                i, j = rng.choice(len(own), 2, replace=False)
                if (pair := frozenset((own[i], own[j]))) not in seen:
                    break
            seen.add(pair)
            pairs.append((own[i], own[j], 1))  # choice's order makes either line text_a
        for _ in range(k):  # negatives: a line of this file, one of another (weighted) file
            while True:
                other = other_file(a)
                x, y = own[rng.integers(len(own))], other[rng.integers(len(other))]
                if frozenset((x, y)) not in seen:
                    break
            seen.add(frozenset((x, y)))
            pairs.append((x, y, 0))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def make_next_pairs(lines: dict[str, list[str]], total: int,
                    seed: int) -> list[tuple[str, str, int]]:
    """~total shuffled (text_a, text_b, is_next) pairs: each chosen snippet is text_a twice,
    once before the snippet after it (1) and once before a snippet of another file (0),
    never that file's first (so where a snippet sits in its file says nothing)."""
    rng = np.random.default_rng(seed)
    paths, counts, other_file = _file_counts(lines, total, rng, lambda n: n - 1)
    pairs: list[tuple[str, str, int]] = []
    for a, (path, k) in enumerate(zip(paths, counts)):
        own = lines[path]
        for i in sorted(rng.choice(len(own) - 1, k, replace=False)):
            other = other_file(a)
            # never another file's first snippet: no positive B is one (position would leak)
            pairs += [(own[i], own[i + 1], 1), (own[i], other[rng.integers(1, len(other))], 0)]
    return [pairs[i] for i in rng.permutation(len(pairs))]


class CodePairs(tfds.core.GeneratorBasedBuilder):
    """Pairs of stdlib code snippets labelled 1 when they come from the same file."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: single lines.",
                     "2.0.0": "Snippets of SNIPPET_LINES lines."}
    LABELS = ["different_file", "same_file"]
    MAKE = staticmethod(make_pairs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Without TF, Text is returned as bytes and ClassLabel as an int64 scalar.
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # keep the seeded order
            features=tfds.features.FeaturesDict(
                {
                    "text_a": tfds.features.Text(),
                    "text_b": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=self.LABELS),
                }
            ),
            # Like stdlib_source: pairs depend on this interpreter's stdlib (checked in sources).
            metadata=tfds.core.MetadataDict(python=python_version()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        lines = file_lines(stdlib_root(), list_files(stdlib_root()))
        out = {}
        for index, (split, total) in enumerate(TARGET_PAIRS.items()):
            in_split = {p: ls for p, ls in lines.items() if split_of(p) == split}
            out[split] = self._generate_examples(self.MAKE(in_split, total, SEED + index))
        return out

    def _generate_examples(self, pairs: list[tuple[str, str, int]]) -> Iterator[tuple[int, dict]]:
        for i, (a, b, label) in enumerate(pairs):
            yield i, {"text_a": a, "text_b": b, "label": label}


class CodeNext(CodePairs):
    """Pairs of stdlib code snippets labelled 1 when B is the snippet right after A."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Negatives' B is never a file's first snippet, like positives'."}
    LABELS = ["other_file", "next"]
    MAKE = staticmethod(make_next_pairs)
