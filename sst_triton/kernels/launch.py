"""How every kernel is launched: one problem description, one runner, CUDA's grid limits.

A pattern's kernel module exposes ``launch_forward`` / ``launch_backward`` (found through
the explicit tables :data:`sst_triton.kernels.FORWARD` and :data:`~sst_triton.kernels.BACKWARD`);
each turns a :class:`Problem` into a launch grid and an argument list and hands them to
:func:`run`, which

- checks the grid of every configuration that may run against CUDA's limits (axis x
  below 2**31, axes y and z at most 65,535) and raises a ``ValueError`` naming the sizes
  before any work: the interpreter checks neither, so without this a CPU test would pass
  a launch that a GPU refuses;
- runs the kernel: autotuned when compiled, one configuration in Triton's interpreter (the
  first of its list, or the one a test forces with ``config=``);
- reports the grid to :func:`capture_grids`, so that a test can see what a launcher would
  launch (``launch=False`` skips the run itself: shapes too large for the interpreter).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..patterns import Pattern
from . import _common

# CUDA's limits on a launch grid: blockIdx.x < 2**31, blockIdx.y and .z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Problem:
    """The sizes of one call, as every launcher needs them.

    ``q`` is ``(B, N, T_q, H, W, D)``; ``k``, ``v`` are ``(B, N_kv, T, H, W, D)``. Query head
    ``n`` reads key/value head ``n // group``; query frame ``i`` is the absolute frame
    ``t_off + i`` (the query block is aligned to the end of the keys, SPEC.md version 2).
    """

    B: int
    N: int
    N_kv: int
    T_q: int
    T: int
    H: int
    W: int
    D: int
    pattern: Pattern
    num_obj: int = 0
    dilation: tuple[int, int, int] = (1, 1, 1)

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, pattern: Pattern, num_obj: int = 0,
           dilation: tuple[int, int, int] = (1, 1, 1)) -> "Problem":
        B, N, T_q, H, W, D = q.shape
        return cls(B, N, k.shape[1], T_q, k.shape[2], H, W, D, pattern, num_obj, tuple(dilation))

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.N // self.N_kv

    @property
    def t_off(self) -> int:
        """Absolute frame of query frame 0."""
        return self.T - self.T_q

    @property
    def S(self) -> int:
        """Key cells per batch-head."""
        return self.T * self.H * self.W

    @property
    def S_q(self) -> int:
        """Query cells per batch-head."""
        return self.T_q * self.H * self.W

    @property
    def is_plain(self) -> bool:
        """No version-2 addition: one key head per query head, every frame a query, no dilation."""
        return self.N_kv == self.N and self.T_q == self.T and self.dilation == (1, 1, 1)


Grid = tuple[int, ...]
_CAPTURES: list[list] = []
_DRY_RUN: list[bool] = []


@contextlib.contextmanager
def capture_grids(launch: bool = True) -> Iterator[list[tuple[str, Grid]]]:
    """Record ``(kernel name, grid)`` of every launch inside the block.

    With ``launch=False`` the kernels are not run (outputs stay uninitialised): for shapes
    whose grids matter but which the interpreter could not run in a test's time.
    """
    seen: list[tuple[str, Grid]] = []
    _CAPTURES.append(seen)
    _DRY_RUN.append(not launch)
    try:
        yield seen
    finally:
        _CAPTURES.pop()
        _DRY_RUN.pop()


def check_grid(name: str, grid: Grid, sizes: str = "") -> None:
    """Raise a ``ValueError`` if CUDA would refuse ``grid``."""
    for axis, (extent, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if extent > limit:
            raise ValueError(
                f"{name}: launch grid {tuple(grid)} exceeds CUDA's limit of {limit} on axis {'xyz'[axis]}"
                + (f" ({sizes})" if sizes else "")
            )


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def run(
    module,
    kernel_name: str,
    grid: Callable[[dict], Grid],
    args: tuple,
    meta: dict,
    *,
    interpret: bool,
    configs: list,
    config=None,
    sizes: str = "",
) -> None:
    """Launch ``module.<kernel_name>`` (or its interpreted twin on CPU tensors).

    Args:
        grid: the launch grid as a function of the configuration's meta-parameters.
        args: the kernel's runtime arguments; meta: its constexprs except the tuned ones.
        interpret: run in Triton's interpreter (CPU tensors).
        configs: the configurations the kernel's autotuner may pick.
        config: force one configuration (tests run every configuration this way); by
            default the interpreter runs ``configs[0]`` and CUDA autotunes.
        sizes: the problem's sizes, quoted by a grid-limit error.
    """
    candidates = [config] if config is not None else (configs[:1] if interpret else list(configs))
    grids = [tuple(grid({**meta, **c.kwargs})) for c in candidates]
    for g in grids:
        check_grid(kernel_name, g, sizes)
    if _CAPTURES:
        _CAPTURES[-1].extend((kernel_name, g) for g in grids)
        if _DRY_RUN[-1]:
            return
    if math.prod(grids[0]) == 0:
        return
    kernel = getattr(module, kernel_name)
    if interpret:
        chosen = config if config is not None else configs[0]
        _common.interpreted(kernel)[grid](*args, **meta, **chosen.kwargs)
    elif config is not None:
        kernel[grid](*args, **meta, **config.all_kwargs())
    else:
        getattr(module, kernel_name + "_tuned")[grid](*args, **meta)


def require_plain(problem: Problem, kernel: str) -> None:
    """Refuse a version-2 problem in a kernel that does not take it yet."""
    if not problem.is_plain:
        raise ValueError(
            f"the {kernel} Triton kernels do not take grouped key/value heads, fewer query frames or "
            f"dilation yet (N={problem.N}, N_kv={problem.N_kv}, T_q={problem.T_q}, T={problem.T}, "
            f"dilation={problem.dilation}); use backend='torch'"
        )
