"""Grid attention backward: the forward's two passes, for queries and for keys.

The keys of ``p = (t, y, x)`` are its row ``(t, y, *)``, its column ``(t, *, x)`` and its
time line ``(*, y, x)``, ``p`` counted once (in the row). The pattern is symmetric (``q`` is
in the grid of ``p`` iff ``p`` is in that of ``q``) except for ``causal``, which only cuts
the time line (query frame ``>=`` key frame), and for ``T_q < T``: only the last ``T_q``
frames hold queries.

As in the forward (:mod:`.grid_fwd`), each axis is one dense problem per tile on tensor
cores, and the time line (``T`` cells, fewer than ``tl.dot``'s 16) is one vector product
per query and key:

- ``grid_bwd_dq_rows``: ``BLOCK_M`` queries of one row against their row keys (``tl.dot``)
  and time keys; writes the partial ``dQ`` into ``DQ`` itself, in its dtype.
- ``grid_bwd_dq_cols``: ``BLOCK_M`` queries of one column against their column keys,
  plus the partial; writes ``DQ``.
- ``grid_bwd_dkdv_rows``: ``BLOCK_N`` keys of one row, for each query head of their
  key/value head's group (summed in the program: deterministic, no atomics), against the
  queries of their row (if the frame holds queries) and of their time lines (query frames
  only; later ones only when causal); writes partial ``dK`` and ``dV`` into ``DK``, ``DV``.
- ``grid_bwd_dkdv_cols``: ``BLOCK_N`` keys of one column against the queries of the
  column, plus the partials; writes ``DK`` and ``DV``.

Grids fold everything on axis 0: ``cdiv(W, BLOCK) * T_Q * H * B * N`` (dQ rows),
``cdiv(H, BLOCK) * T_Q * W * B * N`` (dQ columns), ``cdiv(W, BLOCK) * T * H * B * N_kv`` and
``cdiv(H, BLOCK) * T * W * B * N_kv`` (dK/dV).

Partials: a row pass writes its partial gradient into the gradient itself, in its dtype
(no scratch), and the column pass reads it back and writes the sum at the same cells in the
same program (so in place is safe). A 16-bit gradient's partial is rounded to nearest once
(unit roundoff ``u``: ``2**-11`` fp16, ``2**-8`` bf16): the error added is at most
``u * |partial|``, the size of the final rounding's own, so a gradient stays within about
two roundings of its dtype (float32 / float64 gradients: no extra rounding). The partial
traffic is halved against a float32 scratch (the column pass reads 2 bytes per element).

Work at T, H, W = 4, 24, 40, D = 32, 3 objects, first configurations (:func:`work_backward`,
equal to the instrumented interpreter's counts): E = 1.57 softmax elements per useful pair
for dQ and for dK/dV, L = 2.38 and 2.29 (the one-pass design with per-query column and time
vectors: E = 2.23, L = 14.9-15.3).
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import cast
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
from .grid_fwd import configs_at, head_dim_pruner
from .launch import Problem, cdiv, check_grid, run
from .work import Work

# The first configuration is the interpreter's (16-wide tiles: the least padding at the
# SST shapes, see :func:`work_backward`); the others are for the GPU (64 rows on the tile's
# own side where Hopper's wgmma applies). ``*_BY_HEAD_DIM``: those that compile spill-free
# on sm_80 and sm_90a (``python -m sst_triton.aot --check``) per padded head dim. The dK/dV
# row pass is the heaviest kernel (key, value, dK, dV rows of the tile live across the
# query-row blocks and the time-line vectors): at d = 128 only 16-key tiles with 8 warps fit.
CONFIGS_DQ = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
CONFIGS_DQ_BY_HEAD_DIM = {32: (0, 1, 2), 64: (0, 1, 2), 128: (0, 3)}
CONFIGS_DKDV = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
CONFIGS_DKDV_BY_HEAD_DIM = {32: (0, 1, 2), 64: (0, 2), 128: (3,)}
TUNE_KEY = ["B", "N", "GROUP", "T_Q", "T", "H", "W", "BLOCK_D", "NUM_OBJ", "CAUSAL"]


@triton.jit
def _dq_time(q, do, lse, delta, dq, k_base, v_base, Arg, G, bn, S_q, q_index, qx, y, t0, t1, H, W, D,
             sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, m_valid, scale,
             NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr):
    """Time keys ``(tt, y, qx)``, ``tt`` in ``[t0, t1)``, of a row of queries into ``dq``."""
    for tt in range(t0, t1):
        k = load_cells(k_base, tt, y, qx, sk_t, sk_h, sk_w, sk_d, m_valid, D, BLOCK_D)
        v = load_cells(v_base, tt, y, qx, sv_t, sv_h, sv_w, sv_d, m_valid, D, BLOCK_D)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bn, S_q, q_index, m_valid, (tt * H + y) * W + qx, NUM_OBJ)
        else:
            obj = 0.0
        dq = dq_pairs(q, do, lse, delta, k, v, m_valid, obj, scale, dq)
    return dq


@triton.jit
def grid_bwd_dq_rows(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row and time keys of ``BLOCK_M`` queries of one row into DQ ``(B*N, S_q, D)``
    (partial ``dQ``, DQ's dtype, rounded to nearest). Q, DO ``(B, N, T_Q, H, W, D)``, K, V
    ``(B, N // GROUP, T, H, W, D)``, any strides; Lse, Delta ``(B*N, S_q)``; Arg, G
    ``(B*N, O, S_q)`` (Arg: absolute key indices)."""
    blocks = tl.cdiv(W, BLOCK_M)
    pid = tl.program_id(0)
    pid_x = pid % blocks
    row = (pid // blocks) % (T_Q * H)
    pid_bn = pid // (blocks * T_Q * H)
    tq = row // H
    y = row % H
    t = tq + (T - T_Q)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    kv = n // GROUP
    bn = pid_bn.to(tl.int64)
    S_q = T_Q * H * W

    qx = pid_x * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = qx < W
    q_index = row * W + qx
    q = load_cells(Q + b * sq_b + n * sq_n, tq, y, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, tq, y, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S_q + q_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S_q + q_index, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)
    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n

    # the row, the query itself included: dense
    for x0 in range(0, W, BLOCK_N):
        kx = x0 + tl.arange(0, BLOCK_N)
        n_valid = kx < W
        k = load_cells(k_base, t, y, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
        v = load_cells(v_base, t, y, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
        in_pattern = m_valid[:, None] & n_valid[None, :]
        if NUM_OBJ > 0:
            obj = object_grad(Arg, G, bn, S_q, q_index, m_valid, (t * H + y) * W + kx, NUM_OBJ, False)
        else:
            obj = 0.0
        dq = dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)

    # the time line: earlier frames, then (not causal) later ones
    dq = _dq_time(q, do, lse, delta, dq, k_base, v_base, Arg, G, bn, S_q, q_index, qx, y, 0, t, H, W, D,
                  sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, m_valid, scale, NUM_OBJ, BLOCK_D)
    if not CAUSAL:
        dq = _dq_time(q, do, lse, delta, dq, k_base, v_base, Arg, G, bn, S_q, q_index, qx, y, t + 1, T, H, W, D,
                      sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, m_valid, scale, NUM_OBJ, BLOCK_D)

    store_cells(DQ + bn * S_q * D, cast(dq * scale, DQ.dtype.element_ty, True), q_index, m_valid, D, BLOCK_D)


@triton.jit
def grid_bwd_dq_cols(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column keys of ``BLOCK_M`` queries of one column, plus the row pass's partial in DQ; writes
    DQ contiguous ``(B*N, S_q, D)`` (arguments as in :func:`grid_bwd_dq_rows`)."""
    blocks = tl.cdiv(H, BLOCK_M)
    pid = tl.program_id(0)
    pid_y = pid % blocks
    line = (pid // blocks) % (T_Q * W)
    pid_bn = pid // (blocks * T_Q * W)
    tq = line // W
    x = line % W
    t = tq + (T - T_Q)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    kv = n // GROUP
    bn = pid_bn.to(tl.int64)
    S_q = T_Q * H * W

    qy = pid_y * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = qy < H
    q_index = (tq * H + qy) * W + x
    q = load_cells(Q + b * sq_b + n * sq_n, tq, qy, x, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, tq, qy, x, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S_q + q_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S_q + q_index, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)
    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n

    # the column, the query itself excluded (it is in the row): dense
    for y0 in range(0, H, BLOCK_N):
        ky = y0 + tl.arange(0, BLOCK_N)
        n_valid = ky < H
        k = load_cells(k_base, t, ky, x, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
        v = load_cells(v_base, t, ky, x, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
        in_pattern = m_valid[:, None] & n_valid[None, :] & (qy[:, None] != ky[None, :])
        if NUM_OBJ > 0:
            obj = object_grad(Arg, G, bn, S_q, q_index, m_valid, (t * H + ky) * W + x, NUM_OBJ, False)
        else:
            obj = 0.0
        dq = dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)

    offs_d = tl.arange(0, BLOCK_D)
    cells = bn * S_q + q_index.to(tl.int64)
    part = tl.load(DQ + cells[:, None] * D + offs_d[None, :], mask=m_valid[:, None] & (offs_d[None, :] < D),
                   other=0.0)
    store_cells(DQ + bn * S_q * D, dq * scale + part.to(dq.dtype), q_index, m_valid, D, BLOCK_D)


@triton.jit
def _dkdv_time(k, v, dk, dv, q_base, do_base, Lse, Delta, Arg, G, bq, S_q, k_index, kx, y, t0, t1, T_Q, T, H, W, D,
               sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d, n_valid, scale,
               NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr):
    """Queries ``(tt, y, kx)`` of the time lines of a row of keys, absolute frames ``tt`` in
    ``[t0, t1)`` (all query frames), into ``dk``, ``dv``."""
    t_off = T - T_Q
    for tt in range(t0, t1):
        q_index = ((tt - t_off) * H + y) * W + kx
        q = load_cells(q_base, tt - t_off, y, kx, sq_t, sq_h, sq_w, sq_d, n_valid, D, BLOCK_D)
        do = load_cells(do_base, tt - t_off, y, kx, sdo_t, sdo_h, sdo_w, sdo_d, n_valid, D, BLOCK_D)
        lse = tl.load(Lse + bq * S_q + q_index, mask=n_valid, other=0.0)
        delta = tl.load(Delta + bq * S_q + q_index, mask=n_valid, other=0.0)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bq, S_q, q_index, n_valid, k_index, NUM_OBJ)
        else:
            obj = 0.0
        dk, dv = dkdv_pairs(k, v, q, do, lse, delta, n_valid, obj, scale, dk, dv)
    return dk, dv


@triton.jit
def grid_bwd_dkdv_rows(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row and time queries of ``BLOCK_N`` keys of one row, summed over the ``GROUP`` query
    heads of their key/value head, into DK, DV ``(B*N_kv, S, D)`` (partial ``dK`` and ``dV``,
    their dtype, rounded to nearest); arguments as in :func:`grid_bwd_dq_rows`."""
    N_KV = N // GROUP
    blocks = tl.cdiv(W, BLOCK_N)
    pid = tl.program_id(0)
    pid_x = pid % blocks
    row = (pid // blocks) % (T * H)
    pid_bk = pid // (blocks * T * H)
    t = row // H
    y = row % H
    t_off = T - T_Q
    b = (pid_bk // N_KV).to(tl.int64)
    kv = (pid_bk % N_KV).to(tl.int64)
    S = T * H * W
    S_q = T_Q * H * W

    kx = pid_x * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = kx < W
    k_index = row * W + kx
    k = load_cells(K + b * sk_b + kv * sk_n, t, y, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + kv * sv_n, t, y, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    # the row's queries exist only in a query frame
    row_end = W * (t >= t_off).to(tl.int32)
    tq = t - t_off
    for g in range(0, GROUP):
        n = kv * GROUP + g
        bq = b * N + n
        q_base = Q + b * sq_b + n * sq_n
        do_base = DO + b * sdo_b + n * sdo_n

        # queries of the row: dense
        for x0 in range(0, row_end, BLOCK_M):
            qx = x0 + tl.arange(0, BLOCK_M)
            m_valid = qx < W
            q_index = (tq * H + y) * W + qx
            q = load_cells(q_base, tq, y, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
            do = load_cells(do_base, tq, y, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
            lse = tl.load(Lse + bq * S_q + q_index, mask=m_valid, other=0.0)
            delta = tl.load(Delta + bq * S_q + q_index, mask=m_valid, other=0.0)
            in_pattern = n_valid[:, None] & m_valid[None, :]
            if NUM_OBJ > 0:
                obj = object_grad(Arg, G, bq, S_q, q_index, m_valid, k_index, NUM_OBJ, True)
            else:
                obj = 0.0
            dk, dv = dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)

        # queries of the time lines: later query frames, then (not causal) earlier ones
        dk, dv = _dkdv_time(k, v, dk, dv, q_base, do_base, Lse, Delta, Arg, G, bq, S_q, k_index, kx, y,
                            tl.maximum(t + 1, t_off), T, T_Q, T, H, W, D, sq_t, sq_h, sq_w, sq_d,
                            sdo_t, sdo_h, sdo_w, sdo_d, n_valid, scale, NUM_OBJ, BLOCK_D)
        if not CAUSAL:
            dk, dv = _dkdv_time(k, v, dk, dv, q_base, do_base, Lse, Delta, Arg, G, bq, S_q, k_index, kx, y,
                                t_off, t, T_Q, T, H, W, D, sq_t, sq_h, sq_w, sq_d,
                                sdo_t, sdo_h, sdo_w, sdo_d, n_valid, scale, NUM_OBJ, BLOCK_D)

    bk = pid_bk.to(tl.int64)
    store_cells(DK + bk * S * D, cast(dk * scale, DK.dtype.element_ty, True), k_index, n_valid, D, BLOCK_D)
    store_cells(DV + bk * S * D, cast(dv, DV.dtype.element_ty, True), k_index, n_valid, D, BLOCK_D)


@triton.jit
def grid_bwd_dkdv_cols(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column queries of ``BLOCK_N`` keys of one column (group heads summed), plus the row
    pass's partials; writes DK, DV contiguous ``(B*N_kv, S, D)``."""
    N_KV = N // GROUP
    blocks = tl.cdiv(H, BLOCK_N)
    pid = tl.program_id(0)
    pid_y = pid % blocks
    line = (pid // blocks) % (T * W)
    pid_bk = pid // (blocks * T * W)
    t = line // W
    x = line % W
    t_off = T - T_Q
    b = (pid_bk // N_KV).to(tl.int64)
    kv = (pid_bk % N_KV).to(tl.int64)
    S = T * H * W
    S_q = T_Q * H * W

    ky = pid_y * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = ky < H
    k_index = (t * H + ky) * W + x
    k = load_cells(K + b * sk_b + kv * sk_n, t, ky, x, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + kv * sv_n, t, ky, x, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    col_end = H * (t >= t_off).to(tl.int32)
    tq = t - t_off
    for g in range(0, GROUP):
        n = kv * GROUP + g
        bq = b * N + n
        q_base = Q + b * sq_b + n * sq_n
        do_base = DO + b * sdo_b + n * sdo_n
        # queries of the column, the key's own cell excluded (it is in the row): dense
        for y0 in range(0, col_end, BLOCK_M):
            qy = y0 + tl.arange(0, BLOCK_M)
            m_valid = qy < H
            q_index = (tq * H + qy) * W + x
            q = load_cells(q_base, tq, qy, x, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
            do = load_cells(do_base, tq, qy, x, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
            lse = tl.load(Lse + bq * S_q + q_index, mask=m_valid, other=0.0)
            delta = tl.load(Delta + bq * S_q + q_index, mask=m_valid, other=0.0)
            in_pattern = n_valid[:, None] & m_valid[None, :] & (ky[:, None] != qy[None, :])
            if NUM_OBJ > 0:
                obj = object_grad(Arg, G, bq, S_q, q_index, m_valid, k_index, NUM_OBJ, True)
            else:
                obj = 0.0
            dk, dv = dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)

    bk = pid_bk.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    cells = bk * S + k_index.to(tl.int64)
    tile_mask = n_valid[:, None] & (offs_d[None, :] < D)
    part_k = tl.load(DK + cells[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0)
    part_v = tl.load(DV + cells[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0)
    store_cells(DK + bk * S * D, dk * scale + part_k.to(dk.dtype), k_index, n_valid, D, BLOCK_D)
    store_cells(DV + bk * S * D, dv + part_v.to(dv.dtype), k_index, n_valid, D, BLOCK_D)


_prune_dq = {"early_config_prune": head_dim_pruner(CONFIGS_DQ_BY_HEAD_DIM)}
_prune_dkdv = {"early_config_prune": head_dim_pruner(CONFIGS_DKDV_BY_HEAD_DIM)}
grid_bwd_dq_rows_tuned = triton.autotune(CONFIGS_DQ, key=TUNE_KEY, prune_configs_by=_prune_dq)(grid_bwd_dq_rows)
# a column pass adds to the row pass's partial, which lies in the output itself: each benchmark run of the autotuner must start from the partial
grid_bwd_dq_cols_tuned = triton.autotune(CONFIGS_DQ, key=TUNE_KEY, prune_configs_by=_prune_dq,
                                         restore_value=["DQ"])(grid_bwd_dq_cols)
grid_bwd_dkdv_rows_tuned = triton.autotune(CONFIGS_DKDV, key=TUNE_KEY, prune_configs_by=_prune_dkdv)(grid_bwd_dkdv_rows)
grid_bwd_dkdv_cols_tuned = triton.autotune(CONFIGS_DKDV, key=TUNE_KEY, prune_configs_by=_prune_dkdv,
                                           restore_value=["DK", "DV"])(grid_bwd_dkdv_cols)
# each pass pair shares one configuration list and pruner: the representatives of dQ and dK/dV
grid_bwd_dq_tuned = grid_bwd_dq_rows_tuned
grid_bwd_dkdv_tuned = grid_bwd_dkdv_rows_tuned


def _aot_specs():
    from ._common import example_scalars

    specs = []
    for d in (32, 64, 128):
        example = example_scalars(D=d)
        example.update({f"sdo_{axis}": example[f"sq_{axis}"] for axis in ("b", "n", "t", "h", "w", "d")})
        note = f"bf16, contiguous (1, 8, 4, 32, 32, {d}), GQA group 2, causal, 3 objects"
        fixed = dict(CAUSAL=True, NUM_OBJ=3, BLOCK_D=d, DOT_PRECISION="ieee", DOT_FP32=False)
        for name, kernel, outputs, configs, by_dim in (
            ("dq_rows", grid_bwd_dq_rows, ("DQ",), CONFIGS_DQ, CONFIGS_DQ_BY_HEAD_DIM),
            ("dq_cols", grid_bwd_dq_cols, ("DQ",), CONFIGS_DQ, CONFIGS_DQ_BY_HEAD_DIM),
            ("dkdv_rows", grid_bwd_dkdv_rows, ("DK", "DV"), CONFIGS_DKDV, CONFIGS_DKDV_BY_HEAD_DIM),
            ("dkdv_cols", grid_bwd_dkdv_cols, ("DK", "DV"), CONFIGS_DKDV, CONFIGS_DKDV_BY_HEAD_DIM),
        ):
            spec = aot_spec(f"grid_bwd_{name}[d{d}]", kernel, outputs, dict(example, B=1, GROUP=2, T_Q=4), fixed,
                            configs_at(configs, by_dim, d), note)
            specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch the dQ kernels (rows, then columns) and the dK/dV kernels (rows, then columns)
    for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    sizes = (p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, float(scale))
    limits = f"T*H={p.T * p.H}, T*W={p.T * p.W}, B*N={p.B * p.N}"
    grids = {
        "grid_bwd_dq_rows": lambda m: (cdiv(p.W, m["BLOCK_M"]) * p.T_q * p.H * p.B * p.N,),
        "grid_bwd_dq_cols": lambda m: (cdiv(p.H, m["BLOCK_M"]) * p.T_q * p.W * p.B * p.N,),
        "grid_bwd_dkdv_rows": lambda m: (cdiv(p.W, m["BLOCK_N"]) * p.T * p.H * p.B * p.N_kv,),
        "grid_bwd_dkdv_cols": lambda m: (cdiv(p.H, m["BLOCK_N"]) * p.T * p.W * p.B * p.N_kv,),
    }
    configs = {"dq": (CONFIGS_DQ, config_dq), "dkdv": (CONFIGS_DKDV, config_dkdv)}
    # every grid is checked before any kernel runs
    for name, grid in grids.items():
        listed, forced = configs[name.split("_")[2]]
        for c in [forced] if forced is not None else listed:
            check_grid(name, grid({**meta, **c.kwargs}), limits)
    module = sys.modules[__name__]
    for name, grid in grids.items():
        listed, forced = configs[name.split("_")[2]]
        outputs = (dq,) if "dq" in name else (dk, dv)
        run(module, name, grid, (*inputs, *outputs, *strides, *sizes), meta, interpret=interpret,
            configs=listed, config=forced, sizes=limits)


def work_backward(p: Problem, config_dq, config_dkdv, elem_bytes: int = 4) -> tuple[Work, Work]:
    """What the dQ kernels and the dK/dV kernels issue for ``p`` (see
    :mod:`sst_triton.kernels.work`): q/k/v/dO elements of ``elem_bytes`` (4: float32; the
    gradients, whose partials the column passes read back, alike), float32 accumulation,
    separate contiguous tensors."""
    from ._common import block_d

    BD, O, D = block_d(p.D), p.num_obj, p.D
    causal, H, W, T, t_off = p.pattern.causal, p.H, p.W, p.T, p.t_off
    heads, kv_heads = p.B * p.N, p.B * p.N_kv
    cell, acc = D * elem_bytes, 4
    obj = 2 * O * acc  # Arg and G of one query
    # per query: q, dO, lse, Delta
    query = 2 * cell + 2 * acc
    every_query = heads * p.S_q * (query + obj)

    # dQ, row pass: per query frame, H rows of cdiv(W, BM) tiles against row and time keys
    BM, BN = config_dq.kwargs["BLOCK_M"], config_dq.kwargs["BLOCK_N"]
    tiles = cdiv(W, BM)
    dq_rows = Work(programs=tiles * p.T_q * H * heads)
    for t in range(t_off, T):
        steps = t + (0 if causal else T - 1 - t)
        dq_rows.exp += heads * H * tiles * (cdiv(W, BN) * BM * BN + steps * BM)
        dq_rows.dot_flops += heads * H * tiles * cdiv(W, BN) * 6 * BM * BN * BD
        dq_rows.load_bytes += heads * H * (W * query + tiles * W * 2 * cell + cdiv(W, BN) * W * obj
                                            + steps * W * (2 * cell + obj))
    dq_rows.distinct_bytes = every_query + 2 * kv_heads * p.S * cell
    # dQ, column pass: against column keys, plus the partial
    tiles = cdiv(H, BM)
    lines = heads * p.T_q * W
    dq_cols = Work(
        programs=lines * tiles,
        exp=lines * tiles * cdiv(H, BN) * BM * BN,
        dot_flops=lines * tiles * cdiv(H, BN) * 6 * BM * BN * BD,
        load_bytes=lines * (H * query + tiles * H * 2 * cell + cdiv(H, BN) * H * obj + H * cell),
        distinct_bytes=every_query + 2 * kv_heads * p.T_q * H * W * cell + heads * p.S_q * cell,
    )
    # each pass writes dQ once per query (the row pass its partial)
    dq_rows.store_bytes = dq_cols.store_bytes = heads * p.S_q * cell

    # dK/dV, row pass: every key frame, H rows of cdiv(W, BN) key tiles, GROUP query heads
    BM, BN = config_dkdv.kwargs["BLOCK_M"], config_dkdv.kwargs["BLOCK_N"]
    tiles = cdiv(W, BN)
    dkdv_rows = Work(programs=tiles * T * H * kv_heads)
    for t in range(T):
        in_row = t >= t_off
        steps = (T - max(t + 1, t_off)) + (0 if causal else max(0, t - t_off))
        per_head = Work(
            exp=tiles * ((cdiv(W, BM) * BN * BM if in_row else 0) + steps * BN),
            dot_flops=tiles * (cdiv(W, BM) * 8 * BN * BM * BD if in_row else 0),
            load_bytes=(tiles * W * (query + obj) if in_row else 0) + steps * W * (query + obj),
        )
        dkdv_rows.exp += heads * H * per_head.exp
        dkdv_rows.dot_flops += heads * H * per_head.dot_flops
        dkdv_rows.load_bytes += heads * H * per_head.load_bytes + kv_heads * H * W * 2 * cell
    dkdv_rows.distinct_bytes = every_query + 2 * kv_heads * p.S * cell
    # dK/dV, column pass: column queries of query frames, plus the partials
    tiles = cdiv(H, BN)
    lines = kv_heads * T * W
    dkdv_cols = Work(
        programs=lines * tiles,
        exp=heads * p.T_q * W * tiles * cdiv(H, BM) * BN * BM,
        dot_flops=heads * p.T_q * W * tiles * cdiv(H, BM) * 8 * BN * BM * BD,
        load_bytes=heads * p.T_q * W * tiles * H * (query + obj) + lines * H * 2 * 2 * cell,
        distinct_bytes=every_query + 2 * kv_heads * p.S * 2 * cell,
    )
    # each pass writes dK and dV once per key (the row pass its partials)
    dkdv_rows.store_bytes = dkdv_cols.store_bytes = 2 * kv_heads * p.S * cell
    return dq_rows + dq_cols, dkdv_rows + dkdv_cols
