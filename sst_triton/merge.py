"""Merging attentions over disjoint key sets by their log-sum-exp (NATTEN's ``merge_attentions``).

If ``(out_i, lse_i)`` is the attention of the same queries over key set ``K_i`` (``out_i`` the
softmax-weighted values, ``lse_i`` the natural log of the softmax denominator), then over
``K_1 ∪ K_2 ∪ ...`` (disjoint)::

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

exactly. Plain tensor ops, so autograd differentiates through every part.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _weights(lses: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    # a query that no part gave any key (every lse_i = -inf) keeps out = 0, lse = -inf, no NaN
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    return [torch.exp(l - safe) for l in lses], lse


def merge_pair(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """:func:`merge_attention` of two parts, unchecked, in the dtype of ``out_a`` (internal use)."""
    (w_a, w_b), lse = _weights([lse_a, lse_b])
    return out_a * w_a[..., None] + out_b * w_b[..., None], lse


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets, from the attention over each.

    Args:
        parts: a non-empty sequence of ``(out_i, lse_i)``: ``out_i`` of one shape ``(..., D)``
            (e.g. ``(B, N, T_q, H, W, D)`` from ``return_lse=True``), one dtype and device;
            ``lse_i`` floating, of shape ``out_i.shape[:-1]`` (e.g. ``(B, N, T_q, H, W)``),
            the natural log-sum-exp of each query's scaled logits over its keys in part ``i``.

    Returns:
        ``(out, lse)``: ``out`` like ``out_1`` (computed in float32, returned in its dtype),
        ``lse`` float32 (float64 for float64 parts) of shape ``out.shape[:-1]``. Differentiable in
        every ``out_i`` and ``lse_i``.

    Raises:
        TypeError / ValueError naming ``parts`` (and the offending element) before any work.
    """
    if isinstance(parts, torch.Tensor) or not isinstance(parts, (list, tuple)):
        raise TypeError(f"parts must be a list or tuple of (out, lse) pairs, got {type(parts).__name__}")
    if len(parts) == 0:
        raise ValueError("parts must hold at least one (out, lse) pair, got none")
    for i, part in enumerate(parts):
        if not isinstance(part, (list, tuple)) or len(part) != 2:
            raise TypeError(f"parts[{i}] must be a pair (out, lse) of tensors, got {type(part).__name__}")
        out, lse = part
        if not isinstance(out, torch.Tensor) or not isinstance(lse, torch.Tensor):
            raise TypeError(
                f"parts[{i}] must be a pair (out, lse) of tensors, got ({type(out).__name__}, {type(lse).__name__})"
            )
        if out.dim() < 1 or not out.is_floating_point():
            raise TypeError(f"parts[{i}] out must be a floating tensor (..., D), got {out.dtype} {tuple(out.shape)}")
        if not lse.is_floating_point():
            raise TypeError(f"parts[{i}] lse must be a floating tensor, got {lse.dtype}")
        if lse.shape != out.shape[:-1]:
            raise ValueError(
                f"parts[{i}] lse must have the shape of out without its last axis {tuple(out.shape[:-1])}, "
                f"got {tuple(lse.shape)}"
            )
        out0 = parts[0][0]
        if out.shape != out0.shape:
            raise ValueError(f"parts[{i}] out must have the shape of parts[0] out {tuple(out0.shape)}, got {tuple(out.shape)}")
        if out.dtype != out0.dtype:
            raise TypeError(f"parts[{i}] out must have the dtype of parts[0] out ({out0.dtype}), got {out.dtype}")
        if out.device != out0.device or lse.device != out0.device:
            raise ValueError(f"parts[{i}] must be on the device of parts[0] ({out0.device})")
    compute = torch.float64 if out0.dtype == torch.float64 else torch.float32
    weights, lse = _weights([p[1].to(compute) for p in parts])
    out = sum(p[0].to(compute) * w[..., None] for p, w in zip(parts, weights))
    return out.to(out0.dtype), lse
