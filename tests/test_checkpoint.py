"""Checkpoints restore onto other meshes and device counts; failed saves stop the run."""
import errno
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import checkpoint, objectives, optim, sharding, trainer
from llm_jax.config import base_config
from llm_jax.models import build
from llm_jax.models.layers import ModelConfig

SEQ = 16


def train_one_step(config, state, mesh_shape, devices):
    """A real sharded train step on the restored state; returns its loss."""
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    mesh = sharding.make_mesh(c.mesh, devices)
    rules = sharding.rules(c.mesh)
    model = build(ModelConfig.from_config(c.model, 64, SEQ))
    tx, lr = optim.make(c.optim, 10)
    batch_sh = sharding.batch_sharding(mesh, rules)
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    tokens = np.arange(8 * SEQ, dtype=np.int32).reshape(8, SEQ) % 64
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)}
    before = int(state.step)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = trainer.jit_train_step(model, objectives.Objective.from_config(c), tx, lr,
                                      c.train, state_sh, batch_sh)
        new, m = step(state, jax.device_put(batch, batch_sh))  # donates state
    assert int(new.step) == before + 1
    return float(m["loss"])


def setup(mesh_shape, devices):
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 4, 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    mesh = sharding.make_mesh(c.mesh, devices)
    rules = sharding.rules(c.mesh)
    model = build(ModelConfig.from_config(c.model, 64, SEQ))
    tx, _ = optim.make(c.optim, 10)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        c.data.seq_len = SEQ
        state, _, abstract = trainer.init_state(model, tx, objectives.dummy_batch(c, 1), 0,
                                                mesh, rules)
    return c, state, abstract


@pytest.fixture(scope="module")
def source():
    """A state on the 2x2x2 mesh that is not the init, and the loss of one step from it there
    (computed once, from a copy: the step donates its state)."""
    config, state, _ = setup((2, 2, 2), jax.devices())
    state = state.replace(params=jax.tree.map(lambda p: p + 1.5, state.params))
    there = train_one_step(config, jax.tree.map(jnp.copy, state), (2, 2, 2), jax.devices())
    return config, state, there


@pytest.mark.parametrize("target", [((8, 1, 1), 8), ((1, 1, 1), 1), ((1, 2, 4), 8)])
def test_a_222_checkpoint_restores_onto_other_meshes(tmp_path, source, target):
    config, state, there = source
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, state, {"position": 7}, config)
    ckpt.close()
    (shape, n) = target
    _, _, abstract = setup(shape, jax.devices()[:n])
    restored, data_state, step = checkpoint.Checkpointer(str(tmp_path)).restore_latest(abstract)
    assert step == 3 and data_state == {"position": 7}
    for a, b, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                          jax.tree.leaves(abstract)):
        assert a.sharding == want.sharding and len(a.sharding.device_set) <= n
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and training continues there, with the loss the original mesh computes
    here = train_one_step(config, restored, shape, jax.devices()[:n])
    np.testing.assert_allclose(here, there, rtol=2e-2)


def test_a_failed_save_is_one_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    config, state, _ = setup((8, 1, 1), jax.devices())
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {}, config)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="No space left.*earlier checkpoints"):
        ckpt.save(2, state, {}, config)
    assert os.listdir(tmp_path) == ["1"]


def test_max_to_keep_and_milestones(tmp_path):
    config, state, _ = setup((8, 1, 1), jax.devices())
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, keep_every=3)
    for step in range(1, 8):
        ckpt.save(step, state, {"position": step}, config)
    ckpt.close()
    # the newest two, plus every 3rd step as a milestone
    assert sorted(int(s) for s in os.listdir(tmp_path) if s.isdigit()) == [3, 6, 7]


def test_a_save_of_replicated_state_on_cpu_compiles_nothing(tmp_path, caplog):
    config, state, _ = setup((8, 1, 1), jax.devices())  # every array on all 8 devices
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        ckpt.save(1, state, {}, config)
    ckpt.close()
    # orbax's default slices each replica apart: one compiled slice per device and shape
    assert not [r.getMessage()[:80] for r in caplog.records if "Compiling" in r.getMessage()]


def test_a_write_error_names_the_os_error_that_tensorstore_gives_as_a_number():
    """A disk-full save (CI, 2026-12-07): tensorstore's message gave ENOSPC only as
    [os_error_code='28'], after a long spec; the one-line error must still say it."""
    spec = "{" + ", ".join(f'"k{i}": {i}' for i in range(80)) + "}"
    e = ValueError('RESOURCE_EXHAUSTED: Error opening "zarr" driver: Error writing '
                   '"opt_state.1.0.mu.pos_embed.embedding/.zarray" in OCDBT database at '
                   f"local file \"/w/checkpoints/20.orbax-checkpoint-tmp/state/\" "
                   f"[tensorstore_spec='{spec}'] [os_error_code='28']")
    line = checkpoint._short(e)
    assert line.startswith("No space left on device: RESOURCE_EXHAUSTED") and len(line) < 400
    said = ValueError("[Errno 28] No space left on device [os_error_code=28]")
    assert checkpoint._short(said).count("No space left") == 1  # not said twice
