"""Pieces shared by the backward kernels (FlashAttention-2 style, recomputing ``P``).

With ``dO`` the gradient of ``out``, ``g_o`` that of ``affinity_o`` and ``j*_o(p)`` the key
that attained ``affinity_o[p]`` (the forward's ``argmax``)::

    P[p, j]  = exp(scale * Q_p.K_j - lse[p])                  (j in I_p, else 0)
    dP[p, j] = dO_p.V_j + sum_o g_o[p] * [j == j*_o(p)]       (the max routes g_o to P[p, j*])
    Delta[p] = dO_p.O_p + sum_o g_o[p] * affinity_o[p]
    dS[p, j] = P[p, j] * (dP[p, j] - Delta[p])
    dQ_p = scale * sum_j dS[p, j] K_j,   dK_j = scale * sum_p dS[p, j] Q_p,   dV_j = sum_p P[p, j] dO_p

``Delta`` is computed by the launcher (one fused multiply-sum per query in PyTorch). Every
pattern has two kernels: one over query tiles that writes ``dQ`` and one over key tiles that
walks the queries attending to each key (the inverse pattern) and writes ``dK`` and ``dV``.
Each output element is written by exactly one program: no atomics, deterministic.

Accumulation dtype: the dtype of ``Lse`` (float32; float64 on the internal float64 path
used by ``gradcheck``). Dot precision follows :func:`sst_triton.kernels._common.dot_precision`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import AotSpec, example_scalars


@triton.jit
def window(i, L, K, SHIFT: tl.constexpr):
    """First and one-past-last key coordinate of the local window of coordinate(s) ``i``.

    ``SHIFT``: NATTEN's rule (``k`` cells starting at ``clamp(i - k//2, 0, L - k)``, the
    whole axis when ``L <= k``); otherwise the window is clipped at the borders.
    """
    if SHIFT:
        lo = tl.minimum(tl.maximum(i - K // 2, 0), tl.maximum(L - K, 0))
        hi = tl.minimum(lo + K, L)
    else:
        lo = tl.maximum(i - K // 2, 0)
        hi = tl.minimum(i + K // 2 + 1, L)
    return lo, hi


@triton.jit
def load_cells(base, t, y, x, s_t, s_h, s_w, s_d, valid, D, BLOCK_D: tl.constexpr):
    """``[BLOCK, BLOCK_D]`` feature rows of cells ``(t, y, x)`` (each ``[BLOCK]`` or scalar)
    of one batch-head whose first element is ``base``; 0 where not ``valid`` or past ``D``."""
    offs_d = tl.arange(0, BLOCK_D)
    # tl.cast, not .to(): a loop counter is a plain int in the interpreter
    rows = tl.cast(t, tl.int64) * s_t + tl.cast(y, tl.int64) * s_h + tl.cast(x, tl.int64) * s_w
    ptrs = base + rows[:, None] + offs_d[None, :].to(tl.int64) * s_d
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def store_cells(base, value, index, valid, D, BLOCK_D: tl.constexpr):
    """Store ``[BLOCK, BLOCK_D]`` rows into a contiguous ``(S, D)`` slice at flat ``index``."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + index.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def object_grad(Arg, G, bn, S, query_index, query_valid, key_index, NUM_OBJ: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """``sum_o g_o[p] * [j == j*_o(p)]`` for a block of queries ``p`` and keys ``j``.

    Args:
        Arg, G: contiguous ``(B*N, O, S)`` argmax (int32, ``-1``: none) and affinity gradient.
        bn: int64 batch-head index.
        query_index, query_valid: ``[BLOCK_M]``; key_index: ``[BLOCK_N]``.

    Returns:
        ``[BLOCK_M, BLOCK_N]``, or ``[BLOCK_N, BLOCK_M]`` when ``KEYS_FIRST``.
    """
    row = query_index.to(tl.int64)
    if KEYS_FIRST:
        term = tl.zeros([key_index.shape[0], query_index.shape[0]], G.dtype.element_ty)
    else:
        term = tl.zeros([query_index.shape[0], key_index.shape[0]], G.dtype.element_ty)
    for o in tl.static_range(NUM_OBJ):
        off = (bn * NUM_OBJ + o) * S + row
        arg = tl.load(Arg + off, mask=query_valid, other=-1)
        g = tl.load(G + off, mask=query_valid, other=0.0)
        if KEYS_FIRST:
            term += tl.where(key_index[:, None] == arg[None, :], g[None, :], 0.0)
        else:
            term += tl.where(arg[:, None] == key_index[None, :], g[:, None], 0.0)
    return term


@triton.jit
def object_grad_pairs(Arg, G, bn, S, query_index, query_valid, key_index, NUM_OBJ: tl.constexpr):
    """:func:`object_grad` for one key per query (all ``[BLOCK]`` vectors)."""
    row = query_index.to(tl.int64)
    term = tl.zeros([query_index.shape[0]], G.dtype.element_ty)
    for o in tl.static_range(NUM_OBJ):
        off = (bn * NUM_OBJ + o) * S + row
        arg = tl.load(Arg + off, mask=query_valid, other=-1)
        g = tl.load(G + off, mask=query_valid, other=0.0)
        term += tl.where(arg == key_index, g, 0.0)
    return term


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``a @ b (+ acc)``. ``DOT_FP32`` multiplies float32 copies of the operands: the launcher
    sets it for bfloat16 in Triton's interpreter, whose bfloat16 ``tl.dot`` is wrong (triton
    3.9); bf16 x bf16 products are exact in float32, so the result is the tensor-core one."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if acc is None:
        return tl.dot(a, b, input_precision=DOT_PRECISION)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dq_block(q, do, lse, delta, k, v, in_pattern, obj, scale, dq, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Add one block of keys to ``dQ / scale`` of a tile of queries.

    Args:
        q, do: ``[BLOCK_M, BLOCK_D]``; lse, delta: ``[BLOCK_M]``; k, v: ``[BLOCK_N, BLOCK_D]``.
        in_pattern: ``[BLOCK_M, BLOCK_N]`` key in the query's pattern.
        obj: ``[BLOCK_M, BLOCK_N]`` affinity term of dP (:func:`object_grad`) or 0.
        dq: ``[BLOCK_M, BLOCK_D]`` accumulator.
    """
    s = dot(q, tl.trans(k), None, DOT_PRECISION, DOT_FP32) * scale
    # where() after exp: lse of a padded query row is 0, not -inf
    p = tl.where(in_pattern, tl.exp(s.to(lse.dtype) - lse[:, None]), 0.0)
    dp = dot(do, tl.trans(v), None, DOT_PRECISION, DOT_FP32).to(lse.dtype) + obj
    ds = p * (dp - delta[:, None])
    return dot(ds.to(k.dtype), k, dq, DOT_PRECISION, DOT_FP32)


@triton.jit
def dkdv_ds_block(
    k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr
):
    """:func:`dkdv_block`, also returning the block's ``dS^T`` ``[BLOCK_N, BLOCK_M]`` (float32)
    for a kernel that owns the queries too and takes their ``dQ`` from the same ``P``."""
    st = dot(k, tl.trans(q), None, DOT_PRECISION, DOT_FP32) * scale
    pt = tl.where(in_pattern, tl.exp(st.to(lse.dtype) - lse[None, :]), 0.0)
    dv = dot(pt.to(do.dtype), do, dv, DOT_PRECISION, DOT_FP32)
    dpt = dot(v, tl.trans(do), None, DOT_PRECISION, DOT_FP32).to(lse.dtype) + obj
    dst = pt * (dpt - delta[None, :])
    dk = dot(dst.to(q.dtype), q, dk, DOT_PRECISION, DOT_FP32)
    return dk, dv, dst


@triton.jit
def dkdv_block(
    k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr
):
    """Add one block of queries to ``dK / scale`` and ``dV`` of a tile of keys (keys first).

    Args:
        k, v: ``[BLOCK_N, BLOCK_D]``; q, do: ``[BLOCK_M, BLOCK_D]``; lse, delta: ``[BLOCK_M]``.
        in_pattern, obj: ``[BLOCK_N, BLOCK_M]`` (:func:`object_grad` with ``KEYS_FIRST``).
        dk, dv: ``[BLOCK_N, BLOCK_D]`` accumulators.
    """
    dk, dv, _ = dkdv_ds_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)
    return dk, dv


@triton.jit
def dq_pairs(q, do, lse, delta, k, v, valid, obj, scale, dq):
    """One key per query (grid's column and time keys) into ``dQ / scale``: vector products.

    Args:
        q, do, k, v, dq: ``[BLOCK_M, BLOCK_D]``; lse, delta, valid, obj: ``[BLOCK_M]``.
    """
    acc_t = lse.dtype
    kf = k.to(acc_t)
    s = tl.sum(q.to(acc_t) * kf, axis=1) * scale
    p = tl.where(valid, tl.exp(s - lse), 0.0)
    dp = tl.sum(do.to(acc_t) * v.to(acc_t), axis=1) + obj
    ds = p * (dp - delta)
    return dq + ds[:, None] * kf


@triton.jit
def dkdv_pairs(k, v, q, do, lse, delta, valid, obj, scale, dk, dv):
    """One query per key (grid's column and time queries) into ``dK / scale`` and ``dV``.

    Args:
        k, v, q, do, dk, dv: ``[BLOCK_N, BLOCK_D]``; lse, delta, valid, obj: ``[BLOCK_N]``.
    """
    acc_t = lse.dtype
    qf = q.to(acc_t)
    dof = do.to(acc_t)
    s = tl.sum(k.to(acc_t) * qf, axis=1) * scale
    p = tl.where(valid, tl.exp(s - lse), 0.0)
    dv = dv + p[:, None] * dof
    dp = tl.sum(v.to(acc_t) * dof, axis=1) + obj
    ds = p * (dp - delta)
    return dk + ds[:, None] * qf, dv


def aot_spec(name: str, kernel, outputs: tuple[str, ...], scalars: dict, constexprs: dict, configs, note: str):
    """:class:`~sst_triton.kernels._common.AotSpec` of a backward kernel for a contiguous
    bf16 ``(1, 8, 4, 32, 32, 64)`` call (``dO`` strided like ``q``)."""
    example = example_scalars()
    example.update({f"sdo_{axis}": example[f"sq_{axis}"] for axis in ("b", "n", "t", "h", "w", "d")})
    pointers = {name: "*bf16" for name in ("Q", "K", "V", "DO", *outputs)}
    pointers.update(Lse="*fp32", Delta="*fp32", Arg="*i32", G="*fp32")
    return AotSpec(
        name=name, kernel=kernel, pointers=pointers, scalars={**example, **scalars, "scale": 1.0},
        constexprs=constexprs, configs=configs, note=note,
    )
