"""The SST video object segmentation model, built on sst_triton.

``from models import SST, Propagator``. Imports are lazy so that ``import models.efficientnet``
or ``models.label_propagation`` does not build the whole model. The data, metrics, validation
and training around the model live in :mod:`vos`.
"""
from __future__ import annotations

__all__ = ["SST", "Propagator"]


def __getattr__(name: str):
    if name == "SST":
        from .sst import SST

        return SST
    if name == "Propagator":
        from .propagator import Propagator

        return Propagator
    raise AttributeError(f"module 'models' has no attribute {name!r}")
