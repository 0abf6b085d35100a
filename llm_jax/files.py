"""Whole-or-nothing file writes: a reader, or a rerun after a kill, never sees half a file."""
from __future__ import annotations

import contextlib
import os
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
