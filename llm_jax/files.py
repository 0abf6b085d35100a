"""Whole-or-nothing file writes: a reader, or a rerun after a kill, never sees half a file."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes data beside `path` under a unique temporary name, then renames it over `path`
    (atomic on POSIX); on any error the temporary file is removed and `path` is untouched."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # unique: processes may write the same path
    try:
        with open(tmp, "xb" if isinstance(data, bytes) else "x") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def unwritable(path: str, directory: bool = False) -> str | None:
    """Why a file cannot be written at `path` (with `directory`: into the directory `path`,
    made if missing), or None. Found by trying: os.access says yes to root even on /proc."""
    try:
        if directory:
            if os.path.exists(path) and not os.path.isdir(path):
                return "it is a file, not a directory"
            os.makedirs(path, exist_ok=True)
            where = path
        else:
            if os.path.isdir(path):
                return "it is a directory"
            where = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(where):
                return f"{where} does not exist"
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None
