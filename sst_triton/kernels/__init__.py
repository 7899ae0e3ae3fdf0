"""Triton kernels of sparse spatiotemporal attention.

Every kernel module (``grid_fwd``, ``local_fwd``, ``strided_fwd``, ...) defines:

- its ``@triton.jit`` kernel(s) and ``CONFIGS``, the short list of ``triton.Config``
  the autotuner may pick (the first one is the one the interpreter runs);
- ``AOT_SPECS``: a list of :class:`~sst_triton.kernels._common.AotSpec`, one per
  kernel, with a representative signature, so that ``python -m sst_triton.aot``
  compiles every configuration for sm_80 and sm_90a without a GPU.

To register a new kernel module (e.g. a backward ``sst_triton/kernels/local_bwd.py``)
with the AOT check, define ``AOT_SPECS`` in it and add its name to ``KERNEL_MODULES``
below: that one-line edit is all ``aot.py`` needs.
"""
from __future__ import annotations

import importlib

from ._common import AotSpec, interpreted

KERNEL_MODULES = [
    "strided_fwd",
    "local_fwd",
    "grid_fwd",
    "strided_bwd",
    "local_bwd",
    "grid_bwd",
]


def aot_specs() -> list[AotSpec]:
    """Every registered kernel's :class:`AotSpec`, in ``KERNEL_MODULES`` order."""
    specs: list[AotSpec] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        specs.extend(module.AOT_SPECS)
    return specs


__all__ = ["AotSpec", "KERNEL_MODULES", "aot_specs", "interpreted"]
