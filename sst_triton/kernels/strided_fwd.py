"""Strided attention forward: dense FlashAttention inside each residue class.

The keys of ``p = (t, y, x)`` are the cells congruent to it modulo ``(st, sh, sw)``:
every residue class ``(t mod st, y mod sh, x mod sw)`` is a dense attention problem of
``nT * nH * nW`` cells, addressed through the strides of q/k/v (no copy). One program
takes ``BLOCK_M`` queries of one class and walks the class's keys ``BLOCK_N`` at a time
with ``tl.dot`` for ``Q K^T`` and ``P V``.

Grid: ``(cdiv(largest class, BLOCK_M) * classes, B * N)``.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import class_cell, config_pruner, dot, forward_aot_specs, object_max_block, online_softmax_block, store_results
from .launch import Problem, cdiv, require_plain, run

CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]


@triton.jit
def strided_fwd(
    Q, K, V, Labels, Out, Lse, Aff, Arg,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    N, T, H, W, D, ST, SH, SW,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q, K, V ``(B, N, T, H, W, D)`` with any strides; ``ST, SH, SW`` the pattern
    strides clipped to the axis lengths (the launcher's job); Labels int32 ``(B, T, H, W)``."""
    # (query block, class) share axis 0: classes alone can pass the 65535 limit of axis 1
    blocks = tl.cdiv(tl.cdiv(T, ST) * tl.cdiv(H, SH) * tl.cdiv(W, SW), BLOCK_M)
    pid_m = tl.program_id(0) % blocks
    pid_c = tl.program_id(0) // blocks
    pid_bn = tl.program_id(1)
    rx = pid_c % SW
    ry = (pid_c // SW) % SH
    rt = pid_c // (SW * SH)
    nT = tl.cdiv(T - rt, ST)
    nH = tl.cdiv(H - ry, SH)
    nW = tl.cdiv(W - rx, SW)
    plane = nH * nW
    size = nT * plane
    if pid_m * BLOCK_M >= size:
        return
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    S = T * H * W

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < size
    qt, qy, qx = class_cell(offs_m, rt, ry, rx, nH, nW, ST, SH, SW)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D

    q_rows = qt.to(tl.int64) * sq_t + qy.to(tl.int64) * sq_h + qx.to(tl.int64) * sq_w
    q_ptrs = Q + b * sq_b + n * sq_n + q_rows[:, None] + offs_d[None, :].to(tl.int64) * sq_d
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    hi = size
    if CAUSAL:
        # class-local order is time-major: later frames come after the block's last query
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, size) - 1
        hi = tl.minimum(size, (last // plane + 1) * plane)
    k_base = K + b * sk_b + n * sk_n
    v_base = V + b * sv_b + n * sv_n
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        kt, ky, kx = class_cell(offs_n, rt, ry, rx, nH, nW, ST, SH, SW)
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
        in_pattern = n_valid[None, :] & m_valid[:, None]
        if CAUSAL:
            in_pattern = in_pattern & (kt[None, :] <= qt[:, None])
        s = tl.where(in_pattern, s, float("-inf"))
        if NUM_OBJ > 0:
            key_labels = tl.load(Labels + b * S + (kt * H + ky) * W + kx, mask=n_valid, other=-1)
            eligible = in_pattern
            if CAUSAL_AFF:
                eligible = eligible & (kt[None, :] < qt[:, None])
            # a_arg holds class-local key offsets until the end
            a_max, a_arg = object_max_block(s, eligible, key_labels, start, a_max, a_arg, NUM_OBJ, BLOCK_O)
        m_i, l_i, acc = online_softmax_block(s, m_i, l_i, acc, v, DOT_PRECISION, INTERPRET_BF16)

    query_index = (qt * H + qy) * W + qx
    if NUM_OBJ > 0:
        at, ay, ax = class_cell(a_arg, rt, ry, rx, nH, nW, ST, SH, SW)
        a_arg = (at * H + ay) * W + ax
    store_results(
        Out, Lse, Aff, Arg, b * N + n, S, D, query_index, m_valid, m_i, l_i, acc, a_max, a_arg,
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


strided_fwd_tuned = triton.autotune(
    CONFIGS,
    key=["N", "T", "H", "W", "ST", "SH", "SW", "BLOCK_D", "NUM_OBJ", "CAUSAL"],
    prune_configs_by={"early_config_prune": config_pruner()},
)(strided_fwd)

AOT_SPECS = forward_aot_specs(
    "strided_fwd", strided_fwd, CONFIGS, dict(ST=2, SH=2, SW=2), dict(CAUSAL=True, CAUSAL_AFF=True),
    "stride 2, causal",
)


def launch_forward(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                   interpret: bool, config=None) -> None:
    """Launch :func:`strided_fwd` for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    require_plain(p, "strided")
    st, sh, sw = (min(s, n) for s, n in zip(p.pattern.stride, (p.T, p.H, p.W)))
    largest = cdiv(p.T, st) * cdiv(p.H, sh) * cdiv(p.W, sw)  # class (0, 0, 0) is the largest
    grid = lambda m: (cdiv(largest, m["BLOCK_M"]) * st * sh * sw, p.B * p.N)  # noqa: E731
    args = (*pointers, *strides, p.N, p.T, p.H, p.W, p.D, st, sh, sw, scale_log2)
    run(sys.modules[__name__], "strided_fwd", grid, args, meta, interpret=interpret, configs=CONFIGS,
        config=config, sizes=f"B*N={p.B * p.N}, classes={st * sh * sw}")
