"""The one atomic-write helper: every file this project writes goes through it."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it over ``path``.

    A reader (or a run killed at any instant) sees either the old file or the new one,
    never a half-written one; the temp file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def json_safe(obj: Any) -> Any:
    """NaN/inf -> null, tuples -> lists: the file stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented standard JSON at ``path``, atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")
