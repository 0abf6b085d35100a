"""AdamW with warmup + decay schedules, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine, linear or rsqrt decay (or constant)."""
    peak, warmup = o.learning_rate, min(o.warmup_steps, total_steps)
    end = peak * o.end_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif o.schedule == "rsqrt":
        w = max(warmup, 1)
        decay = lambda step: peak * jnp.sqrt(w / jnp.maximum(step + w, 1))  # noqa: E731
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


DECAYED = ("kernel", "embedding")  # matrices of Dense and Embed


def decay_mask(params: Any) -> Any:
    """Decay Dense kernels and embeddings only; never norm scales, biases or conv taps.

    Decided by name, not rank: scanned layers stack a norm's [d] scale into [layers, d].
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED, params)


def make(o: ml_collections.ConfigDict,
         total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(o, total_steps)
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    chain.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain), lr
