"""Random-access document sources: TFDS array_record data read without TF or network.

The embedded corpora (``llm_jax.data.corpora``) are prepared on first use; any other
TFDS dataset must already be prepared under ``data_dir`` and is never downloaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from llm_jax.data import corpora

# How long non-zero processes wait for process 0 to prepare an embedded corpus.
_PREPARE_TIMEOUT_S = 1800.0


class DataError(ValueError):
    """A user error about data (dataset, split, feature): reported in one line."""


def data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """The configured data directory with ``~`` expanded."""
    return os.path.abspath(os.path.expanduser(data_cfg.data_dir))


def _prepare_hint(name: str, ddir: str) -> str:
    return (
        f"prepare it on a machine with network: `tfds build {name} --data_dir={ddir} "
        f"--file_format=array_record`, then copy {ddir}/{name.split('/')[0]} here"
    )


def _embedded_builder(name: str, ddir: str, process_index: int) -> tfds.core.DatasetBuilder:
    """Builder of an embedded corpus, prepared by process 0; others wait for it."""
    def make() -> tfds.core.DatasetBuilder:
        try:
            return tfds.builder(name, data_dir=ddir, file_format="array_record")
        except (ValueError, tfds.core.registered.DatasetNotFoundError) as e:  # a config
            reason = " ".join(str(e).split())[:300]
            raise DataError(f"data.name={name!r}: {reason}") from None

    builder = make()
    if builder.is_prepared():
        return _same_python(builder, ddir)
    if process_index == 0:
        print(f"building {name} into {ddir} (once; nothing is downloaded)", flush=True)
        try:
            tfds.disable_progress_bar()  # its "Downloading and preparing" lines mislead here
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare()
        except corpora.gettext_translation.NoCatalogsError as e:
            raise DataError(str(e)) from None
        except OSError:
            # Another run sharing data_dir may have finished first (rename race).
            if not make().is_prepared():
                raise
        return make()
    deadline = time.monotonic() + _PREPARE_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
        # A fresh builder re-reads dataset_info.json once process 0 has written it.
        builder = make()
        if builder.is_prepared():
            return builder
    raise DataError(
        f"timed out waiting for process 0 to prepare {name} in {ddir}; "
        "data_dir must be shared by all processes"
    )


def _same_python(builder: tfds.core.DatasetBuilder, ddir: str) -> tfds.core.DatasetBuilder:
    """The stdlib corpus in data_dir must come from this interpreter's standard library."""
    built = builder.info.metadata.get("python") if builder.info.metadata else None
    here = corpora.stdlib_source.python_version()
    if built is not None and built != here:
        raise DataError(
            f"{builder.name} in data_dir={ddir} was built from Python {built}'s standard "
            f"library, this is Python {here}; use another data.data_dir or delete "
            f"{builder.data_dir}"
        )
    return builder


def _builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    name, ddir = data_cfg.name, data_dir(data_cfg)
    if name.split("/")[0].split(":")[0] in corpora.EMBEDDED:
        return _embedded_builder(name, ddir, jax.process_index())
    # Read from files only: this never imports a builder's download code, never
    # touches the network and fails at once when nothing is prepared.
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=ddir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"dataset {name!r} is not prepared under data_dir={ddir}; {_prepare_hint(name, ddir)}"
        ) from None
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(
            f"dataset {name!r} in {ddir} is stored as {builder.info.file_format.value}, "
            f"which needs TensorFlow; {_prepare_hint(name, ddir)}"
        )
    return builder


def load_source(data_cfg: ml_collections.ConfigDict, split: str) -> Sequence[Mapping[str, Any]]:
    """Random-access source (``len`` and ``[i]``) of one split of ``data_cfg.name``.

    Raises:
      DataError: the dataset is not prepared, or lacks the split or the text feature.
    """
    builder = _builder(data_cfg)
    name = data_cfg.name
    available = sorted(builder.info.splits.keys())
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in available:
            raise DataError(f"dataset {name!r} has no split {base!r}; available: {available}")
    features = sorted(builder.info.features.keys())
    if data_cfg.text_feature not in features:
        raise DataError(
            f"dataset {name!r} has no feature data.text_feature={data_cfg.text_feature!r}; "
            f"available: {features}"
        )
    return builder.as_data_source(split=split)


def document_bytes(record: Mapping[str, Any], data_cfg: ml_collections.ConfigDict) -> bytes:
    """The text feature of a record as bytes (str is UTF-8 encoded)."""
    return feature_bytes(record, data_cfg.text_feature)


def feature_bytes(record: Mapping[str, Any], feature: str) -> bytes:
    """A text feature of a record as bytes (str is UTF-8 encoded)."""
    value = record[feature]
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    return bytes(value.item() if hasattr(value, "item") else value)
