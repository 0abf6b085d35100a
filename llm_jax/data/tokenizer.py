"""SentencePiece tokenizer with an exact byte-level round trip, trained and cached on use.

``encode`` works on bytes, not text: valid UTF-8 runs go through SentencePiece, every
other byte becomes its byte-fallback piece ``<0xNN>``. ``decode`` concatenates a per-id
bytes table instead of calling ``sp.decode`` (which would replace invalid UTF-8). So for
every input ``tok.token_bytes[tok.encode(b)].sum() == len(b)`` and ``decode(encode(b)) == b``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
import sentencepiece as spm

from llm_jax import files
from llm_jax.data import sources
from llm_jax.data.spans import NUM_SENTINELS

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Special tokens appended after the SentencePiece pieces (as Hugging Face adds tokens), so
# adding them never retrains or renumbers a tokenizer: [CLS], [SEP], [MASK] for the
# encoder, then T5's sentinels <extra_id_0..99> for span corruption.
SPECIALS = ("[CLS]", "[SEP]", "[MASK]")
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
                        ) | frozenset(range(0x80, 0x100))
_SPACE = "\u2581"  # SentencePiece's whitespace symbol
# Invalid bytes (as surrogateescape code points) and literal U+2581, which SentencePiece
# would confuse with an escaped space: both are encoded as byte-fallback pieces.
_RAW_RUN = re.compile("[\udc80-\udcff\u2581]+")
_MAX_SENTENCE_BYTES = 4096
_WAIT_TIMEOUT_S = 3600.0

# Exact round trip of code needs the first five (design.md, Gotchas). The rest were
# measured on stdlib_source, vocab 8192, 8 MB, 2 cores (validation bytes/token, train s):
# unigram 3.48/14s; bpe 3.57/1.3s; bpe with pieces across scripts 4.13/1.6s and also
# across spaces 4.72/3.1s (e.g. ")\n        self."); unigram likewise 4.51/139s;
# split_digits costs 0.2. Part of the cache key.
TRAINER_SETTINGS: dict[str, object] = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    model_type="bpe",
    split_by_unicode_script=False,
    split_by_whitespace=False,
    split_digits=False,
    character_coverage=0.9995,
    max_sentence_length=_MAX_SENTENCE_BYTES,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
)


class Tokenizer:
    """A SentencePiece model plus byte tables for an exact bytes round trip."""

    def __init__(self, model_proto: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
        if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()) != (
            PAD_ID, BOS_ID, EOS_ID, UNK_ID
        ):
            raise ValueError("tokenizer model does not use pad/bos/eos/unk ids 0/1/2/3")
        table: list[bytes] = []
        byte_ids = np.full(256, -1, np.int32)
        for i in range(self.vocab_size):
            piece = self._sp.id_to_piece(i)
            if self._sp.is_byte(i):
                value = int(piece[3:5], 16)  # "<0xNN>"
                byte_ids[value] = i
                table.append(bytes([value]))
            elif self._sp.is_control(i) or self._sp.is_unknown(i):
                table.append(b"")
            else:
                table.append(piece.replace(_SPACE, " ").encode("utf-8"))
        if (byte_ids < 0).any():
            raise ValueError("tokenizer model lacks byte-fallback pieces <0x00>..<0xFF>")
        self.num_pieces = self.vocab_size  # SentencePiece's own; specials follow
        self.cls_id, self.sep_id, self.mask_id = range(self.num_pieces, self.num_pieces + 3)
        self.sentinel_ids = list(range(self.num_pieces + 3, self.num_pieces + 3 + NUM_SENTINELS))
        table += [b""] * (len(SPECIALS) + NUM_SENTINELS)
        self.vocab_size = len(table)
        self._table = table
        self._byte_ids = byte_ids
        self.token_bytes: np.ndarray = np.array([len(b) for b in table], np.int32)
        # For whole-word masking: a piece continues a word when it starts with a word
        # byte and the previous piece ended with one (letters, digits, _, UTF-8).
        self._starts_word_byte = np.array([bool(b) and b[0] in _WORD_BYTES for b in table])
        self._ends_word_byte = np.array([bool(b) and b[-1] in _WORD_BYTES for b in table])

    def encode(self, text: bytes | str) -> np.ndarray:
        """Token ids (int32) of text; no bos/eos (the packer adds them)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="surrogateescape")
        out: list[np.ndarray] = []
        pos = 0
        for m in _RAW_RUN.finditer(text):
            if m.start() > pos:
                out.append(np.asarray(self._sp.encode(text[pos : m.start()]), np.int32))
            raw = m.group().encode("utf-8", errors="surrogateescape")
            out.append(self._byte_ids[np.frombuffer(raw, np.uint8)])
            pos = m.end()
        if pos < len(text):
            out.append(np.asarray(self._sp.encode(text[pos:]), np.int32))
        return np.concatenate(out) if out else np.zeros(0, np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> bytes:
        """Bytes of ids; specials decode to nothing."""
        table = self._table
        return b"".join(table[i] for i in np.asarray(ids).reshape(-1).tolist())

    def word_starts(self, ids: np.ndarray) -> np.ndarray:
        """True where ids[..., t] begins a new word (see _WORD_BYTES)."""
        ids = np.asarray(ids)
        cont = self._starts_word_byte[ids[..., 1:]] & self._ends_word_byte[ids[..., :-1]]
        first = np.ones(ids.shape[:-1] + (1,), bool)
        return np.concatenate([first, ~cont], axis=-1)

    def serialized_model(self) -> bytes:
        """The SentencePiece model proto (for saving next to a checkpoint)."""
        return self._sp.serialized_model_proto()


def load(path: str) -> Tokenizer:
    """Load a SentencePiece model file."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise sources.DataError(
            f"data.tokenizer_path={path!r} does not exist; set it to a .model file or to '' "
            "to train one on the train split"
        )
    with open(path, "rb") as f:
        proto = f.read()
    try:
        return Tokenizer(proto)
    except (RuntimeError, ValueError) as e:
        raise sources.DataError(f"data.tokenizer_path={path!r} is not usable: {e}") from None


def training_chunks(text: bytes, max_bytes: int = _MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Whole lines grouped into sentences of at most max_bytes, so pieces may learn
    newlines and indentation; over-long lines are cut."""
    buf: list[str] = []
    size = 0
    for line in text.decode("utf-8", errors="ignore").splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        while n > max_bytes:  # a single huge line: cut by characters, under the cap
            cut = max_bytes // 4
            yield line[:cut]
            line = line[cut:]
            n = len(line.encode("utf-8"))
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _training_text(data_cfg: ml_collections.ConfigDict) -> Iterator[str]:
    """Deterministic sample of the train split, capped at tokenizer_train_bytes."""
    source = sources.load_source(data_cfg, data_cfg.train_split)
    # grain's index shuffle is lazy: O(1) memory even for a billion documents.
    docs = grain.MapDataset.source(source).shuffle(seed=0)
    budget = int(data_cfg.tokenizer_train_bytes)
    for i in range(len(docs)):
        if budget <= 0:
            return
        doc = sources.document_bytes(docs[i], data_cfg)[:budget]
        budget -= len(doc)
        yield from training_chunks(doc)


def settings(data_cfg: ml_collections.ConfigDict) -> dict[str, object]:
    """TRAINER_SETTINGS with the config's choice of pieces: 'words' stop at spaces."""
    return dict(TRAINER_SETTINGS, split_by_whitespace=data_cfg.tokenizer_pieces == "words")


def train(data_cfg: ml_collections.ConfigDict) -> bytes:
    """Train a model on the train split; returns the serialized model proto."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_text(data_cfg),
            model_writer=model,
            vocab_size=int(data_cfg.vocab_size),
            num_threads=os.cpu_count() or 1,
            **{"minloglevel": 2, **settings(data_cfg)},
        )
    except RuntimeError as e:  # e.g. a vocab too small for 256 byte pieces + characters
        reason = " ".join(str(e).split())
        raise sources.DataError(
            f"SentencePiece training failed for data.vocab_size={data_cfg.vocab_size}, "
            f"data.tokenizer_train_bytes={data_cfg.tokenizer_train_bytes}: {reason}"
        ) from None
    return model.getvalue()


def cache_path(data_cfg: ml_collections.ConfigDict) -> str:
    """Where the tokenizer trained for these settings is cached."""
    key = json.dumps(
        dict(
            settings(data_cfg),
            name=data_cfg.name,
            split=data_cfg.train_split,
            feature=data_cfg.text_feature,
            train_bytes=int(data_cfg.tokenizer_train_bytes),
            recipe=1,  # bump when the training text or the sampling changes
        ),
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    safe_name = re.sub(r"[^\w.-]", "_", data_cfg.name)
    return os.path.join(
        sources.data_dir(data_cfg), "tokenizers",
        f"{safe_name}-v{int(data_cfg.vocab_size)}-{digest}.model",
    )


def load_or_train(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The configured tokenizer: data.tokenizer_path, or the cached/trained one.

    In multi-process runs process 0 trains and the others wait for the cached file.
    """
    if data_cfg.tokenizer_path:
        return load(data_cfg.tokenizer_path)
    path = cache_path(data_cfg)
    if not os.path.isfile(path):
        if jax.process_index() == 0:
            sources.load_source(data_cfg, data_cfg.train_split)  # build the corpus first
            print(f"training a {data_cfg.vocab_size}-piece SentencePiece tokenizer on "
                  f"{data_cfg.name} (once; cached as {path})", flush=True)
            proto = train(data_cfg)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files.write_atomic(path, proto)  # a waiting process never reads half a model
        else:
            deadline = time.monotonic() + _WAIT_TIMEOUT_S
            while not os.path.isfile(path):
                if time.monotonic() > deadline:
                    raise sources.DataError(
                        f"timed out waiting for process 0 to write {path}; data_dir must be "
                        "shared by all processes, or set data.tokenizer_path"
                    )
                time.sleep(1.0)
    return load(path)
