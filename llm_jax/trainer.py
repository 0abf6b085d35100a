"""run(config, workdir): wires mesh, data, model, optimizer and checkpoints, then loops.

No math lives here: losses and updates are in steps.py, FLOPs in metrics.py.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from llm_jax import (
    checkpoint,
    evaluate,
    finetune,
    generate,
    host_memory,
    metrics,
    models,
    objectives,
    optim,
    preemption,
    sharding,
    steps,
)
from llm_jax import config as config_lib
from llm_jax.data import pipeline, sources, tasks, tokenizer
from llm_jax.models.layers import ModelConfig


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf and train.on_nonfinite is 'stop'."""


def state_init(model: nn.Module, tx: optax.GradientTransformation, example: dict, seed: int,
               mesh: jax.sharding.Mesh, rule_table: tuple) -> tuple[Any, Any, Any]:
    """Parameters and optimizer state born sharded: eval_shape → shardings → jit(init).

    `example` is a batch of the right shapes (`objectives.dummy_batch`). Returns
    (init: (load=None) -> state, state shardings, abstract state with shardings).
    Nothing is allocated until init() is called, so a resume restores without a second
    copy. init(load) is for fine-tuning: it makes fresh parameters only, passes them to
    `load` (which returns parameters of the same structure), and builds the state from
    its result with fresh moments, so no second optimizer state ever exists.
    """
    def boxed_params():  # traced, never eager: the mesh's devices may be compile-only
        rng = jax.random.fold_in(jax.random.key(seed), 0x1517)  # the init stream
        return model.init(rng, example)["params"]

    boxed = jax.eval_shape(boxed_params)
    param_sh = sharding.logical_shardings(boxed, mesh, rule_table)
    abstract_params = jax.tree.map(lambda b: b.value, boxed,
                                   is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = sharding.replicated(mesh)
    # Moments follow their parameter's sharding; counters and the like are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: repl)
    state_sh = steps.TrainState(step=repl, params=param_sh, opt_state=opt_sh, skipped=repl)

    def state_from(params):
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))

    def init():
        return state_from(nn.meta.unbox(boxed_params()))

    init_fn = jax.jit(init, out_shardings=state_sh)
    params_fn = jax.jit(lambda: nn.meta.unbox(boxed_params()), out_shardings=param_sh)
    from_fn = jax.jit(state_from, in_shardings=(param_sh,), out_shardings=state_sh,
                      donate_argnums=0)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(init), state_sh)

    def build(load: Callable[[Any], Any] | None = None):
        return init_fn() if load is None else from_fn(load(params_fn()))

    return build, state_sh, abstract


def init_state(model: nn.Module, tx: optax.GradientTransformation, example: dict, seed: int,
               mesh: jax.sharding.Mesh, rule_table: tuple) -> tuple[Any, Any, Any]:
    """(state, state shardings, abstract state): `state_init` called at once."""
    init, state_sh, abstract = state_init(model, tx, example, seed, mesh, rule_table)
    return init(), state_sh, abstract


def jit_train_step(model: nn.Module, objective: objectives.Objective,
                   tx: optax.GradientTransformation, lr: optax.Schedule,
                   t: ml_collections.ConfigDict, state_sh: Any, batch_sh: Any) -> Any:
    """The train step as one jit with explicit shardings; the state is donated. Dropout
    runs when the model's config has it, for every caller (training, AOT, the benchmark)."""
    train = functools.partial(
        steps.train_step, model=model, objective=objective, tx=tx, lr_schedule=lr,
        seed=t.seed,
        microbatches=t.microbatches, skip_nonfinite=t.on_nonfinite == "skip",
        deterministic=model.cfg.dropout == 0)
    repl = sharding.replicated(batch_sh.mesh)
    return jax.jit(train, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                   donate_argnums=0)


def jit_eval_step(model: nn.Module, objective: objectives.Objective, token_bytes: np.ndarray,
                  param_sh: Any, batch_sh: Any) -> Any:
    evaluate_ = functools.partial(steps.eval_step, model=model, objective=objective,
                                  token_bytes=jnp.asarray(token_bytes, jnp.float32))
    repl = sharding.replicated(batch_sh.mesh)
    return jax.jit(evaluate_, in_shardings=(param_sh, batch_sh), out_shardings=repl)


def enable_compilation_cache(directory: str) -> None:
    """Persistent XLA cache: a second start of the same config skips compiling."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def preflight(config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Every check of the config that needs no data: values, then the mesh against the
    devices (default: all), heads and batch. Raises ConfigError (one line) before anything
    is compiled."""
    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_fits(config, mesh, sharding.rules(config.mesh))
    return mesh


class Trainer:
    """Everything a run needs, built once from the config.

    With `vocab_size` given no tokenizer is loaded (benchmarks and AOT compiles use
    synthetic tokens). `devices` builds the mesh from other devices than this process's,
    e.g. compile-only TPU devices of a pod topology.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 vocab_size: int | None = None, devices: list[jax.Device] | None = None):
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        self.rules = sharding.rules(config.mesh)
        self.mesh = preflight(config, devices)
        self.tok = None if vocab_size else finetune.load_tokenizer(config, workdir)
        self.objective = objectives.Objective.from_config(config)
        if vocab_size is None:  # next-token decoders never see the appended specials
            decoder = config.model.family == "decoder"
            vocab_size = self.tok.num_pieces if decoder else self.tok.vocab_size
        d = config.data
        self.model_cfg = ModelConfig.from_config(
            config.model, vocab_size, max(d.seq_len, d.target_seq_len),
            heads=self.objective.heads, max_segments_per_row=d.max_segments_per_row)
        self.model = models.build(self.model_cfg, config.model.family)
        self.tx, self.lr = optim.make(config.optim, config.train.steps)
        self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
        self.example = objectives.dummy_batch(config, 1)
        # positions each step processes (both sides for encoder_decoder), for tokens/s
        self.tokens_per_step = config.train.batch_size * sum(
            shape[0] for k, shape in objectives.feature_shapes(config).items()
            if k in ("tokens", "inputs", "targets"))

    def flops_per_token(self, training: bool = True) -> float:
        d = self.config.data
        return metrics.flops_per_token(self.model_cfg, self.config.model.family, d.seq_len,
                                       d.target_seq_len, training)


def synthetic_vocab(config: ml_collections.ConfigDict) -> int:
    """The model's vocabulary for a tokenizer of data.vocab_size pieces (no tokenizer is
    loaded): decoders use the pieces, other families also the appended specials."""
    if config.model.family == "decoder":
        return config.data.vocab_size
    return config.data.vocab_size + len(tokenizer.SPECIALS) + tokenizer.NUM_SENTINELS


class TrainStep(NamedTuple):
    trainer: Trainer  # mesh, rules, model, objective, shardings, FLOPs
    compiled: Any
    state: Any
    state_sh: Any
    batch: Any  # synthetic tokens of the configured shapes
    compile_s: float  # tracing and compiling
    init_s: float  # initializing the state (parameters and optimizer moments)


def compile_train_step(config: ml_collections.ConfigDict,
                       compiler_options: dict[str, Any] | None = None) -> TrainStep:
    """The config's real train step (model, optimizer, shardings, donation), compiled for a
    synthetic batch, with its initial state; `compiler_options` are XLA's."""
    tr = Trainer(config, "", vocab_size=synthetic_vocab(config))
    t = config.train
    batch = jax.device_put(objectives.dummy_batch(config, t.batch_size, np.random.default_rng(0),
                                                  tr.model_cfg.vocab_size), tr.batch_sh)
    with jax.set_mesh(tr.mesh), nn.logical_axis_rules(tr.rules):
        start = time.perf_counter()
        state, state_sh, _ = init_state(tr.model, tr.tx, tr.example, t.seed, tr.mesh, tr.rules)
        jax.block_until_ready(state)
        init_s, start = time.perf_counter() - start, time.perf_counter()
        train_fn = jit_train_step(tr.model, tr.objective, tr.tx, tr.lr, t, state_sh, tr.batch_sh)
        compiled = train_fn.lower(state, batch).compile(compiler_options or None)
        return TrainStep(tr, compiled, state, state_sh, batch, time.perf_counter() - start, init_s)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains to config.train.steps (resuming from WORKDIR/checkpoints) and evaluates."""
    t0 = time.perf_counter()
    tr = Trainer(config, workdir)  # config, mesh and data errors surface before any write
    enable_compilation_cache(config.train.compilation_cache_dir)
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.train.max_to_keep,
                                   config.train.keep_every)
    saved = ckpt.saved_config()
    if saved is not None:  # a workdir holds one run: refuse before touching anything
        config_lib.check_same_run(config, saved, workdir)
    with jax.set_mesh(tr.mesh), nn.logical_axis_rules(tr.rules), \
            preemption.Watcher() as watcher:
        try:
            result = _train(tr, ckpt, watcher, t0)
        except checkpoint.CheckpointError:
            raise  # closing a manager whose writes failed only adds noise
        except BaseException:
            # the error in flight says why the run stopped (e.g. a full disk)
            with contextlib.suppress(checkpoint.CheckpointError):
                ckpt.close()
            raise
        ckpt.close()
        return result


def _train(tr: Trainer, ckpt: checkpoint.Checkpointer, watcher: preemption.Watcher,
           t0: float) -> dict[str, float]:
    config, workdir, t = tr.config, tr.workdir, tr.config.train
    init, state_sh, abstract = state_init(tr.model, tr.tx, tr.example, t.seed, tr.mesh,
                                          tr.rules)
    train_fn = jit_train_step(tr.model, tr.objective, tr.tx, tr.lr, t, state_sh, tr.batch_sh)
    eval_fn = jit_eval_step(tr.model, tr.objective, tr.tok.token_bytes, state_sh.params,
                            tr.batch_sh)
    # before the input pipeline's threads start: filling its buffers on a CPU host's cores
    # made the matmul read 100 GFLOP/s instead of 186, and MFU 140%
    peak, peak_src = metrics.peak_flops(t.peak_flops, tr.model_cfg.dtype)
    doc_stats = pipeline.DocumentStats()
    host_iter = tasks.train_iterator(
        config, tr.tok, process_index=jax.process_index(), process_count=jax.process_count(),
        stats=doc_stats)
    data_iter = pipeline.DevicePrefetch(host_iter, tr.batch_sh, config.data.prefetch,
                                        t.batch_size)
    start = 0
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        if t.init_from:  # fine-tuning: matching parameters from the pretrained run
            loaded = {}

            def load(fresh: Any) -> Any:
                loaded["params"], loaded["report"] = finetune.load_matching(t.init_from, fresh)
                return loaded.pop("params")

            state = init(load)
            if tr.is_main:
                print(loaded["report"], flush=True)
        else:
            state = init()
    else:
        state, data_state, start = restored
        data_iter.set_state(data_state)
        if tr.is_main:
            print(f"resumed from {workdir}/checkpoints at step {start}", flush=True)
    if tr.is_main:
        config_lib.write_json(config, workdir)
        finetune.save_tokenizer(tr.tok, workdir)
    writer = metrics.Writer(workdir, enabled=tr.is_main, resume_step=start)
    log = metrics.Progress(t.steps, start, t.progress, enabled=tr.is_main)
    eval_local = tasks.eval_batches(
        config, tr.tok, process_index=jax.process_index(), process_count=jax.process_count())
    eval_global = [pipeline.to_global(b, tr.batch_sh, t.batch_size) for b in eval_local]
    periodic = eval_global[:t.eval_batches] if t.eval_batches else eval_global

    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    flops_tok = tr.flops_per_token()
    log.log(f"model: {n_params / 1e6:.2f}M params, {flops_tok / 1e6:.1f} MFLOP/token; "
            f"mesh {dict(tr.mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s ({peak_src})")

    tokens_per_step = tr.tokens_per_step
    timer = metrics.StepTimer(start)
    pending = None  # (metrics, step) not yet checked for non-finite values

    def check_finite() -> None:
        if t.on_nonfinite == "stop" and pending is not None and not bool(pending[0]["finite"]):
            m, bad = pending
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad} (loss={float(m['loss'])}); "
                f"stopped; the last good checkpoint is step {ckpt.wait_and_latest()} in "
                f"{workdir}")

    for step in range(start, t.steps):
        batch = next(data_iter)
        if step == start and jax.process_count() > 1:
            compile_then_meet(eval_fn, state.params, eval_global[:1], start,
                              train=(train_fn, state, batch))
        state, m = train_fn(state, batch)
        check_finite()  # the previous step's: checking one step late keeps dispatch async
        done, pending = step + 1, (m, step + 1)
        if done == start + 1:
            check_finite()
            jax.block_until_ready(state)
            log.log(f"compiled and ran the first step in {time.perf_counter() - t0:.1f}s "
                    "since start")
        if done % t.log_every == 0 or done == t.steps or done == 1:
            dt = timer.per_step(done, m)  # the first interval includes compiling
            record = metrics.train_record(jax.device_get(m), tokens_per_step / dt, dt,
                                          flops_tok, peak)
            record["peak_host_mem_mb"] = host_memory.peak_rss_mb()
            if config.model.family == "decoder":  # counted by the next-token pipeline
                record.update(doc_stats.snapshot())
            writer.write(done, "train", record)
            log.log(metrics.format_record(done, "train", record))
        paused = False
        if done % t.eval_every == 0 and done != t.steps:
            _write_eval(writer, log, done, evaluate.run_eval(eval_fn, state.params, periodic))
            # before a save's background writes start, which would slow the matmul
            peak = metrics.remeasure_peak(peak, peak_src, tr.model_cfg.dtype)
            paused = True
        stop = watcher.should_stop(done)
        if done % t.checkpoint_every == 0 or done == t.steps or stop:
            check_finite()  # never save a non-finite state
            ckpt.save(done, state, data_iter.get_state(), config)
            paused = True
        if stop:
            ckpt.wait()
            log.close()
            raise preemption.Preempted(f"stopped by SIGTERM after step {done}; checkpoint "
                                       f"{done} is saved in {workdir}; rerun to continue")
        if paused:  # keep eval and saving out of tokens/s
            jax.block_until_ready(state)
            timer.restart(done)
        log.update(1)
    check_finite()
    log.close()
    ckpt.wait()

    if start >= t.steps and jax.process_count() > 1:  # a finished run, rerun: eval only
        compile_then_meet(eval_fn, state.params, eval_global[:1], start)
    final = evaluate.run_eval(eval_fn, state.params, eval_global)
    if config.task.objective == "seq2seq" and config.task.bleu_examples:
        final.update(generate.bleu_eval(tr, state.params))
        log.log(f"BLEU {final['bleu']:.2f} on {final['bleu_examples']} validation examples "
                "(sacrebleu, greedy decoding)")
    if start < t.steps:  # a rerun of a finished run reports, but does not log twice
        _write_eval(writer, log, t.steps, final)
    writer.close()
    if tr.is_main and config.model.family == "decoder":
        text = b"".join(sources.document_bytes(r, config.data)
                        for r in sources.load_source(config.data, config.data.eval_split))
        if int(final["bytes"]) != len(text):  # the tokens must spell the text exactly
            print(f"warning: eval targets spell {int(final['bytes'])} bytes, the split has "
                  f"{len(text)}; bits per byte uses the former", flush=True)
        base = evaluate.compressor_bits_per_byte(text)
        table = ", ".join(f"{k} {v:.3f}" for k, v in base.items())
        print(f"final validation bits per byte: model {final['bits_per_byte']:.3f}; "
              f"{table} (same {len(text):,} bytes)", flush=True)
        final.update({f"{k} bpb": v for k, v in base.items()})
    if tr.is_main and start < t.steps and (note := host_memory_note(train_fn, state, batch)):
        print(f"note: {note}", flush=True)
    return final


def compile_then_meet(eval_fn: Any, params: Any, eval_batches: list[Any], start: int,
                      train: tuple[Any, Any, Any] | None = None,
                      timeout_s: int = 3600) -> None:
    """Compiles the eval step and, given (train_fn, state, batch), the train step (jit keeps
    both), then waits for every process at the coordination service. A step's first
    collective gives all processes 30 s (gloo's fixed timeout on CPU) to arrive, and one
    compiling slower on a busy host missed it. (BLEU's decoding, compiled after the final
    eval, has no such meeting.)"""
    if train is not None:
        train_fn, state, batch = train
        train_fn.lower(state, batch).compile()
    for b in eval_batches:
        eval_fn.lower(params, b).compile()
    ocp.multihost.get_barrier_sync_fn()(key=f"llm_jax_steps_compiled_{start}",
                                        timeout_ms=timeout_s * 1000)


def host_memory_note(train_fn: Any, state: Any, batch: Any) -> str | None:
    """`host_memory.allocator_hint` for a CPU run: its peak resident memory against the
    train step's temporaries, read from the executable the jit already holds (lowering it
    again with the same shapes hits the jit's cache: nothing compiles)."""
    if jax.devices()[0].platform != "cpu":
        return None
    mem = train_fn.lower(state, batch).compile().memory_analysis()
    if mem is None:
        return None
    return host_memory.allocator_hint(host_memory.peak_rss_mb(), mem.temp_size_in_bytes / 2**20)


def _write_eval(writer: metrics.Writer, log: metrics.Progress, step: int,
                ev: dict[str, float]) -> None:
    record = {k: v for k, v in ev.items()
              if k not in ("tokens", "bytes", "lm_loss", "lm_accuracy", "bleu_examples") and
              not k.endswith("_count")}
    writer.write(step, "eval", record)
    log.log(metrics.format_record(step, "eval", record))
