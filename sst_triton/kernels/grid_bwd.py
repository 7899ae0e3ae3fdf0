"""Grid attention backward: one fused pass per axis computes dQ, dK and dV.

The keys of ``p = (t, y, x)`` are its row ``(t, y, *)``, its column ``(t, *, x)`` and its
time line ``(*, y, x)``, ``p`` counted once (in the row). The pattern is symmetric (``q`` is
in the grid of ``p`` iff ``p`` is in that of ``q``) except for ``causal``, which only cuts
the time line (query frame ``>=`` key frame), and for ``T_q < T``: only the last ``T_q``
frames hold queries.

Along one axis the pattern is dense within a line, and symmetric: a program that owns whole
lines of one (batch, key/value head) owns every query and every key of them on that axis,
so one pass computes all three gradients from one recomputed ``P`` per (key block, query
block) pair (:func:`_line_block`, tensor cores), with no atomics:

- ``grid_bwd_rows`` (:func:`grid_bwd_axis`, ``AXIS = 0``): one row ``(t, y, *)``, every
  key frame ``t``. For each block of ``BLOCK_N`` row keys (``dK``, ``dV`` in registers,
  summed over the ``GROUP`` query heads of the key/value head), each block of ``BLOCK_M``
  row queries (query frames only) adds its ``dQ`` share to ``DQ`` by read-modify-write
  (the first key block also adds the queries' time keys); then the keys' time-line queries
  (query frames only; later ones only when causal). The time line (``T`` cells, fewer than
  ``tl.dot``'s 16) is one vector product per query and key, as in the forward.
- ``grid_bwd_cols`` (``AXIS = 1``): one column ``(t, *, x)`` of a query frame, each cell's
  own pair masked (it is in the row), added onto the row pass's ``dQ``, ``dK``, ``dV``.

Each pass reads q, dO, k, v, Lse, Delta (and Arg, G) once per line (once per key block of
it: ``BLOCK_N = 128`` holds a row of the SST shape), where the separate dQ and dK/dV
kernels of each axis read them twice: about 17 tensor passes of HBM traffic instead of 23.

Grids fold everything on axis 0: ``T * H * B * N_kv`` (rows), ``T_Q * W * B * N_kv``
(columns): one program per line.

Partials: the row pass writes its gradients into the gradients themselves, in their dtype
(no scratch), and the column pass reads them back and writes the sums at the same cells in
the same program (so in place is safe); within a pass, ``dQ`` of a line longer than
``BLOCK_N`` is stored once per key block and read back by the next (the program's own
cells: deterministic). A 16-bit gradient's partial is rounded to nearest at each store
(unit roundoff ``u``: ``2**-11`` fp16, ``2**-8`` bf16): each adds at most ``u * |partial|``,
so a gradient stays within a few roundings of its dtype (float32 / float64: no extra rounding).

Work at T, H, W = 4, 24, 40, D = 32, 3 objects, the first configuration (:func:`work_backward`,
equal to the instrumented interpreter's counts): E = 1.63 softmax elements per useful pair,
L = 3.01 for the whole backward (separate dQ and dK/dV passes: E = 1.57 each, so 3.14 in
all; the one-pass design with per-query column and time vectors: E = 2.23 each).
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from ._common import cast
from .common_bwd import (
    aot_spec,
    dkdv_ds_block,
    dkdv_pairs,
    dot,
    dq_pairs,
    load_cells,
    object_grad,
    object_grad_pairs,
    store_cells,
)
from .grid_fwd import configs_at, head_dim_pruner
from .launch import Problem, cdiv, check_grid, run
from .work import Work

# The first configuration is the interpreter's (16-wide blocks: the least padding at the
# issue-11 shape T, H, W = 4, 24, 40, see :func:`work_backward`); the others are for the GPU:
# BLOCK_N = 128 keeps a whole row of up to 128 cells (W = 107 at the SST shape) in one key
# block, so each query's dQ is stored once per pass and its q, dO are read once (the SST
# shape's best estimate in perf/work_model.py). A program holds its key block's k, v, dK, dV
# across the group's query blocks and the time lines, so wide head dims need small key blocks
# on many warps; one pipelining stage where two spill. ``CONFIGS_BY_HEAD_DIM``: those that
# compile spill-free on sm_80 and sm_90a (``python -m sst_triton.aot --check``) per padded head
# dim: at 64 the 128-key blocks spill, at 128 only 16 x 16 blocks on 4 warps fit.
CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
]
CONFIGS_BY_HEAD_DIM = {32: (0, 1, 2, 3, 4, 5), 64: (0, 2, 4, 5), 128: (3,)}
# one fused kernel computes dQ, dK and dV: the dQ and dK/dV lists of the other patterns are
# this one list (a forced config_dq / config_dkdv configures the fused kernel)
CONFIGS_DQ = CONFIGS_DKDV = CONFIGS
TUNE_KEY = ["B", "N", "GROUP", "T_Q", "T", "H", "W", "BLOCK_D", "NUM_OBJ", "CAUSAL"]


@triton.jit
def _dq_time(q, do, lse, delta, dq, k_base, v_base, Arg, G, bn, S_q, q_index, qx, y, t0, t1, H, W, D,
             sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, m_valid, scale,
             NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr):
    """Time keys ``(tt, y, qx)``, ``tt`` in ``[t0, t1)``, of a line of queries into ``dq``
    (``y`` or ``qx`` the ``[BLOCK_M]`` positions along the line, the other one fixed)."""
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
def _dkdv_time(k, v, dk, dv, q_base, do_base, Lse, Delta, Arg, G, bq, S_q, k_index, kx, y, t0, t1, T_Q, T, H, W, D,
               sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d, n_valid, scale,
               NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr):
    """Queries ``(tt, y, kx)`` of the time lines of a row of keys, absolute frames ``tt`` in
    ``[t0, t1)`` (all query frames), into ``dk``, ``dv``."""
    t_off = T - T_Q
    for tt in range(t0, t1):
        q_index = ((tt - t_off) * H + y) * W + kx
        q, do, lse, delta = _load_queries(q_base, do_base, Lse, Delta, bq * S_q, tt - t_off, y, kx, q_index, n_valid,
                                          sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d, D, BLOCK_D)
        if NUM_OBJ > 0:
            obj = object_grad_pairs(Arg, G, bq, S_q, q_index, n_valid, k_index, NUM_OBJ)
        else:
            obj = 0.0
        dk, dv = dkdv_pairs(k, v, q, do, lse, delta, n_valid, obj, scale, dk, dv)
    return dk, dv


@triton.jit
def load_rows(base, index, valid, D, BLOCK_D: tl.constexpr):
    """``[BLOCK, BLOCK_D]`` rows at flat ``index`` of a contiguous ``(S, D)`` slice (what
    :func:`store_cells` wrote); 0 where not ``valid`` or past ``D``."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + index.to(tl.int64)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _line_cells(c, fixed, AXIS: tl.constexpr):
    """``(y, x)`` of positions ``c`` along a line of one frame: a row ``(y = fixed, x = c)``
    when ``AXIS = 0``, a column ``(y = c, x = fixed)`` when ``AXIS = 1``."""
    if AXIS == 0:
        y = fixed
        x = c
    else:
        y = c
        x = fixed
    return y, x


@triton.jit
def _load_queries(q_base, do_base, Lse, Delta, row0, tq, y, x, q_index, valid, sq_t, sq_h, sq_w, sq_d,
                  sdo_t, sdo_h, sdo_w, sdo_d, D, BLOCK_D: tl.constexpr):
    """q, dO ``[BLOCK_M, BLOCK_D]`` and lse, Delta ``[BLOCK_M]`` of query cells ``(tq, y, x)``
    (query frame ``tq``) of one head: q, dO from their bases, Lse, Delta at ``row0 + q_index``."""
    q = load_cells(q_base, tq, y, x, sq_t, sq_h, sq_w, sq_d, valid, D, BLOCK_D)
    do = load_cells(do_base, tq, y, x, sdo_t, sdo_h, sdo_w, sdo_d, valid, D, BLOCK_D)
    lse = tl.load(Lse + row0 + q_index, mask=valid, other=0.0)
    delta = tl.load(Delta + row0 + q_index, mask=valid, other=0.0)
    return q, do, lse, delta


@triton.jit
def _line_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv,
                DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """One block of keys against one block of queries of the same line: all three gradients
    from one recomputed ``P`` (keys first).

    Args:
        k, v, dk, dv: ``[BLOCK_N, BLOCK_D]``; q, do: ``[BLOCK_M, BLOCK_D]``; lse, delta: ``[BLOCK_M]``.
        in_pattern, obj: ``[BLOCK_N, BLOCK_M]`` (:func:`object_grad` with ``KEYS_FIRST``).

    Returns:
        ``dk / scale``, ``dv`` updated, and the block's ``dq / scale`` ``[BLOCK_M, BLOCK_D]``.
    """
    dk, dv, dst = dkdv_ds_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv, DOT_PRECISION, DOT_FP32)
    dq = dot(tl.trans(dst.to(k.dtype)), k, None, DOT_PRECISION, DOT_FP32).to(lse.dtype)
    return dk, dv, dq


@triton.jit
def grid_bwd_axis(
    Q, K, V, DO, Lse, Delta, Arg, G, DQ, DK, DV,
    sq_b, sq_n, sq_t, sq_h, sq_w, sq_d,
    sk_b, sk_n, sk_t, sk_h, sk_w, sk_d,
    sv_b, sv_n, sv_t, sv_h, sv_w, sv_d,
    sdo_b, sdo_n, sdo_t, sdo_h, sdo_w, sdo_d,
    B, N, GROUP, T_Q, T, H, W, D,
    scale,
    AXIS: tl.constexpr, CAUSAL: tl.constexpr, NUM_OBJ: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ, dK and dV of one line of one key/value head along one axis: ``AXIS = 0`` a row
    ``(t, y, *)`` of ``W`` cells, every key frame ``t`` (with the time lines); ``AXIS = 1``
    a column ``(t, *, x)`` of ``H`` cells, query frames only, each cell's own pair excluded
    (it is in the row), added to the row pass's partials.

    The program owns every query and every key of its line on this axis, for all ``GROUP``
    query heads of its key/value head: for each block of ``BLOCK_N`` keys (their ``dK``,
    ``dV`` in registers, summed over the group), each block of ``BLOCK_M`` queries of each
    head gives its ``dQ`` share, added to ``DQ`` by read-modify-write (the cells are the
    program's alone: deterministic, no atomics).

    Q, DO ``(B, N, T_Q, H, W, D)``, K, V ``(B, N // GROUP, T, H, W, D)``, any strides; Lse,
    Delta ``(B*N, S_q)``; Arg, G ``(B*N, O, S_q)`` (Arg: absolute key indices); DQ
    ``(B*N, S_q, D)``, DK, DV ``(B*N_kv, S, D)`` contiguous, their dtype (the row pass's
    partials rounded to nearest).
    """
    N_KV = N // GROUP
    t_off = T - T_Q
    pid = tl.program_id(0)
    if AXIS == 0:
        LINES = T * H
        L = W
    else:
        LINES = T_Q * W
        L = H
    line = pid % LINES
    pid_bk = pid // LINES
    if AXIS == 0:
        t = line // H
        fixed = line % H
    else:
        t = line // W + t_off
        fixed = line % W
    tq = t - t_off
    b = (pid_bk // N_KV).to(tl.int64)
    kv = (pid_bk % N_KV).to(tl.int64)
    bk = pid_bk.to(tl.int64)
    S = T * H * W
    S_q = T_Q * H * W
    k_base = K + b * sk_b + kv * sk_n
    v_base = V + b * sv_b + kv * sv_n
    # a row of a frame without queries only has the queries of its time lines
    q_end = L * (t >= t_off).to(tl.int32)

    if AXIS == 1:
        # the time keys (tt, y, x), tt != t, of the column's queries: earlier frames, then (not
        # causal) later ones, vector products added to the row pass's dQ before the key blocks
        # (inside them they would hold registers beside the blocks' keys and gradients)
        for g in range(0, GROUP):
            n = kv * GROUP + g
            bq = b * N + n
            for i0 in range(0, L, BLOCK_M):
                qc = i0 + tl.arange(0, BLOCK_M)
                m_valid = qc < L
                qy, qx = _line_cells(qc, fixed, AXIS)
                q_index = (tq * H + qy) * W + qx
                q, do, lse, delta = _load_queries(Q + b * sq_b + n * sq_n, DO + b * sdo_b + n * sdo_n, Lse, Delta,
                                                  bq * S_q, tq, qy, qx, q_index, m_valid, sq_t, sq_h, sq_w, sq_d,
                                                  sdo_t, sdo_h, sdo_w, sdo_d, D, BLOCK_D)
                dq = tl.zeros([BLOCK_M, BLOCK_D], Lse.dtype.element_ty)
                dq = _dq_time(q, do, lse, delta, dq, k_base, v_base, Arg, G, bq, S_q, q_index, qx, qy, 0, t,
                              H, W, D, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, m_valid, scale, NUM_OBJ,
                              BLOCK_D)
                if not CAUSAL:
                    dq = _dq_time(q, do, lse, delta, dq, k_base, v_base, Arg, G, bq, S_q, q_index, qx, qy, t + 1,
                                  T, H, W, D, sk_t, sk_h, sk_w, sk_d, sv_t, sv_h, sv_w, sv_d, m_valid, scale,
                                  NUM_OBJ, BLOCK_D)
                dq_cells = DQ + bq * S_q * D
                dq = dq * scale + load_rows(dq_cells, q_index, m_valid, D, BLOCK_D).to(dq.dtype)
                store_cells(dq_cells, cast(dq, DQ.dtype.element_ty, True), q_index, m_valid, D, BLOCK_D)
        # the key blocks read back what other threads of the program stored
        tl.debug_barrier()

    for j0 in range(0, L, BLOCK_N):
        kc = j0 + tl.arange(0, BLOCK_N)
        n_valid = kc < L
        ky, kx = _line_cells(kc, fixed, AXIS)
        k_index = (t * H + ky) * W + kx
        k = load_cells(k_base, t, ky, kx, sk_t, sk_h, sk_w, sk_d, n_valid, D, BLOCK_D)
        v = load_cells(v_base, t, ky, kx, sv_t, sv_h, sv_w, sv_d, n_valid, D, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
        dv = tl.zeros([BLOCK_N, BLOCK_D], Lse.dtype.element_ty)
        for g in range(0, GROUP):
            n = kv * GROUP + g
            bq = b * N + n
            q_base = Q + b * sq_b + n * sq_n
            do_base = DO + b * sdo_b + n * sdo_n
            for i0 in range(0, q_end, BLOCK_M):
                qc = i0 + tl.arange(0, BLOCK_M)
                m_valid = qc < L
                qy, qx = _line_cells(qc, fixed, AXIS)
                q_index = (tq * H + qy) * W + qx
                q, do, lse, delta = _load_queries(q_base, do_base, Lse, Delta, bq * S_q, tq, qy, qx, q_index, m_valid,
                                                  sq_t, sq_h, sq_w, sq_d, sdo_t, sdo_h, sdo_w, sdo_d, D, BLOCK_D)
                in_pattern = n_valid[:, None] & m_valid[None, :]
                if AXIS == 1:
                    in_pattern = in_pattern & (kc[:, None] != qc[None, :])
                if NUM_OBJ > 0:
                    obj = object_grad(Arg, G, bq, S_q, q_index, m_valid, k_index, NUM_OBJ, True)
                else:
                    obj = 0.0
                dk, dv, dq = _line_block(k, v, q, do, lse, delta, in_pattern, obj, scale, dk, dv,
                                         DOT_PRECISION, DOT_FP32)
                dq_cells = DQ + bq * S_q * D
                dq = dq * scale
                # what earlier key blocks (and, for columns, the row pass and the time keys) left in DQ
                if AXIS == 0:
                    if j0 > 0:
                        dq += load_rows(dq_cells, q_index, m_valid, D, BLOCK_D).to(dq.dtype)
                else:
                    dq += load_rows(dq_cells, q_index, m_valid, D, BLOCK_D).to(dq.dtype)
                store_cells(dq_cells, cast(dq, DQ.dtype.element_ty, True), q_index, m_valid, D, BLOCK_D)

            if AXIS == 0:
                # the queries of the keys' time lines: later query frames, then (not causal) earlier ones
                dk, dv = _dkdv_time(k, v, dk, dv, q_base, do_base, Lse, Delta, Arg, G, bq, S_q, k_index, kx, ky,
                                    tl.maximum(t + 1, t_off), T, T_Q, T, H, W, D, sq_t, sq_h, sq_w, sq_d,
                                    sdo_t, sdo_h, sdo_w, sdo_d, n_valid, scale, NUM_OBJ, BLOCK_D)
                if not CAUSAL:
                    dk, dv = _dkdv_time(k, v, dk, dv, q_base, do_base, Lse, Delta, Arg, G, bq, S_q, k_index, kx,
                                        ky, t_off, t, T_Q, T, H, W, D, sq_t, sq_h, sq_w, sq_d,
                                        sdo_t, sdo_h, sdo_w, sdo_d, n_valid, scale, NUM_OBJ, BLOCK_D)

        dk = dk * scale
        k_cells = DK + bk * S * D
        v_cells = DV + bk * S * D
        if AXIS == 1:
            dk += load_rows(k_cells, k_index, n_valid, D, BLOCK_D).to(dk.dtype)
            dv += load_rows(v_cells, k_index, n_valid, D, BLOCK_D).to(dv.dtype)
        store_cells(k_cells, cast(dk, DK.dtype.element_ty, True), k_index, n_valid, D, BLOCK_D)
        store_cells(v_cells, cast(dv, DV.dtype.element_ty, True), k_index, n_valid, D, BLOCK_D)
        # the next key block reads back the dQ this one stored, from other threads of the program
        tl.debug_barrier()


_prune = {"early_config_prune": head_dim_pruner(CONFIGS_BY_HEAD_DIM)}
# one kernel, two launches: the row pass (AXIS=0) and the column pass (AXIS=1), tuned apart
grid_bwd_rows = grid_bwd_cols = grid_bwd_axis
grid_bwd_rows_tuned = triton.autotune(CONFIGS, key=TUNE_KEY, prune_configs_by=_prune)(grid_bwd_axis)
# the column pass adds to the row pass's partials, which lie in the gradients themselves: each
# benchmark run of the autotuner must start from them (the row pass only writes: nothing to restore)
grid_bwd_cols_tuned = triton.autotune(CONFIGS, key=TUNE_KEY, prune_configs_by=_prune,
                                      restore_value=["DQ", "DK", "DV"])(grid_bwd_axis)
# perf/work_model.py finds the per-head-dim pruner of dQ and dK/dV through these names: one
# fused kernel computes both
grid_bwd_dq_tuned = grid_bwd_dkdv_tuned = grid_bwd_rows_tuned


def _aot_specs():
    from ._common import example_scalars

    specs = []
    for d in (32, 64, 128):
        example = example_scalars(D=d)
        example.update({f"sdo_{axis}": example[f"sq_{axis}"] for axis in ("b", "n", "t", "h", "w", "d")})
        note = f"bf16, contiguous (1, 8, 4, 32, 32, {d}), GQA group 2, causal, 3 objects"
        for axis, name in ((0, "rows"), (1, "cols")):
            fixed = dict(AXIS=axis, CAUSAL=True, NUM_OBJ=3, BLOCK_D=d, DOT_PRECISION="ieee", DOT_FP32=False)
            spec = aot_spec(f"grid_bwd_{name}[d{d}]", grid_bwd_axis, ("DQ", "DK", "DV"),
                            dict(example, B=1, GROUP=2, T_Q=4), fixed, configs_at(CONFIGS, CONFIGS_BY_HEAD_DIM, d), note)
            specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()


def _config(config_dq, config_dkdv):
    """The one configuration of the fused kernel forced by ``config_dq`` / ``config_dkdv``
    (either, or both when equal), or ``None``."""
    if config_dq is not None and config_dkdv is not None and (
        config_dq.all_kwargs() != config_dkdv.all_kwargs()
    ):
        raise ValueError(
            "config_dq and config_dkdv: the grid backward is one fused kernel (dQ, dK and dV per axis); "
            f"force one configuration, got {config_dq} and {config_dkdv}"
        )
    return config_dq if config_dq is not None else config_dkdv


def launch_backward(p: Problem, inputs: tuple, dq, dk, dv, strides: tuple, scale: float, meta: dict, *,
                    interpret: bool, config_dq=None, config_dkdv=None) -> None:
    """Launch :func:`grid_bwd_axis` on the rows, then on the columns, for problem ``p`` (see
    :func:`sst_triton.kernels.launch.run`); ``config_dq`` / ``config_dkdv`` force the
    configuration of both (one fused kernel: give either, or the same one twice)."""
    config = _config(config_dq, config_dkdv)
    sizes = (p.B, p.N, p.group, p.T_q, p.T, p.H, p.W, p.D, float(scale))
    limits = f"T*H={p.T * p.H}, T_q*W={p.T_q * p.W}, B*N_kv={p.B * p.N_kv}"
    grids = {
        # one program per line of one (batch, key/value head): every key frame's rows, the
        # query frames' columns (a column of another frame has no queries of its own)
        "grid_bwd_rows": (0, lambda m: (p.T * p.H * p.B * p.N_kv,)),
        "grid_bwd_cols": (1, lambda m: (p.T_q * p.W * p.B * p.N_kv,)),
    }
    # both grids are checked before either pass runs
    for name, (_, grid) in grids.items():
        for c in [config] if config is not None else CONFIGS:
            check_grid(name, grid({**meta, **c.kwargs}), limits)
    module = sys.modules[__name__]
    for name, (axis, grid) in grids.items():
        run(module, name, grid, (*inputs, dq, dk, dv, *strides, *sizes), dict(meta, AXIS=axis), interpret=interpret,
            configs=CONFIGS, config=config, sizes=limits)


def work_backward(p: Problem, config_dq, config_dkdv=None, elem_bytes: int = 4) -> tuple[Work]:
    """What the fused kernel issues for ``p`` (see :mod:`sst_triton.kernels.work`), both
    passes: a 1-tuple, the kernel computing dQ, dK and dV at once. q/k/v/dO and gradient
    elements of ``elem_bytes`` (4: float32), float32 Lse/Delta/G, float32 accumulation,
    separate contiguous tensors; ``config_dkdv``, if given, must equal ``config_dq``."""
    from ._common import block_d

    config = _config(config_dq, config_dkdv)
    BM, BN = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    BD, O, D = block_d(p.D), p.num_obj, p.D
    causal, H, W, T, t_off = p.pattern.causal, p.H, p.W, p.T, p.t_off
    heads, kv_heads = p.B * p.N, p.B * p.N_kv
    cell, acc = D * elem_bytes, 4
    obj = 2 * O * acc  # Arg and G of one query
    query = 2 * cell + 2 * acc + obj  # q, dO, lse, Delta, Arg, G
    every_query = heads * p.S_q * query
    tile = Work(exp=BN * BM, dot_flops=5 * 2 * BN * BM * BD)  # one (key block, query block) pair

    # row pass: every key frame's rows (with their keys' time-line queries); queries of the
    # row in query frames only
    key_blocks, query_blocks = cdiv(W, BN), cdiv(W, BM)
    rows = Work(programs=T * H * kv_heads)
    for t in range(T):
        in_row = t >= t_off
        time_queries = (T - max(t + 1, t_off)) + (0 if causal else max(0, t - t_off))  # per key
        pairs = key_blocks * query_blocks if in_row else 0
        per_head = Work(
            exp=pairs * tile.exp + key_blocks * BN * time_queries,
            dot_flops=pairs * tile.dot_flops,
            load_bytes=(key_blocks * W * query + (key_blocks - 1) * W * cell if in_row else 0)
            + time_queries * W * query,
            store_bytes=key_blocks * W * cell if in_row else 0,
        )
        rows.exp += heads * H * per_head.exp
        rows.dot_flops += heads * H * per_head.dot_flops
        rows.load_bytes += heads * H * per_head.load_bytes + kv_heads * H * W * 2 * cell
        rows.store_bytes += heads * H * per_head.store_bytes + kv_heads * H * W * 2 * cell
    # every query (its row or its time line), every key, dQ read back past the first key block
    rows.distinct_bytes = every_query + 2 * kv_heads * p.S * cell + (heads * p.S_q * cell if key_blocks > 1 else 0)

    # column pass: query frames' columns, each cell's own pair masked; adds to the partials.
    # First the queries' time keys (q, dO, lse, Delta, then k, v, Arg, G per frame; dQ updated)
    key_blocks, query_blocks = cdiv(H, BN), cdiv(H, BM)
    lines, keys = kv_heads * p.T_q * W, kv_heads * p.T_q * H * W
    time = Work()
    for t in range(t_off, T):
        time_keys = t + (0 if causal else T - 1 - t)
        time.exp += heads * W * query_blocks * BM * time_keys
        time.load_bytes += heads * W * H * (2 * cell + 2 * acc + time_keys * (2 * cell + obj) + cell)
    cols = Work(
        programs=lines,
        exp=time.exp + lines * p.group * key_blocks * query_blocks * tile.exp,
        dot_flops=lines * p.group * key_blocks * query_blocks * tile.dot_flops,
        load_bytes=time.load_bytes + heads * p.S_q * key_blocks * (query + cell) + keys * 2 * cell + keys * 2 * cell,
        # time keys reach every key frame (T > 1): k, v of all; the partials of query frames
        distinct_bytes=every_query + heads * p.S_q * cell + 2 * kv_heads * (p.S if T > 1 else H * W) * cell
        + 2 * keys * cell,
        store_bytes=heads * p.S_q * (1 + key_blocks) * cell + 2 * keys * cell,
    )
    return (rows + cols,)
