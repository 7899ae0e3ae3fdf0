"""The Triton path: launches the fused forward kernels of :mod:`sst_triton.kernels`.

CUDA tensors run the compiled, autotuned kernels. CPU tensors run the very same kernels
in Triton's interpreter (one configuration, no autotuning), which is how they are
tested without a GPU; no ``TRITON_INTERPRET=1`` is needed, so compiled and interpreted
kernels live side by side in one process.

:func:`forward` returns what the backward needs besides ``out``: the log-sum-exp of every
query's logits and the key that attained each affinity.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from . import _checks
from .kernels import _common, grid_fwd, local_fwd, strided_fwd
from .patterns import Pattern

MAX_HEAD_DIM = 256


def _launch(module, kernel_name: str, grid, args: tuple, meta: dict, interpret: bool) -> None:
    """Run ``module.<kernel_name>``: its autotuned self on a GPU, its interpreted twin on CPU."""
    if interpret:
        config = module.CONFIGS[0]
        _common.interpreted(getattr(module, kernel_name))[grid](*args, **meta, **config.kwargs)
    else:
        getattr(module, kernel_name + "_tuned")[grid](*args, **meta)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
):
    """Fused sparse attention forward.

    Args:
        q, k, v: ``(B, N, T, H, W, D)``, float32/float16/bfloat16, any strides, on CUDA
            (compiled kernels) or CPU (interpreter).
        pattern: the connectivity pattern.
        scale: logit scale; ``None`` means ``1 / sqrt(D)``.
        labels: ``(B, T, H, W)`` integer ids in ``[-1, num_objects)`` or ``None``.
        num_objects: ``O``.
        causal_affinity: affinities only from keys of strictly earlier frames.

    Returns:
        ``(out, affinity, lse, argmax)``: ``out`` ``(B, N, T, H, W, D)`` in q's dtype;
        ``affinity`` float32 ``(B, N, O, T, H, W)`` or ``None``; ``lse`` float32
        ``(B, N, T, H, W)``, natural log-sum-exp of the scaled logits over ``I_p``;
        ``argmax`` int32 ``(B, N, O, T, H, W)``, flat index ``(t*H + y)*W + x`` of the
        key that attained each affinity, ``-1`` where no key was eligible, or ``None``.
    """
    _checks.check_qkv(q, k, v)
    _checks.check_labels(q, labels, num_objects, check_values=False)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sst_triton.Pattern, got {type(pattern).__name__}")
    B, N, T, H, W, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim D must be <= {MAX_HEAD_DIM} on the Triton path, got {D}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q must be on a CUDA device or the CPU for the Triton path, got {q.device}")
    interpret = q.device.type == "cpu"
    scale = D ** -0.5 if scale is None else float(scale)
    device = q.device
    num_obj = 0 if labels is None else int(num_objects)

    out = torch.empty((B, N, T, H, W, D), dtype=q.dtype, device=device)
    lse = torch.empty((B, N, T, H, W), dtype=torch.float32, device=device)
    if num_obj:
        aff = torch.empty((B, N, num_obj, T, H, W), dtype=torch.float32, device=device)
        arg = torch.empty((B, N, num_obj, T, H, W), dtype=torch.int32, device=device)
        lab = labels.to(device=device, dtype=torch.int32).contiguous()
    else:
        # never read or written (NUM_OBJ == 0 compiles the object code away)
        aff = torch.empty(1, dtype=torch.float32, device=device)
        arg = torch.empty(1, dtype=torch.int32, device=device)
        lab = torch.empty(1, dtype=torch.int32, device=device)

    pointers = (q, k, v, lab, out, lse, aff, arg)
    strides = (*q.stride(), *k.stride(), *v.stride())
    meta = dict(
        CAUSAL=pattern.causal,
        CAUSAL_AFF=bool(causal_affinity),
        NUM_OBJ=num_obj,
        BLOCK_O=_common.block_o(num_obj),
        BLOCK_D=_common.block_d(D),
        DOT_PRECISION=_common.dot_precision(q.dtype),
        # triton 3.9's interpreter mishandles bfloat16 dot and rounding (see kernels._common)
        INTERPRET_BF16=interpret and q.dtype == torch.bfloat16,
    )
    scale_log2 = scale * _common.LOG2E

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if pattern.kind == "strided":
            st, sh, sw = (min(s, n) for s, n in zip(pattern.stride, (T, H, W)))
            largest = -(-T // st) * -(-H // sh) * -(-W // sw)  # class (0, 0, 0) is the largest
            grid = lambda m: (triton.cdiv(largest, m["BLOCK_M"]) * st * sh * sw, B * N)  # noqa: E731
            args = (*pointers, *strides, N, T, H, W, D, st, sh, sw, scale_log2)
            _launch(strided_fwd, "strided_fwd", grid, args, meta, interpret)
        elif pattern.kind == "local":
            kt, kh, kw = pattern.kernel_size
            grid = lambda m: (triton.cdiv(W, m["TILE_W"]) * triton.cdiv(H, m["TILE_H"]), T, B * N)  # noqa: E731
            args = (*pointers, *strides, N, T, H, W, D, kt, kh, kw, scale_log2)
            _launch(local_fwd, "local_fwd", grid, args, {**meta, "SHIFT": pattern.boundary == "shift"}, interpret)
        elif pattern.kind == "grid":
            grid = lambda m: (triton.cdiv(W, m["BLOCK_M"]) * T * H, B * N)  # noqa: E731
            args = (*pointers, *strides, N, T, H, W, D, scale_log2)
            _launch(grid_fwd, "grid_fwd", grid, args, meta, interpret)
        else:
            raise ValueError(f"pattern.kind must be 'grid', 'local' or 'strided', got {pattern.kind!r}")

    if not num_obj:
        return out, None, lse, None
    return out, aff, lse, arg
