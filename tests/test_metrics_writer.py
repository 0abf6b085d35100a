"""Writes on a failing disk (metrics, TensorBoard, checkpoints): one-line errors, never a hang
or a stray traceback."""
import sys
import threading

import pytest

from llm_jax import checkpoint, console, metrics


class _Full:
    def write(self, text):
        raise OSError(28, "No space left on device")

    def close(self):
        raise OSError(28, "No space left on device")


def test_a_failed_metrics_write_is_one_line_naming_the_workdir_and_step(tmp_path):
    writer = metrics.Writer(str(tmp_path))
    writer.write(1, "train", {"loss": 2.0})  # a good write first
    writer._jsonl.close()
    writer._jsonl = _Full()
    with pytest.raises(metrics.WriteError) as e:
        writer.write(2, "train", {"loss": 1.5})
    assert str(e.value) == (f"writing metrics to {tmp_path} at step 2 failed: [Errno 28] No "
                            "space left on device; the checkpoints written so far are intact")
    with pytest.raises(metrics.WriteError, match="No space left"):
        writer.close()


def test_a_stopped_tensorboard_thread_is_an_error_not_a_hang(tmp_path):
    """tensorboardX's writer thread dies on a full disk; add_scalar must not block on its
    queue (10 events by default: one record has more) and the next write must say so."""
    writer = metrics.Writer(str(tmp_path))
    writer.write(1, "train", {"loss": 2.0})
    writer._tb.file_writer.event_writer._worker.stop()  # as if an OSError had ended it
    many = {f"m{i}": float(i) for i in range(40)}
    done = []
    t = threading.Thread(target=lambda: done.append(_raises(writer.write, 2, "train", many)))
    t.start()
    t.join(timeout=30)
    assert done and "writer thread" in done[0] and "tensorboard" in done[0]


def _raises(fn, *args):
    try:
        fn(*args)
    except metrics.WriteError as e:
        return str(e)
    return "no error"


def test_thread_errors_from_tensorboardx_stay_quiet_and_others_print(monkeypatch):
    seen = []
    monkeypatch.setattr(console, "_THREAD_HOOK", seen.append)

    def args(filename):
        try:  # an OSError raised in a frame of `filename`
            exec(compile("raise OSError(28, 'No space left on device')", filename, "exec"))
        except OSError:
            exc = sys.exc_info()
        return threading.ExceptHookArgs([*exc, None])

    console._quiet_event_writer(args("/site-packages/tensorboardX/record_writer.py"))
    assert seen == []  # the main thread reports the full disk in one line
    other = args("/site-packages/somewhere/else.py")
    console._quiet_event_writer(other)
    assert seen == [other]


def test_closing_after_a_failed_save_raises_checkpoint_error_and_still_closes(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), 2, 0)
    closed = []
    real_close = ckpt.manager.close

    def fail(failed=[]):  # like Orbax: a failed save raises once
        if not failed:
            failed.append(True)
            raise ValueError("RESOURCE_EXHAUSTED: Error writing: No space left on device")

    ckpt.manager.wait_until_finished = fail
    ckpt.manager.close = lambda: (closed.append(True), real_close())
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        ckpt.close()
    assert closed == [True]
