"""Strided attention forward: dense FlashAttention inside each residue class.

The keys of ``p = (t, y, x)`` are the cells congruent to it modulo ``(st, sh, sw)``:
every residue class ``(t mod st, y mod sh, x mod sw)`` is a dense attention problem of
``nT * nH * nW`` cells, addressed through the strides of q/k/v (no copy), numbered
time-major (:func:`~sst_triton.kernels._common.class_cell`). One program takes ``BLOCK_M``
query cells of one class of one (batch, head) and walks the class's keys ``BLOCK_N`` at a
time with ``tl.dot`` for ``Q K^T`` and ``P V``.

Version 2: query head ``n`` reads key/value head ``n // GROUP``; the queries are the cells
of the last ``T_Q`` of the ``T`` frames. Time-major numbering makes a class's query cells a
contiguous suffix of the class (frames ``>= T - T_Q``), so the query blocks tile that suffix
only, while the keys (and ``causal``, ``causal_affinity``, the residues) use absolute frames.

Grid: one axis, ``(B * N) * classes * query blocks`` programs, the query blocks of one class
adjacent (they read the same keys, which then come from L2); only the ``min(T_Q, st) * sh * sw``
classes that hold a query frame get programs. Nothing on axes y/z, whose
65,535 limit the class count alone (``stride=(1, 256, 256)``: 65,536 classes) or ``B * N``
would pass.

Loads: each key row is read once per query block of its class, so ``BLOCK_M`` is as large
as the registers allow (128 rows by default): at ``T, H, W = 4, 24, 40``, stride
``(1, 4, 4)`` a class of 240 cells takes 2 query blocks instead of 8 (``L`` 5.7 -> ~1.7).
"""
from __future__ import annotations

import sys
from collections import Counter

import triton
import triton.language as tl

from ._common import block_d as _block_d, block_o as _block_o, class_cell, dot, forward_aot_specs, object_max_block, \
    online_softmax_block, store_results
from .launch import Problem, cdiv, run
from .work import Work

# Ordered: the first configuration that a head dim keeps (``configs_for``) is the one the
# interpreter runs, so the first is the large-query-block one (fewest key reloads; it compiles at
# every checked head dim). BLOCK_M >= 64 throughout: Hopper's wgmma takes 64-row warpgroup tiles.
# BLOCK_N = 32 where the [BLOCK_M, BLOCK_N] logits and the object maxima would spill at 64.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]

# The head dims (BLOCK_D as checked by `python -m sst_triton.aot`: 32, 64, 128) at which each
# configuration compiles with no spill on both sm_80 and sm_90a; past 128 no configuration is
# checked and the smallest one runs.
CHECKED_HEAD_DIMS = (32, 64, 128)
_HEAD_DIMS = {
    (128, 32, 8): (32, 64, 128),
    (64, 32, 4): (32, 64),        # d128: 184 spill bytes on sm_80
    (64, 32, 8): (32, 64, 128),
    (128, 64, 8): (32,),          # d64: 152 spill bytes on sm_80
}


def _key(config) -> tuple[int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps


def checked_head_dim(block_d: int):
    """The checked head dim whose compile covers ``block_d`` (a smaller block fits where a larger
    one does), or ``None`` past the largest."""
    return next((d for d in CHECKED_HEAD_DIMS if block_d <= d), None)


def pick(configs: list, table: dict, key, block_d: int) -> list:
    """``configs`` (in order) that compile spill-free at ``block_d`` per ``table``; the one with
    the fewest accumulator rows per warp when ``block_d`` is past every checked head dim."""
    d = checked_head_dim(block_d)
    kept = [c for c in configs if d is not None and d in table[key(c)]]
    if kept:
        return kept
    return [min(configs, key=lambda c: max(c.kwargs.values()) / c.num_warps)]


def configs_for(block_d: int) -> list:
    """The configurations the autotuner may pick at head dim ``block_d`` (CONFIGS order)."""
    return pick(CONFIGS, _HEAD_DIMS, _key, block_d)


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    keep = {_key(c) for c in configs_for(block_d)}
    return [c for c in configs if _key(c) in keep]


@triton.jit
def strided_fwd(
    Q, K, V, Labels, Out, Lse, Aff, Arg,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    B, N, GROUP, T_Q, T, H, W, D, ST, SH, SW,
    scale_log2,
    CAUSAL: tl.constexpr, CAUSAL_AFF: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Q ``(B, N, T_Q, H, W, D)``, K, V ``(B, N // GROUP, T, H, W, D)``, any strides; ``ST, SH,
    SW`` the pattern strides clipped to the axis lengths (the launcher's job); Labels int32
    ``(B, T, H, W)``; Out contiguous ``(B*N, T_Q*H*W, D)``, Lse ``(B*N, T_Q*H*W)``, Aff/Arg
    ``(B*N, O, T_Q*H*W)`` (Arg values: absolute key cells)."""
    # ---- program -> (batch-head, class, query block): all on axis 0, blocks fastest
    # only classes with a query frame get programs: the time residues of the T_Q query frames
    blocks = tl.cdiv(tl.cdiv(T_Q, ST) * tl.cdiv(H, SH) * tl.cdiv(W, SW), BLOCK_M)
    classes = tl.minimum(T_Q, ST) * SH * SW
    t_off = T - T_Q
    pid = tl.program_id(0)
    pid_m = pid % blocks
    pid_c = (pid // blocks) % classes
    pid_bn = pid // (blocks * classes)
    rx = pid_c % SW
    ry = (pid_c // SW) % SH
    rt = (t_off + pid_c // (SW * SH)) % ST
    nH = tl.cdiv(H - ry, SH)
    nW = tl.cdiv(W - rx, SW)
    plane = nH * nW
    size = tl.cdiv(T - rt, ST) * plane
    # the class's query cells: its frames >= t_off, a suffix in time-major order
    q_lo = tl.cdiv(tl.maximum(t_off - rt, 0), ST) * plane
    if q_lo + pid_m * BLOCK_M >= size:
        return
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    kv = n // GROUP
    S = T * H * W

    # ---- the query block
    offs_m = q_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < size
    qt, qy, qx = class_cell(offs_m, rt, ry, rx, nH, nW, ST, SH, SW)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    # query frame qt - t_off of q
    q_rows = (qt - t_off).to(tl.int64) * sq_t + qy.to(tl.int64) * sq_h + qx.to(tl.int64) * sq_w
    q_ptrs = Q + b * sq_b + n * sq_n + q_rows[:, None] + offs_d[None, :].to(tl.int64) * sq_d
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a_max = tl.full([BLOCK_M, BLOCK_O], float("-inf"), tl.float32)
    a_arg = tl.full([BLOCK_M, BLOCK_O], -1, tl.int32)

    # ---- the class's keys, BLOCK_N at a time
    hi = size
    if CAUSAL:
        # time-major: keys of frames after the block's last query come after its frame
        last = tl.minimum(q_lo + pid_m * BLOCK_M + BLOCK_M, size) - 1
        hi = tl.minimum(size, (last // plane + 1) * plane)
    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n
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

    # ---- epilogue: rows of the query frames, Arg as absolute key cells
    query_index = ((qt - t_off) * H + qy) * W + qx
    if NUM_OBJ > 0:
        at, ay, ax = class_cell(a_arg, rt, ry, rx, nH, nW, ST, SH, SW)
        a_arg = (at * H + ay) * W + ax
    store_results(
        Out, Lse, Aff, Arg, b * N + n, T_Q * H * W, D, query_index, m_valid, m_i, l_i, acc, a_max, a_arg,
        NUM_OBJ, BLOCK_D, BLOCK_O, INTERPRET_BF16,
    )


strided_fwd_tuned = triton.autotune(
    CONFIGS,
    key=["B", "N", "GROUP", "T_Q", "T", "H", "W", "ST", "SH", "SW", "BLOCK_D", "NUM_OBJ", "CAUSAL"],
    prune_configs_by={"early_config_prune": _prune},
)(strided_fwd)

AOT_SPECS = forward_aot_specs(
    "strided_fwd", strided_fwd, CONFIGS, dict(B=1, GROUP=1, T_Q=4, ST=2, SH=2, SW=2),
    dict(CAUSAL=True, CAUSAL_AFF=True), "stride 2, causal",
)
for _spec in AOT_SPECS:
    _spec.configs = configs_for(_spec.constexprs["BLOCK_D"])


def clipped_stride(p: Problem) -> tuple[int, int, int]:
    """The pattern's stride clipped to the axis lengths: a stride past an axis leaves one
    residue per cell, as the axis length itself does."""
    return tuple(min(s, n) for s, n in zip(p.pattern.stride, (p.T, p.H, p.W)))


def largest_query_class(p: Problem) -> int:
    """Most query cells of one class (class (0, 0, 0) within the query frames)."""
    st, sh, sw = clipped_stride(p)
    return cdiv(p.T_q, st) * cdiv(p.H, sh) * cdiv(p.W, sw)


def query_classes(p: Problem) -> int:
    """Classes that hold a query cell: the time residues of the last ``T_q`` frames."""
    st, sh, sw = clipped_stride(p)
    return min(p.T_q, st) * sh * sw


def launch_forward(p: Problem, pointers: tuple, strides: tuple, scale_log2: float, meta: dict, *,
                   interpret: bool, config=None) -> None:
    """Launch :func:`strided_fwd` for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    st, sh, sw = clipped_stride(p)
    largest = largest_query_class(p)
    grid = lambda m: (p.B * p.N * query_classes(p) * cdiv(largest, m["BLOCK_M"]),)  # noqa: E731
    args = (*pointers, *strides, p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, st, sh, sw, scale_log2)
    run(sys.modules[__name__], "strided_fwd", grid, args, meta, interpret=interpret,
        configs=configs_for(meta["BLOCK_D"]), config=config,
        sizes=f"B*N={p.B * p.N}, classes={query_classes(p)}, largest class={largest} query cells")


# ---------------------------------------------------------------------------------------
# Work model (sst_triton.kernels.work): exact for the tiling above
# ---------------------------------------------------------------------------------------


def class_shapes(p: Problem) -> Counter:
    """``(nT, first query frame (class-local), nH, nW) -> number of classes`` over all classes."""
    st, sh, sw = clipped_stride(p)
    by_t = Counter((cdiv(p.T - rt, st), cdiv(max(p.t_off - rt, 0), st)) for rt in range(st))
    by_h = Counter(cdiv(p.H - ry, sh) for ry in range(sh))
    by_w = Counter(cdiv(p.W - rx, sw) for rx in range(sw))
    return Counter({
        (nT, qf, nH, nW): ct * ch * cw
        for (nT, qf), ct in by_t.items() for nH, ch in by_h.items() for nW, cw in by_w.items()
    })


def query_blocks(nT: int, qf: int, plane: int, block: int, causal: bool):
    """``(query rows, key rows walked)`` of every query block of one class (as the kernels tile)."""
    size, q_lo = nT * plane, qf * plane
    for start in range(q_lo, size, block):
        rows = min(block, size - start)
        hi = min(size, ((start + rows - 1) // plane + 1) * plane) if causal else size
        yield rows, hi


def work_forward(p: Problem, config, elem_bytes: int = 4) -> Work:
    """What :func:`strided_fwd` issues for ``p`` under ``config``; q/k/v elements of
    ``elem_bytes`` (4: float32), contiguous tensors."""
    BM, BN = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    BD, BO, O = _block_d(p.D), _block_o(p.num_obj), p.num_obj
    causal = p.pattern.causal
    st, sh, sw = clipped_stride(p)
    heads = p.B * p.N
    w = Work(programs=heads * query_classes(p) * cdiv(largest_query_class(p), BM))
    distinct_keys = 0
    for (nT, qf, nH, nW), count in class_shapes(p).items():
        plane = nH * nW
        if qf >= nT:
            continue  # no query frame in this class: its programs return at once
        distinct_keys += count * nT * plane
        for rows, hi in query_blocks(nT, qf, plane, BM, causal):
            key_blocks = cdiv(hi, BN)
            c = Work(
                exp=key_blocks * (BM * BN + BM) + (BM * BO if O else 0),
                dot_flops=key_blocks * 2 * (2 * BM * BN * BD),
                load_bytes=rows * p.D * elem_bytes + hi * (2 * p.D * elem_bytes + (4 if O else 0)),
            )
            w.exp += heads * count * c.exp
            w.dot_flops += heads * count * c.dot_flops
            w.load_bytes += heads * count * c.load_bytes
    w.distinct_bytes = (
        heads * p.S_q * p.D * elem_bytes                              # Q
        + 2 * p.B * p.N_kv * distinct_keys * p.D * elem_bytes        # K, V
        + (p.B * distinct_keys * 4 if O else 0)                       # labels
    )
    # written once per query: out, lse (float32), affinity (float32) and argmax (int32)
    w.store_bytes = heads * p.S_q * (p.D * elem_bytes + 4 + 2 * O * 4)
    return w
