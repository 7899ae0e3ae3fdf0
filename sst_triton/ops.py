"""Public entry points: argument checks, then the custom operator of the backend.

Every call goes through a ``torch.library`` operator (:mod:`sst_triton._custom_ops`), so the
same code runs eagerly, under ``torch.autocast`` and under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _custom_ops
from .patterns import Boundary, IntOr3, Pattern


def _autocast_qkv(q, k, v):
    """Under ``torch.autocast`` q, k, v take the autocast dtype (as SDPA's do), so that
    mixed inputs such as an fp32 ``q`` beside an autocast-produced bf16 ``k`` pass the checks.
    The operators carry the same rule for callers that reach them directly."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        return q, k, v
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.dtype in _checks.SUPPORTED_DTYPES else x for x in (q, k, v))


def _resolve_backend(q: torch.Tensor, backend: Optional[str]) -> str:
    if backend in (None, "auto"):
        return "triton" if q.is_cuda else "torch"
    return backend


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
):
    """Attention of every cell over its :class:`Pattern` (see :func:`grid_attention`)."""
    q, k, v = _autocast_qkv(q, k, v)
    _checks.check_qkv(q, k, v)
    _checks.check_pattern(pattern)
    _checks.check_flag(causal_affinity, "causal_affinity")
    scale = _checks.check_scale(scale)
    _checks.check_backend(backend)
    # The range of label values is data: reading it would break a compiled graph, so the
    # compiler skips that one check (the shape, dtype and device checks still run).
    _checks.check_labels(q, labels, num_objects, check_values=not torch.compiler.is_compiling())
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _custom_ops.sparse_attention(
        q, k, v, pattern, scale, labels, num_objects, causal_affinity, _resolve_backend(q, backend)
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
):
    """Each cell attends to its row, its column and its temporal line (``T + H + W - 2`` keys).

    Args:
        q, k, v: ``(B, N, T, H, W, D)``, float32/float16/bfloat16, any strides.
        scale: logit scale; ``None`` means ``1 / sqrt(D)``.
        causal: keep only keys of the same or earlier frames.
        labels: ``(B, T, H, W)`` integer object ids in ``[-1, num_objects)``, ``-1`` unknown.
        num_objects: ``O``, required with ``labels``.
        causal_affinity: affinities only from keys of strictly earlier frames.
        backend: ``None``/``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"torch"``, or
            ``"triton"`` (on CPU tensors: Triton's interpreter).

    Returns:
        ``out`` ``(B, N, T, H, W, D)``; with labels ``(out, affinity)``, affinity
        ``(B, N, O, T, H, W)`` float32.
    """
    return sparse_attention(q, k, v, Pattern.grid(causal), scale, labels, num_objects, causal_affinity, backend)


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
):
    """Each cell attends to the ``kt x kh x kw`` cube around it.

    Args:
        kernel_size: int or ``(kt, kh, kw)``, each odd and ``>= 1``.
        boundary: ``"clip"`` (windows cut at the border) or ``"shift"`` (NATTEN: the
            window slides inwards so every query keeps ``min(k, L)`` keys per axis).

    The other arguments and the return value are those of :func:`grid_attention`.
    """
    return sparse_attention(
        q, k, v, Pattern.local(kernel_size, boundary, causal), scale, labels, num_objects, causal_affinity, backend
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
):
    """Each cell attends to the cells at steps of ``(st, sh, sw)`` from it along each axis.

    Args:
        stride: int or ``(st, sh, sw)``, each ``>= 1``.

    The other arguments and the return value are those of :func:`grid_attention`.
    """
    return sparse_attention(
        q, k, v, Pattern.strided(stride, causal), scale, labels, num_objects, causal_affinity, backend
    )
