"""What a user sees on stderr: one-line errors, without library noise around them."""
from __future__ import annotations

import logging
import sys
from typing import TextIO

from absl import logging as absl_logging

CLOSED_LOOP = "RuntimeError: Event loop is closed"


def one_line(e: BaseException) -> str:
    """The exception's message with all whitespace runs collapsed to single spaces."""
    return " ".join(str(e).split())


class _LibraryNoise(logging.Filter):
    """Orbax logs a traceback per failed background write (we report it once, in one
    line); TFDS warns that a dataset it is about to build has no dataset_info.json yet."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname:
            return False
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
                if line.strip() != CLOSED_LOOP:
                    self._stream.write("".join(self._block))
                self._block = None
        else:
            self._stream.write(line)

    def _flush_block(self) -> None:
        if self._block:
            self._stream.write("".join(self._block))
        self._block = None

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


def quiet_libraries() -> None:
    """Warnings and errors only from absl users (Orbax, TFDS log each file at INFO)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_LibraryNoise())
    sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
