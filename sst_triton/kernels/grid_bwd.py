"""Grid attention backward.

The keys of ``p = (t, y, x)`` are its row ``(t, y, *)``, its column ``(t, *, x)`` and its
time line ``(*, y, x)``, ``p`` counted once. The pattern is symmetric (``q`` is in the grid
of ``p`` iff ``p`` is in that of ``q``) except for ``causal``, which only cuts the time line
(query frame ``>=`` key frame).

``grid_bwd_dq``: ``BLOCK_M`` consecutive cells of one row; the row's keys are one dense
block (``tl.dot``), the column and time keys differ per query: one key per query per step,
vector products (grid is ``O(T + H + W)`` per query, bandwidth-bound anyway).
``grid_bwd_dkdv``: ``BLOCK_N`` consecutive keys of one row, walking the row's queries with
``tl.dot`` and the column and time queries of each key as vectors.

Grid: ``(cdiv(W, BLOCK), T * H, B * N)``.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from .common_bwd import (
    aot_spec,
    dkdv_block,
    dkdv_pairs,
    dq_block,
    dq_pairs,
    load_cells,
    object_grad,
    object_grad_pairs,
    store_cells,
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
    # the per-key column/time vectors add to the tile's registers: 8 warps keep it spill-free
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]
TUNE_KEY = ["T", "H", "W", "D"]


@triton.jit
def grid_bwd_dq(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    N, T, H, W, D,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dQ`` of ``BLOCK_M`` cells of row ``program_id(1) = t * H + y``. Q, K, V, DO
    ``(B, N, T, H, W, D)`` any strides; Lse, Delta ``(B*N, S)``; Arg, G ``(B*N, O, S)``;
    DQ contiguous ``(B*N, S, D)``."""
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    pid_bn = tl.program_id(2)
    t = row // H
    y = row % H
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    bn = pid_bn.to(tl.int64)
    S = T * H * W

    qx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = qx < W
    q_index = row * W + qx
    q = load_cells(Q + b * sq_b + n * sq_n, t, y, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, t, y, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S + q_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S + q_index, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)
    k_base = K + b * sk_b + n * sk_n
    v_base = V + b * sv_b + n * sv_n

    # the row, the query itself included: dense
    for x0 in range(0, W, BLOCK_N):
        kx = x0 + tl.arange(0, BLOCK_N)
        n_valid = kx < W
        k = load_cells(k_base, t, y, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
        v = load_cells(v_base, t, y, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
        in_pattern = m_valid[:, None] & n_valid[None, :]
        if NUM_OBJ > 0:
            obj = object_grad(Arg, G, bn, S, q_index, m_valid, row * W + kx, NUM_OBJ, False)
        else:
            obj = 0.0
        dq = dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)

    # the column: key (t, y2, x) of query (t, y, x)
    for y2 in range(0, H):
        # compared as a vector: the interpreter cannot mask a load with block & scalar
        valid = m_valid & (qx * 0 + y != y2)
        k = load_cells(k_base, t, y2, qx, sk_t, sk_h, sk_w, sk_d, valid, D, BLOCK_D)
        v = load_cells(v_base, t, y2, qx, sv_t, sv_h, sv_w, sv_d, valid, D, BLOCK_D)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bn, S, q_index, valid, (t * H + y2) * W + qx, NUM_OBJ)
        else:
            obj = 0.0
        dq = dq_pairs(q, do, lse, delta, k, v, valid, obj, scale, dq)

    # the time line: key (t2, y, x), earlier or same frames only when causal
    t_end = T
    if CAUSAL:
        t_end = t + 1
    for t2 in range(0, t_end):
        valid = m_valid & (qx * 0 + t != t2)
        k = load_cells(k_base, t2, y, qx, sk_t, sk_h, sk_w, sk_d, valid, D, BLOCK_D)
        v = load_cells(v_base, t2, y, qx, sv_t, sv_h, sv_w, sv_d, valid, D, BLOCK_D)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bn, S, q_index, valid, (t2 * H + y) * W + qx, NUM_OBJ)
        else:
            obj = 0.0
        dq = dq_pairs(q, do, lse, delta, k, v, valid, obj, scale, dq)

    store_cells(DQ + bn * S * D, dq * scale, q_index, m_valid, D, BLOCK_D)


@triton.jit
def grid_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    N, T, H, W, D,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dK`` and ``dV`` of ``BLOCK_N`` keys of row ``program_id(1) = t * H + y``;
    arguments as in :func:`grid_bwd_dq`, DK and DV contiguous ``(B*N, S, D)``."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_bn = tl.program_id(2)
    t = row // H
    y = row % H
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    bn = pid_bn.to(tl.int64)
    S = T * H * W

    kx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = kx < W
    k_index = row * W + kx
    k = load_cells(K + b * sk_b + n * sk_n, t, y, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + n * sv_n, t, y, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    q_base = Q + b * sq_b + n * sq_n
    do_base = DO + b * sdo_b + n * sdo_n

    # queries of the row: dense
    for x0 in range(0, W, BLOCK_M):
        qx = x0 + tl.arange(0, BLOCK_M)
        m_valid = qx < W
        q_index = row * W + qx
        q = load_cells(q_base, t, y, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
        do = load_cells(do_base, t, y, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
        lse = tl.load(Lse + bn * S + q_index, mask=m_valid, other=0.0)
        delta = tl.load(Delta + bn * S + q_index, mask=m_valid, other=0.0)
        in_pattern = n_valid[:, None] & m_valid[None, :]
        if NUM_OBJ > 0:
            obj = object_grad(Arg, G, bn, S, q_index, m_valid, k_index, NUM_OBJ, True)
        else:
            obj = 0.0
        dk, dv = dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)

    # queries of the column: query (t, y2, x) of key (t, y, x)
    for y2 in range(0, H):
        valid = n_valid & (kx * 0 + y != y2)
        q_index = (t * H + y2) * W + kx
        q = load_cells(q_base, t, y2, kx, sq_t, sq_h, sq_w, sq_d, valid, D, BLOCK_D)
        do = load_cells(do_base, t, y2, kx, sdo_t, sdo_h, sdo_w, sdo_d, valid, D, BLOCK_D)
        lse = tl.load(Lse + bn * S + q_index, mask=valid, other=0.0)
        delta = tl.load(Delta + bn * S + q_index, mask=valid, other=0.0)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bn, S, q_index, valid, k_index, NUM_OBJ)
        else:
            obj = 0.0
        dk, dv = dkdv_pairs(k, v, q, do, lse, delta, valid, obj, scale, dk, dv)

    # queries of the time line: later or same frames only when causal
    t_start = 0
    if CAUSAL:
        t_start = t
    for t2 in range(t_start, T):
        valid = n_valid & (kx * 0 + t != t2)
        q_index = (t2 * H + y) * W + kx
        q = load_cells(q_base, t2, y, kx, sq_t, sq_h, sq_w, sq_d, valid, D, BLOCK_D)
        do = load_cells(do_base, t2, y, kx, sdo_t, sdo_h, sdo_w, sdo_d, valid, D, BLOCK_D)
        lse = tl.load(Lse + bn * S + q_index, mask=valid, other=0.0)
        delta = tl.load(Delta + bn * S + q_index, mask=valid, other=0.0)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bn, S, q_index, valid, k_index, NUM_OBJ)
        else:
            obj = 0.0
        dk, dv = dkdv_pairs(k, v, q, do, lse, delta, valid, obj, scale, dk, dv)

    store_cells(DK + bn * S * D, dk * scale, k_index, n_valid, D, BLOCK_D)
    store_cells(DV + bn * S * D, dv, k_index, n_valid, D, BLOCK_D)


grid_bwd_dq_tuned = triton.autotune(CONFIGS_DQ, key=TUNE_KEY)(grid_bwd_dq)
grid_bwd_dkdv_tuned = triton.autotune(CONFIGS_DKDV, key=TUNE_KEY)(grid_bwd_dkdv)

_NOTE = "bf16, contiguous (1, 8, 4, 32, 32, 64), causal, 3 objects"
_FIXED = dict(CAUSAL=True, NUM_OBJ=3, BLOCK_D=64, DOT_PRECISION="ieee", DOT_FP32=False)
AOT_SPECS = [
    aot_spec(f"grid_bwd_{part}", kernel, outputs, {}, _FIXED, configs, _NOTE)
    for part, kernel, outputs, configs in (
        ("dq", grid_bwd_dq, ("DQ",), CONFIGS_DQ),
        ("dkdv", grid_bwd_dkdv, ("DK", "DV"), CONFIGS_DKDV),
    )
]


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch the dQ and the dK/dV kernels for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    require_plain(p, "grid")
    sizes = (p.N, p.T, p.H, p.W, p.D, float(scale))
    grid_q = lambda m: (cdiv(p.W, m["BLOCK_M"]), p.T * p.H, p.B * p.N)  # noqa: E731
    grid_k = lambda m: (cdiv(p.W, m["BLOCK_N"]), p.T * p.H, p.B * p.N)  # noqa: E731
    limits = f"T*H={p.T * p.H}, B*N={p.B * p.N}"
    module = sys.modules[__name__]
    run(module, "grid_bwd_dq", grid_q, (*inputs, dq, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DQ, config=config_dq, sizes=limits)
    run(module, "grid_bwd_dkdv", grid_k, (*inputs, dk, dv, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DKDV, config=config_dkdv, sizes=limits)
