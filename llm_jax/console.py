"""What a user sees on stderr: one-line errors, without library noise around them."""
from __future__ import annotations

import codecs
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from typing import TextIO

from absl import logging as absl_logging

_HEADER = "Traceback (most recent call last):"


_LOOP_WORDS = {"RuntimeError", ":", "Event", "loop", "is", "closed"}


def _closed_loop(line: str) -> bool:
    """A line of a closed-loop traceback (its frames, source lines or exception), or, where
    several threads' tracebacks interleave within a line, only fragments of its last line."""
    if any(m in line for m in ("Event loop is closed", "in _check_closed",
                               "in call_soon_threadsafe", "self._check_closed()")):
        return True
    words = line.replace(":", " : ").split()
    return bool(words) and set(words) <= _LOOP_WORDS


def one_line(e: BaseException) -> str:
    """The exception's message with all whitespace runs collapsed to single spaces."""
    return " ".join(str(e).split())


def _checkpoint_write(record: logging.LogRecord) -> bool:
    """Whether an asyncio record is about an Orbax write: its message (the future, with the
    checkpoint's temporary path) or its exception's frames name Orbax."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += "".join(traceback.format_exception(*record.exc_info))
    return "/orbax/" in text or ".orbax-checkpoint-tmp" in text


class _LibraryNoise(logging.Filter):
    """Orbax logs a traceback per failed background write, and asyncio again per unawaited
    write task (we report it once, in one line); TFDS warns that a dataset it is about to
    build has no dataset_info.json yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname:
            return False
        if record.name == "asyncio" and _checkpoint_write(record):
            return False  # a failed write's unawaited tasks, reported again when collected
        return not ("tensorflow_datasets" in record.pathname
                    and "has no dataset_info.json" in record.getMessage())


class _DropClosedLoopTracebacks:
    """After a failed async checkpoint write, tensorstore callbacks aimed at Orbax's closed
    event loop print one traceback each, from C, while training goes on. They carry
    nothing the one-line checkpoint error does not; every other traceback passes."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._block: list[str] | None = None
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line + "\n")
        return len(text)

    def _line(self, line: str) -> None:
        at = line.find(_HEADER)
        if at > 0:  # another thread's fragment, then a header, within one line: judge apart
            self._line(line[:at] + "\n")
            line = line[at:]
        if not line.strip():
            return
        if self._block == [_HEADER + "\n"] and not line.startswith((" ", "\t")):
            self._block = None  # a header whose frames never came (its writer was cut off)
        if line.startswith(_HEADER):
            self._flush_block()
            self._block = [line]
        elif self._block is not None:
            self._block.append(line)
            if not line.startswith((" ", "\t")):  # the exception line ends the block
                self._flush_block()
        elif not _closed_loop(line):  # lines of a block another thread cut in on
            self._stream.write(line)

    def _flush_block(self) -> None:
        # two threads' tracebacks can interleave: a block is the closed loop's if any of
        # its lines says so, whichever line ended it; a lone header (its writer exited or
        # was cut off before the first frame) says nothing
        if (self._block and len(self._block) > 1
                and not any(_closed_loop(x) for x in self._block)):
            self._stream.write("".join(self._block))
        self._block = None

    def close_blocks(self) -> None:
        """At the end of all output: a traceback still open is written unless it is the
        closed loop's."""
        if self._partial:
            self._line(self._partial + "\n")
            self._partial = ""
        self._flush_block()
        self._stream.flush()

    def flush(self) -> None:
        # Hold a traceback still open here (another thread's, cut off mid-print) and a
        # partial line unless it redraws a progress bar ("\r"): threads writing from C
        # interleave closed-loop fragments that only a whole line shows to be noise
        if (self._partial and self._block is None and "\r" in self._partial
                and not _HEADER.startswith(self._partial[:len(_HEADER)])
                and not _closed_loop(self._partial)):
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_REAL_FD: int | None = None  # the real stderr, once fd 2 goes through the filter process
_FILTER: subprocess.Popen | None = None


def error(message: str) -> None:
    """The one line a user sees for a user error, written past any filtering."""
    line = f"error: {' '.join(message.split())}\n"
    sys.__stderr__.flush()
    if _REAL_FD is None:
        sys.__stderr__.write(line)
        sys.__stderr__.flush()
    else:  # straight to the real stderr: a traceback the filter holds cannot swallow it
        os.write(_REAL_FD, line.encode(errors="replace"))


def _filter_main() -> None:
    """The filter process: stdin (the parent's fd 2) to stdout (the real stderr) until
    every writer has gone. It outlives a crashed parent, so its last words still arrive."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the parent decides
        signal.signal(sig, signal.SIG_IGN)
    out = _DropClosedLoopTracebacks(open(1, "w", errors="replace", closefd=False))
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    while chunk := os.read(0, 1 << 16):
        try:
            out.write(decode(chunk))  # "\r" passes through: progress bars keep redrawing
            out.flush()
        except OSError:  # the real stderr is gone: keep reading, or the parent would block
            pass
    try:
        out.close_blocks()
    except OSError:
        pass


def _filter_fd2() -> None:
    """Pass file descriptor 2 itself through the filter: tensorstore prints the closed-loop
    tracebacks from C, past sys.stderr. A small child process does the filtering."""
    global _REAL_FD, _FILTER
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all
        return
    read_end, write_end = os.pipe()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # importable as here
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p), LLM_JAX_MALLOC="0")
    _FILTER = subprocess.Popen(
        [sys.executable, "-c", "from llm_jax import console; console._filter_main()"],
        stdin=read_end, stdout=real, stderr=subprocess.DEVNULL, env=env)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _REAL_FD = real


def _quiet_event_writer(args: threading.ExceptHookArgs) -> None:
    """tensorboardX's writer thread dies printing its OSError (a full disk); the main thread
    then reports it in one line (metrics.WriteError). Other threads' errors print as usual."""
    frames = traceback.extract_tb(args.exc_traceback)
    if not (issubclass(args.exc_type, OSError)
            and any("/tensorboardX/" in f.filename for f in frames)):
        _THREAD_HOOK(args)


_THREAD_HOOK = threading.excepthook


def quiet_libraries() -> None:
    """Warnings and errors only from absl users (Orbax, TFDS log each file at INFO)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_LibraryNoise())
    threading.excepthook = _quiet_event_writer
    _filter_fd2()
    if _REAL_FD is None:  # fd 2 is not filtered: filter at least what Python writes
        sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
