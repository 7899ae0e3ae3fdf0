"""Grid attention forward: row keys as a dense block, column and time keys as vectors.

One program takes ``BLOCK_M`` consecutive queries of one row ``(t, y, x0 ...)``. Their row
keys ``(t, y, *)`` are shared: a dense ``tl.dot`` block walked ``BLOCK_N`` at a time.
Column keys ``(t, y', x)`` and time keys ``(t', y, x)`` differ per query, but for a fixed
``y'`` (or ``t'``) the tile's keys are again a contiguous row segment, so each step is a
batch of ``BLOCK_M`` vector products: bandwidth-bound, which suits the ``O(T + H + W)``
keys per query. The query itself is counted once, in the row.

Grid: ``(cdiv(W, BLOCK_M) * T * H, B * N)``.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import (
    config_pruner,
    dot,
    forward_aot_specs,
    object_max_block,
    object_max_vector,
    online_softmax_block,
    online_softmax_vector,
    store_results,
)
from .launch import Problem, cdiv, require_plain, run

CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]

# At head dim 128 the column/time phases' [BLOCK_M, BLOCK_D] tiles spill with 8 warps on
# sm_90a (python -m sst_triton.aot): keep 4 there.
WIDE_MAX_WARPS = 4


@triton.jit
def grid_fwd(
    Q, K, V, Labels, Out, Lse, Aff, Arg,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    N, T, H, W, D,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q, K, V ``(B, N, T, H, W, D)`` with any strides; Labels int32 ``(B, T, H, W)``."""
    blocks = tl.cdiv(W, BLOCK_M)
    pid_x = tl.program_id(0) % blocks
    row = tl.program_id(0) // blocks
    pid_bn = tl.program_id(1)
    t = row // H
    y = row % H
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    S = T * H * W

    qx = pid_x * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = qx < W
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    tile_mask = m_valid[:, None] & d_valid[None, :]
    q_base = Q + b * sq_b + n * sq_n + t.to(tl.int64) * sq_t + y.to(tl.int64) * sq_h
    q = tl.load(q_base + qx[:, None].to(tl.int64) * sq_w + offs_d[None, :].to(tl.int64) * sq_d,
                mask=tile_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    k_base = K + b * sk_b + n * sk_n
    v_base = V + b * sv_b + n * sv_n
    lab_base = Labels + b * S

    # row keys (t, y, x'): one dense block per BLOCK_N of them
    k_row = k_base + t.to(tl.int64) * sk_t + y.to(tl.int64) * sk_h
    v_row = v_base + t.to(tl.int64) * sv_t + y.to(tl.int64) * sv_h
    for start in range(0, W, BLOCK_N):
        kx = start + tl.arange(0, BLOCK_N)
        n_valid = kx < W
        kT = tl.load(k_row + kx[None, :].to(tl.int64) * sk_w + offs_d[:, None].to(tl.int64) * sk_d,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_row + kx[:, None].to(tl.int64) * sv_w + offs_d[None, :].to(tl.int64) * sv_d,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        s = dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PRECISION, INTERPRET_BF16) * scale_log2
        in_pattern = m_valid[:, None] & n_valid[None, :]
        s = tl.where(in_pattern, s, float("-inf"))
        # same frame: never eligible under causal affinity
        if NUM_OBJ > 0 and not CAUSAL_AFF:
            row_start = (t * H + y) * W + start
            key_labels = tl.load(lab_base + row_start + tl.arange(0, BLOCK_N), mask=n_valid, other=-1)
            a_max, a_arg = object_max_block(s, in_pattern, key_labels, row_start, a_max, a_arg, NUM_OBJ, BLOCK_O)
        m_i, l_i, acc = online_softmax_block(s, m_i, l_i, acc, v, DOT_PRECISION, INTERPRET_BF16)

    # column keys (t, y', x), y' != y: one key per query per step
    k_col = k_base + t.to(tl.int64) * sk_t + qx[:, None].to(tl.int64) * sk_w + offs_d[None, :].to(tl.int64) * sk_d
    v_col = v_base + t.to(tl.int64) * sv_t + qx[:, None].to(tl.int64) * sv_w + offs_d[None, :].to(tl.int64) * sv_d
    for yy in range(0, H):
        # compared as a vector: the interpreter mistypes scalar-bool & block-bool
        key_y = tl.zeros([BLOCK_M], tl.int32) + yy
        valid = m_valid & (key_y != y)
        k = tl.load(k_col + tl.cast(yy, tl.int64) * sk_h, mask=tile_mask & valid[:, None], other=0.0)
        v = tl.load(v_col + tl.cast(yy, tl.int64) * sv_h, mask=tile_mask & valid[:, None], other=0.0)
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) * scale_log2
        s = tl.where(valid, s, float("-inf"))
        if NUM_OBJ > 0 and not CAUSAL_AFF:
            key_index = (t * H + yy) * W + qx
            key_labels = tl.load(lab_base + key_index, mask=valid, other=-1)
            a_max, a_arg = object_max_vector(s, valid & (key_labels >= 0), key_labels, key_index, a_max, a_arg,
                                             BLOCK_O)
        m_i, l_i, acc = online_softmax_vector(s, m_i, l_i, acc, v)

    # time keys (t', y, x), t' != t (t' < t when causal)
    k_tube = k_base + y.to(tl.int64) * sk_h + qx[:, None].to(tl.int64) * sk_w + offs_d[None, :].to(tl.int64) * sk_d
    v_tube = v_base + y.to(tl.int64) * sv_h + qx[:, None].to(tl.int64) * sv_w + offs_d[None, :].to(tl.int64) * sv_d
    t_end = T
    if CAUSAL:
        t_end = t + 1
    for tt in range(0, t_end):
        key_t = tl.zeros([BLOCK_M], tl.int32) + tt
        valid = m_valid & (key_t != t)
        k = tl.load(k_tube + tl.cast(tt, tl.int64) * sk_t, mask=tile_mask & valid[:, None], other=0.0)
        v = tl.load(v_tube + tl.cast(tt, tl.int64) * sv_t, mask=tile_mask & valid[:, None], other=0.0)
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) * scale_log2
        s = tl.where(valid, s, float("-inf"))
        if NUM_OBJ > 0:
            key_index = (tt * H + y) * W + qx
            key_labels = tl.load(lab_base + key_index, mask=valid, other=-1)
            eligible = valid & (key_labels >= 0)
            if CAUSAL_AFF:
                eligible = eligible & (key_t < t)
            a_max, a_arg = object_max_vector(s, eligible, key_labels, key_index, a_max, a_arg, BLOCK_O)
        m_i, l_i, acc = online_softmax_vector(s, m_i, l_i, acc, v)

    query_index = (t * H + y) * W + qx
    store_results(
        Out, Lse, Aff, Arg, b * N + n, S, D, query_index, m_valid, m_i, l_i, acc, a_max, a_arg,
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


grid_fwd_tuned = triton.autotune(
    CONFIGS,
    key=["N", "T", "H", "W", "BLOCK_D", "NUM_OBJ", "CAUSAL"],
    prune_configs_by={"early_config_prune": config_pruner(WIDE_MAX_WARPS)},
)(grid_fwd)

AOT_SPECS = forward_aot_specs(
    "grid_fwd", grid_fwd, CONFIGS, dict(), dict(CAUSAL=True, CAUSAL_AFF=False),
    "causal, causal_affinity=False (objects in every phase)", WIDE_MAX_WARPS,
)


def launch_forward(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                   interpret: bool, config=None) -> None:
    """Launch :func:`grid_fwd` for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    require_plain(p, "grid")
    grid = lambda m: (cdiv(p.W, m["BLOCK_M"]) * p.T * p.H, p.B * p.N)  # noqa: E731
    args = (*pointers, *strides, p.N, p.T, p.H, p.W, p.D, scale_log2)
    run(sys.modules[__name__], "grid_fwd", grid, args, meta, interpret=interpret, configs=CONFIGS,
        config=config, sizes=f"T*H={p.T * p.H}, B*N={p.B * p.N}")
