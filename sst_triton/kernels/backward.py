"""Launcher of the fused backward kernels: ``dQ``, ``dK``, ``dV`` from ``dO`` and ``d affinity``.

CUDA tensors run the autotuned compiled kernels, CPU tensors their interpreted twins
(:func:`sst_triton.kernels._common.interpreted`), exactly as the forward does. float64
inputs are accepted here (not by the public API): the kernels then accumulate in float64,
which is what ``torch.autograd.gradcheck`` needs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from einops import rearrange

from ..patterns import Pattern
from . import BACKWARD, _common
from .launch import Problem


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern: Pattern,
    scale: float,
    grad_affinity: Optional[torch.Tensor] = None,
    affinity: Optional[torch.Tensor] = None,
    argmax: Optional[torch.Tensor] = None,
    grad_lse: Optional[torch.Tensor] = None,
    dilation: tuple[int, int, int] = (1, 1, 1),
    config_dq=None,
    config_dkdv=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the fused forward in ``q``, ``k``, ``v``.

    Args:
        q, grad_out, out: ``(B, N, T_q, H, W, D)``; k, v: ``(B, N_kv, T, H, W, D)``; any
            strides (``grad_out`` may be an expanded zero-stride tensor).
        lse: ``(B, N, T_q, H, W)`` natural log-sum-exp of each query's scaled logits.
        pattern: the forward's pattern; scale: its logit scale.
        grad_affinity, affinity: ``(B, N, O, T_q, H, W)``, or ``None`` without objects.
        argmax: ``(B, N, O, T_q, H, W)`` int, flat key index ``(t*H + y)*W + x`` that
            attained each affinity, ``-1`` where none.
        grad_lse: ``(B, N, T_q, H, W)`` gradient of ``lse``, or ``None``. Since
            ``d lse / d s_j = P_j``, it enters as ``dS = P * (dP - (Delta - grad_lse))``:
            folded into ``Delta``, no kernel change.
        dilation: the forward's ``(dt, dh, dw)`` (local).
        config_dq, config_dkdv: force one ``triton.Config`` of each kernel (tests).

    Returns:
        ``dq`` contiguous like ``q``; ``dk``, ``dv`` contiguous like ``k``, each in the
        dtype of ``q``.
    """
    device = q.device
    interpret = device.type == "cpu"
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    # Delta[p] = dO_p.O_p + sum_o g_o[p] affinity_o[p]: what every dS of query p subtracts
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    num_obj = 0
    if argmax is not None and argmax.numel() > 0:
        num_obj = argmax.shape[2]
        g = grad_affinity.to(acc)
        delta = delta + (g * affinity.to(acc)).sum(2)
        arg = rearrange(argmax.to(torch.int32), "b n o t h w -> (b n) o (t h w)").contiguous()
        g = rearrange(g, "b n o t h w -> (b n) o (t h w)").contiguous()
    else:
        arg = torch.empty(1, dtype=torch.int32, device=device)
        g = torch.empty(1, dtype=acc, device=device)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    delta = rearrange(delta, "b n t h w -> (b n) (t h w)").contiguous()
    lse = rearrange(lse.to(acc), "b n t h w -> (b n) (t h w)").contiguous()

    dq = torch.empty(q.shape, dtype=q.dtype, device=device)
    dk, dv = (torch.empty(k.shape, dtype=q.dtype, device=device) for _ in range(2))
    inputs = (q, k, v, grad_out, lse, delta, arg, g)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    meta = dict(
        CAUSAL=pattern.causal,
        NUM_OBJ=num_obj,
        BLOCK_D=_common.block_d(q.shape[-1]),
        DOT_PRECISION=_common.dot_precision(q.dtype),
        DOT_FP32=interpret and q.dtype == torch.bfloat16,
    )
    if pattern.kind not in BACKWARD:
        raise ValueError(f"pattern.kind must be one of {sorted(BACKWARD)}, got {pattern.kind!r}")
    problem = Problem.of(q, k, pattern, num_obj, dilation)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        BACKWARD[pattern.kind](
            problem, inputs, dq, dk, dv, strides, float(scale), meta, interpret=interpret,
            config_dq=config_dq, config_dkdv=config_dkdv,
        )
    return dq, dk, dv
