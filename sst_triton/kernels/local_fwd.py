"""Local (cube) attention forward: a tile of queries against the halo of its windows.

One program takes a ``TILE_H x TILE_W`` tile of queries of one frame. Windows are
monotone in the query coordinate (for both ``clip`` and ``shift``), so the union of the
tile's windows is a box, the halo: ``[lo(first), hi(last))`` per axis, at most
``kt x (TILE_H + kh - 1) x (TILE_W + kw - 1)`` cells. The halo is walked ``BLOCK_N`` keys
at a time with ``tl.dot`` for ``Q K^T`` and ``P V``; each query masks the keys outside its
own window.

Grid: ``(cdiv(H, TILE_H) * cdiv(W, TILE_W), T, B * N)``.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import config_pruner, dot, forward_aot_specs, object_max_block, online_softmax_block, store_results
from .launch import Problem, cdiv, require_plain, run

CONFIGS = [
    triton.Config({"TILE_H": 4, "TILE_W": 8, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"TILE_H": 8, "TILE_W": 8, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"TILE_H": 8, "TILE_W": 16, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]


@triton.jit
def window(i, length, k, SHIFT: tl.constexpr):
    """First and one-past-last key coordinate of the window of coordinate ``i`` (SPEC.md)."""
    if SHIFT:
        lo = tl.minimum(tl.maximum(i - k // 2, 0), tl.maximum(length - k, 0))
        hi = tl.minimum(lo + k, length)
    else:
        lo = tl.maximum(i - k // 2, 0)
        hi = tl.minimum(i + k // 2 + 1, length)
    return lo, hi


@triton.jit
def local_fwd(
    Q, K, V, Labels, Out, Lse, Aff, Arg,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    N, T, H, W, D, KT, KH, KW,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr, SHIFT: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q, K, V ``(B, N, T, H, W, D)`` with any strides; ``KT, KH, KW`` the odd kernel
    size; Labels int32 ``(B, T, H, W)``."""
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    pid_tile = tl.program_id(0)
    t = tl.program_id(1)
    pid_bn = tl.program_id(2)
    tiles_w = tl.cdiv(W, TILE_W)
    y0 = (pid_tile // tiles_w) * TILE_H
    x0 = (pid_tile % tiles_w) * TILE_W
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    S = T * H * W

    offs_m = tl.arange(0, BLOCK_M)
    qy = y0 + offs_m // TILE_W
    qx = x0 + offs_m % TILE_W
    m_valid = (qy < H) & (qx < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q_rows = t.to(tl.int64) * sq_t + qy.to(tl.int64) * sq_h + qx.to(tl.int64) * sq_w
    q_ptrs = Q + b * sq_b + n * sq_n + q_rows[:, None] + offs_d[None, :].to(tl.int64) * sq_d
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    # each query's own window along y and x; the frame's window along t is shared
    wy_lo, wy_hi = window(qy, H, KH, SHIFT)
    wx_lo, wx_hi = window(qx, W, KW, SHIFT)
    t_lo, t_hi = window(t, T, KT, SHIFT)
    if CAUSAL:
        t_hi = tl.minimum(t_hi, t + 1)
    # the halo: union of the tile's windows (windows are monotone in the coordinate)
    y_lo, _ = window(y0, H, KH, SHIFT)
    _, y_hi = window(tl.minimum(y0 + TILE_H, H) - 1, H, KH, SHIFT)
    x_lo, _ = window(x0, W, KW, SHIFT)
    _, x_hi = window(tl.minimum(x0 + TILE_W, W) - 1, W, KW, SHIFT)
    halo_w = x_hi - x_lo
    halo_plane = (y_hi - y_lo) * halo_w
    halo = (t_hi - t_lo) * halo_plane

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    k_base = K + b * sk_b + n * sk_n
    v_base = V + b * sv_b + n * sv_n
    for start in range(0, halo, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < halo
        kt = t_lo + offs_n // halo_plane
        ky = y_lo + (offs_n // halo_w) % (y_hi - y_lo)
        kx = x_lo + offs_n % halo_w
        k_cols = kt.to(tl.int64) * sk_t + ky.to(tl.int64) * sk_h + kx.to(tl.int64) * sk_w
        kT = tl.load(
            k_base + k_cols[None, :] + offs_d[:, None].to(tl.int64) * sk_d,
            mask=n_valid[None, :] & d_valid[:, None], other=0.0,
        )
        v_rows = kt.to(tl.int64) * sv_t + ky.to(tl.int64) * sv_h + kx.to(tl.int64) * sv_w
        v = tl.load(
            v_base + v_rows[:, None] + offs_d[None, :].to(tl.int64) * sv_d,
            mask=n_valid[:, None] & d_valid[None, :], other=0.0,
        )
        s = dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PRECISION, INTERPRET_BF16) * scale_log2
        in_pattern = (
            m_valid[:, None] & n_valid[None, :]
            & (ky[None, :] >= wy_lo[:, None]) & (ky[None, :] < wy_hi[:, None])
            & (kx[None, :] >= wx_lo[:, None]) & (kx[None, :] < wx_hi[:, None])
        )
        s = tl.where(in_pattern, s, float("-inf"))
        if NUM_OBJ > 0:
            key_labels = tl.load(Labels + b * S + (kt * H + ky) * W + kx, mask=n_valid, other=-1)
            eligible = in_pattern
            if CAUSAL_AFF:
                eligible = eligible & (kt[None, :] < t)
            # a_arg holds halo offsets until the end
            a_max, a_arg = object_max_block(s, eligible, key_labels, start, a_max, a_arg, NUM_OBJ, BLOCK_O)
        m_i, l_i, acc = online_softmax_block(s, m_i, l_i, acc, v, DOT_PRECISION, INTERPRET_BF16)

    query_index = (t * H + qy) * W + qx
    if NUM_OBJ > 0:
        a_arg = ((t_lo + a_arg // halo_plane) * H + y_lo + (a_arg // halo_w) % (y_hi - y_lo)) * W + x_lo + a_arg % halo_w
    store_results(
        Out, Lse, Aff, Arg, b * N + n, S, D, query_index, m_valid, m_i, l_i, acc, a_max, a_arg,
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


local_fwd_tuned = triton.autotune(
    CONFIGS,
    key=["N", "T", "H", "W", "KT", "KH", "KW", "BLOCK_D", "NUM_OBJ", "CAUSAL", "SHIFT"],
    prune_configs_by={"early_config_prune": config_pruner()},
)(local_fwd)

AOT_SPECS = forward_aot_specs(
    "local_fwd", local_fwd, CONFIGS, dict(KT=3, KH=7, KW=7), dict(CAUSAL=True, CAUSAL_AFF=True, SHIFT=False),
    "kernel (3, 7, 7), clip, causal",
)


def launch_forward(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                   interpret: bool, config=None) -> None:
    """Launch :func:`local_fwd` for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    require_plain(p, "local")
    kt, kh, kw = p.pattern.kernel_size
    grid = lambda m: (cdiv(p.W, m["TILE_W"]) * cdiv(p.H, m["TILE_H"]), p.T, p.B * p.N)  # noqa: E731
    args = (*pointers, *strides, p.N, p.T, p.H, p.W, p.D, kt, kh, kw, scale_log2)
    run(sys.modules[__name__], "local_fwd", grid, args, {**meta, "SHIFT": p.pattern.boundary == "shift"},
        interpret=interpret, configs=CONFIGS, config=config, sizes=f"T={p.T}, B*N={p.B * p.N}")
