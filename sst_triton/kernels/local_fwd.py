"""Local (cube) attention forward: a 3-D box of queries against the halo of its windows.

Geometry (shared with :mod:`.local_bwd`):

- **Dilation is a fold.** Along an axis of length ``L`` with dilation ``d`` (NATTEN), the
  cells ``c`` with ``c mod d = r`` form a sub-sequence of ``ceil((L - r) / d)`` cells, cell
  ``c`` at position ``c // d``, and a window never leaves its sub-sequence. So a dilated
  problem is ``dt * dh * dw`` interleaved undilated problems, one per residue
  ``(rt, ry, rx)``: a program lives in one residue and works on *positions*; only
  addresses turn a position ``i`` back into the cell ``r + i * d``. ``d = 1`` is the
  plain problem (one residue, position = cell).
- **Query boxes.** One program takes a ``TILE_T x TILE_H x TILE_W`` box of query positions
  (``BLOCK_M`` queries, ``t``-major). Query frames are the last ``T_Q`` of the ``T`` key
  frames (SPEC.md version 2): along ``t`` the boxes start at the first position whose
  absolute frame is ``>= T - T_Q``; every rule (windows, causal, causal affinity, shift)
  uses absolute frames, i.e. positions of the same residue.
- **The halo is a box.** A window is a product of per-axis intervals, each monotone in the
  query coordinate for both ``clip`` and ``shift`` (and ``causal`` only cuts ``t``), so the
  union of the windows of a box of queries is the box ``[lo(first), hi(last))`` per axis:
  no key of it is reached by no query, and nothing outside it is reached. The program walks
  exactly that halo, flattened ``t``-major, ``BLOCK_N`` keys at a time, with ``tl.dot`` for
  ``Q K^T`` and ``P V``; each query masks the keys outside its own window. Walking the
  flattened halo pads only its last block, where fixed key sub-boxes would pad every axis
  of every halo (a 6-row border halo in 4-row sub-boxes wastes a quarter).

Work per program (see :func:`work_forward`): ``ceil(halo / BLOCK_N)`` blocks of
``BLOCK_M x BLOCK_N`` softmax elements, against ``prod_axis(window_axis)`` useful keys per
query: the box shape trades softmax elements (small boxes: halo close to one window) for
loads (large boxes: each key loaded by fewer programs). The first configuration, ``2 x 4 x
4``, keeps both ``E <= 2.6`` and ``L <= 6`` for the kernels SST uses ((7, 5, 5) and
(3, 7, 7) at ``T = 4``); the GPU autotuner also sees 64- and 128-query boxes (wgmma).

Grid: ``(tiles * dt*dh*dw * B*N,)``, everything on axis 0 (tiles fastest: neighbouring
programs share halos in L2).
"""
from __future__ import annotations

import math
import sys

import numpy as np
import triton
import triton.language as tl

from ._common import block_d, block_o, dot, forward_aot_specs, object_max_block, online_softmax_block, store_results
from .launch import Problem, cdiv, run
from .work import Work

# TILE_* is the query box, BLOCK_M its size (read by the shared register-budget pruner),
# BLOCK_N the keys per step. The first config is the interpreter's (and the work targets').
# Each config is kept up to the head dim at which it compiles spill-free on sm_80 and sm_90a
# (``python -m sst_triton.aot --check``): a gathered key block needs a 64-bit address per
# element, so a second pipeline stage costs as many registers as the block itself.
# Large head dims need large boxes: a box loads every key of its halo once (2 * 2 * D bytes,
# bf16 K and V) for 4 * D FLOPs per query, so it issues about BLOCK_M FLOPs per byte it
# reads from L2; under ~110 (989 TFLOP/s over ~9 TB/s of L2) L2 bounds it before the tensor
# cores do. At D = 128 the 128-query boxes with 32 keys a step (configs 4, 5) are the ones
# that compile spill-free with and without objects on both archs (180-254 registers on 8
# warps: one CTA per SM); every 64-query box tried spills on sm_80 there (72-2020 B at 4
# and 8 warps, 1-3 stages) and 64 keys a step spill with objects (40-324 B).
CONFIGS = [
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"TILE_T": 4, "TILE_H": 4, "TILE_W": 4, "BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1),
    triton.Config({"TILE_T": 2, "TILE_H": 4, "TILE_W": 8, "BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1),
    triton.Config({"TILE_T": 1, "TILE_H": 8, "TILE_W": 8, "BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"TILE_T": 4, "TILE_H": 4, "TILE_W": 8, "BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=1),
    triton.Config({"TILE_T": 2, "TILE_H": 8, "TILE_W": 8, "BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=1),
]
# the checked head dims (32, 64, 128) each config compiles spill-free at, on sm_80 and sm_90a
HEAD_DIMS = [(32, 64, 128), (32, 64), (32, 64), (32, 64), (32, 64, 128), (32, 64, 128)]


def configs_up_to(configs: list, table: list, head_dims: list, bd: int) -> list:
    """The configs of ``configs`` (members of ``table``) checked spill-free at the head-dim
    class of padded head dim ``bd`` (32, 64 or 128: the smallest at least ``bd``); the first
    of ``table`` when none is (head dims past 128: correct, not spill-checked)."""
    bucket = next((d for d in (32, 64, 128) if bd <= d), None)
    kept = [c for c in configs if bucket in head_dims[_index(table, c)]]
    return kept or [table[0]]


def _index(table: list, config) -> int:
    for i, c in enumerate(table):
        if c is config or (c.kwargs == config.kwargs and c.num_warps == config.num_warps
                           and c.num_stages == config.num_stages):
            return i
    raise ValueError(f"unknown config {config}")


def head_dim_pruner(table: list, head_dims: list):
    """``early_config_prune`` keeping the configs of ``table`` allowed at the call's BLOCK_D."""

    def prune(configs, named_args, **kwargs):
        return configs_up_to(list(configs), table, head_dims, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))

    return prune


TUNE_KEY = ["B", "N", "GROUP", "T_Q", "T", "H", "W", "KT", "KH", "KW", "DT", "DH", "DW", "BLOCK_D", "NUM_OBJ", "CAUSAL",
            "SHIFT"]


@triton.jit
def window(i, length, k, SHIFT: tl.constexpr):
    """First and one-past-last key position of the window of position(s) ``i`` on an axis
    (or dilation sub-sequence) of ``length`` positions, kernel ``k`` (SPEC.md)."""
    if SHIFT:
        lo = tl.minimum(tl.maximum(i - k // 2, 0), tl.maximum(length - k, 0))
        hi = tl.minimum(lo + k, length)
    else:
        lo = tl.maximum(i - k // 2, 0)
        hi = tl.minimum(i + k // 2 + 1, length)
    return lo, hi


@triton.jit
def window_anchor(i, length, k, SHIFT: tl.constexpr):
    """Anchor ``a(i)`` and width ``w`` of the window of position(s) ``i``: a key position
    ``0 <= j < length`` is in it iff ``uint32(j - a(i)) < w`` (one compare per axis and one
    vector per query instead of two). clip: ``|j - i| <= k // 2``; shift: ``w = min(k, length)``
    keys from ``lo(i)``."""
    if SHIFT:
        a = tl.minimum(tl.maximum(i - k // 2, 0), tl.maximum(length - k, 0))
        w = tl.minimum(length, k)
    else:
        a = i - k // 2
        w = k + 0 * length
    return a, tl.cast(w, tl.uint32)


@triton.jit
def inverse_window(j0, j1, length, k, SHIFT: tl.constexpr):
    """``[lo, hi)``: the query positions whose window holds some key position of
    ``[j0, j1]`` (the inverse of :func:`window`, exact for both boundaries).

    clip: ``|i - j| <= k // 2``. shift: ``hi(i) = lo(i) + k > j0`` first holds at
    ``i = j0 - k + 1 + k // 2`` (0 if that window start is clamped), ``lo(i) <= j1`` last
    holds at ``j1 + k // 2`` (the end of the axis once ``j1`` reaches the last window start
    ``length - k``)."""
    c = k // 2
    if SHIFT:
        a = j0 - k + 1
        lo = tl.where(a > 0, a + c, 0)
        hi = tl.where(j1 >= length - k, length, tl.minimum(j1 + c + 1, length))
    else:
        lo = tl.maximum(j0 - c, 0)
        hi = tl.minimum(j1 + c + 1, length)
    return lo, hi


@triton.jit
def residue_program(pid, N_BOX, DT, DH, DW):
    """Split an axis-0 program id into ``(box, rt, ry, rx, bn)``: box fastest, then the
    dilation residue, then the batch-head."""
    box = pid % N_BOX
    rest = pid // N_BOX
    res = rest % (DT * DH * DW)
    bn = rest // (DT * DH * DW)
    return box, res // (DH * DW), (res // DW) % DH, res % DW, bn


@triton.jit
def box_positions(box, first_t, LT, LH, LW, TILES_H, TILES_W,
                  TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Positions ``[TILE_T*TILE_H*TILE_W]`` of box number ``box`` (``t``-major) of a
    residue whose sub-sequences have ``LT x LH x LW`` positions, boxes along ``t`` starting
    at position ``first_t``; plus the box's corner and its last valid position per axis
    (last < first when the box is empty)."""
    offs = tl.arange(0, TILE_T * TILE_H * TILE_W)
    t0 = first_t + (box // (TILES_H * TILES_W)) * TILE_T
    y0 = ((box // TILES_W) % TILES_H) * TILE_H
    x0 = (box % TILES_W) * TILE_W
    pt = t0 + offs // (TILE_H * TILE_W)
    py = y0 + (offs // TILE_W) % TILE_H
    px = x0 + offs % TILE_W
    valid = (pt < LT) & (py < LH) & (px < LW)
    t1 = tl.minimum(t0 + TILE_T, LT) - 1
    y1 = tl.minimum(y0 + TILE_H, LH) - 1
    x1 = tl.minimum(x0 + TILE_W, LW) - 1
    return pt, py, px, valid, t0, y0, x0, t1, y1, x1


@triton.jit
def program_box(pid, T, H, W, T_FIRST, DT, DH, DW,
                TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The box of cells that axis-0 program ``pid`` takes, shared by every local kernel.

    Boxes of ``TILE_T x TILE_H x TILE_W`` positions cover, per dilation residue
    ``(rt, ry, rx)``, the positions of frames ``T_FIRST .. T - 1`` (the query frames, or every
    key frame with ``T_FIRST = 0``). Returns the positions ``(pt, py, px)`` and cells
    ``(t, y, x)`` of the box (each ``[TILE_T*TILE_H*TILE_W]``) with their validity, the
    box's first and last valid position per axis, the residue's sub-sequence lengths
    ``(LT, LH, LW)``, the residue and the batch-head index.
    """
    tiles_h = tl.cdiv(tl.cdiv(H, DH), TILE_H)
    tiles_w = tl.cdiv(tl.cdiv(W, DW), TILE_W)
    n_box = tl.cdiv(tl.cdiv(T - T_FIRST, DT), TILE_T) * tiles_h * tiles_w
    box, rt, ry, rx, bn = residue_program(pid, n_box, DT, DH, DW)
    # positions per axis of this residue's sub-sequences; the first frame's position
    LT = (T - rt + DT - 1) // DT
    LH = (H - ry + DH - 1) // DH
    LW = (W - rx + DW - 1) // DW
    first_t = (T_FIRST - rt + DT - 1) // DT
    pt, py, px, valid, t0, y0, x0, t1, y1, x1 = box_positions(
        box, first_t, LT, LH, LW, tiles_h, tiles_w, TILE_T, TILE_H, TILE_W)
    return (pt, py, px, rt + pt * DT, ry + py * DH, rx + px * DW, valid,
            t0, y0, x0, t1, y1, x1, LT, LH, LW, rt, ry, rx, bn)


@triton.jit
def halo_cells(offs, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW):
    """Positions and cells of offsets ``offs`` of a box ``[t_lo, .) x [y_lo, y_lo + ny) x
    [x_lo, x_lo + nx)`` of positions flattened ``t``-major (``ny, nx >= 1``)."""
    pt = t_lo + offs // (ny * nx)
    py = y_lo + (offs // nx) % ny
    px = x_lo + offs % nx
    return pt, py, px, rt + pt * DT, ry + py * DH, rx + px * DW


@triton.jit
def halo_split(halo, BLOCK_N: tl.constexpr):
    """Where the full ``BLOCK_N`` steps over ``halo`` keys end: before a last remainder of
    at most ``BLOCK_N // 2`` keys (walked as one half step), else at ``halo``."""
    rem = halo % BLOCK_N
    return tl.where((rem > 0) & (rem <= BLOCK_N // 2), halo - rem, halo)


@triton.jit
def fwd_step(
    start, halo, q, qpt, at, ay, ax, wt, wh, ww, m_i, l_i, acc, a_max, a_arg,
    k_base, v_base, labels_base, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, H, W, D,
    t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Halo keys ``start .. start + BLOCK_N - 1`` (those ``< halo``) into the running state
    of the ``BLOCK_M`` queries: logits, each query's window mask, object maxima, online
    softmax. ``k_base``/``v_base``/``labels_base``: the batch(-kv-head)'s first element."""
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < halo
    kpt, kpy, kpx, kt, ky, kx = halo_cells(offs_n, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW)
    k_cols = kt.to(tl.int64) * sk_t + ky.to(tl.int64) * sk_h + kx.to(tl.int64) * sk_w
    kT = tl.load(k_base + k_cols[None, :] + offs_d[:, None].to(tl.int64) * sk_d,
                 mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    v_rows = kt.to(tl.int64) * sv_t + ky.to(tl.int64) * sv_h + kx.to(tl.int64) * sv_w
    v = tl.load(v_base + v_rows[:, None] + offs_d[None, :].to(tl.int64) * sv_d,
                mask=n_valid[:, None] & d_valid[None, :], other=0.0)
    s = dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PRECISION, INTERPRET_BF16) * scale_log2
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
    s = tl.where(in_pattern, s, float("-inf"))
    if NUM_OBJ > 0:
        key_labels = tl.load(labels_base + (kt * H + ky) * W + kx, mask=n_valid, other=-1)
        eligible = in_pattern
        if CAUSAL_AFF:
            eligible = eligible & (kpt[None, :] < qpt[:, None])
        # a_arg holds halo offsets until the epilogue
        a_max, a_arg = object_max_block(s, eligible, key_labels, start, a_max, a_arg, NUM_OBJ, BLOCK_O)
    m_i, l_i, acc = online_softmax_block(s, m_i, l_i, acc, v, DOT_PRECISION, INTERPRET_BF16)
    return m_i, l_i, acc, a_max, a_arg


@triton.jit
def local_fwd(
    Q, K, V, Labels, Out, Lse, Aff, Arg,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    B, N, GROUP, T_Q, T, H, W, D, KT, KH, KW, DT, DH, DW,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, SHIFT: tl.constexpr,
    TILE_T: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Q ``(B, N, T_Q, H, W, D)``, K, V ``(B, N // GROUP, T, H, W, D)``, any strides; Labels
    int32 ``(B, T, H, W)``; Out contiguous ``(B*N, T_Q*H*W, D)``, Lse ``(B*N, T_Q*H*W)``,
    Aff/Arg ``(B*N, O, T_Q*H*W)``. ``KT, KH, KW`` odd kernel size, ``DT, DH, DW`` dilation."""
    tl.static_assert(BLOCK_M == TILE_T * TILE_H * TILE_W)
    t_off = T - T_Q
    qpt, qpy, qpx, qt, qy, qx, m_valid, t0, y0, x0, t1, y1, x1, LT, LH, LW, rt, ry, rx, bn = program_box(
        tl.program_id(0), T, H, W, t_off, DT, DH, DW, TILE_T, TILE_H, TILE_W)
    b = (bn // N).to(tl.int64)
    n = (bn % N).to(tl.int64)
    kv = n // GROUP
    S = T * H * W

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q_rows = (qt - t_off).to(tl.int64) * sq_t + qy.to(tl.int64) * sq_h + qx.to(tl.int64) * sq_w
    q = tl.load(Q + b * sq_b + n * sq_n + q_rows[:, None] + offs_d[None, :].to(tl.int64) * sq_d,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    # each query's own window, in positions
    at, wt = window_anchor(qpt, LT, KT, SHIFT)
    ay, wh = window_anchor(qpy, LH, KH, SHIFT)
    ax, ww = window_anchor(qpx, LW, KW, SHIFT)
    # the halo: the union of the box's windows, itself a box (module docstring)
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n
    # BLOCK_N keys a step; a last remainder of at most BLOCK_N // 2 keys takes a half step
    # (fewer padded softmax elements: a halo is rarely a multiple of BLOCK_N)
    full_end = halo_split(halo, BLOCK_N)
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc, a_max, a_arg = fwd_step(
            start, halo, q, qpt, at, ay, ax, wt, wh, ww, m_i, l_i, acc, a_max, a_arg,
            k_base, v_base, Labels + b * S, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, H, W, D,
            t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, scale_log2,
            CAUSAL, CAUSAL_AFF, NUM_OBJ, BLOCK_O, BLOCK_D, DOT_PRECISION, INTERPRET_BF16, BLOCK_M, BLOCK_N)
    if full_end < halo:
        m_i, l_i, acc, a_max, a_arg = fwd_step(
            full_end, halo, q, qpt, at, ay, ax, wt, wh, ww, m_i, l_i, acc, a_max, a_arg,
            k_base, v_base, Labels + b * S, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, H, W, D,
            t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW, scale_log2,
            CAUSAL, CAUSAL_AFF, NUM_OBJ, BLOCK_O, BLOCK_D, DOT_PRECISION, INTERPRET_BF16, BLOCK_M, BLOCK_N // 2)

    query_index = ((qt - t_off) * H + qy) * W + qx
    if NUM_OBJ > 0:
        _, _, _, at, ay, ax = halo_cells(a_arg, t_lo, y_lo, x_lo, ny, nx, rt, ry, rx, DT, DH, DW)
        a_arg = (at * H + ay) * W + ax
    store_results(
        Out, Lse, Aff, Arg, bn.to(tl.int64), T_Q * H * W, D, query_index, m_valid, m_i, l_i, acc, a_max, a_arg,
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


local_fwd_tuned = triton.autotune(
    CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": head_dim_pruner(CONFIGS, HEAD_DIMS)},
)(local_fwd)

AOT_SPECS = forward_aot_specs(
    "local_fwd", local_fwd, CONFIGS,
    dict(B=1, GROUP=2, T_Q=4, KT=3, KH=7, KW=7, DT=1, DH=2, DW=2), dict(CAUSAL=True, CAUSAL_AFF=True, SHIFT=False),
    "kernel (3, 7, 7), dilation (1, 2, 2), GQA group 2, clip, causal",
)
for _spec in AOT_SPECS:
    _spec.configs = configs_up_to(CONFIGS, CONFIGS, HEAD_DIMS, _spec.constexprs["BLOCK_D"])


# ---------------------------------------------------------------------------------------
# Launch geometry and the work model
# ---------------------------------------------------------------------------------------


def dilation_of(p: Problem) -> tuple[int, int, int]:
    """The dilation the kernels run: ``min(d, L)`` per axis. A dilation at or past an axis
    makes every cell its own sub-sequence of one position, as ``d = L`` does, and would
    only add residues with no cell."""
    return tuple(min(d, L) for d, L in zip(p.dilation, (p.T, p.H, p.W)))


def boxes(p: Problem, tile: tuple[int, int, int], queries: bool = True) -> int:
    """Boxes per residue: of query positions (``queries``) or of key positions."""
    frames = p.T_q if queries else p.T
    return math.prod(cdiv(cdiv(L, d), t) for L, d, t in zip((frames, p.H, p.W), dilation_of(p), tile))


def tile_of(config) -> tuple[int, int, int]:
    kw = config.kwargs
    return kw["TILE_T"], kw["TILE_H"], kw["TILE_W"]


def launch_forward(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                   interpret: bool, config=None) -> None:
    """Launch :func:`local_fwd` for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    dilation = dilation_of(p)
    residues = math.prod(dilation)
    grid = lambda m: (boxes(p, (m["TILE_T"], m["TILE_H"], m["TILE_W"])) * residues * p.B * p.N,)  # noqa: E731
    args = (*pointers, *strides, p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, *p.pattern.kernel_size, *dilation,
            scale_log2)
    run(sys.modules[__name__], "local_fwd", grid, args, {**meta, "SHIFT": p.pattern.boundary == "shift"},
        interpret=interpret, configs=CONFIGS, config=config,
        sizes=f"B*N={p.B * p.N}, T_q={p.T_q}, H={p.H}, W={p.W}, dilation={p.dilation}")


def _window(i: np.ndarray, length: int, k: int, shift: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`window` in numpy."""
    if shift:
        lo = np.minimum(np.maximum(i - k // 2, 0), max(length - k, 0))
        return lo, np.minimum(lo + k, length)
    return np.maximum(i - k // 2, 0), np.minimum(i + k // 2 + 1, length)


def _inverse_window(j0: np.ndarray, j1: np.ndarray, length: int, k: int, shift: bool):
    """:func:`inverse_window` in numpy."""
    c = k // 2
    if shift:
        a = j0 - k + 1
        return np.where(a > 0, a + c, 0), np.where(j1 >= length - k, length, np.minimum(j1 + c + 1, length))
    return np.maximum(j0 - c, 0), np.minimum(j1 + c + 1, length)


def axis_boxes(length: int, first: int, tile: int, n_boxes: int, k: int, shift: bool, causal: bool = False,
               inverse: bool = False, reach_first: int = 0):
    """Per box along one axis of one residue: ``(valid positions, lo, hi)`` of the other side.

    Forward/dQ (``inverse=False``): boxes of query positions from ``first``; ``[lo, hi)``
    the union of their windows. dK/dV (``inverse=True``): boxes of key positions from 0;
    ``[lo, hi)`` the query positions reaching them, cut to ``>= reach_first`` (query frames).
    ``causal`` applies to the ``t`` axis only.
    """
    j0 = first + tile * np.arange(n_boxes)
    j1 = np.minimum(j0 + tile, length) - 1
    valid = np.maximum(j1 - j0 + 1, 0)
    if inverse:
        lo, hi = _inverse_window(j0, j1, length, k, shift)
        lo = np.maximum(lo, reach_first)
        if causal:
            lo = np.maximum(lo, j0)
    else:
        lo, _ = _window(j0, length, k, shift)
        _, hi = _window(j1, length, k, shift)
        if causal:
            hi = np.minimum(hi, j1 + 1)
    span = np.where(valid > 0, np.maximum(hi - lo, 0), 0)
    return valid, lo, span


def box_walks(p: Problem, tile: tuple[int, int, int], inverse: bool):
    """For every residue: per-box valid cells of the box, size of the box walked against it,
    and the cells (as a boolean ``(T, H, W)`` of the walked side) that some box walks."""
    kernel = p.pattern.kernel_size
    shift = p.pattern.boundary == "shift"
    frames = (p.T, p.H, p.W)
    dil = dilation_of(p)
    walked = np.zeros(frames, dtype=bool)
    out = []
    for rt in range(dil[0]):
        for ry in range(dil[1]):
            for rx in range(dil[2]):
                r = (rt, ry, rx)
                lengths = [-(-(L - ri) // d) for L, ri, d in zip(frames, r, dil)]
                first_t = -(-(p.t_off - rt) // dil[0]) if p.t_off > rt else 0
                n_t = cdiv(cdiv(p.T_q if not inverse else p.T, dil[0]), tile[0])
                counts = [n_t, cdiv(cdiv(p.H, dil[1]), tile[1]), cdiv(cdiv(p.W, dil[2]), tile[2])]
                axes = []
                for a in range(3):
                    axes.append(axis_boxes(
                        lengths[a], 0 if (a or inverse) else first_t, tile[a], counts[a], kernel[a], shift,
                        causal=(a == 0 and p.pattern.causal), inverse=inverse, reach_first=first_t if a == 0 else 0,
                    ))
                (vt, lt, st), (vy, ly, sy), (vx, lx, sx) = axes
                valid = vt[:, None, None] * vy[None, :, None] * vx[None, None, :]
                span = st[:, None, None] * sy[None, :, None] * sx[None, None, :]
                span = np.where(valid > 0, span, 0)
                out.append((valid.ravel(), span.ravel()))
                # cells of the walked side: union of the per-axis walked intervals
                masks = []
                for a, (v_, l_, s_) in enumerate(axes):
                    m = np.zeros(lengths[a], dtype=bool)
                    for lo, s, v in zip(l_, s_, v_):
                        if v > 0 and s > 0:
                            m[lo:lo + s] = True
                    masks.append(m)
                # a cell is walked iff some box walks it: boxes are a product, so are the unions,
                # but only when every axis has a box with a non-empty span on the others too
                if all(m.any() for m in masks):
                    cube = masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]
                    walked[rt::dil[0], ry::dil[1], rx::dil[2]] |= cube
    return out, walked


def steps(walk: np.ndarray, block: int) -> tuple[int, int]:
    """Full and half steps of :func:`halo_split`'s walk over ``walk`` cells per program."""
    rem = walk % block
    half = (rem > 0) & (rem <= block // 2)
    full = np.where(half, walk // block, -(-walk // block))
    return int(full.sum()), int(half.sum())


def work_forward(p: Problem, config, dtype_bytes: int = 4) -> Work:
    """The work :func:`local_fwd` issues for ``p`` under ``config`` (rules in :mod:`.work`);
    ``dtype_bytes``: element size of q, k, v."""
    bm, bn_ = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    bd, bo = block_d(p.D), block_o(p.num_obj)
    walks, walked = box_walks(p, tile_of(config), inverse=False)
    heads = p.B * p.N
    w = Work()
    for valid, halo in walks:
        full, half = steps(halo, bn_)
        w.programs += len(valid) * heads
        w.exp += heads * (full * (bm * bn_ + bm) + half * (bm * bn_ // 2 + bm) + (len(valid) * bm * bo if p.num_obj else 0))
        w.dot_flops += heads * (full * bn_ + half * bn_ // 2) * 2 * (2 * bm * bd)
        keys = int(halo.sum())
        w.load_bytes += heads * (int(valid.sum()) * p.D * dtype_bytes + keys * 2 * p.D * dtype_bytes
                                 + (keys * 4 if p.num_obj else 0))
    cells = int(walked.sum())
    w.distinct_bytes = (p.B * p.N * p.S_q * p.D * dtype_bytes + p.B * p.N_kv * cells * 2 * p.D * dtype_bytes
                        + (p.B * cells * 4 if p.num_obj else 0))
    # written once per query: out, lse (float32), affinity (float32) and argmax (int32)
    w.store_bytes = heads * p.S_q * (p.D * dtype_bytes + 4 + 2 * p.num_obj * 4)
    return w

