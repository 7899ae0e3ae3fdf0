"""Launcher of the fused backward kernels: ``dQ``, ``dK``, ``dV`` from ``dO`` and ``d affinity``.

CUDA tensors run the autotuned compiled kernels, CPU tensors their interpreted twins
(:func:`sst_triton.kernels._common.interpreted`), exactly as the forward does. float64
inputs are accepted here (not by the public API): the kernels then accumulate in float64,
which is what ``torch.autograd.gradcheck`` needs.
"""
from __future__ import annotations

from typing import Optional

import importlib

import torch
from einops import rearrange

from ..patterns import Pattern
from . import _common


def _launch(module, kernel_name: str, grid, args: tuple, meta: dict, interpret: bool) -> None:
    """Run ``module.<kernel_name>``: autotuned on a GPU, the first config interpreted on CPU."""
    if interpret:
        config = getattr(module, "CONFIGS_" + kernel_name.rsplit("_", 1)[-1].upper())[0]
        _common.interpreted(getattr(module, kernel_name))[grid](*args, **meta, **config.kwargs)
    else:
        getattr(module, kernel_name + "_tuned")[grid](*args, **meta)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the fused forward in ``q``, ``k``, ``v``.

    Args:
        grad_out, q, k, v, out: ``(B, N, T, H, W, D)``, any strides (``grad_out`` may be an
            expanded zero-stride tensor).
        lse: ``(B, N, T, H, W)`` natural log-sum-exp of each query's scaled logits.
        pattern: the forward's pattern; scale: its logit scale.
        grad_affinity, affinity: ``(B, N, O, T, H, W)``, or ``None`` without objects.
        argmax: ``(B, N, O, T, H, W)`` int, flat key index ``(t*H + y)*W + x`` that attained
            each affinity, ``-1`` where none.

    Returns:
        ``dq``, ``dk``, ``dv``: contiguous ``(B, N, T, H, W, D)`` in the dtype of ``q``.
    """
    B, N, T, H, W, D = q.shape
    S = T * H * W
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
    delta = rearrange(delta, "b n t h w -> (b n) (t h w)").contiguous()
    lse = rearrange(lse.to(acc), "b n t h w -> (b n) (t h w)").contiguous()

    dq, dk, dv = (torch.empty((B, N, T, H, W, D), dtype=q.dtype, device=device) for _ in range(3))
    inputs = (q, k, v, grad_out, lse, delta, arg, g)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    meta = dict(
        CAUSAL=pattern.causal,
        NUM_OBJ=num_obj,
        BLOCK_D=_common.block_d(D),
        DOT_PRECISION=_common.dot_precision(q.dtype),
        DOT_FP32=interpret and q.dtype == torch.bfloat16,
    )
    cdiv = lambda a, b: -(-a // b)  # noqa: E731

    with torch.cuda.device(device) if device.type == "cuda" else _NullContext():
        if pattern.kind == "strided":
            st, sh, sw = (min(s, n) for s, n in zip(pattern.stride, (T, H, W)))
            largest = cdiv(T, st) * cdiv(H, sh) * cdiv(W, sw)  # class (0, 0, 0) is the largest
            sizes = (N, T, H, W, D, st, sh, sw, float(scale))
            grid_q = lambda m: (cdiv(largest, m["BLOCK_M"]), st * sh * sw, B * N)  # noqa: E731
            grid_k = lambda m: (cdiv(largest, m["BLOCK_N"]), st * sh * sw, B * N)  # noqa: E731
        elif pattern.kind == "local":
            kt, kh, kw = pattern.kernel_size
            sizes = (N, T, H, W, D, kt, kh, kw, float(scale))
            grid_q = lambda m: (cdiv(H * W, m["BLOCK_M"]), T, B * N)  # noqa: E731
            grid_k = lambda m: (cdiv(H * W, m["BLOCK_N"]), T, B * N)  # noqa: E731
            meta["SHIFT"] = pattern.boundary == "shift"
        elif pattern.kind == "grid":
            sizes = (N, T, H, W, D, float(scale))
            grid_q = lambda m: (cdiv(W, m["BLOCK_M"]), T * H, B * N)  # noqa: E731
            grid_k = lambda m: (cdiv(W, m["BLOCK_N"]), T * H, B * N)  # noqa: E731
        else:
            raise ValueError(f"pattern.kind must be 'grid', 'local' or 'strided', got {pattern.kind!r}")
        name = f"{pattern.kind}_bwd"
        module = importlib.import_module(f"{__package__}.{name}")
        _launch(module, f"{name}_dq", grid_q, (*inputs, dq, *strides, *sizes), meta, interpret)
        _launch(module, f"{name}_dkdv", grid_k, (*inputs, dk, dv, *strides, *sizes), meta, interpret)
    return dq, dk, dv


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
