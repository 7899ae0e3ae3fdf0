"""Argument checks shared by every entry point: all run before any kernel."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = (None, "auto", "torch", "triton")


def check_qkv(q, k, v) -> None:
    """``q`` ``(B, N, T_q, H, W, D)``; ``k``, ``v`` ``(B, N_kv, T, H, W, D)``, one shape.

    ``N % N_kv == 0`` (grouped heads) and ``T_q <= T`` (the query frames are the last ones);
    every other axis of ``q`` equals that of ``k``; one dtype and one device.
    """
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
    B, N, T_q, H, W, D = q.shape
    N_kv, T = k.shape[1], k.shape[2]
    if (k.shape[0], *k.shape[3:]) != (B, H, W, D):
        raise ValueError(
            f"k must have the batch, height, width and head dim of q: (B, N_kv, T, H, W, D) = "
            f"({B}, N_kv, T, {H}, {W}, {D}), got {tuple(k.shape)}"
        )
    if N % N_kv:
        raise ValueError(
            f"k has N_kv = {N_kv} heads, which must divide q's N = {N} heads (query head n reads "
            f"key/value head n // (N // N_kv)), got shapes q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if T_q > T:
        raise ValueError(
            f"q has T_q = {T_q} frames, more than the T = {T} frames of k (the query frames are the "
            f"last T_q <= T key frames), got shapes q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def check_extra_kv(extra_kv, k: torch.Tensor) -> None:
    """``extra_kv``: ``None`` or a pair ``(k_x, v_x)`` of tensors ``(B, N_kv, L, D)`` like ``k``."""
    if extra_kv is None:
        return
    if not isinstance(extra_kv, (tuple, list)) or len(extra_kv) != 2:
        raise TypeError(f"extra_kv must be a pair (k_x, v_x) of tensors (B, N_kv, L, D), got {type(extra_kv).__name__}")
    B, N_kv, _, _, _, D = k.shape
    for name, x in zip(("extra_kv[0] (k_x)", "extra_kv[1] (v_x)"), extra_kv):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, N_kv, L, D), got {type(x).__name__}")
        if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (B, N_kv, D):
            raise ValueError(f"{name} must have shape (B, N_kv, L, D) = ({B}, {N_kv}, L, {D}), got {tuple(x.shape)}")
        if x.dtype != k.dtype:
            raise TypeError(f"{name} must have the dtype of k ({k.dtype}), got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"{name} must be on the device of k ({k.device}), got {x.device}")
    if extra_kv[0].shape != extra_kv[1].shape:
        raise ValueError(
            f"extra_kv: k_x and v_x must have one shape (B, N_kv, L, D), got {tuple(extra_kv[0].shape)} "
            f"and {tuple(extra_kv[1].shape)}"
        )


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


def check_labels(q: torch.Tensor, labels, num_objects, check_values: bool = True, k=None) -> None:
    """``labels``: integer ``(B, T, H, W)`` with values in ``[-1, num_objects)``.

    ``T`` is the number of key frames: that of ``k`` when given (``q`` may have fewer).
    """
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
    if k is not None:
        T = k.shape[2]
    if tuple(labels.shape) != (B, T, H, W):
        raise ValueError(f"labels must have shape (B, T, H, W) = {(B, T, H, W)}, got {tuple(labels.shape)}")
    if labels.device != q.device:
        raise ValueError(f"labels must be on the device of q ({q.device}), got {labels.device}")
    if check_values and labels.numel() > 0:
        # one device-to-host copy for both bounds: a single sync per call on CUDA
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if lo < -1 or hi >= num_objects:
            raise ValueError(
                f"labels must lie in [-1, num_objects) = [-1, {num_objects}), got values in [{lo}, {hi}]"
            )
