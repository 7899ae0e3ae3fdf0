"""Strided attention backward: dense FlashAttention-2 backward inside each residue class.

A residue class ``(t mod st, y mod sh, x mod sw)`` is a dense attention problem of
``nT * nH * nW`` cells, ordered time-major as in :mod:`.strided_fwd`. The pattern is
symmetric inside a class except for ``causal`` (query frame >= key frame), which bounds the
key loop of ``strided_bwd_dq`` from above and the query loop of ``strided_bwd_dkdv`` from
below, frame-wise.

Version 2: the queries are the cells of the last ``T_Q`` frames (a suffix of every class in
time-major order); query head ``n`` reads key/value head ``n // GROUP``. ``strided_bwd_dkdv``
runs one program per key block of one (batch, key/value head) and sums over the ``GROUP``
query heads of that head in a fixed order (deterministic, no atomics), walking only the
query cells of its class. Keys of a class with no query frame get zero gradients.

Grids: one axis each, ``(B * N) * classes with a query frame * query blocks`` (dQ) and
``(B * N_kv) * classes * key blocks`` (dK/dV): axes y/z (65,535) are never used.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import block_d as _block_d, block_o as _block_o, class_cell
from .common_bwd import aot_spec, dkdv_block, dq_block, load_cells, object_grad, store_cells
from .launch import Problem, cdiv, run
from .strided_fwd import class_shapes, clipped_stride, largest_query_class, pick, query_blocks, query_classes
from .work import Work

# Ordered: the first configuration a head dim keeps is the interpreter's. The query pass
# widens its query block (keys reloaded once per query block), the key pass its key block
# (queries reloaded once per key block, and BLOCK_N is the row count of its dK/dV products:
# >= 64 where wgmma applies).
CONFIGS_DQ = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
CONFIGS_DKDV = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]
# The checked head dims at which each configuration compiles with no spill on sm_80 and sm_90a
# (``python -m sst_triton.aot``; see strided_fwd.pick).
_HEAD_DIMS = {
    ("dq", 128, 64, 8): (32,),               # d64: 340 spill bytes on sm_80
    ("dq", 128, 32, 8): (32, 64),            # d128: 404 spill bytes on sm_80
    ("dq", 64, 32, 8): (32, 64, 128),
    ("dq", 64, 32, 4): (32, 128),            # d64: 16 spill bytes on sm_80
    ("dkdv", 32, 128, 8): (32,),             # (64, 128, 8) spilled at d32 on sm_90a
    ("dkdv", 32, 64, 8): (32, 64),           # d128: 208 spill bytes on sm_90a
    ("dkdv", 32, 32, 4): (64, 128),          # d32 without objects: 8 spill bytes on sm_90a
    ("dkdv", 16, 64, 8): (128,),
}
TUNE_KEY = ["B", "N", "GROUP", "T_Q", "T", "H", "W", "ST", "SH", "SW", "BLOCK_D", "NUM_OBJ", "CAUSAL"]


def _key(part: str, config) -> tuple:
    return part, config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps


def configs_for(part: str, block_d: int) -> list:
    """The configurations of ``part`` ("dq" or "dkdv") the autotuner may pick at ``block_d``."""
    configs = CONFIGS_DQ if part == "dq" else CONFIGS_DKDV
    return pick(configs, _HEAD_DIMS, lambda c: _key(part, c), block_d)


def _pruner(part: str):
    def prune(configs, named_args, **kwargs):
        keep = {_key(part, c) for c in configs_for(part, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))}
        return [c for c in configs if _key(part, c) in keep]

    return prune


@triton.jit
def class_prologue(pid, T_Q, T, H, W, ST, SH, SW, BLOCK: tl.constexpr, QUERY_TILES: tl.constexpr):
    """Decode ``pid`` = ((batch-head) * classes + class) * blocks + block (blocks over the
    largest class's query cells or over its cells) into the class geometry."""
    if QUERY_TILES:
        # only the classes with a query frame: the time residues of the T_Q query frames
        blocks = tl.cdiv(tl.cdiv(T_Q, ST) * tl.cdiv(H, SH) * tl.cdiv(W, SW), BLOCK)
        classes = tl.minimum(T_Q, ST) * SH * SW
    else:
        blocks = tl.cdiv(tl.cdiv(T, ST) * tl.cdiv(H, SH) * tl.cdiv(W, SW), BLOCK)
        classes = ST * SH * SW
    pid_blk = pid % blocks
    pid_c = (pid // blocks) % classes
    pid_bn = pid // (blocks * classes)
    rx = pid_c % SW
    ry = (pid_c // SW) % SH
    if QUERY_TILES:
        rt = (T - T_Q + pid_c // (SW * SH)) % ST
    else:
        rt = pid_c // (SW * SH)
    nH = tl.cdiv(H - ry, SH)
    nW = tl.cdiv(W - rx, SW)
    plane = nH * nW
    size = tl.cdiv(T - rt, ST) * plane
    # query cells: the class's frames >= T - T_Q, a suffix in time-major order
    q_lo = tl.cdiv(tl.maximum(T - T_Q - rt, 0), ST) * plane
    return pid_blk, pid_bn, rt, ry, rx, nH, nW, plane, size, q_lo


@triton.jit
def strided_bwd_dq(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D, ST, SH, SW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dQ`` of ``BLOCK_M`` query cells of one class. Q, DO ``(B, N, T_Q, H, W, D)``, K, V
    ``(B, N // GROUP, T, H, W, D)``, any strides; Lse, Delta ``(B*N, S_q)``; Arg, G
    ``(B*N, O, S_q)``; DQ contiguous ``(B*N, S_q, D)``. ``ST, SH, SW``: the strides clipped
    to the axis lengths."""
    pid_m, pid_bn, rt, ry, rx, nH, nW, plane, size, q_lo = class_prologue(
        tl.program_id(0), T_Q, T, H, W, ST, SH, SW, BLOCK_M, True)
    if q_lo + pid_m * BLOCK_M >= size:
        return
    b = (pid_bn // N).to(tl.int64)
    n = (pid_bn % N).to(tl.int64)
    kv = n // GROUP
    bn = pid_bn.to(tl.int64)
    t_off = T - T_Q
    S_q = T_Q * H * W

    offs_m = q_lo + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < size
    qt, qy, qx = class_cell(offs_m, rt, ry, rx, nH, nW, ST, SH, SW)
    q_index = ((qt - t_off) * H + qy) * W + qx
    q = load_cells(Q + b * sq_b + n * sq_n, qt - t_off, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
    do = load_cells(DO + b * sdo_b + n * sdo_n, qt - t_off, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
    lse = tl.load(Lse + bn * S_q + q_index, mask=m_valid, other=0.0)
    delta = tl.load(Delta + bn * S_q + q_index, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)
    if NUM_OBJ > 0:
        # the block's argmax keys and affinity gradients, loaded once (not once per key block)
        objects = tl.arange(0, BLOCK_O)
        obj_off = (bn * NUM_OBJ + objects[None, :]) * S_q + q_index[:, None].to(tl.int64)
        obj_mask = m_valid[:, None] & (objects[None, :] < NUM_OBJ)
        args = tl.load(Arg + obj_off, mask=obj_mask, other=-1)
        grads = tl.load(G + obj_off, mask=obj_mask, other=0.0)

    hi = size
    if CAUSAL:
        # time-major order: keys of later frames than the block's last query come after it
        last = tl.minimum(q_lo + pid_m * BLOCK_M + BLOCK_M, size) - 1
        hi = tl.minimum(size, (last // plane + 1) * plane)
    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n
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
            # sum_o g_o[p] [key == argmax_o(p)]; an unmatched argmax is -1
            key_index = (kt * H + ky) * W + kx
            obj = tl.zeros([BLOCK_M, BLOCK_N], Lse.dtype.element_ty)
            for o in tl.static_range(NUM_OBJ):
                arg_o = tl.sum(tl.where(objects[None, :] == o, args, 0), axis=1)
                g_o = tl.sum(tl.where(objects[None, :] == o, grads, 0.0), axis=1)
                obj += tl.where(arg_o[:, None] == key_index[None, :], g_o[:, None], 0.0)
        else:
            obj = 0.0
        dq = dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION, DOT_FP32)

    store_cells(DQ + bn * S_q * D, dq * scale, q_index, m_valid, D, BLOCK_D)


@triton.jit
def strided_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, Arg, G, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D, ST, SH, SW,
    scale,
    CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dK`` and ``dV`` of ``BLOCK_N`` key cells of one class of one (batch, key/value head),
    summed over the ``GROUP`` query heads that read it; arguments as in :func:`strided_bwd_dq`,
    DK and DV contiguous ``(B*N_kv, S, D)``."""
    N_KV = N // GROUP
    pid_n, pid_bkv, rt, ry, rx, nH, nW, plane, size, q_lo = class_prologue(
        tl.program_id(0), T_Q, T, H, W, ST, SH, SW, BLOCK_N, False)
    if pid_n * BLOCK_N >= size:
        return
    b = (pid_bkv // N_KV).to(tl.int64)
    kv = (pid_bkv % N_KV).to(tl.int64)
    t_off = T - T_Q
    S = T * H * W
    S_q = T_Q * H * W

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < size
    kt, ky, kx = class_cell(offs_n, rt, ry, rx, nH, nW, ST, SH, SW)
    k_index = (kt * H + ky) * W + kx
    k = load_cells(K + b * sk_b + kv * sk_n, kt, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
    v = load_cells(V + b * sv_b + kv * sv_n, kt, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
    dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)

    lo = q_lo
    if CAUSAL:
        # queries of frames before the block's first key come before it
        lo = tl.maximum(lo, ((pid_n * BLOCK_N) // plane) * plane)
    for g in range(0, GROUP):
        n = kv * GROUP + g
        bn = b * N + n
        q_base = Q + b * sq_b + n * sq_n
        do_base = DO + b * sdo_b + n * sdo_n
        for start in range(lo, size, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_valid = offs_m < size
            qt, qy, qx = class_cell(offs_m, rt, ry, rx, nH, nW, ST, SH, SW)
            q_index = ((qt - t_off) * H + qy) * W + qx
            q = load_cells(q_base, qt - t_off, qy, qx, sq_t, sq_h, sq_w, sq_d, m_valid, D, BLOCK_D)
            do = load_cells(do_base, qt - t_off, qy, qx, sdo_t, sdo_h, sdo_w, sdo_d, m_valid, D, BLOCK_D)
            lse = tl.load(Lse + bn * S_q + q_index, mask=m_valid, other=0.0)
            delta = tl.load(Delta + bn * S_q + q_index, mask=m_valid, other=0.0)
            in_pattern = n_valid[:, None] & m_valid[None, :]
            if CAUSAL:
                in_pattern = in_pattern & (kt[:, None] <= qt[None, :])
            if NUM_OBJ > 0:
                obj = object_grad(Arg, G, bn, S_q, q_index, m_valid, k_index, NUM_OBJ, True)
            else:
                obj = 0.0
            dk, dv = dkdv_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)

    dkv = (b * N_KV + kv) * S * D
    store_cells(DK + dkv, dk * scale, k_index, n_valid, D, BLOCK_D)
    store_cells(DV + dkv, dv, k_index, n_valid, D, BLOCK_D)


strided_bwd_dq_tuned = triton.autotune(
    CONFIGS_DQ, key=TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})(strided_bwd_dq)
strided_bwd_dkdv_tuned = triton.autotune(
    CONFIGS_DKDV, key=TUNE_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})(strided_bwd_dkdv)

AOT_SPECS = [
    aot_spec(
        f"strided_bwd_{part}[d{d}]", kernel, outputs,
        dict(B=1, GROUP=1, T_Q=4, ST=2, SH=2, SW=2, D=d,
             **{f"s{t}_{a}": s for t in ("q", "k", "v", "do")
                for a, s in zip("bnthwd", (8 * 4096 * d, 4096 * d, 1024 * d, 32 * d, d, 1))}),
        dict(CAUSAL=True, NUM_OBJ=3, BLOCK_O=4, BLOCK_D=d, DOT_PRECISION="ieee", DOT_FP32=False),
        configs_for(part, d), f"bf16, contiguous (1, 8, 4, 32, 32, {d}), stride 2, causal, 3 objects",
    )
    for d in (32, 64, 128)
    for part, kernel, outputs in (
        ("dq", strided_bwd_dq, ("DQ",)),
        ("dkdv", strided_bwd_dkdv, ("DK", "DV")),
    )
]


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch the dQ and the dK/dV kernels for problem ``p`` (see :func:`sst_triton.kernels.launch.run`)."""
    st, sh, sw = clipped_stride(p)
    classes = st * sh * sw
    largest_q = largest_query_class(p)
    largest = cdiv(p.T, st) * cdiv(p.H, sh) * cdiv(p.W, sw)  # class (0, 0, 0) is the largest
    meta = {**meta, "BLOCK_O": _block_o(p.num_obj)}
    sizes = (p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, st, sh, sw, float(scale))
    grid_q = lambda m: (p.B * p.N * query_classes(p) * cdiv(largest_q, m["BLOCK_M"]),)  # noqa: E731
    grid_k = lambda m: (p.B * p.N_kv * classes * cdiv(largest, m["BLOCK_N"]),)  # noqa: E731
    limits = f"B*N={p.B * p.N}, classes={classes}, largest class={largest} cells"
    module = sys.modules[__name__]
    run(module, "strided_bwd_dq", grid_q, (*inputs, dq, *strides, *sizes), meta, interpret=interpret,
        configs=configs_for("dq", meta["BLOCK_D"]), config=config_dq, sizes=limits)
    run(module, "strided_bwd_dkdv", grid_k, (*inputs, dk, dv, *strides, *sizes), meta, interpret=interpret,
        configs=configs_for("dkdv", meta["BLOCK_D"]), config=config_dkdv, sizes=limits)


# ---------------------------------------------------------------------------------------
# Work model (sst_triton.kernels.work): exact for the tiling above
# ---------------------------------------------------------------------------------------


def work_backward(p: Problem, config_dq, config_dkdv, elem_bytes: int = 4, acc_bytes: int = 4) -> tuple[Work, Work]:
    """What :func:`strided_bwd_dq` and :func:`strided_bwd_dkdv` issue for ``p``: q/k/v/dO
    elements of ``elem_bytes``, Lse/Delta/G of ``acc_bytes`` (float32: 4), contiguous tensors."""
    BD, O, D = _block_d(p.D), p.num_obj, p.D
    causal = p.pattern.causal
    st, sh, sw = clipped_stride(p)
    classes = st * sh * sw
    shapes = class_shapes(p)
    row_q = 2 * D * elem_bytes + 2 * acc_bytes            # q, dO rows; lse, delta
    row_obj = O * (4 + acc_bytes)                         # argmax, g per object

    # dQ: one program per query block
    BM, BN = config_dq.kwargs["BLOCK_M"], config_dq.kwargs["BLOCK_N"]
    heads = p.B * p.N
    wq = Work(programs=heads * query_classes(p) * cdiv(largest_query_class(p), BM))
    keys_read = 0
    for (nT, qf, nH, nW), count in shapes.items():
        plane = nH * nW
        if qf >= nT:
            continue
        keys_read += count * nT * plane
        for rows, hi in query_blocks(nT, qf, plane, BM, causal):
            key_blocks = cdiv(hi, BN)
            wq.exp += heads * count * key_blocks * BM * BN
            wq.dot_flops += heads * count * key_blocks * 3 * 2 * BM * BN * BD
            wq.load_bytes += heads * count * (rows * (row_q + row_obj) + hi * 2 * D * elem_bytes)
    wq.distinct_bytes = heads * p.S_q * (row_q + row_obj) + 2 * p.B * p.N_kv * keys_read * D * elem_bytes
    wq.store_bytes = heads * p.S_q * D * elem_bytes  # dQ, once per query

    # dK/dV: one program per key block of a (batch, key/value head), GROUP query heads each
    BM, BN = config_dkdv.kwargs["BLOCK_M"], config_dkdv.kwargs["BLOCK_N"]
    kv_heads = p.B * p.N_kv
    largest = cdiv(p.T, st) * cdiv(p.H, sh) * cdiv(p.W, sw)
    wk = Work(programs=kv_heads * classes * cdiv(largest, BN))
    for (nT, qf, nH, nW), count in shapes.items():
        plane = nH * nW
        size, q_lo = nT * plane, qf * plane
        for start in range(0, size, BN):
            keys = min(BN, size - start)
            lo = max(q_lo, (start // plane) * plane) if causal else q_lo
            query_rows = max(0, size - lo)
            query_blocks_walked = cdiv(query_rows, BM)
            per_head = Work(
                exp=query_blocks_walked * BN * BM,
                dot_flops=query_blocks_walked * 4 * 2 * BM * BN * BD,
                load_bytes=query_rows * (row_q + row_obj),
            )
            wk.exp += kv_heads * count * p.group * per_head.exp
            wk.dot_flops += kv_heads * count * p.group * per_head.dot_flops
            wk.load_bytes += kv_heads * count * (p.group * per_head.load_bytes + keys * 2 * D * elem_bytes)
    wk.distinct_bytes = heads * p.S_q * (row_q + row_obj) + 2 * kv_heads * p.S * D * elem_bytes
    wk.store_bytes = 2 * kv_heads * p.S * D * elem_bytes  # dK, dV, once per key
    return wq, wk
