"""What a user sees on stderr: one-line errors, without library noise around them."""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import TextIO

from absl import logging as absl_logging


def _closed_loop(line: str) -> bool:
    """A line of a closed-loop traceback (its frames, source lines or exception)."""
    return any(m in line for m in ("Event loop is closed", "in _check_closed",
                                   "in call_soon_threadsafe", "self._check_closed()"))


def one_line(e: BaseException) -> str:
    """The exception's message with all whitespace runs collapsed to single spaces."""
    return " ".join(str(e).split())


class _LibraryNoise(logging.Filter):
    """Orbax logs a traceback per failed background write, and asyncio again per unawaited
    write task (we report it once, in one line); TFDS warns that a dataset it is about to
    build has no dataset_info.json yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname:
            return False
        if record.name == "asyncio" and "/orbax/" in record.getMessage():
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
        if line.startswith("Traceback (most recent call last):"):
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
        # its lines says so, whichever line ended it
        if self._block and not any(_closed_loop(x) for x in self._block):
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
        # A traceback still open here is another thread's, cut off mid-print: hold it.
        if self._partial and self._block is None:
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def error(message: str) -> None:
    """The one line a user sees for a user error, written past any filtering."""
    sys.__stderr__.write(f"error: {' '.join(message.split())}\n")
    sys.__stderr__.flush()


def _filter_fd2() -> None:
    """Pass file descriptor 2 itself through the filter: tensorstore prints the closed-loop
    tracebacks from C, past sys.stderr. A thread forwards each line to the real stderr;
    `drain` (at exit, or before os._exit) lets it finish."""
    global _drain
    read_end, write_end = os.pipe()
    real = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    out = _DropClosedLoopTracebacks(os.fdopen(real, "w", buffering=1))

    def pump() -> None:
        with os.fdopen(read_end, errors="replace") as pipe:
            for line in pipe:
                out.write(line)
                out.flush()
        out.close_blocks()

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def drain() -> None:
        sys.stdout.flush()
        sys.__stderr__.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the thread reads to its end
        thread.join(timeout=5)

    _drain = drain
    atexit.register(drain)


_drain = None


def drain() -> None:
    """Forward what the stderr filter still holds; call before os._exit."""
    if _drain is not None:
        _drain()


def quiet_libraries() -> None:
    """Warnings and errors only from absl users (Orbax, TFDS log each file at INFO)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_LibraryNoise())
    sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
    _filter_fd2()
