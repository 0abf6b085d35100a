"""`python -m llm_jax.benchmark` and `benchmarks/ab_step.py` as a user runs them: the
table and the JSON the benchmark promises; the A/B script's overrides, output and errors."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from data_fixtures import data_cfg, tok  # noqa: F401  (session fixtures)

from llm_jax import config as config_lib
from llm_jax.data import tasks
from llm_jax.overrides import UserError

# LLVM at -O0 in the benchmark processes too: a few tiny steps, so compiling dominates
# (22.5 s -> 14.3 s for the CLI run below); these tests check outputs, not speed
FAST = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
        + " --xla_backend_optimization_level=0"}


def test_benchmark_cli_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "llm_jax.benchmark", "--config", "configs/tiny.py", "--steps", "3",
         "--warmup", "1", "--json", str(out), "--profile", str(tmp_path / "prof"),
         # an input pipeline that cannot run costs its own row, not the step's figures
         "--config.data.name=absent_ds", f"--config.data.data_dir={tmp_path / 'nodata'}"],
        capture_output=True, text=True, timeout=300, env=FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MFU" in r.stdout and "train tokens/s (median)" in r.stdout
    res = json.loads(out.read_text())
    for key in ("tokens_per_sec", "mfu", "step_time_median_s", "compile_s", "peak_host_mem_mb"):
        assert res[key] > 0, key
    assert (res["steps"], res["warmup_steps"]) == (3, 1)
    # XLA's temporaries per device, which each step allocates and frees again
    assert 0 < res["step_temp_mb"] < res["peak_host_mem_mb"]
    assert re.search(r"step temporaries per device \(MB\) +\d", r.stdout), r.stdout
    assert "'absent_ds' is not prepared" in res["pipeline_error"]
    assert re.search(r"input pipeline +not measured: dataset 'absent_ds'", r.stdout), r.stdout
    # the first step's time holds initializing, compiling and running it
    assert res["init_s"] > 0 and res["first_step_s"] > res["init_s"] + res["compile_s"]
    tokens_per_step = res["batch_size"] * res["seq_len"]
    step_tokens = res["tokens_per_sec"] * res["step_time_median_s"]
    assert abs(step_tokens - tokens_per_step) < 1e-6 * tokens_per_step
    # MFU = tokens/s x model FLOPs per token / peak (tiny.py gives its peak: 1e11)
    assert res["peak_flops"] == 1e11 and res["peak_source"] == "config"
    assert abs(res["mfu"] - res["tokens_per_sec"] * res["model_flops_per_token"] / 1e11) < 1e-9
    assert res["step_time_min_s"] <= res["step_time_median_s"] <= res["step_time_max_s"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "prof"]  # no temporary
    assert list((tmp_path / "prof").rglob("*.xplane.pb"))  # the profiler's trace
    # and the traced steps' time by op scope: 3 executions on 8 devices (conftest), with
    # the model's layers, the LM head and loss, and the optimizer among the scopes
    assert "time by op scope" in r.stdout and res["profile_step_s"] > 0
    assert (res["profile_runs"], res["profile_devices"]) == (3, 8)
    scopes = [row["scope"] for row in res["profile_ops"]]
    assert abs(sum(row["share"] for row in res["profile_ops"]) - 1) < 1e-6
    for part in ("DecoderLM/decoder/layers/", "lm_head_loss ", "optimizer "):
        assert any(s.startswith(part) for s in scopes), (part, scopes)


def test_benchmark_cli_refuses_bad_flags_in_one_line_before_compiling(tmp_path):
    """Mistakes that would otherwise surface after minutes of compiling and timing."""
    (tmp_path / "file").write_text("x")
    cmd = [sys.executable, "-m", "llm_jax.benchmark"]
    for args, says in ((["--config", "configs/tiny.py", "--steps", "0"], "--steps=0"),
                       (["--config", "configs/tiny.py", "--json", str(tmp_path / "no" / "o.json")],
                        "does not exist"),
                       (["--config", "configs/tiny.py", "--profile", str(tmp_path / "file")],
                        "not a directory"),
                       (["--config", "configs/tiny.py", "--config.train.stepz=3"], "train.steps"),
                       (["--config", "configs/no_such.py"], "no such file"),
                       (["--steps", "3"], "--config=configs/NAME.py is needed")):
        r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and says in lines[-1], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "compiling" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("family,objective", [("encoder", "mlm"),
                                              ("encoder_decoder", "span_corruption")])
def test_pipeline_alone_is_timed_for_every_family(data_cfg, tok, family, objective):  # noqa: F811
    # what the benchmark's pipeline row runs, for the families beyond the decoder
    c = config_lib.load_file("configs/tiny.py")
    c.data.update(data_cfg.to_dict())
    c.model.family, c.task.objective = family, objective
    assert tasks.throughput(c, tok, 1000, seconds=0.5) > 0


def test_benchmarked_step_runs_dropout_when_the_config_has_it():
    # the same initial state and batch: only dropout can make the two losses differ
    from llm_jax import trainer
    losses = []
    for rate in (0.0, 0.5):
        c = config_lib.load_file("configs/tiny.py")
        c.model.dropout = rate
        step = trainer.compile_train_step(c)
        losses.append(float(step.compiled(step.state, step.batch)[1]["loss"]))
    assert losses[0] != losses[1], losses


def test_mfu_counts_the_higher_of_the_peaks_measured_before_and_after_the_steps():
    """A shared VM slowed while its CPU peak was measured read MFU 119.5%: the peak is
    measured on both sides of the timed steps, and the higher one counts. (In a process of
    its own: llm_jax.benchmark defines absl flags that llm_jax.train, which another test
    file may have imported into this worker, defines too.)"""
    code = """
import json
from llm_jax import benchmark, config, metrics
peaks = [(3e11, "measured before"), (1e11, "measured after")]
metrics.peak_flops = lambda configured, dtype: peaks.pop(0)
res = benchmark.benchmark(config.load_file("configs/tiny.py"), steps=1, pipeline=False, warmup=0)
print(json.dumps({"left": len(peaks), **{k: res[k] for k in (
    "peak_flops", "peak_source", "mfu", "tokens_per_sec", "model_flops_per_token")}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["left"] == 0  # both measured
    assert (res["peak_flops"], res["peak_source"]) == (3e11, "measured before")
    assert res["mfu"] == pytest.approx(res["tokens_per_sec"] * res["model_flops_per_token"] / 3e11)


def _ab_step():
    spec = importlib.util.spec_from_file_location("ab_step", "benchmarks/ab_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_step_overrides_are_typed_and_checked():
    ab = _ab_step()
    c = ab.with_overrides(config_lib.load_file("configs/tiny.py"),
                          ["model.document_mask=false", "model.num_layers=1",
                           "model.activation=relu", "optim.learning_rate=0.5"])
    assert (c.model.document_mask, c.model.num_layers, c.model.activation) == (False, 1, "relu")
    assert c.optim.learning_rate == 0.5 and isinstance(c.model.num_layers, int)
    for bad, says in (("model.num_layrs=1", r"unknown key; closest valid keys: .*num_layers"),
                      ("model.activation.e=1", "unknown key"),
                      ("model=1", "unknown key"),
                      ("model.document_mask=flase", "model.document_mask='flase': expected true"),
                      ("model.num_layers=1.5", "model.num_layers='1.5': expected int"),
                      ("model.num_layers=true", "expected int"),
                      ("model.document_mask", "expected KEY=VALUE")):
        with pytest.raises(UserError, match=says):
            ab.with_overrides(config_lib.load_file("configs/tiny.py"), [bad])


def test_ab_step_cli_times_both_builds():
    # a script's sys.path starts at benchmarks/: find llm_jax here even when not installed
    env = {**FAST, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "benchmarks/ab_step.py", "--config", "configs/tiny.py",
                        "--b", "model.num_layers=1", "--rounds", "2", "--steps", "2"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"B: model.num_layers=1; parameters A ([\d,]+), B ([\d,]+)\n"
                  r"A [\d,]+, B [\d,]+ tokens/s \(medians of 4 steps\); B [+-][\d.]+% vs\. A "
                  r"\(middle half of the rounds: [+-][\d.]+% to [+-][\d.]+%\)", r.stdout)
    assert m, r.stdout
    a, b = (int(x.replace(",", "")) for x in m.groups())
    assert b < a  # B got its override: one layer instead of tiny.py's two


@pytest.mark.parametrize("args, says", [
    (["--xla", "xla_cpu_no_such_option=true"], "xla_cpu_no_such_option"),
    (["--b", "model.activation=relux"], "relux"),
    (["--rounds", "3"], "even number"),
    (["--xla", "xla_gpu_enable_triton_gemm=false"], "a GPU option"),
    (["--xla", "--xla_cpu_ftz=true"], "--xla xla_cpu_ftz=true"),
    (["--config", "configs/no_such.py"], "no such file")])
def test_ab_step_cli_refuses_bad_options_in_one_line(args, says, monkeypatch, capsys):
    ab = _ab_step()
    monkeypatch.setattr(sys, "argv", ["ab_step.py", "--config", "configs/tiny.py"] + args)
    with pytest.raises(SystemExit) as e:  # any other exception fails the test
        ab.main()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and says in last, last
