"""Connectivity patterns of sparse spatiotemporal attention.

A cell is ``p = (t, y, x)`` of a ``T x H x W`` video; its flat index is
``(t * H + y) * W + x``. A :class:`Pattern` says which keys ``I_p`` each query
attends to (see SPEC.md). Everything here is shape arithmetic shared by the
reference, the PyTorch path and the Triton kernels' launchers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

IntOr3 = Union[int, Sequence[int]]
Kind = Literal["grid", "local", "strided"]
Boundary = Literal["clip", "shift"]


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def as_triple(value: IntOr3, name: str) -> tuple[int, int, int]:
    """``7 -> (7, 7, 7)``; a length-3 sequence of ints passes through."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of 3 ints (t, h, w), got {value!r}")
    if isinstance(value, int):
        return (value, value, value)
    try:
        triple = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of 3 ints (t, h, w), got {value!r}") from None
    if len(triple) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in triple):
        raise TypeError(f"{name} must be an int or a tuple of 3 ints (t, h, w), got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class Pattern:
    """A connectivity pattern with its parameters.

    Args:
        kind: ``"grid"``, ``"local"`` or ``"strided"``.
        kernel_size: ``(kt, kh, kw)`` window of ``local`` (odd, >= 1).
        stride: ``(st, sh, sw)`` step of ``strided`` (>= 1).
        boundary: ``"clip"`` (windows cut at the border) or ``"shift"`` (NATTEN's rule).
        causal: keep only keys with ``t' <= t``.
        dilation: ``(dt, dh, dw)`` of ``local`` (>= 1, NATTEN's dilation): along an axis with
            dilation ``d`` the window is taken inside the query's own sub-sequence of cells
            ``c`` with the same ``c mod d``. ``(1, 1, 1)`` is the plain window.

    Times are absolute: with fewer query frames than key frames (``T_q < T``), query frame
    ``i`` is time ``T - T_q + i`` for every rule here.
    """

    kind: Kind
    kernel_size: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)
    boundary: Boundary = "clip"
    causal: bool = False
    # last, so that positional construction Pattern(kind, ks, stride, boundary, causal) keeps working
    dilation: tuple[int, int, int] = (1, 1, 1)

    @staticmethod
    def grid(causal: bool = False) -> "Pattern":
        return Pattern("grid", causal=_check_flag(causal, "causal"))

    @staticmethod
    def local(
        kernel_size: IntOr3, boundary: Boundary = "clip", causal: bool = False, dilation: IntOr3 = 1
    ) -> "Pattern":
        ks = as_triple(kernel_size, "kernel_size")
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_size must be odd and >= 1 along every axis, got {ks}")
        if boundary not in ("clip", "shift"):
            raise ValueError(f"boundary must be 'clip' or 'shift', got {boundary!r}")
        dil = as_triple(dilation, "dilation")
        if any(d < 1 for d in dil):
            raise ValueError(f"dilation must be >= 1 along every axis, got {dil}")
        return Pattern(
            "local", kernel_size=ks, boundary=boundary, causal=_check_flag(causal, "causal"), dilation=dil
        )

    @staticmethod
    def strided(stride: IntOr3, causal: bool = False) -> "Pattern":
        st = as_triple(stride, "stride")
        if any(s < 1 for s in st):
            raise ValueError(f"stride must be >= 1 along every axis, got {st}")
        return Pattern("strided", stride=st, causal=_check_flag(causal, "causal"))

    def max_keys(self, T: int, H: int, W: int) -> int:
        """Upper bound of ``|I_p|`` over all queries."""
        if self.kind == "grid":
            return T + H + W - 2
        if self.kind == "local":
            # a dilated window lives in a sub-sequence of at most ceil(L / d) cells
            return math.prod(min(k, -(-L // d)) for k, L, d in zip(self.kernel_size, (T, H, W), self.dilation))
        st, sh, sw = self.stride
        return -(-T // st) * -(-H // sh) * -(-W // sw)


def window_start(i: torch.Tensor, length, k: int, boundary: Boundary) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last key coordinate of the local window of coordinate ``i``.

    ``length`` is an int, or a tensor broadcastable against ``i`` (the per-query length of a
    dilation sub-sequence).
    """
    if isinstance(length, torch.Tensor):
        if boundary == "shift":
            # min(k, L) keys starting at clamp(i - k//2, 0, L - k); the whole axis when L <= k
            lo = torch.minimum((i - k // 2).clamp(min=0), (length - k).clamp(min=0))
            return lo, torch.minimum(lo + k, length)
        return (i - k // 2).clamp(min=0), torch.minimum(i + k // 2 + 1, length)
    if boundary == "shift":
        if length <= k:
            return torch.zeros_like(i), torch.full_like(i, length)
        lo = (i - k // 2).clamp(0, length - k)
        return lo, lo + k
    return (i - k // 2).clamp(min=0), (i + k // 2 + 1).clamp(max=length)


def coords(T: int, H: int, W: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, y, x)`` of every cell in flat order, each of shape ``(S,)``."""
    t, y, x = torch.meshgrid(
        torch.arange(T, device=device), torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"
    )
    return t.reshape(-1), y.reshape(-1), x.reshape(-1)


def connectivity(pattern: Pattern, T: int, H: int, W: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Whether key cells are in the pattern of query cells.

    Args:
        query: flat query indices ``(t*H + y)*W + x`` with absolute ``t``, any shape ``Q``.
        key: flat key indices, broadcastable against ``query``.

    Returns:
        bool tensor of the broadcast shape.
    """
    qt, qy, qx = query // (H * W), (query // W) % H, query % W
    kt, ky, kx = key // (H * W), (key // W) % H, key % W
    if pattern.kind == "grid":
        same_t, same_y, same_x = qt == kt, qy == ky, qx == kx
        mask = (same_t & same_y) | (same_t & same_x) | (same_y & same_x)
    elif pattern.kind == "local":
        mask = torch.ones_like(qt == kt)
        for qi, ki, length, k, d in zip((qt, qy, qx), (kt, ky, kx), (T, H, W), pattern.kernel_size, pattern.dilation):
            if d == 1:
                lo, hi = window_start(qi, length, k, pattern.boundary)
                mask = mask & (ki >= lo) & (ki < hi)
                continue
            # NATTEN's dilation: the window is taken inside the query's residue sub-sequence
            # (cells c with c mod d = r, of length ceil((L - r) / d)), at position c // d
            r = qi % d
            lo, hi = window_start(qi // d, (length - r + d - 1) // d, k, pattern.boundary)
            mask = mask & (ki % d == r) & (ki // d >= lo) & (ki // d < hi)
    else:
        st, sh, sw = pattern.stride
        mask = ((qt - kt) % st == 0) & ((qy - ky) % sh == 0) & ((qx - kx) % sw == 0)
    if pattern.causal:
        mask = mask & (kt <= qt)
    return mask


def dense_mask(pattern: Pattern, T: int, H: int, W: int, device=None, T_q=None) -> torch.Tensor:
    """The ``(S_q, S)`` boolean mask of the pattern: row = query, column = key.

    ``T_q`` (default ``T``) query frames are the last ones: row ``i`` is the cell of flat
    index ``(T - T_q) * H * W + i``. ``O(S^2)`` memory: for references and dense baselines only.
    """
    T_q = T if T_q is None else T_q
    idx = torch.arange(T * H * W, device=device)
    return connectivity(pattern, T, H, W, idx[(T - T_q) * H * W:, None], idx[None, :])
