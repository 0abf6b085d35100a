"""Hundreds of random invalid overrides: each ends fast with one line, never a traceback."""
import random
import subprocess
import sys
import time

import pytest
from absl import flags

from llm_jax import config as config_lib
from llm_jax import train, trainer
from llm_jax.overrides import UserError

INT_KEYS = ["train.steps", "train.batch_size", "train.log_every", "train.eval_every",
            "train.checkpoint_every", "model.num_layers", "model.d_model", "model.num_heads",
            "model.mlp_dim", "data.seq_len", "data.vocab_size", "train.microbatches"]
FLOAT_KEYS = ["optim.learning_rate", "optim.weight_decay", "optim.grad_clip", "model.dropout"]
CHOICE_KEYS = list(config_lib.CHOICES)
BOOL_KEYS = ["model.scan_layers", "model.tie_embeddings", "model.use_bias"]


def invalid_override(rng: random.Random) -> list[str]:
    """One random invalid set of overrides (on top of configs/tiny.py, 8 devices)."""
    kind = rng.randrange(8)
    if kind == 0:  # unknown key: a typo of a real one, or nonsense
        key = rng.choice(INT_KEYS + FLOAT_KEYS + CHOICE_KEYS)
        i = rng.randrange(len(key))
        key = key[:i] + rng.choice("xyz_.") + key[i + 1:] if rng.random() < 0.7 else \
            "".join(rng.choice("abcdefgh.") for _ in range(rng.randint(3, 12))).strip(".")
        if key in config_lib.flat_keys(config_lib.base_config()) or not key:
            key = "nope." + (key or "x")
        return [f"--config.{key}=1"]
    if kind == 1:  # wrong type for a number
        key = rng.choice(INT_KEYS + FLOAT_KEYS)
        bad = rng.choice(["abc", "None", "[]", "1e", "--", "true", "0x", "1,2"])
        if key in INT_KEYS:
            bad = rng.choice([bad, "1.5", "2.25"])
        return [f"--config.{key}={bad}"]
    if kind == 2:  # zero or negative sizes
        return [f"--config.{rng.choice(INT_KEYS)}={rng.choice([0, -1, -7, -1000])}"]
    if kind == 3:  # a value outside the choices
        return [f"--config.{rng.choice(CHOICE_KEYS)}={rng.choice(['foo', 'GELU', 'x1', 'none2'])}"]
    if kind == 4:  # a mesh that does not cover 8 devices
        sizes = rng.choice([(3, 1, 1), (1, 1, 5), (2, 2, 1), (4, 4, 1), (16, 1, 1), (-1, 3, 1),
                            (-1, -1, 1), (0, 1, 1), (1, -2, 1)])
        return [f"--config.mesh.{a}={s}" for a, s in zip(("data", "fsdp", "tensor"), sizes)]
    if kind == 5:  # a batch the devices cannot split
        return [f"--config.train.batch_size={rng.choice([1, 3, 5, 7, 9, 12, 20, 30])}"]
    if kind == 6:  # heads that the tensor axis cannot split, or GQA that does not divide
        return rng.choice([["--config.mesh.data=1", "--config.mesh.tensor=8"],
                           ["--config.model.num_kv_heads=3"],
                           ["--config.model.d_model=30"]])
    return [f"--config.{rng.choice(BOOL_KEYS)}={rng.choice(['maybe', '2', 'yes please'])}"]


CASES = [invalid_override(random.Random(i)) for i in range(240)]


def check(argv):
    """The CLI's own parse + preflight path, in-process: returns the one-line message."""
    fv = flags.FlagValues()
    train.define_flags(fv)
    config, _ = train.parse_args(argv, fv)
    trainer.preflight(config)
    return None


@pytest.mark.parametrize("chunk", range(4))
def test_random_invalid_overrides_fail_fast_in_one_line(chunk):
    for overrides in CASES[chunk::4]:
        argv = ["train", "--config=configs/tiny.py", "--workdir=/nonexistent/x", *overrides]
        start = time.perf_counter()
        with pytest.raises((UserError, config_lib.ConfigError)) as err:
            check(argv)
        message = str(err.value)
        assert "\n" not in message.strip() and message, overrides
        assert time.perf_counter() - start < 5, overrides


@pytest.mark.parametrize("overrides", CASES[:240:24])
def test_the_real_command_exits_2_without_traceback(tmp_path, overrides):
    r = subprocess.run([sys.executable, "-m", "llm_jax.train", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}/w", *overrides], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, (overrides, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "w").exists()  # nothing written for a refused config
