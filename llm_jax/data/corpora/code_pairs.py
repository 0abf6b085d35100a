"""TFDS builder of a sequence-pair task: do two standard-library code snippets share a file?

Built from the same files as ``stdlib_source`` with the same split rule, so validation pairs
come only from stdlib_source's validation files. Lines are stripped of leading and trailing
whitespace (indentation would otherwise hint at the file's style); a line is used when it is
at least 20 characters long and occurs in exactly one file (counted over all files, so the
label is never ambiguous and no line is in both splits). A snippet is SNIPPET_LINES such
consecutive usable lines of a file, joined by newlines (single lines gave a small model too
little evidence). Files that are not valid UTF-8 are skipped (their lines still count for
that uniqueness). ``label`` is 1 for two different snippets of one file and 0 for snippets
of two different files of the same split; the labels are 50/50. Each file gives
~sqrt(#snippets) positives (capped, so big files do not dominate) and as many negatives
with a snippet of it as ``text_a``. Deterministic: fixed seed, sorted file order.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator

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


def make_pairs(lines: dict[str, list[str]], total: int, seed: int) -> list[tuple[str, str, int]]:
    """~total shuffled (text_a, text_b, label) pairs, half positive, from the files in lines."""
    paths = sorted(p for p, ls in lines.items() if len(ls) >= 2)
    if len(paths) < 2:
        raise ValueError(f"need two files with two usable lines each, got {len(paths)}")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(lines[p]) for p in paths])
    weights = np.minimum(np.sqrt(sizes), _WEIGHT_CAP)
    counts = np.minimum(np.round(total / 2 * weights / weights.sum()), sizes * (sizes - 1) // 2)
    cum = np.cumsum(weights)
    pairs: list[tuple[str, str, int]] = []
    seen: set[frozenset[str]] = set()
    for a, (path, k) in enumerate(zip(paths, counts.astype(int))):
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
                b = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
                if b == a:
                    continue
                other = lines[paths[b]]
                x, y = own[rng.integers(len(own))], other[rng.integers(len(other))]
                if frozenset((x, y)) not in seen:
                    break
            seen.add(frozenset((x, y)))
            pairs.append((x, y, 0))
    return [pairs[i] for i in rng.permutation(len(pairs))]


class CodePairs(tfds.core.GeneratorBasedBuilder):
    """Pairs of stdlib code snippets labelled 1 when they come from the same file."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: single lines.",
                     "2.0.0": "Snippets of SNIPPET_LINES lines."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Without TF, Text is returned as bytes and ClassLabel as an int64 scalar.
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # keep the seeded order
            features=tfds.features.FeaturesDict(
                {
                    "text_a": tfds.features.Text(),
                    "text_b": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["different_file", "same_file"]),
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
            out[split] = self._generate_examples(make_pairs(in_split, total, SEED + index))
        return out

    def _generate_examples(self, pairs: list[tuple[str, str, int]]) -> Iterator[tuple[int, dict]]:
        for i, (a, b, label) in enumerate(pairs):
            yield i, {"text_a": a, "text_b": b, "label": label}
