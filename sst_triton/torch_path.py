"""The PyTorch path that CPU tensors take: sparse, per pattern, chunked over queries.

Each pattern is laid out so that its keys form small dense blocks that batched
matmuls handle well, instead of gathering ``|I_p|`` keys per query:

- grid: the row, the column and the temporal line of a query are three einsums along
  one axis each, joined under one softmax (the query itself is kept in the row only);
- local: a tile of neighbouring queries attends to the halo of keys that covers all
  of its windows (tile + kernel - 1 per axis), with a mask cutting each query's window;
- strided: a rearrange puts every residue class ``(t mod st, y mod sh, x mod sw)`` on a
  batch axis, and attention inside each class is dense.

Queries are processed in chunks of at most :data:`PAIRS_PER_CHUNK` (query, key) pairs
per batch-head, so memory is ``O(chunk * K)`` per step and ``O(S * |I_p|)`` at most
(what autograd keeps for the backward), never ``O(S^2)``. Everything is ordinary tensor
ops: gradients come from autograd, and the ``amax`` of an affinity sends its gradient
to the probability of the key that attained it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .patterns import Pattern, window_start

# Bound on (query, key) pairs per batch-head materialised in one step. Large enough
# that the batched matmuls are efficient, small enough that a 64x64x4 video stays
# within a few tens of MB beyond its inputs.
PAIRS_PER_CHUNK = 1 << 18


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 is only reached by gradcheck (the public API rejects it)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _softmax_out(logits: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _affinity(probs: torch.Tensor, key_labels: torch.Tensor, num_objects: int) -> torch.Tensor:
    """Per-object max of ``probs`` over the keys labelled with that object.

    Args:
        probs: ``(B, N, *Q, K)``.
        key_labels: ``(B, *Q, K)`` (or broadcastable), ``-1`` where the key is not eligible.

    Returns:
        ``(B, N, *Q, O)``; 0 where no key of the object is eligible.
    """
    key_labels = key_labels.unsqueeze(1)
    zero = probs.new_zeros(())
    # one masked amax per object: the objects of a video are few, and unlike
    # scatter_reduce this keeps the work vectorised along the keys
    return torch.stack(
        [torch.where(key_labels == o, probs, zero).amax(dim=-1) for o in range(num_objects)], dim=-1
    )


# ----------------------------------------------------------------------------- grid


def _grid(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity):
    B, N, T, H, W, D = q.shape
    dev = q.device
    K = T + H + W
    rows = max(1, min(H, PAIRS_PER_CHUNK // (T * W * K)))
    t_idx = torch.arange(T, device=dev)
    y_all = torch.arange(H, device=dev)
    # the temporal line excludes the query's own frame (kept in the row); causal drops later frames
    tube_valid = t_idx[None, :] != t_idx[:, None]  # (t_query, t_key)
    if pattern.causal:
        tube_valid &= t_idx[None, :] <= t_idx[:, None]
    tube_valid = rearrange(tube_valid, "t s -> t 1 1 s")
    if labels is not None:
        # row and column keys lie in the query's own frame, never strictly earlier
        tube_elig = tube_valid & (t_idx[None, :] < t_idx[:, None])[:, None, None] if causal_affinity else tube_valid
    # outputs are written in place chunk by chunk: no list of chunks and concatenation at the end
    out = q.new_empty(B, N, T, H, W, D)
    aff = q.new_empty(B, N, T, H, W, num_objects) if labels is not None else None
    # columns as contiguous blocks once, instead of a permuted copy inside every chunk's einsum
    k_col, v_col = (rearrange(x, "b n t g x d -> b n t x g d").contiguous() for x in (k, v))
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        qc = q[:, :, :, y0:y1]
        kc, vc = k[:, :, :, y0:y1], v[:, :, :, y0:y1]
        row = torch.einsum("bntyxd,bntywd->bntyxw", qc, kc)
        col = torch.einsum("bntyxd,bntxgd->bntyxg", qc, k_col)
        tube = torch.einsum("bntyxd,bnsyxd->bntyxs", qc, kc)
        col_valid = rearrange(y_all[None, :] != torch.arange(y0, y1, device=dev)[:, None], "y g -> 1 y 1 g")
        col = col.masked_fill(~col_valid, float("-inf"))
        tube = tube.masked_fill(~tube_valid, float("-inf"))
        probs = torch.softmax(torch.cat([row, col, tube], dim=-1) * scale, dim=-1)
        p_row, p_col, p_tube = probs.split([W, H, T], dim=-1)
        out[:, :, :, y0:y1] = (
            torch.einsum("bntyxw,bntywd->bntyxd", p_row, vc)
            + torch.einsum("bntyxg,bntxgd->bntyxd", p_col, v_col)
            + torch.einsum("bntyxs,bnsyxd->bntyxd", p_tube, vc)
        )
        if labels is not None:
            lab = labels[:, :, y0:y1]
            tube_lab = torch.where(tube_elig, rearrange(lab, "b s y x -> b 1 y x s"), -1)
            if causal_affinity:
                aff[:, :, :, y0:y1] = _affinity(p_tube, tube_lab, num_objects)
            else:
                row_lab = rearrange(lab, "b t y w -> b t y 1 w").expand(-1, -1, -1, W, -1)
                col_lab = rearrange(labels, "b t g x -> b t 1 x g").expand(-1, -1, y1 - y0, -1, -1)
                col_lab = torch.where(col_valid[None], col_lab, -1)
                aff[:, :, :, y0:y1] = _affinity(probs, torch.cat([row_lab, col_lab, tube_lab], dim=-1), num_objects)
    if labels is None:
        return out, None
    return out, rearrange(aff, "b n t h w o -> b n o t h w")


# ----------------------------------------------------------------------------- local


def _local_tiles(pattern: Pattern, T: int, H: int, W: int) -> tuple[int, int, int]:
    """Query tile per axis: trades halo waste (keys outside a query's window) for matmul size."""
    best, best_cost = (1, 1, 1), math.inf
    cands = [[c for c in (1, 2, 4, 8, 16, 32) if c < L] + [L] for L in (T, H, W)]
    for tt in cands[0]:
        for ty in cands[1]:
            for tx in cands[2]:
                tiles = (tt, ty, tx)
                q_tile = tt * ty * tx
                halo = math.prod(min(t + k - 1, L) for t, k, L in zip(tiles, pattern.kernel_size, (T, H, W)))
                n_tiles = math.prod(-(-L // t) for t, L in zip(tiles, (T, H, W)))
                padded = n_tiles * q_tile
                # measured on 2 cores (T=4, 64x64, k=7, D=32): attention work ~ padded queries * halo,
                # the halo gather ~ halo / tile, and a fixed price per tile (small matmuls)
                cost = padded * halo + padded * halo / q_tile * 48 + n_tiles * 8000
                if q_tile * halo > PAIRS_PER_CHUNK:
                    continue
                if cost < best_cost:
                    best, best_cost = tiles, cost
    return best


def _local_axis(pattern: Pattern, axis: int, length: int, tile: int, device):
    """Halo of each tile along one axis.

    Returns:
        start ``(n_tiles,)`` first key of each halo (the halo has ``halo`` keys),
        valid ``(n_tiles, tile, halo)`` whether halo key ``m`` is in the window of
        the tile's query ``i`` (padded queries take the window of the last real one),
        key ``(n_tiles, halo)`` and query ``(n_tiles, tile)`` coordinates.
    """
    k = pattern.kernel_size[axis]
    halo = min(tile + k - 1, length)
    n = -(-length // tile)
    query = (torch.arange(n, device=device)[:, None] * tile + torch.arange(tile, device=device)).clamp(max=length - 1)
    lo, hi = window_start(query, length, k, pattern.boundary)
    start = lo[:, 0].clamp(max=length - halo)
    key = start[:, None] + torch.arange(halo, device=device)
    valid = (key[:, None, :] >= lo[..., None]) & (key[:, None, :] < hi[..., None])
    return start, valid, key, query


def _local(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity):
    B, N, T, H, W, D = q.shape
    dev = q.device
    tt, ty, tx = _local_tiles(pattern, T, H, W)
    (_, vt, kt, qt), (_, vy, ky, _), (_, vx, kx, _) = (
        _local_axis(pattern, a, L, t, dev) for a, (L, t) in enumerate(zip((T, H, W), (tt, ty, tx)))
    )
    nt, ny, nx = vt.shape[0], vy.shape[0], vx.shape[0]
    # the time axis carries causality (and the strict-earlier rule of affinities); all axes are separable
    if pattern.causal:
        vt = vt & (kt[:, None, :] <= qt[..., None])
    if labels is not None:
        et = vt & (kt[:, None, :] < qt[..., None]) if causal_affinity else vt
    padded = (nt * tt, ny * ty, nx * tx)
    # split views (no copy): a block of query tiles is gathered only when its turn comes
    split = "b n (nt tt) (ny ty) (nx tx) c -> b n nt ny nx tt ty tx c"
    q_split = rearrange(_pad_cells(q, padded), split, tt=tt, ty=ty, tx=tx)
    out = q.new_empty(B, N, *padded, D)
    out_split = rearrange(out, split, tt=tt, ty=ty, tx=tx)
    if labels is not None:
        aff = q.new_empty(B, N, *padded, num_objects)
        aff_split = rearrange(aff, split, tt=tt, ty=ty, tx=tx)
        lab_flat = rearrange(labels, "b t h w -> b (t h w)")
    kf, vf = (rearrange(x, "b n t h w d -> b n (t h w) d") for x in (k, v))
    halo = kt.shape[1] * ky.shape[1] * kx.shape[1]
    q_tile = tt * ty * tx
    # a step covers a block of tiles along x (2 * PAIRS_PER_CHUNK pairs: the fused kernel keeps no logits)
    x_block = max(1, min(nx, 2 * PAIRS_PER_CHUNK // (q_tile * halo)))
    blocks = [(it, j, x0, min(nx, x0 + x_block)) for j in range(ny) for it in range(nt) for x0 in range(0, nx, x_block)]

    def mask_of(t_mask: torch.Tensor, it: int, j: int, x0: int, x1: int) -> torch.Tensor:
        m = t_mask[it][None, :, None, None, :, None, None] & vy[j][None, None, :, None, None, :, None]
        m = m & vx[x0:x1, None, None, :, None, None, :]  # (nx, tt, ty, tx, ht, hy, hx)
        return rearrange(m, "nx tt ty tx ht hy hx -> nx (tt ty tx) (ht hy hx)")

    # blocks away from the borders share one window pattern: build each mask once
    masks: dict = {}

    def masks_of(it: int, j: int, x0: int, x1: int):
        key = (it, vy[j].cpu().numpy().tobytes(), x1 - x0, vx[x0:x1].cpu().numpy().tobytes())
        if key not in masks:
            m = mask_of(vt, it, j, x0, x1)
            if labels is None:
                masks[key] = (torch.zeros(m.shape, dtype=q.dtype, device=dev).masked_fill_(~m, float("-inf"))[None],)
            else:
                masks[key] = (m, mask_of(et, it, j, x0, x1))
        return masks[key]

    untile = "(b n) nx (tt ty tx) c -> b n nx tt ty tx c"
    dims = dict(b=B, tt=tt, ty=ty)
    for it, j, x0, x1 in blocks:
        flat = (kt[it][:, None, None] * H + ky[j][None, :, None]) * W + kx[x0:x1, None, None, :]  # (nx, ht, hy, hx)
        flat = flat.reshape(-1)
        kh, vh = (rearrange(x.index_select(2, flat), "b n (c m) d -> (b n) c m d", c=x1 - x0) for x in (kf, vf))
        qb = rearrange(q_split[:, :, it, j, x0:x1], "b n nx tt ty tx d -> (b n) nx (tt ty tx) d") * scale
        if labels is None:
            (bias,) = masks_of(it, j, x0, x1)
            # 4-D operands and mask (batch-heads, tiles, ...) so that the fused CPU kernel takes them
            o = F.scaled_dot_product_attention(qb, kh, vh, attn_mask=bias, scale=1.0)
            out_split[:, :, it, j, x0:x1] = rearrange(o, untile, **dims)
            continue
        mask, elig = masks_of(it, j, x0, x1)
        probs = _softmax_out(torch.matmul(qb, kh.transpose(-1, -2)), mask)
        out_split[:, :, it, j, x0:x1] = rearrange(torch.matmul(probs, vh), untile, **dims)
        lab = rearrange(lab_flat.index_select(1, flat), "b (c m) -> b c 1 m", c=x1 - x0)
        a = _affinity(rearrange(probs, "(b n) c q m -> b n c q m", b=B), torch.where(elig, lab, -1), num_objects)
        aff_split[:, :, it, j, x0:x1] = rearrange(a, "b n nx (tt ty tx) o -> b n nx tt ty tx o", tt=tt, ty=ty)
    out = out[:, :, :T, :H, :W]
    if labels is None:
        return out, None
    return out, rearrange(aff[:, :, :T, :H, :W], "b n t h w o -> b n o t h w")


def _pad_cells(x: torch.Tensor, sizes: tuple[int, int, int], value: float = 0.0) -> torch.Tensor:
    """Pad the ``(T, H, W)`` axes of ``(B, N, T, H, W, C)`` at their ends to ``sizes`` (no copy when none)."""
    T, H, W = x.shape[2:5]
    if (T, H, W) == tuple(sizes):
        return x
    return F.pad(x, (0, 0, 0, sizes[2] - W, 0, sizes[1] - H, 0, sizes[0] - T), value=value)


# ----------------------------------------------------------------------------- strided


def _strided(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity):
    B, N, T, H, W, D = q.shape
    dev = q.device
    # a step at least the axis length leaves every cell alone in its class along that axis
    st, sh, sw = (min(s, L) for s, L in zip(pattern.stride, (T, H, W)))
    Tc, Hc, Wc = -(-T // st), -(-H // sh), -(-W // sw)
    padded = (Tc * st, Hc * sh, Wc * sw)
    M = Tc * Hc * Wc
    # split views (no copy): [..., rt, rh, rw, tc, hc, wc, :] is the cell (tc*st + rt, hc*sh + rh, wc*sw + rw)
    split = "b n (tc st) (hc sh) (wc sw) c -> b n st sh sw tc hc wc c"
    qs, ks, vs = (rearrange(_pad_cells(x, padded), split, st=st, sh=sh, sw=sw) for x in (q, k, v))
    out = q.new_empty(B, N, *padded, D)
    out_s = rearrange(out, split, st=st, sh=sh, sw=sw)
    coord = torch.meshgrid(*(torch.arange(n, device=dev) for n in padded), indexing="ij")
    # padding keys are invalid; within a class t = tc * st + rt, so causality compares tc
    real = rearrange((coord[0] < T) & (coord[1] < H) & (coord[2] < W), "(tc st) (hc sh) (wc sw) -> st sh sw 1 (tc hc wc)",
                     st=st, sh=sh, sw=sw)
    tc = torch.arange(Tc, device=dev).repeat_interleave(Hc * Wc)
    valid = real & (tc[None, :] <= tc[:, None]) if pattern.causal else real
    need_mask = pattern.causal or not bool(real.all())
    if labels is not None:
        elig = valid & (tc[None, :] < tc[:, None]) if causal_affinity else valid
        lab_s = rearrange(_pad_cells(labels[:, None, ..., None], padded, -1)[:, 0, ..., 0],
                          "b (tc st) (hc sh) (wc sw) -> b st sh sw (tc hc wc)", st=st, sh=sh, sw=sw)
        aff = q.new_empty(B, N, *padded, num_objects)
        aff_s = rearrange(aff, split, st=st, sh=sh, sw=sw)
    # chunks: classes of one (rt, rh) at a time, and the queries of a class in rows when it is large
    if M * M <= PAIRS_PER_CHUNK:
        n_cls, q_rows = max(1, PAIRS_PER_CHUNK // (M * M)), M
    else:
        n_cls, q_rows = 1, max(1, PAIRS_PER_CHUNK // M)
    to_class = "b n sw tc hc wc c -> b n sw (tc hc wc) c"
    from_class = "b n sw (tc hc wc) c -> b n sw tc hc wc c"
    for rt in range(st):
        for rh in range(sh):
            qb, kb, vb = (rearrange(x[:, :, rt, rh], to_class) for x in (qs, ks, vs))
            ob = qb.new_empty(qb.shape)
            ab = qb.new_empty(*qb.shape[:-1], num_objects) if labels is not None else None
            for c0 in range(0, sw, n_cls):
                c1 = min(sw, c0 + n_cls)
                kk, vv = kb[:, :, c0:c1], vb[:, :, c0:c1]
                for r0 in range(0, M, q_rows):
                    r1 = min(M, r0 + q_rows)
                    m = valid[rt, rh, c0:c1, r0:r1] if valid.shape[3] > 1 else valid[rt, rh, c0:c1]
                    logits = torch.matmul(qb[:, :, c0:c1, r0:r1] * scale, kk.transpose(-1, -2))
                    probs = _softmax_out(logits, m if need_mask else None)
                    ob[:, :, c0:c1, r0:r1] = torch.matmul(probs, vv)
                    if labels is not None:
                        e = elig[rt, rh, c0:c1, r0:r1] if elig.shape[3] > 1 else elig[rt, rh, c0:c1]
                        key_lab = torch.where(e, lab_s[:, rt, rh, c0:c1, None, :], -1)
                        ab[:, :, c0:c1, r0:r1] = _affinity(probs, key_lab, num_objects)
            out_s[:, :, rt, rh] = rearrange(ob, from_class, tc=Tc, hc=Hc)
            if labels is not None:
                aff_s[:, :, rt, rh] = rearrange(ab, from_class, tc=Tc, hc=Hc)
    out = out[:, :, :T, :H, :W]
    if labels is None:
        return out, None
    return out, rearrange(aff[:, :, :T, :H, :W], "b n t h w o -> b n o t h w")


_IMPLS = {"grid": _grid, "local": _local, "strided": _strided}


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
):
    """Sparse attention over ``pattern`` in plain PyTorch (arguments already checked).

    Args:
        q, k, v: ``(B, N, T, H, W, D)``, any strides; float16/bfloat16/float32 are
            computed in float32, float64 in float64.
        pattern: the connectivity pattern.
        scale: logit scale.
        labels: ``(B, T, H, W)`` integer ids in ``[-1, num_objects)``.
        num_objects: ``O``.
        causal_affinity: affinities only from keys of strictly earlier frames.

    Returns:
        ``out`` ``(B, N, T, H, W, D)`` in the input dtype, and with labels the
        affinity ``(B, N, O, T, H, W)`` in float32 (float64 for float64 input).
    """
    compute = _compute_dtype(q)
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    if labels is not None:
        labels = labels.long()
    out, aff = _IMPLS[pattern.kind](qf, kf, vf, pattern, scale, labels, num_objects, causal_affinity)
    out = out.to(q.dtype)
    if labels is None:
        return out
    return out, aff.to(compute)
