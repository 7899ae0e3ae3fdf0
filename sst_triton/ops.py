"""Public entry points: argument checks, then the custom operator of the backend.

Every call goes through a ``torch.library`` operator (:mod:`sst_triton._custom_ops`), so the
same code runs eagerly, under ``torch.autocast`` and under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _custom_ops
from .patterns import Boundary, IntOr3, Pattern


def _autocast_qkv(q, k, v, extra_kv=None):
    """Under ``torch.autocast`` q, k, v (and the extra keys) take the autocast dtype (as SDPA's
    do), so that mixed inputs such as an fp32 ``q`` beside an autocast-produced bf16 ``k`` pass
    the checks. The operators carry the same rule for callers that reach them directly."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        return q, k, v, extra_kv
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return q, k, v, extra_kv
    dtype = torch.get_autocast_dtype(device_type)

    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in _checks.SUPPORTED_DTYPES else x

    if isinstance(extra_kv, (tuple, list)) and len(extra_kv) == 2:
        extra_kv = (cast(extra_kv[0]), cast(extra_kv[1]))
    return cast(q), cast(k), cast(v), extra_kv


def _resolve_backend(q: torch.Tensor, backend: Optional[str]) -> str:
    if backend in (None, "auto"):
        return "triton" if q.is_cuda else "torch"
    return backend


# The version-2 keyword arguments, documented once for every entry point.
_V2_ARGS = """
        return_lse: also return ``lse`` ``(B, N, T_q, H, W)`` float32, the natural log of each
            query's softmax denominator over every key it attends (extra keys included);
            differentiable. Appended last.
        extra_kv: ``(k_x, v_x)``, each ``(B, N_kv, L, D)`` with the dtype and device of ``k``:
            keys/values every query attends besides its pattern, in the same softmax (text or
            register tokens of a video diffusion transformer). They enter no affinity but the
            normalisation of every probability. ``L = 0`` is the same as ``None``."""

_SHAPES = """
    Shapes (grouped heads and streaming queries):
        q: ``(B, N, T_q, H, W, D)``; k, v: ``(B, N_kv, T, H, W, D)``, float32/float16/bfloat16,
        any strides. ``N % N_kv == 0``: query head ``n`` reads key/value head
        ``n // (N // N_kv)`` (GQA; ``N_kv = 1`` is MQA), never copied per query head.
        ``T_q <= T``: query frame ``i`` is absolute frame ``T - T_q + i`` (the newest frames
        against cached keys/values); every rule (pattern, ``causal``, ``causal_affinity``,
        the shift boundary) uses absolute times.
        labels: ``(B, T, H, W)`` (the key frames)."""


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    backend: Optional[str] = None,
    *,
    return_lse: bool = False,
    extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """Attention of every cell over its :class:`Pattern` (see :func:`grid_attention`).

    A dilated local window is ``Pattern.local(kernel_size, dilation=d)``.
    """
    q, k, v, extra_kv = _autocast_qkv(q, k, v, extra_kv)
    _checks.check_qkv(q, k, v)
    _checks.check_pattern(pattern)
    _checks.check_flag(causal_affinity, "causal_affinity")
    _checks.check_flag(return_lse, "return_lse")
    _checks.check_extra_kv(extra_kv, k)
    scale = _checks.check_scale(scale)
    _checks.check_backend(backend)
    # The range of label values is data: reading it would break a compiled graph, so the
    # compiler skips that one check (the shape, dtype and device checks still run).
    _checks.check_labels(q, labels, num_objects, check_values=not torch.compiler.is_compiling(), k=k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _custom_ops.sparse_attention(
        q, k, v, pattern, scale, labels, num_objects, causal_affinity, _resolve_backend(q, backend),
        extra_kv=None if extra_kv is None else tuple(extra_kv), return_lse=return_lse,
    )


def grid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    causal: bool = False,
    *,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    backend: Optional[str] = None,
    return_lse: bool = False,
    extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """Each cell attends to its row, its column and its temporal line (``T + H + W - 2`` keys).

    Args:
        q, k, v: ``(B, N, T, H, W, D)``, float32/float16/bfloat16, any strides (see Shapes
            for grouped heads and fewer query frames).
        scale: logit scale; ``None`` means ``1 / sqrt(D)``.
        causal: keep only keys of the same or earlier frames.
        labels: ``(B, T, H, W)`` integer object ids in ``[-1, num_objects)``, ``-1`` unknown.
        num_objects: ``O``, required with ``labels``.
        causal_affinity: affinities only from keys of strictly earlier frames.
        backend: ``None``/``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"torch"``, or
            ``"triton"`` (on CPU tensors: Triton's interpreter).{v2}
{shapes}

    Returns:
        ``out`` ``(B, N, T_q, H, W, D)``; with labels ``(out, affinity)``, affinity
        ``(B, N, O, T_q, H, W)`` float32; with ``return_lse`` the lse appended:
        ``(out, lse)`` or ``(out, affinity, lse)``.
    """
    return sparse_attention(
        q, k, v, Pattern.grid(causal), scale, labels, num_objects, causal_affinity, backend,
        return_lse=return_lse, extra_kv=extra_kv,
    )


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOr3,
    scale: Optional[float] = None,
    causal: bool = False,
    boundary: Boundary = "clip",
    *,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    backend: Optional[str] = None,
    return_lse: bool = False,
    extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    dilation: IntOr3 = 1,
):
    """Each cell attends to the ``kt x kh x kw`` cube around it.

    Args:
        kernel_size: int or ``(kt, kh, kw)``, each odd and ``>= 1``.
        boundary: ``"clip"`` (windows cut at the border) or ``"shift"`` (NATTEN: the
            window slides inwards so every query keeps ``min(k, L)`` keys per axis).
        dilation: int or ``(dt, dh, dw)``, each ``>= 1`` (NATTEN's dilation). Along an axis of
            length ``L`` with dilation ``d`` the cells split into ``d`` interleaved
            sub-sequences (same ``c mod d``); a query's window (kernel size, boundary rule) is
            taken inside its own sub-sequence, of length ``ceil((L - r) / d)`` for residue ``r``,
            at position ``c // d``. ``1`` is the plain window.

    The other arguments and the return value are those of :func:`grid_attention`.
    """
    return sparse_attention(
        q, k, v, Pattern.local(kernel_size, boundary, causal, dilation), scale, labels, num_objects,
        causal_affinity, backend, return_lse=return_lse, extra_kv=extra_kv,
    )


def strided_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stride: IntOr3,
    scale: Optional[float] = None,
    causal: bool = False,
    *,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    backend: Optional[str] = None,
    return_lse: bool = False,
    extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
):
    """Each cell attends to the cells at steps of ``(st, sh, sw)`` from it along each axis.

    Args:
        stride: int or ``(st, sh, sw)``, each ``>= 1``.

    The other arguments and the return value are those of :func:`grid_attention`.
    """
    return sparse_attention(
        q, k, v, Pattern.strided(stride, causal), scale, labels, num_objects, causal_affinity, backend,
        return_lse=return_lse, extra_kv=extra_kv,
    )


if grid_attention.__doc__:  # None under python -OO
    grid_attention.__doc__ = grid_attention.__doc__.format(v2=_V2_ARGS, shapes=_SHAPES)
