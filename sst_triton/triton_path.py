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

from . import _checks, kernels
from .kernels import _common
from .kernels.launch import Problem
from .patterns import Pattern

MAX_HEAD_DIM = 256


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    dilation: tuple[int, int, int] = (1, 1, 1),
    config=None,
):
    """Fused sparse attention forward.

    Args:
        q: ``(B, N, T_q, H, W, D)``; k, v: ``(B, N_kv, T, H, W, D)`` with ``N % N_kv == 0``
            and ``T_q <= T`` (query frame ``i`` is absolute frame ``T - T_q + i``);
            float32/float16/bfloat16, any strides, on CUDA (compiled kernels) or CPU
            (interpreter).
        pattern: the connectivity pattern.
        scale: logit scale; ``None`` means ``1 / sqrt(D)``.
        labels: ``(B, T, H, W)`` integer ids in ``[-1, num_objects)`` or ``None``.
        num_objects: ``O``.
        causal_affinity: affinities only from keys of strictly earlier frames.
        dilation: ``(dt, dh, dw)`` of a local pattern.
        config: force one ``triton.Config`` of the kernel (tests); ``None`` autotunes on
            CUDA and takes the first configuration in the interpreter.

    Returns:
        ``(out, affinity, lse, argmax)``: ``out`` ``(B, N, T_q, H, W, D)`` in q's dtype;
        ``affinity`` float32 ``(B, N, O, T_q, H, W)`` or ``None``; ``lse`` float32
        ``(B, N, T_q, H, W)``, natural log-sum-exp of the scaled logits over ``I_p``;
        ``argmax`` int32 ``(B, N, O, T_q, H, W)``, flat index ``(t*H + y)*W + x`` (absolute
        frame ``t``) of the key that attained each affinity, ``-1`` where none was eligible,
        or ``None``.
    """
    _checks.check_qkv(q, k, v)
    # labels describe the key frames: (B, T, H, W) of k
    _checks.check_labels(k, labels, num_objects, check_values=False)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sst_triton.Pattern, got {type(pattern).__name__}")
    B, N, T_q, H, W, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q's head dim D must be <= {MAX_HEAD_DIM} on the Triton path, got {D}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q must be on a CUDA device or the CPU for the Triton path, got {q.device}")
    interpret = q.device.type == "cpu"
    scale = D ** -0.5 if scale is None else float(scale)
    device = q.device
    num_obj = 0 if labels is None else int(num_objects)

    problem = Problem.of(q, k, pattern, num_obj, dilation)
    out = torch.empty((B, N, T_q, H, W, D), dtype=q.dtype, device=device)
    lse = torch.empty((B, N, T_q, H, W), dtype=torch.float32, device=device)
    if num_obj:
        aff = torch.empty((B, N, num_obj, T_q, H, W), dtype=torch.float32, device=device)
        arg = torch.empty((B, N, num_obj, T_q, H, W), dtype=torch.int32, device=device)
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
    if pattern.kind not in kernels.FORWARD:
        raise ValueError(f"pattern.kind must be one of {sorted(kernels.FORWARD)}, got {pattern.kind!r}")
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernels.FORWARD[pattern.kind](
            problem, pointers, strides, scale * _common.LOG2E, meta, interpret=interpret, config=config
        )

    if not num_obj:
        return out, None, lse, None
    return out, aff, lse, arg
