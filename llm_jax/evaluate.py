"""Corpus-level evaluation: loss, perplexity, bits per byte, and compressor baselines."""
from __future__ import annotations

import gzip
import lzma
import math
from typing import Callable, Iterable

import jax
import numpy as np


def run_eval(eval_fn: Callable, params, batches: Iterable) -> dict[str, float]:
    """Sums exact counts over the batches, then forms the ratios once (no mean of means)."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_fn(params, batch))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v, np.float64))
    tokens = max(totals.get("tokens", 0.0), 1.0)
    loss = totals.get("loss_sum", 0.0) / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        # summed log-loss in bits over the raw UTF-8 bytes those tokens spell
        "bits_per_byte": totals.get("loss_sum", 0.0) / math.log(2) / max(totals["bytes"], 1.0),
        "accuracy": totals.get("correct", 0.0) / tokens,
        "tokens": totals.get("tokens", 0.0),
        "bytes": totals.get("bytes", 0.0),
    }


def compressor_bits_per_byte(text: bytes) -> dict[str, float]:
    """gzip -9 and xz -9 (preset 9) on the same bytes, in bits per byte."""
    n = max(len(text), 1)
    return {"gzip -9": 8 * len(gzip.compress(text, 9)) / n,
            "xz -9": 8 * len(lzma.compress(text, preset=9)) / n}
