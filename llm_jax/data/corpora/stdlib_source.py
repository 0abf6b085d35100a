"""TFDS builder for the running interpreter's standard-library source code.

A real code corpus that needs no download: every ``.py`` file under
``sysconfig.get_paths()['stdlib']`` (site-packages excluded), as raw bytes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
VALIDATION_PERCENT = 5


def python_version() -> str:
    """major.minor.micro of the running interpreter, e.g. '3.11.7'."""
    return ".".join(map(str, sys.version_info[:3]))


def stdlib_root() -> str:
    """Directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def split_of(relative_path: str) -> str:
    """Hash rule: stable across machines and file orderings, ~5% validation."""
    digest = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16)
    return "validation" if digest % 100 < VALIDATION_PERCENT else "train"


def list_files(root: str) -> list[str]:
    """Sorted relative paths of all ``.py`` files under root, minus site-packages."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(paths)


class StdlibSource(tfds.core.GeneratorBasedBuilder):
    """Python standard-library source files; ``text`` holds the exact file bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Without TF, Text stores bytes verbatim and data_source returns them as
        # bytes (measured, incl. non-UTF-8 and NULs), like lm1b's `text` feature.
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # keep records in sorted-path order
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            # Which interpreter's stdlib this is: a data_dir built by another Python holds
            # other files, so a run must not mix them up (checked in sources.py).
            metadata=tfds.core.MetadataDict(python=python_version()),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        root = stdlib_root()
        paths = list_files(root)
        return {
            split: self._generate_examples(root, [p for p in paths if split_of(p) == split])
            for split in ("train", "validation")
        }

    def _generate_examples(self, root: str, paths: list[str]) -> Iterator[tuple[str, dict]]:
        for path in paths:
            with open(os.path.join(root, path), "rb") as f:
                yield path, {"text": f.read(), "path": path}
