"""The SST video object segmentation model and its data, built on sst_triton.

``from models import SST, Propagator``. Imports are lazy so that ``models.mask_io`` and
the data code load without pulling in the model.
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
