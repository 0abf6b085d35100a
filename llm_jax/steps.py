"""Pure train and eval steps for next-token prediction on packed rows.

A batch is {'tokens', 'segment_ids', 'positions'} of shape [batch, length]. Position t
predicts token t+1 when both lie in the same (non-padding) segment.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    skipped: Array  # updates dropped for a non-finite loss or gradient (on_nonfinite=skip)


def next_token_targets(batch: Batch) -> tuple[Array, Array]:
    """Targets shifted left by one and a 0/1 weight of which positions are scored."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return targets, jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)


def token_losses(model: nn.Module, params: Any, batch: Batch, rng: Array | None,
                 deterministic: bool) -> tuple[Array, Array, Array]:
    """Per-position cross entropy (nats), weights and targets."""
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng})
    targets, weights = next_token_targets(batch)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return loss, weights, (jnp.argmax(logits, -1) == targets)


def _loss_sum(params: Any, batch: Batch, rng: Array, model: nn.Module,
              deterministic: bool) -> tuple[Array, Array]:
    loss, weights, _ = token_losses(model, params, batch, rng, deterministic)
    return jnp.sum(loss * weights), jnp.sum(weights)


def _grads(params: Any, batch: Batch, rng: Array, model: nn.Module, microbatches: int,
           deterministic: bool) -> tuple[Array, Array, Any]:
    """Summed loss, token count and summed gradients, over microbatches if asked.

    Summing, then dividing once by the total token count, makes accumulation give the same
    update as the full batch even when microbatches hold different numbers of tokens.
    """
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)
    if microbatches == 1:
        (loss, count), grads = grad_fn(params, batch, rng, model, deterministic)
        return loss, count, grads

    def split(x: Array) -> Array:  # row j*m + i goes to microbatch i: each stays spread out
        return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
        loss, count, grads = carry
        micro, i = xs
        (part, n), g = grad_fn(params, micro, jax.random.fold_in(rng, i), model, deterministic)
        return (loss + part, count + n, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss, count, grads), _ = jax.lax.scan(
        body, init, (jax.tree.map(split, batch), jnp.arange(microbatches)))
    return loss, count, grads


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule, base_rng: Array,
               microbatches: int = 1, skip_nonfinite: bool = False,
               deterministic: bool = True) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Randomness is fold_in(base_rng, step): a step is reproducible."""
    rng = jax.random.fold_in(base_rng, state.step)
    loss_sum, count, grads = _grads(state.params, batch, rng, model, microbatches,
                                    deterministic)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if skip_nonfinite:  # keep the old params and moments, but move on to the next batch
        keep = lambda n, o: jnp.where(finite, n, o)  # noqa: E731
        # optax's step counters (integer scalars) still advance, so the schedule stays
        # in step with state.step and the logged learning rate
        keep_state = lambda n, o: n if n.ndim == 0 and jnp.issubdtype(  # noqa: E731
            n.dtype, jnp.integer) else keep(n, o)
        new = new.replace(params=jax.tree.map(keep, params, state.params),
                          opt_state=jax.tree.map(keep_state, opt_state, state.opt_state),
                          skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {
        "loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite,
        "param_norm": optax.tree.norm(new.params), "update_norm": optax.tree.norm(updates),
        "learning_rate": lr_schedule(state.step), "skipped_steps": new.skipped,
    }
    return new, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module,
              token_bytes: Array) -> dict[str, Array]:
    """Sums for exact corpus-level metrics: nats, tokens, raw bytes of targets, hits."""
    loss, weights, hits = token_losses(model, params, batch, None, True)
    targets, _ = next_token_targets(batch)
    return {"loss_sum": jnp.sum(loss * weights), "tokens": jnp.sum(weights),
            "bytes": jnp.sum(token_bytes[targets] * weights),
            "correct": jnp.sum(hits * weights)}
