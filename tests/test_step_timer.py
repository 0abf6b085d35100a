"""StepTimer: logged step times cover whole steps even though dispatch runs ahead."""
import time

import jax
import jax.numpy as jnp

from llm_jax import metrics


def test_per_step_waits_for_the_steps_outputs():
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 300, lambda i, y: jnp.tanh(y @ y), x))
    x = jnp.ones((256, 256)) / 256
    slow(x).block_until_ready()  # compiled
    start = time.perf_counter()
    slow(x).block_until_ready()
    compute = time.perf_counter() - start
    timer = metrics.StepTimer(0)
    out = slow(x)  # returns at once: CPU dispatch is asynchronous
    dt = timer.per_step(1, out)
    assert dt >= 0.5 * compute > 0.01, (dt, compute)
    timer.restart(1)
    outs = [slow(x) for _ in range(2)]
    assert timer.per_step(3, outs) >= 0.5 * compute  # 2 steps' time over 2 steps
