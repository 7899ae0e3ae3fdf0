"""Grid attention forward: two passes, each a dense attention problem on tensor cores.

The keys of query ``p = (t, y, x)`` are its row ``(t, y, *)``, its column ``(t, *, x)`` and
its time line ``(*, y, x)``, ``p`` itself counted once (in the row). No query tile shares
both its row and its column keys with every other query of the tile, so the work is split
by axis, each axis a dense block per tile, and merged by log-sum-exp:

``grid_fwd_rows``: ``BLOCK_M`` consecutive queries of one row ``(t, y, x0 ...)``. Their row
keys are one dense ``[BLOCK_M, W]`` problem (``tl.dot``, ``BLOCK_N`` keys at a time). The
time keys ``(t', y, x)`` of the tile are a contiguous row segment per frame ``t'``, one key
per query: ``T - 1`` vector products (a time line has ``T`` keys, fewer than the 16 rows or
columns ``tl.dot`` needs on either side). Each key is loaded once per tile. It writes the
partial state: normalised partial output (``Part``, see below), base-2 log-sum-exp
(``Lse``), and per object the best base-2 logit (``Aff``) and its key (``Arg``).

``grid_fwd_cols``: ``BLOCK_M`` consecutive queries of one column ``(t, y0 ..., x)`` against
the column keys ``(t, *, x)`` (the query itself masked out): again one dense problem per
tile. It then merges the row pass's partial state of the same queries (a running max,
sum and accumulator merged like two key blocks of one online softmax, the object maxima
and their keys by comparison, so affinities stay exact) and writes the results.

The partial output ``Part``: ``Out`` itself when that is float32; for a bfloat16 ``Out`` a
float16 scratch (half of float32's bytes, read back by the column pass), each group of 16
consecutive queries of a row scaled by a power of two ``2**-e`` that brings its largest
magnitude into ``[1, 2)`` (``e``: int8 in ``Exp``, ``(B*N, T_Q*H, cdiv(W, 16))``), so
float16's range never overflows and its 11-bit precision holds: the partial adds a
rounding 8 times smaller than bfloat16's own (a bfloat16 partial, rounded like the output,
was measured up to 2.8x SDPA's error against the 2x bound); float16 ``Out``: a float32
scratch (no 16-bit format is finer than the output there).

Version 2: query head ``n`` reads key/value head ``n // GROUP``; query frame ``i`` is the
absolute frame ``T - T_Q + i`` and every rule (time line, causal, causal affinity) uses
absolute frames. Grids fold everything on axis 0: ``cdiv(W, BLOCK_M) * T_Q * H * B * N``
programs for the row pass, ``cdiv(H, BLOCK_M) * T_Q * W * B * N`` for the column pass.

Work at T, H, W = 4, 24, 40 (``CONFIGS[0]``, see :func:`work_forward`): a query issues
``ceil(W/16)*17 + 2*(T-1)`` exponentials in the row pass (padding ``W`` to 48) and
``ceil(H/16)*17 + 6`` in the column pass; each key is read ``ceil(W/BLOCK_M)`` times as a
row key, ``ceil(H/BLOCK_M)`` times as a column key and once per other query frame as a
time key: E = 1.84 softmax elements per useful pair, L = 2.66 (the one-pass design with
per-query column and time vectors issued E = 3.05, L = 18.8).

Single pass (``grid_fwd_tiles``, the configurations carrying ``BH``/``BW``): a program owns
a ``BH x BW`` tile of queries of one frame and computes every key of them in registers:
the column keys as one batched ``tl.dot`` per block (``[BW, BH, D]`` queries, the tile's
``BW`` columns the batch), that state permuted back once and continued by the row keys
(``[BH, BW, D]``, the ``BH`` rows the batch) and the time keys. No partial state goes
through HBM and q, k, v are read once per launch from HBM (55.7 MiB instead of 129.4 at the SST
shape), but each key is read by ``cdiv(W, BW)`` tiles as a row key and ``cdiv(H, BH)`` as
a column key: L = 9.7 at 16 x 16, which the L2 roof prices (``perf/work_model.py``: 39.2%
of the H100 roofline at the SST shape vs 43.1% for the two passes; 16 x 32 tiles would
reach 49.4% but spill). Its batched products need ~240 registers at 16 x 16 x 32, so it
is kept at head dims <= 32 only (:data:`CONFIGS_BY_HEAD_DIM`). On CUDA with no
configuration forced, :func:`launch_forward` times the two kinds once per autotuning key.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._common import (
    cast,
    dot,
    forward_aot_specs,
    object_max_block,
    object_max_vector,
    online_softmax_block,
    online_softmax_vector,
    store_results,
)
from .launch import Problem, cdiv, check_grid, run
from .work import Work

# The first configuration is the interpreter's (and the one the issue-11 counts use): 16-wide
# tiles pad W = 40 to 48 and H = 24 to 32, the least exponentials at the SST shapes. The
# next three are for the GPU: BLOCK_M >= 64 so that Hopper's wgmma applies (d <= 64). The
# last one carries BH / BW: it runs the single-pass kernel (:func:`grid_fwd_tiles`) on a
# ``BH x BW`` query tile, both >= 16 (each is the M of one batched ``tl.dot``).
CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BH": 16, "BW": 16, "BLOCK_N": 16}, num_warps=8, num_stages=2),
]
# Which of them compile spill-free on sm_80 and sm_90a (``python -m sst_triton.aot --check``),
# per padded head dim: at 128 the 64-query tiles spill in the row pass (its time-line
# vectors hold [BLOCK_M, BLOCK_D] key and value rows besides the accumulator); at 32 ptxas
# caps the column pass of the last two-pass one at 168 registers on sm_90a and spills 20
# bytes; at 128 its column pass, with the float16 partial's exponents, spills 16 bytes at
# sm_80's 168. The single pass fits at 32 only (235-255 registers at 8 warps, no spill); at
# 64 it spills ~700 bytes, at 128 ~6.5 KB, and so do 16 x 16 tiles on 4 warps (1.7 KB at 32)
# and 16 x 32 tiles on 8 warps (1.5 KB at 32): its batched products need ~240 registers even
# without objects or time keys, far above a two-dimensional tile of as many queries.
CONFIGS_BY_HEAD_DIM = {32: (0, 1, 2, 4), 64: (0, 1, 2, 3), 128: (0,)}
# the two kinds of configuration, each its own kernels' autotuning list
TWO_PASS_CONFIGS = [c for c in CONFIGS if "BLOCK_M" in c.kwargs]
TILE_CONFIGS = [c for c in CONFIGS if "BH" in c.kwargs]


def configs_at(configs: list, by_head_dim: dict, block_d: int) -> list:
    """The configurations of ``configs`` kept at padded head dim ``block_d`` (the largest
    listed dim for anything wider: correct, not spill-checked)."""
    dims = sorted(by_head_dim)
    dim = next((d for d in dims if block_d <= d), dims[-1])
    return [configs[i] for i in by_head_dim[dim]]


def head_dim_pruner(by_head_dim: dict):
    """``early_config_prune`` keeping :func:`configs_at` for the call's ``BLOCK_D``."""

    def prune(configs, named_args, **kwargs):
        return configs_at(list(configs), by_head_dim, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))

    return prune


def _config_key(config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def kind_pruner(by_head_dim: dict):
    """``early_config_prune`` keeping, of the configurations handed to it, those that
    :func:`configs_at` keeps in the whole :data:`CONFIGS` at the call's ``BLOCK_D``: one
    table prunes both kinds' autotuning lists."""

    def prune(configs, named_args, **kwargs):
        allowed = {_config_key(c) for c in configs_at(CONFIGS, by_head_dim,
                                                     kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))}
        return [c for c in configs if _config_key(c) in allowed]

    return prune


TUNE_KEY = ["B", "N", "GROUP", "T_Q", "T", "H", "W", "BLOCK_D", "NUM_OBJ", "CAUSAL", "CAUSAL_AFF"]


@triton.jit
def _time_keys(q, qx, y, t0, t1, t, k_base, v_base, lab_base, sk_t, sv_t, sk_h, sv_h, sk_w, sv_w, sk_d, sv_d,
               m_valid, d_valid, H, W, D, scale_log2, m_i, l_i, acc, a_max, a_arg,
               ELIGIBLE: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """Time keys ``(tt, y, qx)`` for ``tt`` in ``[t0, t1)`` (never ``t``): one key per query.

    ``ELIGIBLE``: these frames may carry affinity (earlier frames, or no causal affinity)."""
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = m_valid[:, None] & d_valid[None, :]
    rows_k = y.to(tl.int64) * sk_h + qx[:, None].to(tl.int64) * sk_w + offs_d[None, :].to(tl.int64) * sk_d
    rows_v = y.to(tl.int64) * sv_h + qx[:, None].to(tl.int64) * sv_w + offs_d[None, :].to(tl.int64) * sv_d
    for tt in range(t0, t1):
        k = tl.load(k_base + rows_k + tl.cast(tt, tl.int64) * sk_t, mask=tile_mask, other=0.0)
        v = tl.load(v_base + rows_v + tl.cast(tt, tl.int64) * sv_t, mask=tile_mask, other=0.0)
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1) * scale_log2
        s = tl.where(m_valid, s, float("-inf"))
        if NUM_OBJ > 0:
            if ELIGIBLE:
                key_index = (tt * H + y) * W + qx
                key_labels = tl.load(lab_base + key_index, mask=m_valid, other=-1)
                a_max, a_arg = object_max_vector(s, m_valid & (key_labels >= 0), key_labels, key_index, a_max,
                                                 a_arg, BLOCK_O)
        m_i, l_i, acc = online_softmax_vector(s, m_i, l_i, acc, v)
    return m_i, l_i, acc, a_max, a_arg


@triton.jit
def grid_fwd_rows(
    Q, K, V, Labels, Out, Lse, Aff, Arg, Part, Exp,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row and time keys of ``BLOCK_M`` queries of one row; writes the partial state.

    Q ``(B, N, T_Q, H, W, D)``, K, V ``(B, N // GROUP, T, H, W, D)``, any strides; Labels
    int32 ``(B, T, H, W)``. Part ``(B*N, S_q, D)``: normalised partial output (float32, or
    float16 scaled by ``2**-Exp`` per 16 queries of a row, see the module docstring);
    Lse ``(B*N, S_q)``: its base-2 log-sum-exp; Aff/Arg ``(B*N, O, S_q)``: best base-2 logit
    per object (``-inf``: none) and its absolute key index.
    """
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
    S = T * H * W
    S_q = T_Q * H * W

    qx = pid_x * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = qx < W
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    tile_mask = m_valid[:, None] & d_valid[None, :]
    q_base = Q + b * sq_b + n * sq_n + tq.to(tl.int64) * sq_t + y.to(tl.int64) * sq_h
    q = tl.load(q_base + qx[:, None].to(tl.int64) * sq_w + offs_d[None, :].to(tl.int64) * sq_d,
                mask=tile_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n
    lab_base = Labels + b * S

    # row keys (t, y, x'), the query itself included: one dense block per BLOCK_N of them
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

    # time keys (t', y, x): earlier frames, then (not causal) later ones; never t itself
    m_i, l_i, acc, a_max, a_arg = _time_keys(
        q, qx, y, 0, t, t, k_base, v_base, lab_base, sk_t, sv_t, sk_h, sv_h, sk_w, sv_w, sk_d, sv_d,
        m_valid, d_valid, H, W, D, scale_log2, m_i, l_i, acc, a_max, a_arg, True, NUM_OBJ, BLOCK_O, BLOCK_D)
    if not CAUSAL:
        m_i, l_i, acc, a_max, a_arg = _time_keys(
            q, qx, y, t + 1, T, t, k_base, v_base, lab_base, sk_t, sv_t, sk_h, sv_h, sk_w, sv_w, sk_d, sv_d,
            m_valid, d_valid, H, W, D, scale_log2, m_i, l_i, acc, a_max, a_arg, not CAUSAL_AFF, NUM_OBJ,
            BLOCK_O, BLOCK_D)

    # partial state: every query sees itself in its row, so l_i > 0 where m_valid
    l_safe = tl.where(m_valid, l_i, 1.0)
    bn = pid_bn.to(tl.int64)
    q_index = (row * W + qx).to(tl.int64)
    cells = bn * S_q + q_index
    part = acc / l_safe[:, None]
    if Part.dtype.element_ty == tl.float16:
        # per 16 queries: 2**e <= their largest magnitude < 2**(e+1) (e = 0 for 0, subnormal,
        # inf or NaN: those go through unscaled), exponent bits only, no exp
        G: tl.constexpr = BLOCK_M // 16
        mag = tl.max(tl.reshape(tl.max(tl.abs(part), axis=1), [G, 16]), axis=1)
        field = (mag.to(tl.int32, bitcast=True) >> 23) & 0xFF
        normal = (field > 0) & (field < 255)
        pow2 = tl.where(normal, (field << 23).to(tl.float32, bitcast=True), 1.0)
        part = part / tl.reshape(tl.broadcast_to(pow2[:, None], [G, 16]), [BLOCK_M])[:, None]
        groups = pid_x * G + tl.arange(0, G)
        n_groups = tl.cdiv(W, 16)
        tl.store(Exp + (bn * T_Q * H + row) * n_groups + groups, tl.where(normal, field - 127, 0).to(tl.int8),
                 mask=groups < n_groups)
    tl.store(Part + cells[:, None] * D + offs_d[None, :], part.to(Part.dtype.element_ty), mask=tile_mask)
    tl.store(Lse + cells, m_i + tl.log2(l_safe), mask=m_valid)
    if NUM_OBJ > 0:
        objects = tl.arange(0, BLOCK_O)
        aff_off = (bn * NUM_OBJ + objects[None, :].to(tl.int64)) * S_q + q_index[:, None]
        obj_mask = m_valid[:, None] & (objects[None, :] < NUM_OBJ)
        tl.store(Aff + aff_off, a_max, mask=obj_mask)
        tl.store(Arg + aff_off, a_arg, mask=obj_mask)


@triton.jit
def grid_fwd_cols(
    Q, K, V, Labels, Out, Lse, Aff, Arg, Part, Exp,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column keys of ``BLOCK_M`` queries of one column, merged with the row pass's partial
    state (arguments as in :func:`grid_fwd_rows`); writes Out ``(B*N, S_q, D)``, Lse
    (natural log), Aff, Arg."""
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
    S = T * H * W
    S_q = T_Q * H * W

    qy = pid_y * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = qy < H
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    tile_mask = m_valid[:, None] & d_valid[None, :]
    q_base = Q + b * sq_b + n * sq_n + tq.to(tl.int64) * sq_t + x.to(tl.int64) * sq_w
    q = tl.load(q_base + qy[:, None].to(tl.int64) * sq_h + offs_d[None, :].to(tl.int64) * sq_d,
                mask=tile_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    # column keys (t, y', x), y' != y: one dense block per BLOCK_N of them
    k_col = K + b * sk_b + kv * sk_n + t.to(tl.int64) * sk_t + x.to(tl.int64) * sk_w
    v_col = V + b * sv_b + kv * sv_n + t.to(tl.int64) * sv_t + x.to(tl.int64) * sv_w
    lab_col = Labels + b * S + t * H * W + x
    for start in range(0, H, BLOCK_N):
        ky = start + tl.arange(0, BLOCK_N)
        n_valid = ky < H
        kT = tl.load(k_col + ky[None, :].to(tl.int64) * sk_h + offs_d[:, None].to(tl.int64) * sk_d,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_col + ky[:, None].to(tl.int64) * sv_h + offs_d[None, :].to(tl.int64) * sv_d,
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        s = dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_PRECISION, INTERPRET_BF16) * scale_log2
        in_pattern = m_valid[:, None] & n_valid[None, :] & (qy[:, None] != ky[None, :])
        s = tl.where(in_pattern, s, float("-inf"))
        if NUM_OBJ > 0 and not CAUSAL_AFF:
            key_labels = tl.load(lab_col + ky * W, mask=n_valid, other=-1)
            # a_arg holds the key's row y' until the merge below
            a_max, a_arg = object_max_block(s, in_pattern, key_labels, start, a_max, a_arg, NUM_OBJ, BLOCK_O)
        m_i, l_i, acc = online_softmax_block(s, m_i, l_i, acc, v, DOT_PRECISION, INTERPRET_BF16)

    # merge the row pass: its state is (max = its lse, sum = 1, acc = its normalised output)
    bn = pid_bn.to(tl.int64)
    q_index = (tq * H + qy) * W + x
    cells = bn * S_q + q_index.to(tl.int64)
    if Part.dtype.element_ty == tl.float16:
        n_groups = tl.cdiv(W, 16)
        e = tl.load(Exp + (bn * T_Q * H + tq * H + qy) * n_groups + x // 16, mask=m_valid, other=0).to(tl.int32)
        # undo the row pass's scaling in the weight of its partial (no [BLOCK_M, BLOCK_D] product)
        unscale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    else:
        unscale = 1.0
    lse_r = tl.load(Lse + cells, mask=m_valid, other=0.0)
    m_new = tl.maximum(m_i, lse_r)
    alpha = tl.exp2(m_i - m_new)  # m_i = -inf (H == 1): 0
    beta = tl.exp2(lse_r - m_new)
    l_i = l_i * alpha + beta
    part = tl.load(Part + cells[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    acc = acc * alpha[:, None] + part * (beta * unscale)[:, None]
    if NUM_OBJ > 0:
        objects = tl.arange(0, BLOCK_O)
        aff_off = (bn * NUM_OBJ + objects[None, :].to(tl.int64)) * S_q + q_index[:, None].to(tl.int64)
        obj_mask = m_valid[:, None] & (objects[None, :] < NUM_OBJ)
        a_row = tl.load(Aff + aff_off, mask=obj_mask, other=float("-inf"))
        arg_row = tl.load(Arg + aff_off, mask=obj_mask, other=-1)
        col_wins = a_max > a_row
        a_arg = tl.where(col_wins, (t * H + a_arg) * W + x, arg_row)
        a_max = tl.maximum(a_max, a_row)
    store_results(
        Out, Lse, Aff, Arg, bn, S_q, D, q_index, m_valid, m_new, l_i, acc, a_max, a_arg,
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


# ---------------------------------------------------------------------------------------
# Single pass: 2-D query tiles, row, column and time keys in one program
# ---------------------------------------------------------------------------------------


@triton.jit
def _softmax_tile(s, m_i, l_i, acc, v, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """:func:`online_softmax_block` batched over the first axis (one line of the tile each).

    s ``[L, M, BLOCK_N]`` base-2 logits (``-inf`` outside the pattern), m_i, l_i ``[L, M]``,
    acc ``[L, M, BLOCK_D]``, v ``[L, BLOCK_N, BLOCK_D]``: line ``l``'s keys' values."""
    m_new = tl.maximum(m_i, tl.max(s, axis=2))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, :, None])
    l_i = l_i * alpha + tl.sum(p, axis=2)
    acc = acc * alpha[:, :, None]
    acc = dot(cast(p, v.dtype, INTERPRET_BF16), v, acc, DOT_PRECISION, INTERPRET_BF16)
    return m_new, l_i, acc


@triton.jit
def _object_max_tile(s, eligible, key_labels, key_start, a_max, a_arg, NUM_OBJ: tl.constexpr,
                     BLOCK_O: tl.constexpr):
    """:func:`object_max_block` batched over the first axis: s, eligible ``[L, M, BLOCK_N]``,
    key_labels ``[L, BLOCK_N]``, a_max, a_arg ``[L, M, BLOCK_O]``; the key found at position
    ``j`` of line ``l`` is ``key_start + j`` (key_start: a scalar or ``[L, 1, 1]``)."""
    objects = tl.arange(0, BLOCK_O)[None, None, :]
    for o in tl.static_range(NUM_OBJ):
        s_o = tl.where(eligible & (key_labels[:, None, :] == o), s, float("-inf"))
        block_max, block_pos = tl.max(s_o, axis=2, return_indices=True, return_indices_tie_break_left=True)
        better = (objects == o) & (block_max[:, :, None] > a_max)
        a_max = tl.where(better, block_max[:, :, None], a_max)
        a_arg = tl.where(better, key_start + block_pos[:, :, None], a_arg)
    return a_max, a_arg


@triton.jit
def _time_keys_tile(q, qy, qx, q_valid, t0, t1, k_base, v_base, lab_base, sk_t, sv_t, sk_h, sv_h, sk_w, sv_w,
                    sk_d, sv_d, H, W, D, scale_log2, m_i, l_i, acc, a_max, a_arg,
                    ELIGIBLE: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_time_keys` for a ``[BH, BW]`` tile: keys ``(tt, y, x)``, ``tt`` in ``[t0, t1)``."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = q_valid[:, :, None] & (offs_d < D)[None, None, :]
    cell_k = (qy[:, None, None].to(tl.int64) * sk_h + qx[None, :, None].to(tl.int64) * sk_w
              + offs_d[None, None, :].to(tl.int64) * sk_d)
    cell_v = (qy[:, None, None].to(tl.int64) * sv_h + qx[None, :, None].to(tl.int64) * sv_w
              + offs_d[None, None, :].to(tl.int64) * sv_d)
    objects = tl.arange(0, BLOCK_O)[None, None, :]
    for tt in range(t0, t1):
        k = tl.load(k_base + cell_k + tl.cast(tt, tl.int64) * sk_t, mask=mask, other=0.0)
        v = tl.load(v_base + cell_v + tl.cast(tt, tl.int64) * sv_t, mask=mask, other=0.0)
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=2) * scale_log2
        s = tl.where(q_valid, s, float("-inf"))
        if NUM_OBJ > 0:
            if ELIGIBLE:
                key_index = (tt * H + qy[:, None]) * W + qx[None, :]
                key_labels = tl.load(lab_base + key_index, mask=q_valid, other=-1)
                better = (q_valid & (key_labels >= 0))[:, :, None] & (key_labels[:, :, None] == objects) \
                    & (s[:, :, None] > a_max)
                a_max = tl.where(better, s[:, :, None], a_max)
                a_arg = tl.where(better, key_index[:, :, None], a_arg)
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, :, None] + p[:, :, None] * v.to(tl.float32)
        m_i = m_new
    return m_i, l_i, acc, a_max, a_arg


@triton.jit
def grid_fwd_tiles(
    Q, K, V, Labels, Out, Lse, Aff, Arg,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Every key of a ``BH x BW`` tile of queries ``(t, y0 .. y0+BH, x0 .. x0+BW)`` of one
    (batch, head), in one pass; writes Out ``(B*N, S_q, D)``, Lse (natural log), Aff, Arg.

    Q ``(B, N, T_Q, H, W, D)``, K, V ``(B, N // GROUP, T, H, W, D)``, any strides; Labels
    int32 ``(B, T, H, W)``. Column keys first (batched ``tl.dot`` over the tile's ``BW``
    columns, the query permuted to ``[BW, BH, D]``), their online-softmax state permuted
    back once and continued by the row keys (batched over the ``BH`` rows) and the time
    keys: one accumulator live at a time. The column's object maxima are kept apart and
    merged last, so ties resolve as in the two-pass kernels (row and time keys first).
    """
    tiles_x = tl.cdiv(W, BW)
    tiles_y = tl.cdiv(H, BH)
    pid = tl.program_id(0)
    pid_x = pid % tiles_x
    pid_y = (pid // tiles_x) % tiles_y
    rest = pid // (tiles_x * tiles_y)
    tq = rest % T_Q
    pid_bn = rest // T_Q
    t = tq + (T - T_Q)
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    kv = n // GROUP
    S = T * H * W
    S_q = T_Q * H * W

    qy = pid_y * BH + tl.arange(0, BH)
    qx = pid_x * BW + tl.arange(0, BW)
    y_valid = qy < H
    x_valid = qx < W
    q_valid = y_valid[:, None] & x_valid[None, :]  # [BH, BW]
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q_base = Q + b * sq_b + n * sq_n + tq.to(tl.int64) * sq_t
    q = tl.load(q_base + qy[:, None, None].to(tl.int64) * sq_h + qx[None, :, None].to(tl.int64) * sq_w
                + offs_d[None, None, :].to(tl.int64) * sq_d,
                mask=q_valid[:, :, None] & d_valid[None, None, :], other=0.0)  # [BH, BW, BLOCK_D]

    k_frame = K + b * sk_b + kv * sk_n + t.to(tl.int64) * sk_t
    v_frame = V + b * sv_b + kv * sv_n + t.to(tl.int64) * sv_t
    lab_base = Labels + b * S
    lab_frame = lab_base + t * H * W

    # column keys (t, y', x), y' != y, in the column-major layout [BW, BH]
    q_c = tl.permute(q, (1, 0, 2))
    m_c = tl.full([BW, BH], float("-inf"), tl.float32)
    l_c = tl.zeros([BW, BH], tl.float32)
    acc_c = tl.zeros([BW, BH, BLOCK_D], tl.float32)
    a_c = tl.full([BW, BH, BLOCK_O], float("-inf"), tl.float32)
    arg_c = tl.full([BW, BH, BLOCK_O], -1, tl.int32)
    valid_c = x_valid[:, None] & y_valid[None, :]  # [BW, BH]
    for start in range(0, H, BLOCK_N):
        ky = start + tl.arange(0, BLOCK_N)
        n_valid = ky < H
        kT = tl.load(k_frame + qx[:, None, None].to(tl.int64) * sk_w + offs_d[None, :, None].to(tl.int64) * sk_d
                     + ky[None, None, :].to(tl.int64) * sk_h,
                     mask=x_valid[:, None, None] & d_valid[None, :, None] & n_valid[None, None, :], other=0.0)
        v = tl.load(v_frame + qx[:, None, None].to(tl.int64) * sv_w + ky[None, :, None].to(tl.int64) * sv_h
                    + offs_d[None, None, :].to(tl.int64) * sv_d,
                    mask=x_valid[:, None, None] & n_valid[None, :, None] & d_valid[None, None, :], other=0.0)
        s = dot(q_c, kT, tl.zeros([BW, BH, BLOCK_N], tl.float32), DOT_PRECISION, INTERPRET_BF16) * scale_log2
        in_pattern = valid_c[:, :, None] & n_valid[None, None, :] & (qy[None, :, None] != ky[None, None, :])
        s = tl.where(in_pattern, s, float("-inf"))
        # same frame: never eligible under causal affinity
        if NUM_OBJ > 0 and not CAUSAL_AFF:
            key_labels = tl.load(lab_frame + ky[None, :] * W + qx[:, None], mask=x_valid[:, None] & n_valid[None, :],
                                 other=-1)
            # arg_c holds the key's row y' until the merge below
            a_c, arg_c = _object_max_tile(s, in_pattern, key_labels, start, a_c, arg_c, NUM_OBJ, BLOCK_O)
        m_c, l_c, acc_c = _softmax_tile(s, m_c, l_c, acc_c, v, DOT_PRECISION, INTERPRET_BF16)

    # the row keys continue the column state, permuted back once (exact: one online softmax)
    m_i = tl.trans(m_c)
    l_i = tl.trans(l_c)
    acc = tl.permute(acc_c, (1, 0, 2))
    a_max = tl.full([BH, BW, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BH, BW, BLOCK_O], -1, tl.int32)
    # row keys (t, y, x'), the query itself included
    for start in range(0, W, BLOCK_N):
        kx = start + tl.arange(0, BLOCK_N)
        n_valid = kx < W
        kT = tl.load(k_frame + qy[:, None, None].to(tl.int64) * sk_h + offs_d[None, :, None].to(tl.int64) * sk_d
                     + kx[None, None, :].to(tl.int64) * sk_w,
                     mask=y_valid[:, None, None] & d_valid[None, :, None] & n_valid[None, None, :], other=0.0)
        v = tl.load(v_frame + qy[:, None, None].to(tl.int64) * sv_h + kx[None, :, None].to(tl.int64) * sv_w
                    + offs_d[None, None, :].to(tl.int64) * sv_d,
                    mask=y_valid[:, None, None] & n_valid[None, :, None] & d_valid[None, None, :], other=0.0)
        s = dot(q, kT, tl.zeros([BH, BW, BLOCK_N], tl.float32), DOT_PRECISION, INTERPRET_BF16) * scale_log2
        in_pattern = q_valid[:, :, None] & n_valid[None, None, :]
        s = tl.where(in_pattern, s, float("-inf"))
        if NUM_OBJ > 0 and not CAUSAL_AFF:
            row_start = (t * H + qy) * W + start
            key_labels = tl.load(lab_base + row_start[:, None] + tl.arange(0, BLOCK_N)[None, :],
                                 mask=y_valid[:, None] & n_valid[None, :], other=-1)
            a_max, a_arg = _object_max_tile(s, in_pattern, key_labels, row_start[:, None, None], a_max, a_arg,
                                            NUM_OBJ, BLOCK_O)
        m_i, l_i, acc = _softmax_tile(s, m_i, l_i, acc, v, DOT_PRECISION, INTERPRET_BF16)

    # time keys (t', y, x): earlier frames, then (not causal) later ones; never t itself
    k_head = K + b * sk_b + kv * sk_n
    v_head = V + b * sv_b + kv * sv_n
    m_i, l_i, acc, a_max, a_arg = _time_keys_tile(
        q, qy, qx, q_valid, 0, t, k_head, v_head, lab_base, sk_t, sv_t, sk_h, sv_h, sk_w, sv_w, sk_d, sv_d,
        H, W, D, scale_log2, m_i, l_i, acc, a_max, a_arg, True, NUM_OBJ, BLOCK_O, BLOCK_D)
    if not CAUSAL:
        m_i, l_i, acc, a_max, a_arg = _time_keys_tile(
            q, qy, qx, q_valid, t + 1, T, k_head, v_head, lab_base, sk_t, sv_t, sk_h, sv_h, sk_w, sv_w, sk_d, sv_d,
            H, W, D, scale_log2, m_i, l_i, acc, a_max, a_arg, not CAUSAL_AFF, NUM_OBJ, BLOCK_O, BLOCK_D)

    BM: tl.constexpr = BH * BW
    q_index = (tq * H + qy[:, None]) * W + qx[None, :]
    if NUM_OBJ > 0:
        if not CAUSAL_AFF:
            # the column's maxima: row and time keys win ties (as in grid_fwd_cols' merge)
            a_col = tl.permute(a_c, (1, 0, 2))
            arg_col = tl.permute(arg_c, (1, 0, 2))
            col_wins = a_col > a_max
            a_arg = tl.where(col_wins, (t * H + arg_col) * W + qx[None, :, None], a_arg)
            a_max = tl.maximum(a_max, a_col)
    store_results(
        Out, Lse, Aff, Arg, pid_bn.to(tl.int64), S_q, D, tl.reshape(q_index, [BM]), tl.reshape(q_valid, [BM]),
        tl.reshape(m_i, [BM]), tl.reshape(l_i, [BM]), tl.reshape(acc, [BM, BLOCK_D]),
        tl.reshape(a_max, [BM, BLOCK_O]), tl.reshape(a_arg, [BM, BLOCK_O]),
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


_prune = {"early_config_prune": kind_pruner(CONFIGS_BY_HEAD_DIM)}
grid_fwd_rows_tuned = triton.autotune(TWO_PASS_CONFIGS, key=TUNE_KEY, prune_configs_by=_prune)(grid_fwd_rows)
# the column pass updates the row pass's state in place (Lse, Aff, Arg; Out when it is the
# partial): each benchmark run of the autotuner must start from the row pass's values
grid_fwd_cols_tuned = triton.autotune(TWO_PASS_CONFIGS, key=TUNE_KEY, prune_configs_by=_prune,
                                      restore_value=["Out", "Lse", "Aff", "Arg"])(grid_fwd_cols)
grid_fwd_tiles_tuned = triton.autotune(TILE_CONFIGS, key=TUNE_KEY, prune_configs_by=_prune)(grid_fwd_tiles)
# The module's autotuning table, both kinds together (what :func:`launch_forward` chooses
# among on CUDA, and what ``perf/work_model.py`` ranks): CONFIGS and the per-head-dim
# pruner; never launched itself (each kernel has its own ``*_tuned`` above).
grid_fwd_tuned = SimpleNamespace(configs=CONFIGS, early_config_prune=kind_pruner(CONFIGS_BY_HEAD_DIM))


def _aot_specs():
    specs = []
    for name, kernel, configs in (("grid_fwd_rows", grid_fwd_rows, TWO_PASS_CONFIGS),
                                  ("grid_fwd_cols", grid_fwd_cols, TWO_PASS_CONFIGS),
                                  ("grid_fwd_tiles", grid_fwd_tiles, TILE_CONFIGS)):
        # (forward_aot_specs' own pruning knows BLOCK_M / TILE_H tiles only: replaced below)
        for spec in forward_aot_specs(
            name, kernel, TWO_PASS_CONFIGS, dict(B=1, GROUP=2, T_Q=4), dict(CAUSAL=True, CAUSAL_AFF=False),
            "GQA group 2, causal, causal_affinity=False (objects in every phase)",
        ):
            if kernel is not grid_fwd_tiles:
                # bfloat16 Out: the scaled float16 partial
                spec.pointers["Part"] = "*fp16"
                spec.pointers["Exp"] = "*i8"
            spec.configs = kind_pruner(CONFIGS_BY_HEAD_DIM)(configs, {}, BLOCK_D=spec.constexprs["BLOCK_D"])
            specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()


def _partial(out: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the row pass leaves its normalised output and the exponents of its scaling:
    ``out`` itself when it is float32, a float16 scratch with int8 exponents (one per 16
    queries of a row) for bfloat16, a float32 scratch for float16 (unused exponents)."""
    if out.dtype == torch.float32:
        return out, torch.empty(1, dtype=torch.int8, device=out.device)
    if out.dtype == torch.bfloat16:
        exps = torch.empty(p.B * p.N, p.T_q * p.H, cdiv(p.W, 16), dtype=torch.int8, device=out.device)
        return torch.empty(out.shape, dtype=torch.float16, device=out.device), exps
    return torch.empty(out.shape, dtype=torch.float32, device=out.device), torch.empty(1, dtype=torch.int8,
                                                                                       device=out.device)


def _launch_two_pass(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                     interpret: bool, config=None) -> None:
    """:func:`grid_fwd_rows` then :func:`grid_fwd_cols` (a BLOCK_M configuration, or autotuned)."""
    q, k, v, lab, out, lse, aff, arg = pointers
    part, exps = _partial(out, p)
    args = (q, k, v, lab, out, lse, aff, arg, part, exps, *strides,
            p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, scale_log2)
    module = sys.modules[__name__]
    grid_rows = lambda m: (cdiv(p.W, m["BLOCK_M"]) * p.T_q * p.H * p.B * p.N,)  # noqa: E731
    for name, grid in (("grid_fwd_rows", grid_rows), ("grid_fwd_cols", _grid_cols(p))):
        run(module, name, grid, args, meta, interpret=interpret, configs=TWO_PASS_CONFIGS, config=config,
            sizes=_sizes(p))


def _launch_tiles(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                  interpret: bool, config=None) -> None:
    """:func:`grid_fwd_tiles` (a BH / BW configuration, or autotuned over those)."""
    args = (*pointers, *strides, p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, scale_log2)
    run(sys.modules[__name__], "grid_fwd_tiles", _grid_tiles(p), args, meta, interpret=interpret,
        configs=TILE_CONFIGS, config=config, sizes=_sizes(p))


def _sizes(p: Problem) -> str:
    return f"T_q*H={p.T_q * p.H}, T_q*W={p.T_q * p.W}, B*N={p.B * p.N}"


def _grid_cols(p: Problem):
    return lambda m: (cdiv(p.H, m["BLOCK_M"]) * p.T_q * p.W * p.B * p.N,)


def _grid_tiles(p: Problem):
    return lambda m: (cdiv(p.H, m["BH"]) * cdiv(p.W, m["BW"]) * p.T_q * p.B * p.N,)


def _is_tiles(config) -> bool:
    return "BH" in config.kwargs


# CUDA, no configuration forced: the faster kernel kind per autotuning key (each kind
# autotuned among its own configurations first), measured once per key
_FASTEST_KIND: dict[tuple, str] = {}


def launch_forward(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                   interpret: bool, config=None) -> None:
    """Launch the forward for problem ``p`` (see :func:`sst_triton.kernels.launch.run`): the
    two passes (:func:`grid_fwd_rows`, :func:`grid_fwd_cols`) for a ``BLOCK_M``
    configuration and in the interpreter by default (``CONFIGS[0]``), the single pass
    (:func:`grid_fwd_tiles`) for a ``BH``/``BW`` one; on CUDA with no configuration forced,
    whichever kind measures faster for the call's autotuning key."""
    candidates = [config] if config is not None else (CONFIGS[:1] if interpret else CONFIGS)
    # every candidate's grids are checked before any kernel runs
    for c in candidates:
        m = {**meta, **c.kwargs}
        if _is_tiles(c):
            check_grid("grid_fwd_tiles", _grid_tiles(p)(m), _sizes(p))
        else:
            check_grid("grid_fwd_cols", _grid_cols(p)(m), _sizes(p))
    call = (p, pointers, strides, scale_log2, meta)
    if config is not None or interpret:
        chosen = config if config is not None else CONFIGS[0]
        (_launch_tiles if _is_tiles(chosen) else _launch_two_pass)(*call, interpret=interpret, config=chosen)
        return
    from . import launch as _launch

    tiles_allowed = bool(kind_pruner(CONFIGS_BY_HEAD_DIM)(TILE_CONFIGS, {}, BLOCK_D=meta["BLOCK_D"]))
    kinds = {"two_pass": _launch_two_pass, **({"tiles": _launch_tiles} if tiles_allowed else {})}
    if _launch._DRY_RUN and _launch._DRY_RUN[-1]:
        # a dry run (capture_grids(launch=False)) reports every kernel the tuner may launch
        for launcher in kinds.values():
            launcher(*call, interpret=False)
        return
    key = (p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.num_obj, pointers[0].dtype,
           *(meta[name] for name in ("BLOCK_D", "CAUSAL", "CAUSAL_AFF")))
    if key not in _FASTEST_KIND:
        import triton.testing

        times = {}
        for name, launcher in kinds.items():
            launcher(*call, interpret=False)  # autotunes that kind's kernels for the key
            times[name] = triton.testing.do_bench(lambda: launcher(*call, interpret=False))
        _FASTEST_KIND[key] = min(times, key=times.get)
    kinds[_FASTEST_KIND[key]](*call, interpret=False)


def work_forward(p: Problem, config, elem_bytes: int = 4, causal_affinity: bool = True, fp16: bool = False) -> Work:
    """What :func:`grid_fwd_rows` and :func:`grid_fwd_cols` issue for ``p`` under ``config``
    (see :mod:`sst_triton.kernels.work`); q/k/v elements of ``elem_bytes`` (4: float32;
    2: bfloat16, or float16 with ``fp16``), separate contiguous tensors. The partial output
    the column pass reads: float32, or float16 plus an int8 exponent per 16 queries of a
    row for bfloat16 (see :func:`_partial`)."""
    from ._common import block_d, block_o

    if _is_tiles(config):
        return _work_tiles(p, config, elem_bytes, causal_affinity)
    BM, BN = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    BD, BO, O, D = block_d(p.D), block_o(p.num_obj), p.num_obj, p.D
    causal, H, W, T = p.pattern.causal, p.H, p.W, p.T
    heads, kv_heads = p.B * p.N, p.B * p.N_kv
    row_labels = O > 0 and not causal_affinity
    cell = D * elem_bytes
    scaled = elem_bytes == 2 and not fp16
    part_cell = D * (2 if scaled else 4)

    # row pass: per query frame t, H rows of cdiv(W, BM) tiles
    tiles = cdiv(W, BM)
    rows = Work(programs=tiles * p.T_q * H * heads)
    for t in range(p.t_off, T):
        earlier, later = t, (0 if causal else T - 1 - t)
        labelled = (earlier + (later if not causal_affinity else 0)) if O else 0
        per_row = Work(
            exp=tiles * (cdiv(W, BN) * BM * (BN + 1) + 2 * BM * (earlier + later)),
            dot_flops=tiles * cdiv(W, BN) * 4 * BM * BN * BD,
            load_bytes=W * cell + tiles * W * (2 * cell + (4 if row_labels else 0))
            + (earlier + later) * W * 2 * cell + labelled * W * 4,
        )
        rows.exp += heads * H * per_row.exp
        rows.dot_flops += heads * H * per_row.dot_flops
        rows.load_bytes += heads * H * per_row.load_bytes
    # every key frame is a row or time key of some query; labels: eligible frames only
    label_frames = (T - 1 if causal_affinity else T) if O else 0
    rows.distinct_bytes = heads * p.S_q * cell + 2 * kv_heads * p.S * cell + p.B * label_frames * H * W * 4

    # column pass: per query frame, W columns of cdiv(H, BM) tiles, then the merge
    tiles = cdiv(H, BM)
    lines = heads * p.T_q * W
    per_col = Work(
        exp=tiles * (cdiv(H, BN) * BM * (BN + 1) + 2 * BM + (BM * BO if O else 0)),
        dot_flops=tiles * cdiv(H, BN) * 4 * BM * BN * BD,
        load_bytes=H * cell + tiles * H * (2 * cell + (4 if row_labels else 0))
        + H * (part_cell + (1 if scaled else 0) + 4 + (2 * O * 4 if O else 0)),
    )
    cols = Work(
        exp=lines * per_col.exp, dot_flops=lines * per_col.dot_flops, load_bytes=lines * per_col.load_bytes,
        programs=lines * tiles,
        distinct_bytes=heads * p.S_q * cell + 2 * kv_heads * p.T_q * H * W * cell
        + (p.B * p.T_q * H * W * 4 if row_labels else 0) + heads * p.S_q * (part_cell + 4 + 2 * O * 4)
        + (heads * p.T_q * H * cdiv(W, 16) if scaled else 0),
    )
    # the row pass writes the partial state (Part, Exp, Lse, Aff, Arg) that the column pass
    # reads back, the column pass the results: each once per query
    stats = 4 + 2 * O * 4
    rows.store_bytes = heads * p.S_q * (part_cell + stats) + (heads * p.T_q * H * cdiv(W, 16) if scaled else 0)
    cols.store_bytes = heads * p.S_q * (cell + stats)
    return rows + cols


def _work_tiles(p: Problem, config, elem_bytes: int, causal_affinity: bool) -> Work:
    """What :func:`grid_fwd_tiles` issues (see :func:`work_forward`). Per program, a
    ``BH x BW`` tile: ``cdiv(H, BLOCK_N)`` column blocks and ``cdiv(W, BLOCK_N)`` row blocks
    of ``BH * BW * (BLOCK_N + 1)`` exponentials (``p`` and the rescale) and two batched
    products each, two exponentials per query and time key; every valid column of the tile
    loads its ``H`` column keys, every valid row its ``W`` row keys, every query its time
    keys; the results are written once."""
    from ._common import block_d, block_o

    BH, BW, BN = config.kwargs["BH"], config.kwargs["BW"], config.kwargs["BLOCK_N"]
    BD, BO, O, D = block_d(p.D), block_o(p.num_obj), p.num_obj, p.D
    causal, H, W, T = p.pattern.causal, p.H, p.W, p.T
    heads, kv_heads = p.B * p.N, p.B * p.N_kv
    same_frame_labels = 4 if O > 0 and not causal_affinity else 0
    cell = D * elem_bytes
    tiles_y, tiles_x = cdiv(H, BH), cdiv(W, BW)
    tiles = tiles_y * tiles_x
    work = Work(programs=tiles * p.T_q * heads)
    for t in range(p.t_off, T):
        earlier, later = t, (0 if causal else T - 1 - t)
        labelled = (earlier + (later if not causal_affinity else 0)) if O else 0
        frame = Work(
            exp=tiles * ((cdiv(H, BN) + cdiv(W, BN)) * BH * BW * (BN + 1) + 2 * BH * BW * (earlier + later)
                         + (BH * BW * BO if O else 0)),
            dot_flops=tiles * (cdiv(H, BN) + cdiv(W, BN)) * 4 * BH * BW * BN * BD,
            # q; column keys per valid column of each tile row; row keys per valid row of each
            # tile column; time keys (and eligible time labels) per query
            load_bytes=H * W * cell + (tiles_y + tiles_x) * H * W * (2 * cell + same_frame_labels)
            + (earlier + later) * H * W * 2 * cell + labelled * H * W * 4,
        )
        work.exp += heads * frame.exp
        work.dot_flops += heads * frame.dot_flops
        work.load_bytes += heads * frame.load_bytes
    # every key frame is a row, column or time key of some query; labels: eligible frames only
    label_frames = (T - 1 if causal_affinity else T) if O else 0
    work.distinct_bytes = heads * p.S_q * cell + 2 * kv_heads * p.S * cell + p.B * label_frames * H * W * 4
    work.store_bytes = heads * p.S_q * (cell + 4 + 2 * O * 4)
    return work
