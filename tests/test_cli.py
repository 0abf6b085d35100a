"""Config overrides from the command line, and their one-line errors (exit code 2)."""
import subprocess
import sys

import pytest

from llm_jax import config as config_lib


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "llm_jax.train", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override,needle", [
    ("--config.train.stepz=5", "train.steps"),
    ("--config.modle.d_model=8", "model.d_model"),
    ("--config.train.steps=abc", "expected int"),
    ("--config.train.steps=1.5", "expected int"),
    ("--config.optim.learning_rate=fast", "expected float"),
    ("--config.model.scan_layers=maybe", "true or false"),
])
def test_bad_overrides_fail_in_one_line(tmp_path, override, needle):
    r = cli("--config=configs/tiny.py", f"--workdir={tmp_path}", override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("override,needle", [
    ("--config.model.activation=tanh", "model.activation"),
    ("--config.train.batch_size=-4", "train.batch_size"),
    ("--config.mesh.data=3", "needs 3 devices"),
    ("--config.train.microbatches=3", "microbatches"),
    ("--config.mesh.fsdp=-1", "more than one size of -1"),
])
def test_bad_values_fail_in_one_line(tmp_path, override, needle):
    r = cli("--config=configs/tiny.py", f"--workdir={tmp_path}", override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_missing_config_file_is_one_line(tmp_path):
    r = cli("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "configs/nope.py" in r.stderr and "Traceback" not in r.stderr


def test_closest_keys_suggests_neighbours():
    hint = config_lib.closest_keys("train.batchsize", config_lib.base_config())
    assert "train.batch_size" in hint


def test_validate_accepts_every_shipped_config():
    import importlib.util
    import pathlib
    paths = sorted(pathlib.Path("configs").glob("*.py"))
    assert len(paths) >= 4
    for path in paths:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        c = mod.get_config()
        config_lib.validate(c)
        assert path.read_text().lstrip().startswith('"""'), path
        head = path.read_text()[:1500]
        assert "Command:" in head and "Runtime:" in head and "Expected:" in head, path


def test_stderr_filter_drops_only_closed_loop_tracebacks():
    import io

    from llm_jax import console
    out = io.StringIO()
    f = console._DropClosedLoopTracebacks(out)
    noise = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
             "    g()\nRuntimeError: Event loop is closed\n")
    real = "Traceback (most recent call last):\n  File \"y.py\", line 2\nValueError: bad\n"
    f.write("line one\n" + noise + real[:30])
    f.write(real[30:] + "error: the one line\n")
    f.flush()
    assert out.getvalue() == "line one\n" + real + "error: the one line\n"


def test_asyncio_reports_of_failed_checkpoint_writes_are_dropped():
    """asyncio logs a failed Orbax write's futures again when they are collected: by the
    checkpoint's temporary path in the message, or by Orbax frames in the exception; other
    asyncio errors pass."""
    import logging
    import sys

    from llm_jax import console

    def record(msg, exc_info=None):
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1771, msg, (),
                                 exc_info)

    def orbax_error():  # an exception raised in a frame of Orbax's code
        try:
            exec(compile("raise ValueError('RESOURCE_EXHAUSTED')",
                         "/site-packages/orbax/checkpoint/x.py", "exec"))
        except ValueError:
            return sys.exc_info()

    keep = console._LibraryNoise().filter
    assert not keep(record("_GatheringFuture exception was never retrieved\nfuture: <exception="
                           "ValueError('Error writing \"w/checkpoints/20.orbax-checkpoint-tmp/"
                           "state\": No space left on device')>"))
    assert not keep(record("Task exception was never retrieved", orbax_error()))
    assert keep(record("Task exception was never retrieved\nfuture: <ValueError('bad')>"))


def test_stderr_filter_drops_closed_loop_fragments_interleaved_within_lines():
    """Several C threads print closed-loop tracebacks at once: their lines interleave
    mid-line and arrive in pieces; no piece of them gets through, progress redraws do."""
    import io

    from llm_jax import console
    out = io.StringIO()
    f = console._DropClosedLoopTracebacks(out)
    for piece in ("self._check", "_closed()\n", "    RuntimeError        RuntimeError    : \n",
                  "Traceback (most recent call last):\n", "\n", "    Traceback (most recent ",
                  "call last):\n",
                  "Event loop is closed    raise RuntimeError('Ev", "ent loop is closed')\n",
                  ": Event loop", " is closed\n", "RuntimeError",
                  "Traceback (most recent call last):\n", "\r 10%|#"):
        f.write(piece)
        f.flush()  # the filter process flushes after every read
    f.write("\r 20%|##\nerror: the one line\n")
    f.close_blocks()
    assert out.getvalue() == "\r 10%|#\r 20%|##\nerror: the one line\n"


def test_stderr_filter_holds_a_traceback_cut_off_by_exit():
    import io

    from llm_jax import console
    out = io.StringIO()
    f = console._DropClosedLoopTracebacks(out)
    f.write("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n")
    f.flush()  # another thread was still printing it when the process decided to exit
    assert out.getvalue() == ""
    f.close_blocks()  # at the end of all output a cut-off traceback with a frame is written
    assert out.getvalue() == "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
    lone = io.StringIO()
    f = console._DropClosedLoopTracebacks(lone)
    f.write("Traceback (most recent call last):\n")
    f.close_blocks()  # a header alone, its writer gone before the first frame, says nothing
    assert lone.getvalue() == ""


def test_fd2_filter_process_drops_closed_loop_tracebacks_from_c_and_keeps_the_rest():
    """Writes straight to file descriptor 2 (as C code does) go through the filter process:
    closed-loop tracebacks, even interleaved, are dropped; a real traceback, carriage-return
    progress and the one-line error arrive, also after os._exit."""
    import subprocess
    import sys
    code = r"""
import os
from llm_jax import console
console.quiet_libraries()
noise = ("Traceback (most recent call last):\n"
         "  File \"base_events.py\", line 806, in call_soon_threadsafe\n"
         "    self._check_closed()\n")
os.write(2, noise.encode())
os.write(2, noise.encode() + b"RuntimeError: Event loop is closed\n")
os.write(2, b"\r 10%|#\r 20%|##\n")
os.write(2, b"Traceback (most recent call last):\n  File \"y.py\", line 2\nValueError: bad\n")
console.error("saving checkpoint 10 failed: Event loop is closed")
os._exit(4)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    err = r.stderr.decode()  # bytes: text mode would turn "\r" into "\n"
    assert r.returncode == 4
    assert "call_soon_threadsafe" not in err and "_check_closed" not in err
    assert "\r 10%|#\r 20%|##\n" in err
    assert "Traceback (most recent call last):\n  File \"y.py\", line 2\nValueError: bad\n" in err
    assert "error: saving checkpoint 10 failed: Event loop is closed\n" in err
