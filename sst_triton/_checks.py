"""Argument checks shared by every entry point: all run before any kernel."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = (None, "auto", "torch", "triton")


def check_qkv(q, k, v) -> None:
    """``q``, ``k``, ``v``: tensors of shape ``(B, N, T, H, W, D)``, same shape, dtype and device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, T, H, W, D), got {type(x).__name__}")
        if x.dim() != 6:
            raise ValueError(
                f"{name} must have 6 dimensions (B, N, T, H, W, D), got {x.dim()} (shape {tuple(x.shape)})"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if any(s == 0 for s in x.shape):
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    return float(scale)


def check_pattern(pattern) -> None:
    from .patterns import Pattern

    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be a sst_triton.Pattern (Pattern.grid(), Pattern.local(k), Pattern.strided(s)), "
            f"got {type(pattern).__name__}"
        )


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'torch', 'triton' or None, got {backend!r}")


def check_labels(q: torch.Tensor, labels, num_objects, check_values: bool = True) -> None:
    """``labels``: integer ``(B, T, H, W)`` with values in ``[-1, num_objects)``."""
    if labels is None:
        if num_objects is not None:
            raise ValueError("num_objects was given without labels: pass labels=(B, T, H, W) object ids too")
        return
    if num_objects is None:
        raise ValueError("labels were given without num_objects: pass num_objects=O (ids are in [-1, O))")
    if isinstance(num_objects, bool) or not isinstance(num_objects, numbers.Integral) or num_objects < 1:
        raise ValueError(f"num_objects must be an int >= 1, got {num_objects!r}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor of shape (B, T, H, W), got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype (e.g. torch.long), got {labels.dtype}")
    B, _, T, H, W, _ = q.shape
    if tuple(labels.shape) != (B, T, H, W):
        raise ValueError(f"labels must have shape (B, T, H, W) = {(B, T, H, W)}, got {tuple(labels.shape)}")
    if labels.device != q.device:
        raise ValueError(f"labels must be on the device of q ({q.device}), got {labels.device}")
    if check_values and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= num_objects:
            raise ValueError(
                f"labels must lie in [-1, num_objects) = [-1, {num_objects}), got values in [{lo}, {hi}]"
            )
