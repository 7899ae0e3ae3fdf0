"""Checkpoints: written atomically, read back into a model.

A checkpoint is a dict with at least ``"model"`` (state dict) and ``"config"`` (the run's
configuration, whose ``"model"`` entry holds the keyword arguments of :class:`SST`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory, fsync, then rename over ``path``.

    A reader (or a run killed at any instant) sees either the old file or the new one,
    never a half-written one.
    """
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


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint of this project.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # RNG states and the optimizer are plain tensors/containers: no code is unpickled
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not a checkpoint of this project (expected keys 'model' and 'config')")
    return state


def load_model(path: str | os.PathLike, map_location: Any = "cpu"):
    """Build the model a checkpoint was trained with and load its weights.

    Returns:
        ``(model, config)``: the model in eval mode, and the run's configuration dict.
    """
    from . import SST

    state = load_checkpoint(path, map_location)
    config = state["config"]
    model = SST(**config["model"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, config
