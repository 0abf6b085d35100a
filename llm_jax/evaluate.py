"""Corpus-level evaluation: loss, perplexity, bits per byte, and compressor baselines."""
from __future__ import annotations

import gzip
import lzma
import math
from typing import Callable, Iterable

import jax
import numpy as np


def run_eval(eval_fn: Callable, params, batches: Iterable) -> dict[str, float]:
    """Sums exact counts over the batches, then forms the ratios once (no mean of means).

    Returns "loss" (the sum of the parts' mean losses) and per part "{part}_loss" and
    "{part}_accuracy"; with one part, "accuracy"; for the "lm" part "perplexity", and
    "bits_per_byte" over the raw bytes its targets spell.
    """
    totals: dict[str, float] = {}

    def add(out: dict) -> None:
        for k, v in jax.device_get(out).items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v, np.float64))

    pending = None
    for batch in batches:
        out = eval_fn(params, batch)  # dispatched first: the device never waits on the host
        if pending is not None:
            add(pending)
        pending = out
    if pending is not None:
        add(pending)
    parts = sorted(k[:-len("_count")] for k in totals if k.endswith("_count"))
    res: dict[str, float] = {"loss": 0.0}
    for p in parts:
        count = max(totals[f"{p}_count"], 1.0)
        res[f"{p}_loss"] = totals[f"{p}_loss_sum"] / count
        res[f"{p}_accuracy"] = totals[f"{p}_correct"] / count
        res[f"{p}_count"] = totals[f"{p}_count"]
        res["loss"] += res[f"{p}_loss"]
    if len(parts) == 1:
        res["accuracy"] = res[f"{parts[0]}_accuracy"]
    if "lm" in parts:
        res["perplexity"] = math.exp(min(res["lm_loss"], 700.0))
        res["tokens"] = totals["lm_count"]
    if "bytes" in totals:  # summed log-loss in bits over the raw UTF-8 bytes targets spell
        res["bytes"] = totals["bytes"]
        res["bits_per_byte"] = totals["lm_loss_sum"] / math.log(2) / max(res["bytes"], 1.0)
    return res


def compressor_bits_per_byte(text: bytes) -> dict[str, float]:
    """gzip -9 and xz -9 (preset 9) on the same bytes, in bits per byte."""
    n = max(len(text), 1)
    return {"gzip -9": 8 * len(gzip.compress(text, 9)) / n,
            "xz -9": 8 * len(lzma.compress(text, preset=9)) / n}
