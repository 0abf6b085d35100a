"""Greedy decoding for the encoder–decoder, and BLEU of its translations (sacrebleu)."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils

from llm_jax.data import pipeline, sources

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("model", "length", "bos_id"))
def greedy_decode(model: nn.Module, params: Any, batch: dict[str, Array], length: int,
                  bos_id: int) -> Array:
    """[batch, length] targets: bos, then the argmax token at each step.

    The encoder runs once; each step reruns the decoder over the whole prefix (causal
    attention makes the not-yet-written positions irrelevant).
    """
    encoded = model.apply({"params": params}, batch, encode_only=True)["encoded"]
    rows = batch["inputs"].shape[0]
    dec = {"inputs_segment_ids": batch["inputs_segment_ids"],
           "targets_segment_ids": jnp.ones((rows, length), jnp.int32),
           "targets_positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                                 (rows, length))}
    targets = jnp.zeros((rows, length), jnp.int32).at[:, 0].set(bos_id)

    def step(t, targets):
        logits = model.apply({"params": params}, dict(dec, targets=targets),
                             encoded=encoded)["logits"]
        return targets.at[:, t + 1].set(jnp.argmax(logits[:, t], -1).astype(jnp.int32))

    return jax.lax.fori_loop(0, length - 1, step, targets)


def until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """The generated ids after bos, up to (not including) the first eos."""
    ids = ids[1:]
    stop = np.flatnonzero(ids == eos_id)
    return ids[:stop[0]] if stop.size else ids


def bleu_eval(tr: Any, params: Any) -> dict[str, float]:
    """Corpus BLEU of greedy translations of task.bleu_examples eval records.

    Every process takes part (parameters are sharded); hypotheses are detokenized to text
    and scored against the raw reference strings with sacrebleu's default 13a tokenizer.
    """
    config, tok = tr.config, tr.tok
    task, d, g = config.task, config.data, config.train.batch_size
    source = sources.load_source(d, d.eval_split)
    n = min(task.bleu_examples, len(source))
    # evenly spaced: a sorted split's prefix would be one corner of the alphabet
    records = [source[int(i)] for i in np.linspace(0, len(source) - 1, n)]
    src = [tok.encode(sources.feature_bytes(r, task.inputs_feature))[:d.seq_len - 1]
           for r in records]
    refs = [sources.feature_bytes(r, task.targets_feature).decode("utf-8", "replace")
            for r in records]
    length = d.target_seq_len or d.seq_len
    local = g // jax.process_count()
    hyps: list[str] = []
    for b in range(0, n, g):
        rows = np.full((g, d.seq_len), tok.pad_id, np.int32)
        seg = np.zeros((g, d.seq_len), np.int32)
        for r, ids in enumerate(src[b:b + g]):
            rows[r, :len(ids) + 1] = np.append(ids, tok.eos_id)
            seg[r, :len(ids) + 1] = 1
        pos = np.broadcast_to(np.arange(d.seq_len, dtype=np.int32), rows.shape)
        lo = jax.process_index() * local
        batch = pipeline.to_global({"inputs": rows[lo:lo + local], "inputs_segment_ids":
                                    seg[lo:lo + local], "inputs_positions":
                                    np.ascontiguousarray(pos[lo:lo + local])}, tr.batch_sh, g)
        with jax.set_mesh(tr.mesh), nn.logical_axis_rules(tr.rules):
            out = greedy_decode(tr.model, params, batch, length, tok.bos_id)
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        for ids in out[:min(g, n - b)]:
            hyps.append(tok.decode(until_eos(ids, tok.eos_id)).decode("utf-8", "replace"))
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    return {"bleu": bleu.score, "bleu_examples": n}
