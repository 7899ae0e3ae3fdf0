"""Public entry points: argument checks, then dispatch to the Triton kernels or the PyTorch path."""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .patterns import Boundary, IntOr3, Pattern


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
    _checks.check_qkv(q, k, v)
    scale = _checks.check_scale(scale)
    _checks.check_backend(backend)
    _checks.check_labels(q, labels, num_objects)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _resolve_backend(q, backend) == "triton":
        from . import triton_path

        return triton_path.sparse_attention(q, k, v, pattern, scale, labels, num_objects, causal_affinity)
    from . import torch_path

    return torch_path.sparse_attention(q, k, v, pattern, scale, labels, num_objects, causal_affinity)


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
