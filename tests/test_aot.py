"""--compile_only: compile for a mesh larger than the machine and report memory per device."""
import os
import subprocess
import sys

import pytest

from llm_jax import aot
from llm_jax.config import base_config


def test_compile_only_for_a_16_device_mesh_on_this_machine(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it
    r = subprocess.run([sys.executable, "-m", "llm_jax.train", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}/w", "--compile_only", "--config.mesh.data=1",
                        "--config.mesh.fsdp=16", "--config.train.batch_size=16"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'fsdp': 16" in r.stdout and "total / device" in r.stdout
    assert not (tmp_path / "w").exists()  # nothing trained, nothing written


def test_compile_only_on_an_accelerator_host_points_to_fake_host_devices(monkeypatch, capfd):
    # a GPU host cannot grow fake GPUs: a mesh bigger than it is planned on CPU devices
    import jax

    from llm_jax import train
    from llm_jax.config import load_file
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keep this process's 8
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    c = load_file("configs/tiny.py")
    c.mesh.data, c.mesh.fsdp = 1, 64
    with pytest.raises(SystemExit) as e:
        train._compile_only(c, None)
    assert e.value.code == train.EXIT_USER
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "asks for 64 devices" in last and "JAX_PLATFORMS=cpu" in last, last


@pytest.mark.parametrize("used_mib,verdict", [(80, "10% used with the program, fits"),
                                              (760, "95% used with the program, tight"),
                                              (920, "115% used with the program, DOES NOT")])
def test_hbm_verdict_counts_the_program_and_leaves_headroom(used_mib, verdict):
    mib = 2**20
    r = {"mesh": {"fsdp": 4}, "device_kind": "TPU v5 lite", "params": 1, "compile_s": 1.0,
         "params_bytes": 0, "optimizer_bytes": 0, "batch_bytes": 0, "temporaries_bytes": 0,
         "total_bytes": (used_mib - 10) * mib, "generated_code_bytes": 10 * mib,
         "hbm_bytes": 800 * mib}
    assert verdict in aot.format_report(r).splitlines()[-1]


def test_fsdp_splits_parameter_memory_across_devices():
    c = base_config()
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 64, 4, 256
    c.data.vocab_size, c.data.seq_len, c.train.batch_size = 512, 32, 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
    replicated = aot.compile_report(c)
    c.mesh.data, c.mesh.fsdp = 1, 8
    sharded = aot.compile_report(c)
    assert replicated["params_bytes"] == replicated["params"] * 4  # f32, whole copy
    # fsdp shards every 'embed' axis 8 ways; only the small norm vectors stay whole
    assert sharded["params_bytes"] < replicated["params_bytes"] / 6
    assert sharded["optimizer_bytes"] < replicated["optimizer_bytes"] / 6


def test_topology_compiles_for_a_tpu_pod_or_says_what_is_missing(tmp_path):
    """With libtpu (the jax[tpu] extra) the step compiles for a 4-chip v5e slice and
    reports HBM per chip; without it, one line says how to install it."""
    import importlib.util
    r = subprocess.run([sys.executable, "-m", "llm_jax.train", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}/w", "--compile_only", "--topology=v5e:2x2",
                        "--config.mesh.data=1", "--config.mesh.fsdp=-1"],
                       capture_output=True, text=True, timeout=300)
    if importlib.util.find_spec("libtpu") is None:
        assert r.returncode == 2 and "jax[tpu]" in r.stderr.splitlines()[-1]
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'fsdp': 4" in r.stdout and "TPU v5 lite" in r.stdout
    assert "HBM per chip" in r.stdout and "fits" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "llm_jax.train", "--config=configs/tiny.py",
                          f"--workdir={tmp_path}/w", "--compile_only", "--topology=v9z:1x1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--topology='v9z:1x1'" in bad.stderr
