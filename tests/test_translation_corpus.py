"""The gettext_translation corpus: .mo parsing rules, dedup, split rule, the machine's catalogs."""

from __future__ import annotations

import gettext
import hashlib
import os
import struct

import pytest
import tensorflow_datasets as tfds
from data_fixtures import make_cfg

from llm_jax.data import sources
from llm_jax.data.corpora import gettext_translation as gt


def write_mo(path, entries: dict[bytes, bytes]) -> None:
    """A minimal GNU .mo file (no hash table) holding entries, keys sorted like msgfmt."""
    keys = sorted(entries)
    n = len(keys)
    orig_at, trans_at = 28, 28 + 8 * n
    blob, orig, trans = b"", [], []
    base = 28 + 16 * n
    for table, strings in ((orig, keys), (trans, [entries[k] for k in keys])):
        for s in strings:
            table.append((len(s), base + len(blob)))
            blob += s + b"\0"
    head = struct.pack("<7I", 0x950412DE, 0, n, orig_at, trans_at, 0, 0)
    body = b"".join(struct.pack("<2I", *e) for e in orig + trans)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(head + body + blob)


def _header(charset: str, extra: bytes = b"") -> bytes:
    return b"Content-Type: text/plain; charset=" + charset.encode() + b"\n" + extra


def _read(builder, split: str) -> list[dict[str, str]]:
    source = builder.as_data_source(split)
    rows = source.__getitems__(range(len(source))) if len(source) else []
    return [{k: v.decode("utf-8") for k, v in r.items()} for r in rows]


def _build(name: str, data_dir) -> tfds.core.DatasetBuilder:
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return tfds.builder(name, data_dir=str(data_dir), file_format="array_record")


def test_mo_rules_on_small_catalogs(tmp_path, monkeypatch):
    locale = tmp_path / "locale"
    msgs = locale / "de" / "LC_MESSAGES"
    write_mo(msgs / "alpha.mo", {
        b"": _header("UTF-8"),
        b"Open file": "Datei öffnen".encode(),
        b"menu\x04Quit program": b"Programm beenden",  # msgctxt is stripped
        b"%d file\x00%d files": b"%d Datei\x00%d Dateien",  # singular, first form
        b"Untranslated text": b"",
        b"Same Text": b"same text ",  # equal up to case/whitespace: skipped
        b"Close": "Schließen".encode(),
        b"Message 117": b"Nachricht 117",  # lands in validation (sha256 rule)
    })  # fmt: skip
    write_mo(msgs / "beta.mo", {
        b"": _header("UTF-8"),
        b"Open file": b"Datei aufmachen",
        b"Close": b"Zu",  # a tie with alpha's, unless the symlink counted twice: smallest wins
    })  # fmt: skip
    write_mo(msgs / "gamma.mo", {  # a latin-1 catalog with a latin-1 header (like net-tools)
        b"": _header("iso-8859-1", "Last-Translator: Bächle\n".encode("latin-1")),
        b"Open file": "Datei öffnen".encode("latin-1"),  # 2 of 3 catalogs: the majority
    })  # fmt: skip
    os.symlink(msgs / "beta.mo", msgs / "beta_link.mo")  # the same catalog twice: read once
    write_mo(locale / "fr" / "LC_MESSAGES" / "alpha.mo", {b"Close": b"Fermer"})
    monkeypatch.setattr(gt, "locale_dirs", lambda: [str(locale)])

    builder = _build("gettext_translation/de", tmp_path / "data")
    rows = _read(builder, "train") + _read(builder, "validation")
    expected = {
        "%d file": ("%d Datei", "alpha"),
        "Close": ("Schließen", "alpha"),
        "Open file": ("Datei öffnen", "alpha"),
        "Quit program": ("Programm beenden", "alpha"),
        "Message 117": ("Nachricht 117", "alpha"),
    }
    assert {r["source"]: (r["target"], r["domain"]) for r in rows} == expected
    assert builder.info.metadata["catalogs"] == 3
    assert [r["source"] for r in _read(builder, "validation")] == ["Message 117"]
    assert [r["source"] for r in _read(builder, "train")] == sorted(set(expected) - {"Message 117"})


def test_missing_language_is_a_one_line_error(tmp_path, monkeypatch):
    empty = tmp_path / "locale"
    empty.mkdir()
    monkeypatch.setattr(gt, "locale_dirs", lambda: [str(empty)])
    with pytest.raises(gt.NoCatalogsError) as err:
        _build("gettext_translation/fr", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and "'fr'" in message and str(empty) in message


def test_locale_dirs_exist_and_are_unique():
    dirs = gt.locale_dirs()
    assert all(os.path.isdir(d) for d in dirs)
    assert len({os.path.realpath(d) for d in dirs}) == len(dirs)


# ---- the machine's own German catalogs (~81 .mo files, ~42k pairs, ~2 s to build) ----


@pytest.fixture(scope="module")
def german(tmp_path_factory):
    if not gt.catalog_paths("de", gt.locale_dirs()):
        pytest.skip("no German gettext catalogs on this machine")
    cfg = make_cfg(tmp_path_factory.mktemp("data"), name="gettext_translation/de",
                   text_feature="source")  # fmt: skip
    sources.load_source(cfg, "train")  # prepares it as a training run would
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir, file_format="array_record")
    return builder, {s: _read(builder, s) for s in ("train", "validation")}


def test_german_split_rule_and_uniqueness(german):
    builder, rows = german
    for split, records in rows.items():
        srcs = [r["source"] for r in records]
        assert srcs == sorted(set(srcs)), "sorted by source, each source once"
        for s in srcs:
            digest = int(hashlib.sha256(s.encode()).hexdigest(), 16)
            assert ("validation" if digest % 100 < 3 else "train") == split
    train = {r["source"] for r in rows["train"]}
    assert not train & {r["source"] for r in rows["validation"]}
    total = len(rows["train"]) + len(rows["validation"])
    assert total > 10_000 and 0.02 < len(rows["validation"]) / total < 0.04
    n_catalogs = len({os.path.realpath(p) for p in gt.catalog_paths("de", gt.locale_dirs())})
    assert builder.info.metadata["catalogs"] == n_catalogs


def test_german_pairs_match_gettext(german):
    _, rows = german
    checked = exact = 0
    for r in rows["train"][::50] + rows["validation"][::5]:
        mo = os.path.join("de", "LC_MESSAGES", r["domain"] + ".mo")
        localedir = next(d for d in gt.locale_dirs() if os.path.exists(os.path.join(d, mo)))
        try:
            t = gettext.translation(r["domain"], localedir, languages=["de"])
        except UnicodeDecodeError:
            continue  # gettext refuses this catalog's header (e.g. net-tools); read_mo does not
        catalog = t._catalog  # keys: msgid, "ctx\x04msgid", (msgid, n) for plurals
        forms = {v for k, v in catalog.items()
                 if (k[0] if isinstance(k, tuple) else k).split("\x04")[-1] == r["source"]
                 and (not isinstance(k, tuple) or k[1] == 0)}  # fmt: skip
        assert r["target"] in forms, r
        checked += 1
        exact += t.gettext(r["source"]) == r["target"]
    assert checked > 500 and exact > 0.9 * checked


def test_german_build_is_deterministic(german, tmp_path):
    _, rows = german
    again = _build("gettext_translation/de", tmp_path)
    assert {s: _read(again, s) for s in rows} == rows
