"""Triton kernels of sparse spatiotemporal attention.

Every kernel module (``grid_fwd``, ``local_fwd``, ``strided_fwd``, ...) defines:

- its ``@triton.jit`` kernel(s) and ``CONFIGS``, the short list of ``triton.Config``
  the autotuner may pick (the first one is the one the interpreter runs);
- ``AOT_SPECS``: a list of :class:`~sst_triton.kernels._common.AotSpec`, one per
  kernel, with a representative signature, so that ``python -m sst_triton.aot``
  compiles every configuration for sm_80 and sm_90a without a GPU;
- ``launch_forward`` (forward modules) or ``launch_backward`` (backward modules): the
  launcher, which turns a :class:`~sst_triton.kernels.launch.Problem` into a grid and
  arguments and hands them to :func:`sst_triton.kernels.launch.run`.

:data:`FORWARD` and :data:`BACKWARD` map a pattern kind to its launchers: that table, not a
chain of ``if`` statements, is how :mod:`sst_triton.triton_path` and
:mod:`sst_triton.kernels.backward` find a pattern's kernels.

To register a new kernel module (e.g. a backward ``sst_triton/kernels/local_bwd.py``)
with the AOT check, define ``AOT_SPECS`` in it and add its name to ``KERNEL_MODULES``
below: that one-line edit is all ``aot.py`` needs.
"""
from __future__ import annotations

import importlib

from . import grid_bwd, grid_fwd, local_bwd, local_fwd, strided_bwd, strided_fwd
from ._common import AotSpec, interpreted
from .launch import Problem, capture_grids

KERNEL_MODULES = [
    "strided_fwd",
    "local_fwd",
    "grid_fwd",
    "strided_bwd",
    "local_bwd",
    "grid_bwd",
]


FORWARD = {
    "strided": strided_fwd.launch_forward,
    "local": local_fwd.launch_forward,
    "grid": grid_fwd.launch_forward,
}
BACKWARD = {
    "strided": strided_bwd.launch_backward,
    "local": local_bwd.launch_backward,
    "grid": grid_bwd.launch_backward,
}


def aot_specs() -> list[AotSpec]:
    """Every registered kernel's :class:`AotSpec`, in ``KERNEL_MODULES`` order."""
    specs: list[AotSpec] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        specs.extend(module.AOT_SPECS)
    return specs


__all__ = ["AotSpec", "BACKWARD", "FORWARD", "KERNEL_MODULES", "Problem", "aot_specs", "capture_grids", "interpreted"]
