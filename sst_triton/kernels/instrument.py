"""Count the work a kernel issues by running it in Triton's interpreter with the builder instrumented.

Nothing here can time a kernel, but the work it issues can be counted exactly: every
``tl.dot``, every ``exp``/``exp2`` and every load (with its mask and addresses) goes through
one object, :data:`triton.runtime.interpreter.interpreter_builder`, while a kernel runs in
the interpreter. :func:`instrumented` wraps six of its methods and the interpreter's
``GridExecutor`` (one call per launch: the kernel's name and its grid), and books what each
launch issues in a :class:`~sst_triton.kernels.work.Work`, following the counting rules of
:mod:`sst_triton.kernels.work`:

- ``exp``: ``arg.size`` of every ``create_exp`` / ``create_exp2`` (masked lanes included);
- ``dot_flops``: ``2 * M * N * K`` of every ``create_dot`` (``[M, K] x [K, N]``, padding included);
- ``load_bytes``: lanes whose mask is true (every lane of an unmasked ``create_load``) times
  the element size of the pointer;
- ``distinct_bytes``: the distinct byte addresses among those lanes over the launch (times
  the element size);
- ``programs``: the product of the launch grid;
- ``store_bytes``: lanes whose mask is true (every lane of an unmasked ``create_store``,
  which goes through ``create_masked_store``) times the element size of the pointer.

Each launch is booked separately and named by its kernel, so a backward's ``dQ`` and
``dK/dV`` kernels are told apart, or its fused ``dQ + dK/dV`` kernels grouped
(:func:`count_backward`). ``PyTorch`` work around the
kernels (``Delta``, allocation) is not counted: it is not kernel work.

Also here: :func:`useful_pairs` (the pattern's ``sum_p |I_p|``, the denominator of ``E``) and
:func:`table` / ``python -m sst_triton.kernels.instrument``, the E/L table of issue 11.

Relies on triton 3.x's interpreter internals (``InterpreterBuilder.create_*``,
``GridExecutor.__call__``; checked with 3.9).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
import triton.language as tl

from ..patterns import Pattern, connectivity
from .launch import Problem
from .work import Work

# compact the address log of a launch once it holds this many addresses
_COMPACT_AT = 1 << 22


@dataclass
class Launch:
    """One interpreted kernel launch and the work it issued."""

    name: str
    grid: tuple[int, int, int] = (1, 1, 1)
    work: Work = field(default_factory=Work)
    # element size -> list of uint64 address arrays (compacted with np.unique as they grow)
    _addresses: dict = field(default_factory=dict, repr=False)
    _pending: int = field(default=0, repr=False)

    def _add_addresses(self, size: int, addresses: np.ndarray) -> None:
        chunks = self._addresses.setdefault(size, [])
        chunks.append(addresses)
        self._pending += addresses.size
        if self._pending >= _COMPACT_AT:
            for s, parts in self._addresses.items():
                self._addresses[s] = [np.unique(np.concatenate(parts))]
            self._pending = 0

    def _finish(self) -> None:
        distinct = 0
        for size, parts in self._addresses.items():
            if parts:
                distinct += size * int(np.unique(np.concatenate(parts)).size)
        self.work.distinct_bytes = distinct
        self._addresses = {}


_ACTIVE: list[list[Launch]] = []


@contextlib.contextmanager
def instrumented() -> Iterator[list[Launch]]:
    """Book every interpreted launch inside the block as a :class:`Launch` (in launch order).

    Only kernels run by Triton's interpreter are seen (CPU tensors, or ``TRITON_INTERPRET=1``).
    """
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    cls = type(builder)
    launches: list[Launch] = []
    current: list[Optional[Launch]] = [None]

    def book() -> Optional[Launch]:
        return current[0]

    def create_exp(arg):
        if book() is not None:
            book().work.exp += int(np.size(arg.data))
        return cls.create_exp(builder, arg)

    def create_exp2(arg):
        if book() is not None:
            book().work.exp += int(np.size(arg.data))
        return cls.create_exp2(builder, arg)

    def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
        if book() is not None:
            sa, sb = np.shape(a.data), np.shape(b.data)
            batch = math.prod(sa[:-2]) if len(sa) > 2 else 1
            book().work.dot_flops += 2 * batch * sa[-2] * sa[-1] * sb[-1]
        return cls.create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc)

    def count_load(ptrs, mask):
        launch = book()
        if launch is None:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addresses = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
        if mask is not None:
            lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)
            addresses = addresses[lanes]
        launch.work.load_bytes += size * int(addresses.size)
        if addresses.size:
            launch._add_addresses(size, addresses.copy())

    def create_load(ptr, cache_policy, is_volatile):
        count_load(ptr, None)
        # the class's create_load goes through create_masked_load: call the class's own
        # masked load so that the load is booked once
        mask = interpreter.TensorHandle(np.ones_like(ptr.data, dtype=bool), tl.int1)
        return cls.create_masked_load(builder, ptr, mask, None, cache_policy, is_volatile)

    def create_masked_load(ptrs, mask, other, cache_policy, is_volatile):
        count_load(ptrs, mask)
        return cls.create_masked_load(builder, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(ptrs, value, mask, cache_policy):
        # the class's create_store calls self.create_masked_store: this one, booked once
        launch = book()
        if launch is not None:
            size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
            lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))
            launch.work.store_bytes += size * int(np.count_nonzero(lanes))
        return cls.create_masked_store(builder, ptrs, value, mask, cache_policy)

    def set_grid_dim(nx, ny, nz):
        if book() is not None:
            book().grid = (nx, ny, nz)
            book().work.programs = nx * ny * nz
        return cls.set_grid_dim(builder, nx, ny, nz)

    executor_call = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        launch = Launch(getattr(self.fn, "__name__", "?"))
        outer = current[0]
        current[0] = launch
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            current[0] = outer
            launch._finish()
            launches.append(launch)

    patches = dict(
        create_exp=create_exp, create_exp2=create_exp2, create_dot=create_dot, create_load=create_load,
        create_masked_load=create_masked_load, create_masked_store=create_masked_store, set_grid_dim=set_grid_dim,
    )
    if _ACTIVE:
        raise RuntimeError("instrumented() does not nest")
    _ACTIVE.append(launches)
    for name, fn in patches.items():
        setattr(builder, name, fn)
    interpreter.GridExecutor.__call__ = call
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = executor_call
        for name in patches:
            builder.__dict__.pop(name, None)
        _ACTIVE.pop()


def _total(launches: list[Launch]) -> Work:
    out = Work()
    for launch in launches:
        out = out + launch.work
    return out


# ---------------------------------------------------------------------------------------
# Counting a call
# ---------------------------------------------------------------------------------------


def count_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, labels=None, num_objects=None,
    causal_affinity: bool = True, dilation=(1, 1, 1), config=None,
) -> Work:
    """The work the forward kernel issues for this call (CPU tensors, interpreter).

    ``config`` forces one ``triton.Config``; by default the interpreter's, ``CONFIGS[0]``.
    """
    from .. import triton_path

    with instrumented() as launches:
        triton_path.forward(q, k, v, pattern, labels=labels, num_objects=num_objects,
                            causal_affinity=causal_affinity, dilation=dilation, config=config)
    if not launches:
        raise RuntimeError("the forward launched no interpreted kernel (CUDA tensors?)")
    return _total(launches)


def count_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, labels=None, num_objects=None,
    causal_affinity: bool = True, dilation=(1, 1, 1), config=None, config_dq=None, config_dkdv=None,
    seed: int = 0,
) -> tuple[Work, ...]:
    """The work of the backward's ``dQ`` kernel(s) and of its ``dK/dV`` kernel(s), separately:
    ``(dq, dkdv)``; or, for a backward whose kernels compute ``dQ``, ``dK`` and ``dV`` at once,
    of those fused kernels: ``(fused,)`` (as the modules' ``work_backward`` return them).

    Runs the forward (``config``, not counted), then the backward with random ``dO`` and,
    with objects, random affinity gradients, counting each launch: a kernel whose name
    contains ``dkdv`` is booked to ``dK/dV``, one whose name contains ``dq`` to ``dQ``, any
    other one to the fused kernels (a backward mixing both kinds is refused).
    """
    from .. import triton_path
    from .backward import attention_backward

    out, aff, lse, arg = triton_path.forward(q, k, v, pattern, labels=labels, num_objects=num_objects,
                                             causal_affinity=causal_affinity, dilation=dilation, config=config)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    grad_aff = None if aff is None else torch.randn(aff.shape, generator=gen)
    scale = q.shape[-1] ** -0.5
    with instrumented() as launches:
        attention_backward(grad_out, q, k, v, out, lse, pattern, scale, grad_aff, aff, arg,
                           dilation=dilation, config_dq=config_dq, config_dkdv=config_dkdv)
    if not launches:
        raise RuntimeError("the backward launched no interpreted kernel (CUDA tensors?)")
    kinds: dict[str, list[Launch]] = {"dq": [], "dkdv": [], "fused": []}
    for launch in launches:
        name = launch.name.lower()
        kinds["dkdv" if "dkdv" in name else "dq" if "dq" in name else "fused"].append(launch)
    if kinds["fused"]:
        if kinds["dq"] or kinds["dkdv"]:
            raise RuntimeError(f"a backward of fused and separate kernels: {[x.name for x in launches]}")
        return (_total(kinds["fused"]),)
    return _total(kinds["dq"]), _total(kinds["dkdv"])


def inputs(p: Problem, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random CPU ``(q, k, v, labels)`` of problem ``p`` (labels ``None`` without objects;
    with objects, ids in ``[-1, num_obj)``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(p.B, p.N, p.T_q, p.H, p.W, p.D, generator=gen).to(dtype)
    k = torch.randn(p.B, p.N_kv, p.T, p.H, p.W, p.D, generator=gen).to(dtype)
    v = torch.randn(p.B, p.N_kv, p.T, p.H, p.W, p.D, generator=gen).to(dtype)
    labels = None
    if p.num_obj:
        labels = torch.randint(-1, p.num_obj, (p.B, p.T, p.H, p.W), generator=gen)
    return q, k, v, labels


def count_problem_forward(p: Problem, config=None, dtype: torch.dtype = torch.float32,
                          causal_affinity: bool = True) -> Work:
    """:func:`count_forward` on random inputs of problem ``p``."""
    q, k, v, labels = inputs(p, dtype)
    return count_forward(q, k, v, p.pattern, labels, p.num_obj or None, causal_affinity, p.dilation, config)


def count_problem_backward(p: Problem, config_dq=None, config_dkdv=None, dtype: torch.dtype = torch.float32,
                           causal_affinity: bool = True) -> tuple[Work, ...]:
    """:func:`count_backward` on random inputs of problem ``p``."""
    q, k, v, labels = inputs(p, dtype)
    return count_backward(q, k, v, p.pattern, labels, p.num_obj or None, causal_affinity, p.dilation,
                          config_dq=config_dq, config_dkdv=config_dkdv)


# ---------------------------------------------------------------------------------------
# What the pattern needs
# ---------------------------------------------------------------------------------------


def _axis_pairs(pattern: Pattern, axis: int, length: int, first_query: int) -> int:
    """``sum_i |{j : j in the pattern of i along one axis}|`` over query coordinates
    ``first_query .. length - 1`` (local and strided are products of per-axis rules, and
    causality only involves the time axis)."""
    one = [1, 1, 1]
    shape = list(one)
    shape[axis] = length
    kernel = list(one)
    kernel[axis] = pattern.kernel_size[axis]
    stride = list(one)
    stride[axis] = pattern.stride[axis]
    dil = list(one)
    changes = dict(kernel_size=tuple(kernel), stride=tuple(stride), causal=pattern.causal and axis == 0)
    if hasattr(pattern, "dilation"):
        dil[axis] = pattern.dilation[axis]
        changes["dilation"] = tuple(dil)
    line = dataclasses.replace(pattern, **changes)
    idx = torch.arange(length)
    return int(connectivity(line, *shape, idx[first_query:, None], idx[None, :]).sum())


def useful_pairs(p: Problem) -> int:
    """``U = sum over queries of |I_p|`` for problem ``p`` (all ``B * N`` query heads), in
    closed form: local and strided patterns are products of per-axis rules; a grid query
    sees its row and column in its own frame and its time line (``H + W - 2`` + the frames)."""
    pattern = p.pattern
    heads = p.B * p.N
    if pattern.kind == "grid":
        frames = [(t + 1 if pattern.causal else p.T) for t in range(p.t_off, p.T)]
        return heads * p.H * p.W * sum(f + p.H + p.W - 2 for f in frames)
    pairs = _axis_pairs(pattern, 0, p.T, p.t_off)
    pairs *= _axis_pairs(pattern, 1, p.H, 0)
    pairs *= _axis_pairs(pattern, 2, p.W, 0)
    return heads * pairs


def useful_pairs_dense(p: Problem) -> int:
    """:func:`useful_pairs` from the dense mask (``O(S^2)``: small shapes, tests)."""
    from ..patterns import dense_mask

    return p.B * p.N * int(dense_mask(p.pattern, p.T, p.H, p.W, T_q=p.T_q).sum())


def ratios(work: Work, p: Problem) -> tuple[float, float]:
    """``(E, L)`` of ``work`` for problem ``p``."""
    return work.exp / useful_pairs(p), work.reuse


# ---------------------------------------------------------------------------------------
# The issue-11 table
# ---------------------------------------------------------------------------------------

TABLE_SHAPE = dict(T=4, H=24, W=40, D=32, num_obj=3)


def table_patterns() -> list[tuple[str, Pattern]]:
    return [
        ("local (7,5,5)", Pattern.local((7, 5, 5))),
        ("local (3,7,7)", Pattern.local((3, 7, 7))),
        ("strided (1,4,4)", Pattern.strided((1, 4, 4))),
        ("grid", Pattern.grid()),
    ]


def table(T: int = 4, H: int = 24, W: int = 40, D: int = 32, num_obj: int = 3, only=(), verbose=True) -> list[dict]:
    """E and L of every kernel (forward, backward dQ, backward dK/dV) at one shape, under the
    interpreter's configuration (``CONFIGS[0]``), one batch-head. Prints a table."""
    rows = []
    for name, pattern in table_patterns():
        if only and not any(o in name for o in only):
            continue
        p = Problem(1, 1, 1, T, T, H, W, D, pattern, num_obj)
        start = time.perf_counter()
        fwd = count_problem_forward(p)
        bwd = count_problem_backward(p)
        row = dict(pattern=name, seconds=time.perf_counter() - start, useful_pairs=useful_pairs(p))
        # a fused backward (dQ, dK and dV in one kernel) fills one column: "dq+dkdv"
        kernels = (("dq", bwd[0]), ("dkdv", bwd[1])) if len(bwd) == 2 else (("dq+dkdv", bwd[0]),)
        for kernel, work in (("fwd", fwd), *kernels):
            e, l = ratios(work, p)
            row[kernel] = dict(E=e, L=l, **dataclasses.asdict(work))
        rows.append(row)
        if verbose:
            print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    cells = [f"{row['pattern']:<16}"]
    for kernel in ("fwd", "dq", "dkdv", "dq+dkdv"):
        if kernel in row:
            label = " (dQ+dK/dV fused)" if kernel == "dq+dkdv" else ""
            cells.append(f"E {row[kernel]['E']:5.2f} L {row[kernel]['L']:5.2f}{label}")
    return " | ".join(cells) + f"   ({row['seconds']:.0f} s)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sst_triton.kernels.instrument",
        description="E (softmax elements / useful pair) and L (bytes loaded / distinct byte) of every "
        "kernel, counted in Triton's interpreter at the interpreter's configuration.",
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 24, 40), metavar=("T", "H", "W"))
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], help="patterns whose name contains this")
    args = parser.parse_args(argv)
    T, H, W = args.shape
    print(f"T,H,W = {T},{H},{W}, D = {args.head_dim}, {args.objects} objects, CONFIGS[0] (interpreter)")
    print(f"{'kernel':<16} | {'forward':<15} | {'backward dQ':<15} | {'backward dK/dV':<15}")
    table(T, H, W, args.head_dim, args.objects, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
