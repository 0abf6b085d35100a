"""TFDS builder of English→X sentence pairs from the machine's compiled gettext catalogs.

A real translation corpus that needs no download: every ``<locale dir>/<lang>/LC_MESSAGES/
*.mo`` file under the locale directories (``locale_dirs()``). Each entry gives an English
``source`` (the msgid, msgctxt stripped; plurals use the singular and the first translation)
and its ``target``. The header, untranslated entries and entries whose translation equals the
source up to case and surrounding whitespace are skipped. Each source is kept once, with its
most frequent translation across catalogs (ties: the lexicographically smallest); ``domain``
is the smallest catalog name giving that translation. Records are sorted by source; ~3% of
sources (by sha256) are the ``validation`` split.
"""

from __future__ import annotations

import collections
import gettext
import glob
import hashlib
import os
import re
import struct
from collections.abc import Iterator

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 3
LANGUAGES = (
    "de", "fr", "es", "it", "pt_BR", "pt", "nl", "sv", "da", "nb", "fi", "pl", "cs", "sk",
    "hu", "ro", "tr", "el", "uk", "ru", "ja", "ko", "zh_CN", "zh_TW",
)  # fmt: skip
_MO_MAGIC = 0x950412DE
_CHARSET = re.compile(rb"charset=([A-Za-z0-9_.:-]+)")


class NoCatalogsError(ValueError):
    """No ``.mo`` catalog exists for the requested language (message is one line)."""


def candidate_locale_dirs() -> list[str]:
    """Where catalogs may live: Python's gettext default, then the system directories."""
    return [gettext._default_localedir, "/usr/share/locale", "/usr/local/share/locale"]


def locale_dirs() -> list[str]:
    """The existing candidate locale directories, deduplicated by real path, in order."""
    seen, out = set(), []
    for d in candidate_locale_dirs():
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            out.append(d)
    return out


def catalog_paths(lang: str, dirs: list[str]) -> list[str]:
    """Sorted paths of ``<dir>/<lang>/LC_MESSAGES/*.mo`` over dirs, by real path once each."""
    found: dict[str, str] = {}  # real path -> first sorted path (symlinked catalogs once)
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(glob.escape(d), lang, "LC_MESSAGES", "*.mo"))):
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def read_mo(path: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .mo file, decoded with its charset; bad entries dropped.

    A struct parser rather than ``gettext.GNUTranslations``, which rejects a whole catalog
    for one non-ASCII byte in its header (e.g. net-tools' iso-8859-1 translator name).
    """
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data)[0] if len(data) >= 20 else 0
    order = "<" if magic == _MO_MAGIC else ">" if magic == 0xDE120495 else None
    if order is None:
        return []  # not a .mo file
    n, orig_at, trans_at = struct.unpack_from(order + "3I", data, 8)
    raw = []
    for i in range(n):
        olen, ooff = struct.unpack_from(order + "2I", data, orig_at + 8 * i)
        tlen, toff = struct.unpack_from(order + "2I", data, trans_at + 8 * i)
        raw.append((data[ooff : ooff + olen], data[toff : toff + tlen]))
    header = next((t for o, t in raw if o == b""), b"")
    match = _CHARSET.search(header)
    charset = match.group(1).decode() if match else "utf-8"
    try:
        b"".decode(charset)
    except LookupError:  # e.g. the template placeholder "CHARSET"
        charset = "utf-8"
    pairs = []
    for orig, trans in raw:
        try:
            pairs.append((orig.decode(charset), trans.decode(charset)))
        except UnicodeDecodeError:
            continue  # an entry not in the declared charset: drop it, not the catalog
    return pairs


def entries(path: str) -> Iterator[tuple[str, str]]:
    """Usable (English source, translation) pairs of one catalog."""
    for msgid, msgstr in read_mo(path):
        source = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]  # drop msgctxt and plural
        target = msgstr.split("\x00", 1)[0]  # first plural form
        if not source.strip() or not target.strip():
            continue  # header or untranslated
        if source.strip().casefold() == target.strip().casefold():
            continue  # "translation" that is just the source
        yield source, target


def split_of(source: str) -> str:
    """Hash rule on the source string: stable across machines and catalog orders."""
    digest = int(hashlib.sha256(source.encode("utf-8")).hexdigest(), 16)
    return "validation" if digest % 100 < VALIDATION_PERCENT else "train"


def collect(lang: str, dirs: list[str]) -> tuple[list[dict[str, str]], int]:
    """Deduplicated records of lang sorted by source, and the number of catalogs read.

    Raises:
      NoCatalogsError: no catalog for lang exists under dirs.
    """
    paths = catalog_paths(lang, dirs)
    if not paths:
        raise NoCatalogsError(
            f"no gettext catalogs for language {lang!r}: searched {lang}/LC_MESSAGES/*.mo under "
            f"{', '.join(dirs) or 'no existing directory'} "
            f"(candidates: {', '.join(candidate_locale_dirs())})"
        )
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    domains: dict[tuple[str, str], str] = {}
    for path in paths:
        domain = os.path.basename(path)[: -len(".mo")]
        for source, target in entries(path):
            counts[source][target] += 1
            key = (source, target)
            domains[key] = min(domains.get(key, domain), domain)
    records = []
    for source in sorted(counts):
        # Most frequent translation; ties go to the smallest string.
        target = min(counts[source].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        records.append({"source": source, "target": target, "domain": domains[source, target]})
    return records, len(paths)


class GettextTranslationConfig(tfds.core.BuilderConfig):
    """One target language; the source side is always the English msgids."""


class GettextTranslation(tfds.core.GeneratorBasedBuilder):
    """English→X message pairs from the installed gettext ``.mo`` catalogs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        GettextTranslationConfig(name=lang, description=f"English → {lang}") for lang in LANGUAGES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        # Without TF, Text stores UTF-8 bytes and data_source returns bytes (as stdlib_source).
        return self.dataset_info_from_configs(
            description=__doc__,
            disable_shuffling=True,  # keep records in sorted-source order
            features=tfds.features.FeaturesDict(
                {
                    "source": tfds.features.Text(),
                    "target": tfds.features.Text(),
                    "domain": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        dirs = locale_dirs()
        records, n_catalogs = collect(self.builder_config.name, dirs)
        # Saved with dataset_info after the build: which catalogs this data came from.
        self.info.metadata.update(catalogs=n_catalogs, locale_dirs=dirs)
        by_split = {
            split: [r for r in records if split_of(r["source"]) == split]
            for split in ("train", "validation")
        }
        # TFDS refuses an empty split; a tiny catalog set may have no validation source.
        return {split: self._generate_examples(rs) for split, rs in by_split.items() if rs}

    def _generate_examples(self, records: list[dict[str, str]]) -> Iterator[tuple[int, dict]]:
        yield from enumerate(records)
