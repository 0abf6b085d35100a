"""Real runs of `python -m llm_jax.train` on the tiny config (8 fake devices)."""
import json
import os
import subprocess
import sys

import pytest
from data_fixtures import data_cfg  # noqa: F401  (session fixture: the prepared corpus)

pytestmark = pytest.mark.slow


def train(workdir, data_dir, *overrides, timeout=300):
    cmd = [sys.executable, "-m", "llm_jax.train", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cfg):  # noqa: F811
    workdir = tmp_path_factory.mktemp("tiny")
    r = train(workdir, data_cfg.data_dir, "--config.train.seed=3")
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


def test_tiny_run_learns_and_writes_metrics_events_checkpoints(tiny_run):
    workdir, r = tiny_run
    recs = records(workdir)
    train_recs = [x for x in recs if x["split"] == "train"]
    eval_recs = [x for x in recs if x["split"] == "eval"]
    for rec in train_recs:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu",
                "peak_host_mem_mb"} <= set(rec)
        assert rec["peak_flops"] == 1e11  # configured: never re-measured
        assert 100 < rec["peak_host_mem_mb"] < 64_000  # MB, not KB or bytes
    for rec in eval_recs:
        assert {"step", "loss", "perplexity", "bits_per_byte"} <= set(rec)
    assert [x["step"] for x in train_recs] == [1, 5, 10, 15, 20, 25, 30]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5  # it learns
    assert eval_recs[-1]["step"] == 30 and eval_recs[-1]["loss"] < eval_recs[0]["loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["15", "30"]
    assert json.loads((workdir / "config.json").read_text())["train"]["seed"] == 3
    assert "final validation bits per byte" in r.stdout and "gzip -9" in r.stdout


def test_a_measured_peak_is_raised_at_pauses_and_later_mfu_uses_it(tmp_path, monkeypatch,
                                                                   data_cfg):  # noqa: F811
    from llm_jax import metrics, overrides, trainer
    cfg = overrides.load("configs/tiny.py")
    cfg.data.data_dir = data_cfg.data_dir
    cfg.data.eval_split = "validation[:5%]"  # the final eval: 2 s, not 15
    cfg.train.update(steps=20, eval_every=5, checkpoint_every=10, peak_flops=0.0,
                     compilation_cache_dir="")  # leave this worker's jax config alone
    monkeypatch.setattr(metrics, "peak_flops", lambda configured, dtype: (1e9, "measured"))
    remeasured = iter([5e8, 2e9, 3e9])  # after the evals at steps 5, 10 and 15, not 20
    monkeypatch.setattr(metrics, "measure_cpu_peak", lambda dtype, **_: next(remeasured))
    trainer.run(cfg, str(tmp_path))
    recs = [x for x in records(tmp_path) if x["split"] == "train"]
    flops = trainer.Trainer(cfg, str(tmp_path)).flops_per_token()
    assert [(x["step"], x["peak_flops"]) for x in recs] == [
        (1, 1e9), (5, 1e9), (10, 1e9), (15, 2e9), (20, 3e9)]  # a slower reading is not kept
    for x in recs:
        assert x["mfu"] == pytest.approx(x["tokens_per_sec"] * flops / x["peak_flops"])


def test_rerun_continues_from_the_checkpoint(tiny_run, data_cfg):  # noqa: F811
    workdir, _ = tiny_run
    r = train(workdir, data_cfg.data_dir, "--config.train.seed=3", "--config.train.steps=40")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 30" in r.stdout
    steps = [x["step"] for x in records(workdir) if x["split"] == "train"]
    assert steps == [1, 5, 10, 15, 20, 25, 30, 35, 40]  # nothing before 30 was redone
    assert "40" in os.listdir(workdir / "checkpoints")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_cfg):  # noqa
    r = train(tmp_path, data_cfg.data_dir, "--config.optim.learning_rate=1e30",
              "--config.optim.warmup_steps=0", "--config.optim.grad_clip=0",
              "--config.train.checkpoint_every=1")
    assert r.returncode == 3, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("error")][0]
    assert "non-finite" in line and "last good checkpoint" in line
    bad_step = int(line.split("at step ")[1].split()[0])
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved and max(saved) < bad_step
