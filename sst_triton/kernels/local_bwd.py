"""Local (cube) attention backward, on the forward's 3-D boxes (see :mod:`.local_fwd`).

``local_bwd_dq``: the forward's program, recomputing ``P``: a ``TILE_T x TILE_H x TILE_W``
box of query positions of one dilation residue walks the halo of its windows (a box),
flattened, ``BLOCK_N`` keys a step, and accumulates ``dQ``.

``local_bwd_dkdv``: the inverse. A box of key positions (``BLOCK_N`` keys) of one residue and
one key/value head walks the query positions whose windows hold some of its keys. Along an
axis a window ``[lo(i), hi(i))`` has both ends monotone in ``i`` (clip and shift), so those
queries are again an interval per axis, :func:`~.local_fwd.inverse_window` (exact: a
shifted window reaches up to ``k - 1`` cells away at a border, a clipped one ``k // 2``),
cut to the query frames (positions of absolute frame ``>= T - T_Q``) and, when causal, to
query positions ``>=`` the box's first key position: a box of queries, walked flattened
``BLOCK_M`` at a time; each query's exact forward window is the mask. The program loops
over the ``GROUP`` query heads that share its key/value head (GQA), summing in registers:
deterministic, no atomics.

Both kernels take a half step for a last remainder of at most half a block (fewer padded
softmax elements). Grids: ``(boxes * dt*dh*dw * B*N,)`` and ``(boxes * dt*dh*dw * B*N_kv,)``.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import triton
import triton.language as tl

from ._common import block_d
from .common_bwd import aot_spec, dkdv_block, dq_block, load_cells, object_grad, store_cells
from .launch import Problem, cdiv, run
from .local_fwd import (
    box_walks, boxes, dilation_of, halo_cells, halo_split, inverse_window, program_box, steps, tile_of, window,
    window_anchor, configs_up_to, head_dim_pruner,
)
from .work import Work

# dQ: TILE_* the query box, BLOCK_M its size, BLOCK_N keys a step. dK/dV: TILE_* the key
# box, BLOCK_N its size, BLOCK_M queries a step. The first config is the interpreter's.
# One stage mostly: the blocks are gathers (a 64-bit address per element), and a prefetched
# second stage spills most tiles; each config is kept up to the head dim at which it compiles spill-free.
# At D = 128 a dQ box loads 2 * 2 * D bytes of K and V per halo key for 6 * D FLOPs per
# query (1.5 * BLOCK_M FLOPs per byte from L2): config 6 (32 queries, 8 warps, two stages)
# is the largest box spill-free there with and without objects on both archs (one stage
# spills 8 B with objects on sm_90a). 64- and 128-query boxes with 32 keys a step on 4 or 8
# warps compile spill-free on sm_90a (wgmma) but every one tried spills on sm_80 (96-2264 B),
# so they are not listed.
CONFIGS_DQ = [
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"TILE_T": 4, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 8, "BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"TILE_T": 4, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1),
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
    triton.Config({"TILE_T": 1, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
HEAD_DIMS_DQ = [(32, 64), (32, 64), (32, 64), (32,), (32, 64), (128,), (32, 64, 128)]
# the interpreter's config has 8 warps: at 4 warps the same tiles spill at D = 32 on sm_80.
# At D = 128 64-key boxes (32 or 64 queries a step, 4 or 8 warps, 1 or 2 stages) spill on
# sm_90a (256-1100 B; sm_80 takes some spill-free): the key box stays at 32 there.
CONFIGS_DKDV = [
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_N": 32, "BLOCK_M": 32}, num_warps=8, num_stages=1),
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_N": 32, "BLOCK_M": 32}, num_warps=4, num_stages=1),
]
HEAD_DIMS_DKDV = [(32, 64, 128), (64,)]
TUNE_KEY = ["B", "N", "GROUP", "T_Q", "T", "H", "W", "KT", "KH", "KW", "DT", "DH", "DW", "BLOCK_D", "NUM_OBJ", "CAUSAL",
            "SHIFT"]


@triton.jit
def dq_step(
    start, walk, q, do, lse, delta, args, gs, qpt, at, ay, ax, wt, wh, ww, dq,
    k_base, v_base, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, H, W, D,
    t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Halo keys ``start .. start + BLOCK_N - 1`` (those ``< walk``) into ``dQ / scale`` of
    the ``BLOCK_M`` queries. ``args``/``gs``: ``[BLOCK_M, BLOCK_O]`` argmax key and affinity
    gradient of each query, loaded once per program."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < walk
    kpt, kpy, kpx, kt, ky, kx = halo_cells(offs_n, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW)
    k = load_cells(k_base, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(v_base, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    # keys past the halo get a position no window holds (one vector less than a mask);
    # rows of queries past the box's edge are computed, never stored: no query mask
    kpt = tl.where(n_valid, kpt, -(1 << 20))
    in_pattern = (
        ((kpt[None, :] - at[:, None]).to(tl.uint32) < wt)
        & ((kpy[None, :] - ay[:, None]).to(tl.uint32) < wh)
        & ((kpx[None, :] - ax[:, None]).to(tl.uint32) < ww)
    )
    if CAUSAL:
        in_pattern = in_pattern & (kpt[None, :] <= qpt[:, None])
    if NUM_OBJ > 0:
        # sum_o g_o[p] [j == argmax_o(p)], from the program's own copy of Arg and G
        key_index = (kt * H + ky) * W + kx
        objects = tl.arange(0, BLOCK_O)
        obj = tl.zeros([BLOCK_M, BLOCK_N], gs.dtype)
        for o in tl.static_range(NUM_OBJ):
            arg_o = tl.sum(tl.where(objects[None, :] == o, args, 0), axis=1)
            g_o = tl.sum(tl.where(objects[None, :] == o, gs, 0.0), axis=1)
            obj += tl.where(arg_o[:, None] == key_index[None, :], g_o[:, None], 0.0)
    else:
        obj = 0.0
    return dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)


@triton.jit
def local_bwd_dq(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D, KT, KH, KW, DT, DH, DW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, SHIFT: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dQ`` of one box of queries. Q, DO ``(B, N, T_Q, H, W, D)``, K, V
    ``(B, N // GROUP, T, H, W, D)``, any strides; Lse, Delta ``(B*N, T_Q*H*W)``; Arg, G
    ``(B*N, O, T_Q*H*W)`` (Arg: absolute key index); DQ contiguous ``(B*N, T_Q*H*W, D)``."""
    tl.static_assert(BLOCK_M == TILE_T * TILE_H * TILE_W)
    t_off = T - T_Q
    S_Q = T_Q * H * W
    qpt, qpy, qpx, qt, qy, qx, m_valid, t0, y0, x0, t1, y1, x1, LT, LH, LW, rt, ry, rx, bn = program_box(
        tl.program_id(0), T, H, W, t_off, DT, DH, DW, TILE_T, TILE_H, TILE_W)
    b = (bn // N).to(tl.int64)
    n = (bn % N).to(tl.int64)
    kv = n // GROUP
    bn = bn.to(tl.int64)

    at, wt = window_anchor(qpt, LT, KT, SHIFT)
    ay, wh = window_anchor(qpy, LH, KH, SHIFT)
    ax, ww = window_anchor(qpx, LW, KW, SHIFT)
    t_lo, _ = window(t0, LT, KT, SHIFT)
    _, t_hi = window(t1, LT, KT, SHIFT)
    if CAUSAL:
        t_hi = tl.minimum(t_hi, t1 + 1)
    y_lo, _ = window(y0, LH, KH, SHIFT)
    _, y_hi = window(y1, LH, KH, SHIFT)
    x_lo, _ = window(x0, LW, KW, SHIFT)
    _, x_hi = window(x1, LW, KW, SHIFT)
    empty = (t1 < t0) | (y1 < y0) | (x1 < x0)
    ny = tl.maximum(y_hi - y_lo, 1)
    nx = tl.maximum(x_hi - x_lo, 1)
    halo = tl.where(empty, 0, (t_hi - t_lo) * (y_hi - y_lo) * (x_hi - x_lo))

    query_index = ((qt - t_off) * H + qy) * W + qx
    q = load_cells(Q + b * sq_b + n * sq_n, qt - t_off, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, qt - t_off, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S_Q + query_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S_Q + query_index, mask=m_valid, other=0.0)
    if NUM_OBJ > 0:
        objects = tl.arange(0, BLOCK_O)
        o_off = (bn * NUM_OBJ + objects[None, :].to(tl.int64)) * S_Q + query_index[:, None].to(tl.int64)
        o_mask = m_valid[:, None] & (objects[None, :] < NUM_OBJ)
        args = tl.load(Arg + o_off, mask=o_mask, other=-1)
        gs = tl.load(G + o_off, mask=o_mask, other=0.0)
    else:
        args = 0
        gs = 0.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)

    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n
    full_end = halo_split(halo, BLOCK_N)
    for start in range(0, full_end, BLOCK_N):
        dq = dq_step(start, halo, q, do, lse, delta, args, gs, qpt, at, ay, ax, wt, wh, ww, dq,
                     k_base, v_base, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, H, W, D,
                     t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, scale,
                     CAUSAL, NUM_OBJ, BLOCK_O, BLOCK_D, DOT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N)
    if full_end < halo:
        dq = dq_step(full_end, halo, q, do, lse, delta, args, gs, qpt, at, ay, ax, wt, wh, ww,
                     dq, k_base, v_base, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, H, W, D,
                     t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, scale,
                     CAUSAL, NUM_OBJ, BLOCK_O, BLOCK_D, DOT_PRECISION, DOT_FP32, BLOCK_M, BLOCK_N // 2)

    store_cells(DQ + bn * S_Q * D, dq * scale, query_index, m_valid, D, BLOCK_D)


@triton.jit
def dkdv_step(
    start, walk, k, v, kpt, kpy, kpx, k_index, dk, dv,
    q_base, do_base, sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d, Lse, Delta, Arg, G, bnq, S_Q, t_off,
    H, W, D, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, LT, LH, LW, KT, KH, KW, scale,
    CAUSAL: tl.constexpr, SHIFT: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Queries ``start .. start + BLOCK_M - 1`` (those ``< walk``) of the box of queries
    reaching the program's keys, of query head ``bnq``, into ``dK / scale`` and ``dV``."""
    offs_m = start + tl.arange(0, BLOCK_M)
    m_valid = offs_m < walk
    qpt, qpy, qpx, qt, qy, qx = halo_cells(offs_m, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW)
    at, wt = window_anchor(qpt, LT, KT, SHIFT)
    ay, wh = window_anchor(qpy, LH, KH, SHIFT)
    ax, wx_w = window_anchor(qpx, LW, KW, SHIFT)
    # queries past the walk get an anchor no key reaches (the keys past the box already
    # have a position no window holds): the window compares are the whole mask
    at = tl.where(m_valid, at, 1 << 20)
    in_pattern = (
        ((kpt[:, None] - at[None, :]).to(tl.uint32) < wt)
        & ((kpy[:, None] - ay[None, :]).to(tl.uint32) < wh)
        & ((kpx[:, None] - ax[None, :]).to(tl.uint32) < wx_w)
    )
    if CAUSAL:
        in_pattern = in_pattern & (kpt[:, None] <= qpt[None, :])
    query_index = ((qt - t_off) * H + qy) * W + qx
    q = load_cells(q_base, qt - t_off, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(do_base, qt - t_off, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bnq * S_Q + query_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bnq * S_Q + query_index, mask=m_valid, other=0.0)
    if NUM_OBJ > 0:
        obj = object_grad(Arg, G, bnq, S_Q, query_index, m_valid, k_index, NUM_OBJ, True)
    else:
        obj = 0.0
    return dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)


@triton.jit
def local_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D, KT, KH, KW, DT, DH, DW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, SHIFT: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``dK`` and ``dV`` of one box of keys of one key/value head, summed over its ``GROUP``
    query heads; arguments as in :func:`local_bwd_dq`, DK and DV contiguous
    ``(B*N_kv, T*H*W, D)``."""
    tl.static_assert(BLOCK_N == TILE_T * TILE_H * TILE_W)
    t_off = T - T_Q
    S = T * H * W
    S_Q = T_Q * H * W
    N_KV = N // GROUP
    kpt, kpy, kpx, kt, ky, kx, n_valid, t0, y0, x0, t1, y1, x1, LT, LH, LW, rt, ry, rx, bkv = program_box(
        tl.program_id(0), T, H, W, 0, DT, DH, DW, TILE_T, TILE_H, TILE_W)
    b = (bkv // N_KV).to(tl.int64)
    kv = (bkv % N_KV).to(tl.int64)
    k_index = (kt * H + ky) * W + kx
    k = load_cells(K + b * sk_b + kv * sk_n, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + kv * sv_n, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    # keys past the box: a position no window holds, so the loop needs no key mask
    kpt_w = tl.where(n_valid, kpt, -(1 << 20))

    # the queries whose windows reach the box: a box of query positions (module docstring)
    first_t = (t_off - rt + DT - 1) // DT
    t_lo, t_hi = inverse_window(t0, t1, LT, KT, SHIFT)
    t_lo = tl.maximum(t_lo, first_t)
    if CAUSAL:
        t_lo = tl.maximum(t_lo, t0)
    y_lo, y_hi = inverse_window(y0, y1, LH, KH, SHIFT)
    x_lo, x_hi = inverse_window(x0, x1, LW, KW, SHIFT)
    empty = (t1 < t0) | (y1 < y0) | (x1 < x0) | (t_hi <= t_lo)
    ny = tl.maximum(y_hi - y_lo, 1)
    nx = tl.maximum(x_hi - x_lo, 1)
    walk = tl.where(empty, 0, (t_hi - t_lo) * (y_hi - y_lo) * (x_hi - x_lo))
    full_end = halo_split(walk, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    for g in range(GROUP):
        n = kv * GROUP + g
        bnq = b * N + n
        q_base = Q + b * sq_b + n * sq_n
        do_base = DO + b * sdo_b + n * sdo_n
        for start in range(0, full_end, BLOCK_M):
            dk, dv = dkdv_step(start, walk, k, v, kpt_w, kpy, kpx, k_index, dk, dv,
                               q_base, do_base, sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d,
                               Lse, Delta, Arg, G, bnq, S_Q, t_off, H, W, D, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx,
                               DT, DH, DW, LT, LH, LW, KT, KH, KW, scale,
                               CAUSAL, SHIFT, NUM_OBJ, BLOCK_D, DOT_PRECISION, DOT_FP32, BLOCK_M)
        if full_end < walk:
            dk, dv = dkdv_step(full_end, walk, k, v, kpt_w, kpy, kpx, k_index, dk, dv,
                               q_base, do_base, sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d,
                               Lse, Delta, Arg, G, bnq, S_Q, t_off, H, W, D, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx,
                               DT, DH, DW, LT, LH, LW, KT, KH, KW, scale,
                               CAUSAL, SHIFT, NUM_OBJ, BLOCK_D, DOT_PRECISION, DOT_FP32, BLOCK_M // 2)

    bkv = bkv.to(tl.int64)
    store_cells(DK + bkv * S * D, dk * scale, k_index, n_valid, D, BLOCK_D)
    store_cells(DV + bkv * S * D, dv, k_index, n_valid, D, BLOCK_D)


local_bwd_dq_tuned = triton.autotune(
    CONFIGS_DQ, key=TUNE_KEY,
    prune_configs_by={"early_config_prune": head_dim_pruner(CONFIGS_DQ, HEAD_DIMS_DQ)})(local_bwd_dq)
local_bwd_dkdv_tuned = triton.autotune(
    CONFIGS_DKDV, key=TUNE_KEY,
    prune_configs_by={"early_config_prune": head_dim_pruner(CONFIGS_DKDV, HEAD_DIMS_DKDV)})(local_bwd_dkdv)

AOT_HEAD_DIMS = (32, 64, 128)
AOT_SPECS = [
    aot_spec(
        f"local_bwd_{part}[d{d}]", kernel, outputs,
        dict(B=1, GROUP=2, T_Q=4, KT=3, KH=7, KW=7, DT=1, DH=2, DW=2, D=d),
        dict(CAUSAL=True, NUM_OBJ=3, BLOCK_O=4, BLOCK_D=d, DOT_PRECISION="ieee", DOT_FP32=False, SHIFT=True),
        configs_up_to(configs, configs, max_dims, d),
        f"bf16, contiguous (1, 8, 4, 32, 32, {d}), kernel (3, 7, 7), dilation (1, 2, 2), GQA group 2, shift, "
        "causal, 3 objects",
    )
    for d in AOT_HEAD_DIMS
    for part, kernel, outputs, configs, max_dims in (
        ("dq", local_bwd_dq, ("DQ",), CONFIGS_DQ, HEAD_DIMS_DQ),
        ("dkdv", local_bwd_dkdv, ("DK", "DV"), CONFIGS_DKDV, HEAD_DIMS_DKDV),
    )
]


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch the dQ and the dK/dV kernels for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    dilation = dilation_of(p)
    residues = math.prod(dilation)
    sizes = (p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, *p.pattern.kernel_size, *dilation, float(scale))
    grid_q = lambda m: (boxes(p, (m["TILE_T"], m["TILE_H"], m["TILE_W"])) * residues * p.B * p.N,)  # noqa: E731
    grid_k = lambda m: (boxes(p, (m["TILE_T"], m["TILE_H"], m["TILE_W"]), queries=False)  # noqa: E731
                        * residues * p.B * p.N_kv,)
    meta = {**meta, "SHIFT": p.pattern.boundary == "shift", "BLOCK_O": max(2, triton.next_power_of_2(max(1, meta["NUM_OBJ"])))}
    limits = f"B*N={p.B * p.N}, T={p.T}, H={p.H}, W={p.W}, dilation={p.dilation}"
    module = sys.modules[__name__]
    run(module, "local_bwd_dq", grid_q, (*inputs, dq, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DQ, config=config_dq, sizes=limits)
    run(module, "local_bwd_dkdv", grid_k, (*inputs, dk, dv, *strides, *sizes), meta, interpret=interpret,
        configs=CONFIGS_DKDV, config=config_dkdv, sizes=limits)


def work_backward(p: Problem, config_dq, config_dkdv, dtype_bytes: int = 4, acc_bytes: int = 4) -> tuple[Work, Work]:
    """The work :func:`local_bwd_dq` and :func:`local_bwd_dkdv` issue for ``p`` (rules in
    :mod:`.work`); ``dtype_bytes``: element size of q, k, v, dO; ``acc_bytes``: of Lse,
    Delta, G (float32)."""
    bd = block_d(p.D)
    D, es, O = p.D, dtype_bytes, p.num_obj
    # per query: q, dO rows, lse, delta, and per object Arg (int32) and G
    query_bytes = 2 * D * es + 2 * acc_bytes + O * (4 + acc_bytes)

    bm, bn = config_dq.kwargs["BLOCK_M"], config_dq.kwargs["BLOCK_N"]
    walks, walked = box_walks(p, tile_of(config_dq), inverse=False)
    heads = p.B * p.N
    wq = Work()
    for valid, halo in walks:
        full, half = steps(halo, bn)
        wq.programs += len(valid) * heads
        wq.exp += heads * bm * (full * bn + half * bn // 2)
        wq.dot_flops += heads * (full * bn + half * bn // 2) * 3 * 2 * bm * bd
        wq.load_bytes += heads * (int(valid.sum()) * query_bytes + int(halo.sum()) * 2 * D * es)
    wq.distinct_bytes = p.B * p.N * p.S_q * query_bytes + p.B * p.N_kv * int(walked.sum()) * 2 * D * es
    wq.store_bytes = p.B * p.N * p.S_q * D * es  # dQ, once per query

    bn, bm = config_dkdv.kwargs["BLOCK_N"], config_dkdv.kwargs["BLOCK_M"]
    walks, walked = box_walks(p, tile_of(config_dkdv), inverse=True)
    heads = p.B * p.N_kv
    wk = Work()
    for valid, region in walks:
        full, half = steps(region, bm)
        wk.programs += len(valid) * heads
        wk.exp += heads * p.group * bn * (full * bm + half * bm // 2)
        wk.dot_flops += heads * p.group * (full * bm + half * bm // 2) * 4 * 2 * bn * bd
        wk.load_bytes += heads * (int(valid.sum()) * 2 * D * es + p.group * int(region.sum()) * query_bytes)
    wk.distinct_bytes = p.B * p.N_kv * p.S * 2 * D * es + p.B * p.N * int(walked.sum()) * query_bytes
    wk.store_bytes = p.B * p.N_kv * p.S * 2 * D * es  # dK, dV, once per key
    return wq, wk
