"""Checkpoints: written atomically, read back into a model.

A checkpoint is a dict with at least ``"model"`` (state dict) and ``"config"`` (the run's
:class:`vos.config.RunConfig` as a dict, whose ``"model"`` section holds the keyword arguments
of :class:`models.SST`).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .files import atomic_write


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


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
        ``(model, config)``: the model in eval mode, and the run's :class:`RunConfig`.
    """
    from models import SST

    state = load_checkpoint(path, map_location)
    try:
        config = RunConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its configuration is not this version's ({err})") from None
    model = SST(**asdict(config.model))
    model.load_state_dict(state["model"])
    model.eval()
    return model, config
