"""Strided attention backward: dense FlashAttention-2 backward inside each residue class.

A residue class ``(t mod st, y mod sh, x mod sw)`` is a dense attention problem of
``nT * nH * nW`` cells, ordered time-major as in :mod:`.strided_fwd`. The pattern is
symmetric inside a class except for ``causal`` (query frame >= key frame), which bounds the
key loop of ``strided_bwd_dq`` from above and the query loop of ``strided_bwd_dkdv`` from
below, frame-wise.

Grid of both kernels: ``(cdiv(largest class, BLOCK), classes, B * N)``.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import class_cell
from .common_bwd import aot_spec, dkdv_block, dq_block, load_cells, object_grad, store_cells
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
TUNE_KEY = ["T", "H", "W", "D", "ST", "SH", "SW"]


@triton.jit
def strided_bwd_dq(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    N, T, H, W, D, ST, SH, SW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dQ`` of ``BLOCK_M`` queries of one class. Q, K, V, DO ``(B, N, T, H, W, D)`` any
    strides; Lse, Delta ``(B*N, S)``; Arg, G ``(B*N, O, S)``; DQ contiguous ``(B*N, S, D)``.
    ``ST, SH, SW``: the strides clipped to the axis lengths."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bn = tl.program_id(2)
    rx = pid_c % SW
    ry = (pid_c // SW) % SH
    rt = pid_c // (SW * SH)
    nH = tl.cdiv(H - ry, SH)
    nW = tl.cdiv(W - rx, SW)
    plane = nH * nW
    size = tl.cdiv(T - rt, ST) * plane
    if pid_m * BLOCK_M >= size:
        return
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    bn = pid_bn.to(tl.int64)
    S = T * H * W

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < size
    qt, qy, qx = class_cell(offs_m, rt, ry, rx, nH, nW, ST, SH, SW)
    q_index = (qt * H + qy) * W + qx
    q = load_cells(Q + b * sq_b + n * sq_n, qt, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, qt, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S + q_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S + q_index, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)

    hi = size
    if CAUSAL:
        # time-major order: keys of later frames than the tile's last query come after it
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, size) - 1
        hi = tl.minimum(size, (last // plane + 1) * plane)
    k_base = K + b * sk_b + n * sk_n
    v_base = V + b * sv_b + n * sv_n
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        kt, ky, kx = class_cell(offs_n, rt, ry, rx, nH, nW, ST, SH, SW)
        k = load_cells(k_base, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
        v = load_cells(v_base, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
        in_pattern = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:
            in_pattern = in_pattern & (kt[None, :] <= qt[:, None])
        if NUM_OBJ > 0:
            obj = object_grad(Arg, G, bn, S, q_index, m_valid, (kt * H + ky) * W + kx, NUM_OBJ, False)
        else:
            obj = 0.0
        dq = dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)

    store_cells(DQ + bn * S * D, dq * scale, q_index, m_valid, D, BLOCK_D)


@triton.jit
def strided_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    N, T, H, W, D, ST, SH, SW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dK`` and ``dV`` of ``BLOCK_N`` keys of one class; arguments as in :func:`strided_bwd_dq`,
    DK and DV contiguous ``(B*N, S, D)``."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bn = tl.program_id(2)
    rx = pid_c % SW
    ry = (pid_c // SW) % SH
    rt = pid_c // (SW * SH)
    nH = tl.cdiv(H - ry, SH)
    nW = tl.cdiv(W - rx, SW)
    plane = nH * nW
    size = tl.cdiv(T - rt, ST) * plane
    if pid_n * BLOCK_N >= size:
        return
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    bn = pid_bn.to(tl.int64)
    S = T * H * W

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < size
    kt, ky, kx = class_cell(offs_n, rt, ry, rx, nH, nW, ST, SH, SW)
    k_index = (kt * H + ky) * W + kx
    k = load_cells(K + b * sk_b + n * sk_n, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + n * sv_n, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)

    lo = 0
    if CAUSAL:
        # queries of frames before the tile's first key come before it
        lo = ((pid_n * BLOCK_N) // plane) * plane
    q_base = Q + b * sq_b + n * sq_n
    do_base = DO + b * sdo_b + n * sdo_n
    for start in range(lo, size, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_valid = offs_m < size
        qt, qy, qx = class_cell(offs_m, rt, ry, rx, nH, nW, ST, SH, SW)
        q_index = (qt * H + qy) * W + qx
        q = load_cells(q_base, qt, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
        do = load_cells(do_base, qt, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
        lse = tl.load(Lse + bn * S + q_index, mask=m_valid, other=0.0)
        delta = tl.load(Delta + bn * S + q_index, mask=m_valid, other=0.0)
        in_pattern = n_valid[:, None] & m_valid[None, :]
        if CAUSAL:
            in_pattern = in_pattern & (kt[:, None] <= qt[None, :])
        if NUM_OBJ > 0:
            obj = object_grad(Arg, G, bn, S, q_index, m_valid, k_index, NUM_OBJ, True)
        else:
            obj = 0.0
        dk, dv = dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)

    store_cells(DK + bn * S * D, dk * scale, k_index, n_valid, D, BLOCK_D)
    store_cells(DV + bn * S * D, dv, k_index, n_valid, D, BLOCK_D)


strided_bwd_dq_tuned = triton.autotune(CONFIGS_DQ, key=TUNE_KEY)(strided_bwd_dq)
strided_bwd_dkdv_tuned = triton.autotune(CONFIGS_DKDV, key=TUNE_KEY)(strided_bwd_dkdv)

_NOTE = "bf16, contiguous (1, 8, 4, 32, 32, 64), stride 2, causal, 3 objects"
_FIXED = dict(CAUSAL=True, NUM_OBJ=3, BLOCK_D=64, DOT_PRECISION="ieee", DOT_FP32=False)
AOT_SPECS = [
    aot_spec(f"strided_bwd_{part}", kernel, outputs, dict(ST=2, SH=2, SW=2), _FIXED, configs, _NOTE)
    for part, kernel, outputs, configs in (
        ("dq", strided_bwd_dq, ("DQ",), CONFIGS_DQ),
        ("dkdv", strided_bwd_dkdv, ("DK", "DV"), CONFIGS_DKDV),
    )
]


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch the dQ and the dK/dV kernels for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    require_plain(p, "strided")
    st, sh, sw = (min(s, n) for s, n in zip(p.pattern.stride, (p.T, p.H, p.W)))
    largest = cdiv(p.T, st) * cdiv(p.H, sh) * cdiv(p.W, sw)  # class (0, 0, 0) is the largest
    sizes = (p.N, p.T, p.H, p.W, p.D, st, sh, sw, float(scale))
    grid_q = lambda m: (cdiv(largest, m["BLOCK_M"]), st * sh * sw, p.B * p.N)  # noqa: E731
    grid_k = lambda m: (cdiv(largest, m["BLOCK_N"]), st * sh * sw, p.B * p.N)  # noqa: E731
    limits = f"classes={st * sh * sw}, B*N={p.B * p.N}"
    module = sys.modules[__name__]
    run(module, "strided_bwd_dq", grid_q, (*inputs, dq, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DQ, config=config_dq, sizes=limits)
    run(module, "strided_bwd_dkdv", grid_k, (*inputs, dk, dv, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DKDV, config=config_dkdv, sizes=limits)
