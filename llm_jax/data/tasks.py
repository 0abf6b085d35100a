"""Input pipelines per objective: documents or records → examples → rows → batches.

The decoder's next-token rows come from pipeline.py. Everything else is built here with
the same grain stages: this process's shard of the records, shuffled and repeated;
examples made per record with a random generator seeded by (seed, record's place in the
stream), so corruption is stateless and a step's batch can be rebuilt; a window shuffle;
encoder–decoder examples packed on both sides; batches. Evaluation makes the same
examples from the whole eval split in order, with a fixed seed, once.

Encoder rows are [CLS] A [SEP] B [SEP] + padding, one pair per row. For code, a
"sentence" is a block: a run of non-blank lines with the blank lines after it.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from llm_jax import objectives
from llm_jax.data import masking, pairs, pipeline, sources, spans
from llm_jax.data.tokenizer import Tokenizer

Example = dict[str, np.ndarray]
_EVAL_SEED = 0x5EED  # eval corruption is fixed: every eval scores the same masks
_FIRST_PIECE = 4  # MLM random replacements: any piece after pad, bos, eos, unk


class _Flatten(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 30

    def flat_map(self, element: list[Example]) -> list[Example]:
        return element


class _LazySentences:
    """A document's sentences, tokenized only when read: an NSP negative uses a few
    blocks of a random document, not the whole file."""

    def __init__(self, text: bytes, tok: Tokenizer):
        self._blocks, self._tok = pairs.code_sentences(text), tok

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, index: slice) -> Iterator[np.ndarray]:
        return (self._tok.encode(b) for b in self._blocks[index])


def _mlm_examples(rng: np.random.Generator, record: Any, *, config: ml_collections.ConfigDict,
                  tok: Tokenizer, source: Any) -> list[Example]:
    """Sentence pairs of one document; with task.objective='mlm', masked."""
    task, seq = config.task, config.data.seq_len

    def sentences(rec: Any) -> list[np.ndarray]:
        text = sources.document_bytes(rec, config.data)
        return [tok.encode(s) for s in pairs.code_sentences(text)]

    random_doc = lambda: _LazySentences(  # noqa: E731
        sources.document_bytes(source[int(rng.integers(len(source)))], config.data), tok)
    found = pairs.document_pairs(sentences(record), rng, max_tokens=seq - 3,
                                 random_document=random_doc,
                                 next_prob=0.5 if task.objective == "mlm" and task.nsp else 1.0)
    out = []
    for a, b, is_next in found:
        row = pairs.encode_pair(a, b, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id,
                                seq_len=seq)
        if task.objective == "mlm":
            special = (row["segment_ids"] == 0) | (row["tokens"] >= tok.num_pieces)
            inputs, targets, weights = masking.mask_tokens(
                row["tokens"], rng, special=special, mask_id=tok.mask_id,
                random_low=_FIRST_PIECE, random_high=tok.num_pieces, prob=task.mlm_prob,
                word_start=tok.word_starts(row["tokens"]) if task.whole_word else None)
            row.update(tokens=inputs, mlm_targets=targets,
                       mlm_weights=weights.astype(np.int32),
                       nsp_label=np.int32(is_next))  # 1: B follows A
        out.append(row)
    return out


def _classification_examples(rng: np.random.Generator, record: Any, *,
                             config: ml_collections.ConfigDict, tok: Tokenizer,
                             source: Any) -> list[Example]:
    task, seq = config.task, config.data.seq_len
    text = lambda feature: tok.encode(sources.feature_bytes(record, feature))  # noqa: E731
    a, b = text(task.text_a_feature), text(task.text_b_feature)
    a, b = pairs.truncate_pair(a, b, seq - 3, rng)
    row = pairs.encode_pair(a, b, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id,
                            seq_len=seq)
    label = int(record[task.label_feature])
    if not 0 <= label < config.model.num_classes:  # optax would give a NaN loss
        raise sources.DataError(
            f"{config.data.name!r} has label {label}, outside model.num_classes="
            f"{config.model.num_classes}; set --config.model.num_classes")
    row["label"] = np.int32(label)
    return [row]


def _span_examples(rng: np.random.Generator, record: Any, *, config: ml_collections.ConfigDict,
                   tok: Tokenizer, source: Any) -> list[Example]:
    """T5 span corruption of a document cut into pieces that fill both sides."""
    task, d = config.task, config.data
    n = spans.raw_length(d.seq_len, (d.target_seq_len or d.seq_len) - 1,  # -1: bos
                         task.noise_density, task.mean_span_length)
    ids = tok.encode(sources.document_bytes(record, d))
    out = []
    for start in range(0, len(ids), n):
        chunk = ids[start:start + n]
        if len(chunk) < 2:
            continue
        inputs, targets = spans.span_corrupt(
            chunk, rng, sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id,
            noise_density=task.noise_density, mean_span_length=task.mean_span_length)
        out.append({"inputs": inputs, "targets": np.concatenate([[tok.bos_id], targets])
                    .astype(np.int32)})
    return out


def _seq2seq_examples(rng: np.random.Generator, record: Any, *,
                      config: ml_collections.ConfigDict, tok: Tokenizer,
                      source: Any) -> list[Example]:
    """inputs + eos → bos + targets + eos, each cut to its side's length."""
    del rng
    task, d = config.task, config.data
    text = lambda feature: tok.encode(sources.feature_bytes(record, feature))  # noqa: E731
    src = text(task.inputs_feature)[:d.seq_len - 1]
    tgt = text(task.targets_feature)[:(d.target_seq_len or d.seq_len) - 2]
    return [{"inputs": np.concatenate([src, [tok.eos_id]]).astype(np.int32),
             "targets": np.concatenate([[tok.bos_id], tgt, [tok.eos_id]]).astype(np.int32)}]


_MAKERS: dict[str, Callable[..., list[Example]]] = {
    "mlm": _mlm_examples, "next_token": _mlm_examples,  # next_token: the encoder's LTR rows
    "classification": _classification_examples,
    "span_corruption": _span_examples, "seq2seq": _seq2seq_examples,
}


def _check_features(config: ml_collections.ConfigDict, source: Any) -> None:
    """The task's features exist in the dataset: a one-line error otherwise."""
    task = config.task
    needed = {"seq2seq": ("inputs_feature", "targets_feature"),
              "classification": ("text_a_feature", "text_b_feature", "label_feature")}
    record = source[0] if len(source) else {}
    for key in needed.get(task.objective, ()):
        if task[key] not in record:
            raise sources.DataError(
                f"dataset {config.data.name!r} has no feature task.{key}={task[key]!r}; "
                f"available: {sorted(record)}")


def _rows(config: ml_collections.ConfigDict, tok: Tokenizer, records: grain.MapDataset,
          source: Any, seed: int, threads: int, process_index: int = 0) -> grain.IterDataset:
    """Records → examples (seeded by (seed, process, index in this process's stream))."""
    make = functools.partial(_MAKERS[config.task.objective], config=config, tok=tok,
                             source=source)
    examples = records.map_with_index(
        lambda i, rec: make(np.random.default_rng([seed, process_index, i]), rec))
    stream = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(16 * threads, 1)))
    return grain.experimental.FlatMapIterDataset(stream, _Flatten())


def _pack(config: ml_collections.ConfigDict, tok: Tokenizer, rows: grain.IterDataset,
          bins: int) -> grain.IterDataset:
    """Encoder–decoder examples packed on both sides; example k is segment k on each."""
    if config.model.family != "encoder_decoder":
        return rows
    d = config.data
    return grain.experimental.FirstFitPackIterDataset(
        rows, length_struct={"inputs": d.seq_len, "targets": d.target_seq_len or d.seq_len},
        num_packing_bins=bins, shuffle_bins=False,
        padding_struct={"inputs": tok.pad_id, "targets": tok.pad_id})


def train_iterator(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int,
                   process_count: int, stats: pipeline.DocumentStats | None = None
                   ) -> grain.DatasetIterator:
    """Endless, seeded, checkpointable iterator of this process's batches."""
    t, d = config.train, config.data
    if config.model.family == "decoder":
        return pipeline.make_train_iterator(
            d, tok, seed=t.seed, global_batch_size=t.batch_size, process_index=process_index,
            process_count=process_count, stats=stats)
    local = t.batch_size // process_count
    seed = int(t.seed) % 2**31
    source = sources.load_source(d, d.train_split)
    records = pipeline.shuffled_documents(source, seed=seed, process_index=process_index,
                                          process_count=process_count)
    _check_features(config, source)
    rows = _rows(config, tok, records, source, seed, max(int(d.worker_threads), 0),
                 process_index)
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=max(local, 1024),
                                                       seed=seed)
    batches = iter(_pack(config, tok, rows, max(local, 64)).batch(local, drop_remainder=True))
    return pipeline.ThreadPrefetch(batches, d.prefetch) if d.prefetch > 0 else batches


def throughput(config: ml_collections.ConfigDict, tok: Tokenizer, positions_per_batch: int,
               seconds: float = 10) -> float:
    """Positions per second (padding included) of `train_iterator` alone, without a model."""
    it = train_iterator(config, tok, process_index=0, process_count=1)
    next(it)  # start-up: the first shuffle window
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        batches += 1
    return batches * positions_per_batch / (time.perf_counter() - start)


def eval_batches(config: ml_collections.ConfigDict, tok: Tokenizer, *, process_index: int,
                 process_count: int) -> list[dict[str, np.ndarray]]:
    """The whole eval split as this process's local batches, identical on every run.

    Global batch b holds rows [b * G, (b + 1) * G) and process p its slice of them;
    all-padding rows (segment 0: weight 0) fill the last batch.
    """
    t, d = config.train, config.data
    if config.model.family == "decoder":
        return pipeline.eval_batches(d, tok, global_batch_size=t.batch_size,
                                     process_index=process_index, process_count=process_count)
    source = sources.load_source(d, d.eval_split)
    _check_features(config, source)
    rows = _rows(config, tok, grain.MapDataset.source(source), source, _EVAL_SEED, 0)
    rows = list(_pack(config, tok, rows, 1024))
    shapes = objectives.feature_shapes(config)
    if not rows:
        raise sources.DataError(f"data.eval_split={d.eval_split!r} of {d.name!r} gives no "
                                "examples")
    g = t.batch_size
    filler = -len(rows) % g
    stacked = {k: np.concatenate([np.stack([r[k] for r in rows]).astype(np.int32),
                                  np.zeros((filler, *shapes[k]), np.int32)])
               for k in shapes}
    local, total = g // process_count, len(rows) + filler
    return [{k: v[b + process_index * local: b + (process_index + 1) * local]
             for k, v in stacked.items()} for b in range(0, total, g)]
