"""Pure train and eval steps for any family and objective (see objectives.py)."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_jax.objectives import Objective, Part

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    skipped: Array  # updates dropped for a non-finite loss or gradient (on_nonfinite=skip)


def forward(model: nn.Module, objective: Objective, params: Any, batch: Batch,
            rng: Array | None, deterministic: bool) -> dict[str, Part]:
    """The model on a batch, scored part by part."""
    out = model.apply({"params": params}, batch, deterministic=deterministic,
                      rngs=None if deterministic else {"dropout": rng}, **objective.model_kwargs)
    return objective.parts(out, batch, model.cfg.dtype)


def _loss(params: Any, batch: Batch, rng: Array, model: nn.Module, objective: Objective,
          totals: dict[str, Array], deterministic: bool) -> tuple[Array, dict[str, Array]]:
    """Σ over parts of (summed loss / the whole batch's weight), and per-part sums."""
    parts = forward(model, objective, params, batch, rng, deterministic)
    loss, sums = jnp.zeros((), jnp.float32), {}
    for name, (part_sum, hits, _) in parts.items():
        loss = loss + part_sum / jnp.maximum(totals[name], 1.0)
        sums[f"{name}_loss_sum"], sums[f"{name}_correct"] = part_sum, hits
    return loss, sums


def _grads(params: Any, batch: Batch, rng: Array, model: nn.Module, objective: Objective,
           microbatches: int, deterministic: bool) -> tuple[Array, dict[str, Array], Any]:
    """Loss, per-part sums and gradients, accumulated over microbatches if asked.

    Each part is normalized by the whole batch's weight (known before the forward pass),
    so accumulation gives the same update as the full batch even when microbatches hold
    different numbers of scored items.
    """
    totals = {k: jnp.sum(w) for k, w in objective.weights(batch).items()}
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    if microbatches == 1:
        (loss, sums), grads = grad_fn(params, batch, rng, model, objective, totals,
                                      deterministic)
        return loss, sums, grads

    def split(x: Array) -> Array:  # row j*m + i goes to microbatch i: each stays spread out
        return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, xs):
        micro, i = xs
        (part, sums), g = grad_fn(params, micro, jax.random.fold_in(rng, i), model, objective,
                                  totals, deterministic)
        return jax.tree.map(jnp.add, carry, (part, sums, g)), None

    zero = jnp.zeros((), jnp.float32)
    init = (zero, {k: zero for name in totals for k in (f"{name}_loss_sum", f"{name}_correct")},
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss, sums, grads), _ = jax.lax.scan(
        body, init, (jax.tree.map(split, batch), jnp.arange(microbatches)))
    return loss, sums, grads


def train_step(state: TrainState, batch: Batch, *, model: nn.Module, objective: Objective,
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule, seed: int,
               microbatches: int = 1, skip_nonfinite: bool = False,
               deterministic: bool = True) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update. Randomness is fold_in(key(seed), step): a step is reproducible.

    The key is made inside the step, so nothing is computed eagerly on the mesh's devices
    (which may be compile-only TPU devices).
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss, sums, grads = _grads(state.params, batch, rng, model, objective, microbatches,
                               deterministic)
    with jax.named_scope("optimizer"):  # names its ops in profiles (op_profile.py)
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
        "loss": loss, "grad_norm": grad_norm, "finite": finite,
        "param_norm": optax.tree.norm(new.params), "update_norm": optax.tree.norm(updates),
        "learning_rate": lr_schedule(state.step), "skipped_steps": new.skipped,
    }
    totals = {k: jnp.sum(w) for k, w in objective.weights(batch).items()}
    for name, total in totals.items():  # per part only when there are several
        prefix = f"{name}_" if len(totals) > 1 else ""
        if len(totals) > 1:
            metrics[f"{name}_loss"] = sums[f"{name}_loss_sum"] / jnp.maximum(total, 1.0)
        metrics[f"{prefix}accuracy"] = sums[f"{name}_correct"] / jnp.maximum(total, 1.0)
    return new, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module, objective: Objective,
              token_bytes: Array) -> dict[str, Array]:
    """Sums for exact corpus-level metrics per part: nats, weight, hits; and for the
    "lm" part the raw bytes its targets spell."""
    out = {}
    for name, (loss, hits, count) in forward(model, objective, params, batch, None,
                                             True).items():
        out.update({f"{name}_loss_sum": loss, f"{name}_count": count, f"{name}_correct": hits})
        if name == "lm" and objective.name != "span_corruption":  # sentinels spell no text
            w = objective.weights(batch)["lm"]
            out["bytes"] = jnp.sum(token_bytes[objective.scored_tokens(batch)] * w)
    return out
