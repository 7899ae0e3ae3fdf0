"""Local (cube) attention backward.

``local_bwd_dq``: a tile of ``BLOCK_M`` consecutive cells of one frame's ``H*W`` plane (so
the whole tile shares its key frames) walks, for each key frame of its window, the
contiguous range of plane cells covering the union of its queries' windows, ``BLOCK_N`` at a
time with ``tl.dot``; each query's own window is a mask.

``local_bwd_dkdv``: a tile of ``BLOCK_N`` plane cells of one key frame walks the queries
whose window holds them (the inverse pattern). Clipped windows are symmetric (queries at
most ``k//2`` away), NATTEN's shifted ones are not (a border key is in the window of queries
up to ``k - 1`` away) and causal keeps query frames ``>=`` the key frame, so the loop covers
a conservative range (``k//2`` or ``k - 1`` per axis) and the exact forward window of each
query is the mask: the pattern is never inverted by hand.

Grid: ``(cdiv(H*W, BLOCK), T, B * N)``.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from .common_bwd import (
    aot_spec,
    dkdv_block,
    dq_block,
    load_cells,
    object_grad,
    store_cells,
    window,
)
from .launch import Problem, cdiv, require_plain, run

# Larger tiles spill at D=64 (see ``python -m sst_triton.aot``): the query pass may widen
# its query tile, the key pass its key tile. The first config is the interpreter's.
CONFIGS_DQ = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
CONFIGS_DKDV = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
]
TUNE_KEY = ["T", "H", "W", "D", "KT", "KH", "KW"]


@triton.jit
def local_bwd_dq(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    N, T, H, W, D, KT, KH, KW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dQ`` of ``BLOCK_M`` plane cells of frame ``program_id(1)``. Q, K, V, DO
    ``(B, N, T, H, W, D)`` any strides; Lse, Delta ``(B*N, S)``; Arg, G ``(B*N, O, S)``;
    DQ contiguous ``(B*N, S, D)``; ``KT, KH, KW`` the kernel size."""
    pid_m = tl.program_id(0)
    t = tl.program_id(1)
    pid_bn = tl.program_id(2)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    bn = pid_bn.to(tl.int64)
    HW = H * W
    S = T * HW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < HW
    qy = offs_m // W
    qx = offs_m % W
    ylo, yhi = window(qy, H, KH, SHIFT)
    xlo, xhi = window(qx, W, KW, SHIFT)
    tlo, thi = window(t, T, KT, SHIFT)
    if CAUSAL:
        thi = tl.minimum(thi, t + 1)
    # plane cells between the first and the last key of any query of the tile
    start = tl.min(tl.where(m_valid, ylo * W + xlo, HW), axis=0)
    end = tl.max(tl.where(m_valid, (yhi - 1) * W + xhi, 0), axis=0)

    q_index = t * HW + offs_m
    q = load_cells(Q + b * sq_b + n * sq_n, t, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, t, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S + q_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S + q_index, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)

    k_base = K + b * sk_b + n * sk_n
    v_base = V + b * sv_b + n * sv_n
    for kt in range(tlo, thi):
        for s0 in range(start, end, BLOCK_N):
            offs_n = s0 + tl.arange(0, BLOCK_N)
            n_valid = offs_n < end
            ky = offs_n // W
            kx = offs_n % W
            k = load_cells(k_base, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
            v = load_cells(v_base, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
            in_pattern = (
                m_valid[:, None] & n_valid[None, :]
                & (ky[None, :] >= ylo[:, None]) & (ky[None, :] < yhi[:, None])
                & (kx[None, :] >= xlo[:, None]) & (kx[None, :] < xhi[:, None])
            )
            if NUM_OBJ > 0:
                obj = object_grad(Arg, G, bn, S, q_index, m_valid, kt * HW + offs_n, NUM_OBJ, False)
            else:
                obj = 0.0
            dq = dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)

    store_cells(DQ + bn * S * D, dq * scale, q_index, m_valid, D, BLOCK_D)


@triton.jit
def local_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    N, T, H, W, D, KT, KH, KW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dK`` and ``dV`` of ``BLOCK_N`` plane cells of key frame ``program_id(1)``; arguments
    as in :func:`local_bwd_dq`, DK and DV contiguous ``(B*N, S, D)``."""
    pid_n = tl.program_id(0)
    kt = tl.program_id(1)
    pid_bn = tl.program_id(2)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    bn = pid_bn.to(tl.int64)
    HW = H * W
    S = T * HW

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < HW
    ky = offs_n // W
    kx = offs_n % W
    k_index = kt * HW + offs_n
    k = load_cells(K + b * sk_b + n * sk_n, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + n * sv_n, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)

    # how far a query can sit from a key of its window, per axis
    if SHIFT:
        reach_t = KT - 1
        reach_h = KH - 1
    else:
        reach_t = KT // 2
        reach_h = KH // 2
    t_lo = tl.maximum(kt - reach_t, 0)
    if CAUSAL:
        t_lo = kt
    t_hi = tl.minimum(kt + reach_t + 1, T)
    first_y = (pid_n * BLOCK_N) // W
    last_y = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, HW) - 1) // W
    start = tl.maximum(first_y - reach_h, 0) * W
    end = tl.minimum(last_y + reach_h + 1, H) * W

    q_base = Q + b * sq_b + n * sq_n
    do_base = DO + b * sdo_b + n * sdo_n
    for t in range(t_lo, t_hi):
        win_lo, win_hi = window(t, T, KT, SHIFT)
        if (kt >= win_lo) & (kt < win_hi):
            for s0 in range(start, end, BLOCK_M):
                offs_m = s0 + tl.arange(0, BLOCK_M)
                m_valid = offs_m < end
                qy = offs_m // W
                qx = offs_m % W
                ylo, yhi = window(qy, H, KH, SHIFT)
                xlo, xhi = window(qx, W, KW, SHIFT)
                q_index = t * HW + offs_m
                q = load_cells(q_base, t, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
                do = load_cells(do_base, t, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
                lse = tl.load(Lse + bn * S + q_index, mask=m_valid, other=0.0)
                delta = tl.load(Delta + bn * S + q_index, mask=m_valid, other=0.0)
                in_pattern = (
                    n_valid[:, None] & m_valid[None, :]
                    & (ky[:, None] >= ylo[None, :]) & (ky[:, None] < yhi[None, :])
                    & (kx[:, None] >= xlo[None, :]) & (kx[:, None] < xhi[None, :])
                )
                if NUM_OBJ > 0:
                    obj = object_grad(Arg, G, bn, S, q_index, m_valid, k_index, NUM_OBJ, True)
                else:
                    obj = 0.0
                dk, dv = dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)

    store_cells(DK + bn * S * D, dk * scale, k_index, n_valid, D, BLOCK_D)
    store_cells(DV + bn * S * D, dv, k_index, n_valid, D, BLOCK_D)


local_bwd_dq_tuned = triton.autotune(CONFIGS_DQ, key=TUNE_KEY)(local_bwd_dq)
local_bwd_dkdv_tuned = triton.autotune(CONFIGS_DKDV, key=TUNE_KEY)(local_bwd_dkdv)

AOT_SPECS = [
    aot_spec(
        f"local_bwd_{part}", kernel, outputs, dict(KT=3, KH=7, KW=7),
        dict(CAUSAL=True, NUM_OBJ=3, BLOCK_D=64, DOT_PRECISION="ieee", DOT_FP32=False, SHIFT=True), configs,
        "bf16, contiguous (1, 8, 4, 32, 32, 64), kernel (3, 7, 7), shift, causal, 3 objects",
    )
    for part, kernel, outputs, configs in (
        ("dq", local_bwd_dq, ("DQ",), CONFIGS_DQ),
        ("dkdv", local_bwd_dkdv, ("DK", "DV"), CONFIGS_DKDV),
    )
]


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch the dQ and the dK/dV kernels for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    require_plain(p, "local")
    kt, kh, kw = p.pattern.kernel_size
    sizes = (p.N, p.T, p.H, p.W, p.D, kt, kh, kw, float(scale))
    grid_q = lambda m: (cdiv(p.H * p.W, m["BLOCK_M"]), p.T, p.B * p.N)  # noqa: E731
    grid_k = lambda m: (cdiv(p.H * p.W, m["BLOCK_N"]), p.T, p.B * p.N)  # noqa: E731
    meta = {**meta, "SHIFT": p.pattern.boundary == "shift"}
    limits = f"T={p.T}, B*N={p.B * p.N}"
    module = sys.modules[__name__]
    run(module, "local_bwd_dq", grid_q, (*inputs, dq, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DQ, config=config_dq, sizes=limits)
    run(module, "local_bwd_dkdv", grid_k, (*inputs, dk, dv, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DKDV, config=config_dkdv, sizes=limits)
