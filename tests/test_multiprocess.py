"""Two processes on one machine, joined by jax.distributed on 127.0.0.1 (multi-host path)."""
import json
import os
import socket
import subprocess
import sys

import pytest
from data_fixtures import data_cfg  # noqa: F401  (session fixture: the prepared corpus)

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_resume_and_agree(tmp_path, data_cfg):  # noqa: F811
    port = free_port()
    # LLVM at -O0: 30 tiny steps, so compiling dominates
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
               "--xla_backend_optimization_level=0")

    def launch(steps):
        procs = [subprocess.Popen(
            [sys.executable, "-m", "llm_jax.train", "--config=configs/tiny.py",
             f"--workdir={tmp_path}/w", f"--config.data.data_dir={data_cfg.data_dir}",
             f"--config.train.steps={steps}", "--config.train.checkpoint_every=10",
             "--config.data.tokenizer_train_bytes=200000",  # a fresh tokenizer: one writer
             "--config.data.eval_split=validation[:5%]",  # the final eval: 2 s, not 15
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for i in range(2)]
        try:
            outs = [p.communicate(timeout=300) for p in procs]
        finally:
            for p in procs:
                p.kill()
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]

    for rc, out, err in launch(20):
        assert rc == 0, err[-3000:]
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r["split"] == "train"]
    assert train[-1]["step"] == 20 and train[-1]["loss"] < train[0]["loss"]
    assert len({r["step"] for r in train}) == len(train)  # only process 0 writes
    ckpt = tmp_path / "w" / "checkpoints" / "20" / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(ckpt))
    port = free_port()
    results = launch(30)  # both processes resume from step 20
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert "resumed from" in results[0][1] and "at step 20" in results[0][1]
