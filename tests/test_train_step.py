"""The sharded train step: same losses on every mesh; accumulation equals the full batch."""
import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from llm_jax import objectives, optim, sharding, trainer
from llm_jax.config import ConfigError
from llm_jax.models import build
from llm_jax.models.layers import ModelConfig

SEQ = 32


def tiny_config(name="tiny"):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.data.seq_len = SEQ
    c.data.target_seq_len = SEQ // 2 if c.model.family == "encoder_decoder" else 0
    c.data.vocab_size = 128
    c.train.batch_size = 16
    return c


def _two_segments(rng, batch, length):
    """Segment ids and positions of rows holding two packed examples and some padding."""
    cut = rng.integers(4, length - 4, batch)
    idx = np.arange(length)[None]
    seg = np.where(idx < cut[:, None], 1, 2).astype(np.int32)
    seg[0, -3:] = 0  # some padding
    pos = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
    return seg, pos


def synthetic_batches(n, batch, vocab=128, seed=0, config=None):
    """Batches shaped like the real pipeline's for config's family and objective."""
    config = config or tiny_config()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = objectives.dummy_batch(config, batch, rng, vocab)
        for side in ("", "inputs_", "targets_"):
            if f"{side}segment_ids" in b:
                length = b[f"{side}segment_ids"].shape[1]
                b[f"{side}segment_ids"], b[f"{side}positions"] = _two_segments(rng, batch,
                                                                               length)
        if config.model.family == "encoder":  # one pair per row: segment 1, then padding
            b["segment_ids"] = (b["segment_ids"] == 1).astype(np.int32)
            b["positions"] = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (batch, SEQ))
            b["token_types"] = (np.arange(SEQ)[None] > rng.integers(2, SEQ - 2, (batch, 1))
                                ).astype(np.int32)
        if "mlm_weights" in b:
            b["mlm_weights"] = (rng.random((batch, SEQ)) < 0.15).astype(np.int32)
            b["nsp_label"] = rng.integers(0, 2, batch).astype(np.int32)
        out.append(b)
    return out


def train_losses(config, devices, n_steps=3):
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules(config.mesh)
    sharding.check_fits(config, mesh, rules)
    objective = objectives.Objective.from_config(config)
    cfg = ModelConfig.from_config(config.model, config.data.vocab_size, SEQ, objective.heads)
    model = build(cfg, config.model.family)
    tx, lr = optim.make(config.optim, config.train.steps)
    batch_sh = sharding.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, state_sh, _ = trainer.init_state(model, tx, objectives.dummy_batch(config, 1),
                                                config.train.seed, mesh, rules)
        step = trainer.jit_train_step(model, objective, tx, lr, config.train, state_sh,
                                      batch_sh)
        losses = []
        for b in synthetic_batches(n_steps, config.train.batch_size, config=config):
            state, m = step(state, jax.device_put(b, batch_sh))
            losses.append(float(m["loss"]))
        return np.array(losses), jax.device_get(state.params)


@pytest.fixture(scope="module")
def single_device():
    return one_device("tiny")


@functools.cache
def one_device(name):
    """Losses and parameters of 3 f32 steps of configs/NAME.py on one device (computed once)."""
    c = tiny_config(name)
    c.model.dtype = "float32"
    return train_losses(c, jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_meshes_give_the_same_losses(single_device, mesh):
    c = tiny_config()
    c.model.dtype = "float32"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    losses, params = train_losses(c, jax.devices())
    np.testing.assert_allclose(losses, single_device[0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params, single_device[1])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["bert_tiny", "t5_tiny"])
def test_other_families_give_the_same_losses_on_a_222_mesh(name):
    c = tiny_config(name)
    c.model.dtype = "float32"
    one = one_device(name)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    losses, params = train_losses(c, jax.devices())
    np.testing.assert_allclose(losses, one[0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params, one[1])


@pytest.mark.parametrize("name", ["tiny", "bert_tiny"])
def test_accumulation_matches_the_full_batch(name):
    """For MLM + NSP too: each part is normalized by the whole batch's weight."""
    c = tiny_config(name)
    c.model.dtype = "float32"
    reference = one_device(name)
    c.train.microbatches = 4
    losses, params = train_losses(c, jax.devices()[:1])
    np.testing.assert_allclose(losses, reference[0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params, reference[1])


def test_parameters_are_born_sharded():
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    mesh = sharding.make_mesh(c.mesh)
    rules = sharding.rules(c.mesh)
    model = build(ModelConfig.from_config(c.model, 128, SEQ))
    tx, _ = optim.make(c.optim, 10)
    state, _, _ = trainer.init_state(model, tx, objectives.dummy_batch(c, 1), 0, mesh, rules)
    wi = state.params["decoder"]["layers"]["mlp"]["wi"]["kernel"]  # [layers, embed, mlp]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    mu = state.opt_state[1][0].mu["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert mu.sharding.spec == wi.sharding.spec
    assert len(wi.addressable_shards) == 8 and wi.addressable_shards[0].data.shape == (2, 16, 32)


@pytest.mark.parametrize("override,needle", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices"),
    ({"data": 1, "fsdp": 1, "tensor": 8}, "num_heads=4"),
    ({"data": 8, "fsdp": 1, "tensor": 1, "batch": 12}, "batch_size=12"),
])
def test_a_mesh_that_does_not_fit_is_refused_before_compiling(override, needle):
    c = tiny_config()
    c.train.batch_size = override.pop("batch", 16)
    for k, v in override.items():
        c.mesh[k] = v
    with pytest.raises(ConfigError, match=needle):
        mesh = sharding.make_mesh(c.mesh)
        sharding.check_fits(c, mesh, sharding.rules(c.mesh))


def test_skip_drops_a_nonfinite_update_but_keeps_the_schedule_moving():
    import jax.numpy as jnp

    from llm_jax import steps
    c = tiny_config()
    c.model.dtype = "float32"
    c.train.on_nonfinite = "skip"
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    rules = sharding.rules(c.mesh)
    model = build(ModelConfig.from_config(c.model, 128, SEQ))
    tx, lr = optim.make(c.optim, c.train.steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        objective = objectives.Objective.from_config(c)
        state, _, _ = trainer.init_state(model, tx, objectives.dummy_batch(c, 1), 0, mesh,
                                         rules)
        # a NaN in one weight makes this step's loss and gradients NaN
        bad = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan)
                                                if p.ndim == 2 else p, state.params))
        batch = synthetic_batches(1, c.train.batch_size)[0]
        new, m = steps.train_step(bad, batch, model=model, objective=objective, tx=tx,
                                  lr_schedule=lr, seed=0,
                                  skip_nonfinite=True)
    assert not bool(m["finite"]) and int(new.skipped) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # no update landed
    counts = [x for x in jax.tree.leaves(new.opt_state) if x.ndim == 0]
    assert counts and all(int(x) == 1 for x in counts)  # the schedule moved on
    mu = jax.tree.leaves(new.opt_state[1][0].mu)
    assert all(np.all(np.asarray(x) == 0) for x in mu)  # moments untouched by NaN grads


def test_logged_norms_match_numpy():
    """param_norm and update_norm (the new parameters, and new minus old) against numpy."""
    c = tiny_config()
    c.model.dtype = "float32"
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    rules = sharding.rules(c.mesh)
    model = build(ModelConfig.from_config(c.model, 128, SEQ))
    tx, lr = optim.make(c.optim, c.train.steps)
    objective = objectives.Objective.from_config(c)
    batch_sh = sharding.batch_sharding(mesh, rules)
    norm = lambda tree: np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))  # noqa: E731
                                    for x in jax.tree.leaves(tree)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, state_sh, _ = trainer.init_state(model, tx, objectives.dummy_batch(c, 1), 0,
                                                mesh, rules)
        step = trainer.jit_train_step(model, objective, tx, lr, c.train, state_sh, batch_sh)
        for b in synthetic_batches(2, c.train.batch_size):
            before = jax.device_get(state.params)  # the step donates the state
            state, m = step(state, jax.device_put(b, batch_sh))
            after = jax.device_get(state.params)
            np.testing.assert_allclose(float(m["param_norm"]), norm(after), rtol=1e-5)
            update = jax.tree.map(lambda a, b: a.astype(np.float64) - b, after, before)
            np.testing.assert_allclose(float(m["update_norm"]), norm(update), rtol=1e-3)


def test_document_mask_off_is_refused_outside_decoders():
    from llm_jax import config as config_lib
    c = config_lib.base_config()
    c.model.document_mask = False
    config_lib.validate(c)  # a decoder takes it
    c.model.family, c.task.objective = "encoder", "mlm"
    with pytest.raises(ConfigError, match="document_mask=False applies to decoders only"):
        config_lib.validate(c)


def test_steps_compiled_before_the_processes_meet_are_not_compiled_again(monkeypatch, caplog):
    """Multi-process runs compile the train and eval steps, then meet at a barrier; the
    loop's first calls must reuse those executables, or a process would compile after the
    meeting and its peers' first collective would time out again."""
    import logging

    import orbax.checkpoint as ocp

    from llm_jax.data import pipeline
    c = tiny_config()
    tr = trainer.Trainer(c, "", vocab_size=128)
    events = []
    monkeypatch.setattr(ocp.multihost, "get_barrier_sync_fn",
                        lambda: lambda key, timeout_ms: events.append(key))
    batches = synthetic_batches(2, c.train.batch_size, config=c)
    with jax.set_mesh(tr.mesh), nn.logical_axis_rules(tr.rules):
        state, state_sh, _ = trainer.init_state(tr.model, tr.tx, tr.example, 0, tr.mesh,
                                                tr.rules)
        train_fn = trainer.jit_train_step(tr.model, tr.objective, tr.tx, tr.lr, c.train,
                                          state_sh, tr.batch_sh)
        eval_fn = trainer.jit_eval_step(tr.model, tr.objective, np.ones(128), state_sh.params,
                                        tr.batch_sh)
        train_b, eval_b = (pipeline.to_global(b, tr.batch_sh, c.train.batch_size)
                           for b in batches)
        compiled = lambda event, secs, **_: events.append("compile") if event == \
            "/jax/core/compile/backend_compile_duration" else None  # noqa: E731
        jax.monitoring.register_event_duration_secs_listener(compiled)
        try:
            trainer.compile_then_meet(eval_fn, state.params, [eval_b], 7,
                                      train=(train_fn, state, train_b))
        finally:
            jax.monitoring.unregister_event_duration_listener(compiled)
        assert events == ["compile", "compile", "llm_jax_steps_compiled_7"]  # then meet
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            state, _ = train_fn(state, train_b)
            jax.block_until_ready(eval_fn(state.params, eval_b))
    assert not [r.getMessage()[:80] for r in caplog.records if "Compiling" in r.getMessage()]
