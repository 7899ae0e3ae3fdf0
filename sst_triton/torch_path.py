"""The PyTorch path that CPU tensors take: sparse, per pattern, chunked over queries.

Each pattern is laid out so that its keys form small dense blocks that batched
matmuls handle well, instead of gathering ``|I_p|`` keys per query:

- grid: the row, the column and the temporal line of a query are three einsums along
  one axis each, joined under one softmax (the query itself is kept in the row only);
- local: a tile of neighbouring queries attends to the halo of keys that covers all
  of its windows (tile + kernel - 1 per axis), with a mask cutting each query's window;
  K and V are copied once per call into the x-halos of the tiles, rows in ``(y, t, x)``
  order, so that every tile's halo is a contiguous view (no gather per tile);
  a dilated window is the plain window inside each dilation sub-sequence (strided views);
- strided: a rearrange puts every residue class ``(t mod st, y mod sh, x mod sw)`` on a
  batch axis, and attention inside each class is dense.

Version-2 additions, all without copying keys or values per query head:

- grouped heads (GQA): the ``G = N // N_kv`` query heads that share a key/value head are
  folded into the query rows of one matmul (or an extra einsum index that only the query
  carries), so K and V are read once per key/value head and never repeated;
- fewer query frames (``T_q < T``): only the ``T_q`` query frames are laid out and computed,
  against the keys of all ``T`` frames, with absolute times in every rule;
- log-sum-exp: the natural log of each query's softmax denominator, when asked for;
- extra keys ``(k_x, v_x)``: one dense attention of every query over the ``L`` tokens,
  merged exactly with the sparse part by log-sum-exp (affinities rescaled by the same weight).

Queries are processed in chunks of at most :data:`PAIRS_PER_CHUNK` (query, key) pairs
per key/value head, so memory is ``O(chunk * K)`` per step and ``O(S * |I_p|)`` at most
(what autograd keeps for the backward), never ``O(S^2)``. Everything is ordinary tensor
ops: gradients come from autograd, and the ``amax`` of an affinity sends its gradient
to the probability of the key that attained it.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .merge import merge_pair
from .patterns import Pattern, window_start

# Bound on (query, key) pairs per key/value head materialised in one step. Large enough
# that the batched matmuls are efficient, small enough that a 64x64x4 video stays
# within a few tens of MB beyond its inputs.
PAIRS_PER_CHUNK = 1 << 18
# (query, key) pairs of one step of the local path: its logits (1 MB at float32) stay in cache
PAIRS_PER_STEP = 1 << 18
# bytes of key and value halos of the local path held at once (one chunk of key/value heads)
HALO_BYTES = 8 << 20
# the local path's halos hold at most this many copies of a key/value head's K and V; tiles that
# need more (windows near the video's size) take the gathering path instead
HALO_COPIES = 4


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 is only reached by gradcheck (the public API rejects it)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _softmax_out(logits: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _affinity(probs: torch.Tensor, key_labels: torch.Tensor, num_objects: int, finite: bool = False) -> torch.Tensor:
    """Per-object max of ``probs`` over the keys labelled with that object.

    Args:
        probs: ``(B, N, *Q, K)``.
        key_labels: ``(B, *Q, K)`` (or broadcastable), ``-1`` where the key is not eligible.
        finite: the caller guarantees no NaN in ``probs`` (every query has a valid key).

    Returns:
        ``(B, N, *Q, O)``; 0 where no key of the object is eligible.
    """
    key_labels = key_labels.unsqueeze(1)
    if finite and key_labels.shape[-2] == 1 and probs.shape[-2] > 1:
        # labels per key only (one query frame): a broadcast 0/1 product is cheaper than a
        # broadcast select, and equal to it for finite non-negative probabilities
        return torch.stack(
            [(probs * (key_labels == o).to(probs.dtype)).amax(dim=-1) for o in range(num_objects)], dim=-1
        )
    zero = probs.new_zeros(())
    # one masked amax per object: the objects of a video are few, and unlike
    # scatter_reduce this keeps the work vectorised along the keys
    return torch.stack(
        [torch.where(key_labels == o, probs, zero).amax(dim=-1) for o in range(num_objects)], dim=-1
    )


# ----------------------------------------------------------------------------- grid


def _grid(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity, need_lse):
    B, N, T_q, H, W, D = q.shape
    M, T = k.shape[1], k.shape[2]
    G, t0 = N // M, T - T_q
    dev = q.device
    K = T + H + W
    # the budget is per query head, as in a plain call: a chunk of a key/value head holds its G heads
    rows = max(1, min(H, PAIRS_PER_CHUNK // (T_q * W * K)))
    # the G query heads of a key/value head as their own axis (a view): only q carries it
    qg = rearrange(q, "b (m g) t h w d -> b m g t h w d", g=G)
    t_query = t0 + torch.arange(T_q, device=dev)  # absolute times of the query frames
    t_key = torch.arange(T, device=dev)
    y_all = torch.arange(H, device=dev)
    # the temporal line excludes the query's own frame (kept in the row); causal drops later frames
    tube_valid = t_key[None, :] != t_query[:, None]  # (t_query, t_key)
    if pattern.causal:
        tube_valid &= t_key[None, :] <= t_query[:, None]
    tube_valid = rearrange(tube_valid, "t s -> t 1 1 s")
    if labels is not None:
        # row and column keys lie in the query's own frame, never strictly earlier
        strict = rearrange(t_key[None, :] < t_query[:, None], "t s -> t 1 1 s")
        tube_elig = tube_valid & strict if causal_affinity else tube_valid
    # outputs are written in place chunk by chunk: no list of chunks and concatenation at the end
    out = q.new_empty(B, M, G, T_q, H, W, D)
    aff = q.new_empty(B, N, T_q, H, W, num_objects) if labels is not None else None
    lse = q.new_empty(B, M, G, T_q, H, W) if need_lse else None
    # rows and columns of the query frames only; columns as contiguous blocks once, instead
    # of a permuted copy inside every chunk's einsum
    k_now, v_now = k[:, :, t0:], v[:, :, t0:]
    k_col, v_col = (rearrange(x, "b m t c x d -> b m t x c d").contiguous() for x in (k_now, v_now))
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        qc = qg[:, :, :, :, y0:y1]
        kr, vr = k_now[:, :, :, y0:y1], v_now[:, :, :, y0:y1]
        kc, vc = k[:, :, :, y0:y1], v[:, :, :, y0:y1]
        row = torch.einsum("bmgtyxd,bmtywd->bmgtyxw", qc, kr)
        col = torch.einsum("bmgtyxd,bmtxcd->bmgtyxc", qc, k_col)
        tube = torch.einsum("bmgtyxd,bmsyxd->bmgtyxs", qc, kc)
        col_valid = rearrange(y_all[None, :] != torch.arange(y0, y1, device=dev)[:, None], "y c -> 1 y 1 c")
        col = col.masked_fill(~col_valid, float("-inf"))
        tube = tube.masked_fill(~tube_valid, float("-inf"))
        logits = torch.cat([row, col, tube], dim=-1) * scale
        probs = torch.softmax(logits, dim=-1)
        if need_lse:
            lse[:, :, :, :, y0:y1] = torch.logsumexp(logits, dim=-1)
        p_row, p_col, p_tube = probs.split([W, H, T], dim=-1)
        out[:, :, :, :, y0:y1] = (
            torch.einsum("bmgtyxw,bmtywd->bmgtyxd", p_row, vr)
            + torch.einsum("bmgtyxc,bmtxcd->bmgtyxd", p_col, v_col)
            + torch.einsum("bmgtyxs,bmsyxd->bmgtyxd", p_tube, vc)
        )
        if labels is not None:
            lab = labels[:, :, y0:y1]
            tube_lab = torch.where(tube_elig, rearrange(lab, "b s y x -> b 1 y x s"), -1)
            if causal_affinity:
                aff[:, :, :, y0:y1] = _affinity(p_tube.flatten(1, 2), tube_lab, num_objects)
            else:
                now = labels[:, t0:]
                row_lab = rearrange(now[:, :, y0:y1], "b t y w -> b t y 1 w").expand(-1, -1, -1, W, -1)
                col_lab = rearrange(now, "b t c x -> b t 1 x c").expand(-1, -1, y1 - y0, -1, -1)
                col_lab = torch.where(col_valid[None], col_lab, -1)
                key_lab = torch.cat([row_lab, col_lab, tube_lab], dim=-1)
                aff[:, :, :, y0:y1] = _affinity(probs.flatten(1, 2), key_lab, num_objects)
    out = out.flatten(1, 2)
    lse = lse.flatten(1, 2) if need_lse else None
    if labels is None:
        return out, None, lse
    return out, rearrange(aff, "b n t h w o -> b n o t h w"), lse


# ----------------------------------------------------------------------------- local


def _tile_candidates(q_sizes: tuple[int, int, int]):
    """Every query tile ``(tt, ty, tx)`` the local paths consider: powers of two below each
    query extent, and the whole extent."""
    cands = [[c for c in (1, 2, 4, 8, 16, 32) if c < L] + [L] for L in q_sizes]
    return itertools.product(*cands)


def _local_tiles(pattern: Pattern, q_sizes: tuple[int, int, int], k_sizes: tuple[int, int, int], group: int,
                 head_dim: int = 32):
    """Query tile per axis of :func:`_local`: trades halo waste (keys outside a query's window)
    for matmul size, or ``None`` when every tile's halos would hold more than ``HALO_COPIES``
    copies of K and V (or a tile more than ``PAIRS_PER_CHUNK`` pairs).

    ``q_sizes`` are the query extents ``(T_q, H, W)``, ``k_sizes`` the key extents ``(T, H, W)``;
    ``group`` query heads share each tile's keys (GQA): they are rows of the tile's matmuls.
    """
    best, best_cost = None, math.inf
    for tiles in _tile_candidates(q_sizes):
        q_tile = math.prod(tiles)
        ht, hy, hx = (min(t + k - 1, L) for t, k, L in zip(tiles, pattern.kernel_size, k_sizes))
        nt, ny, nx = (-(-L // t) for t, L in zip(tiles, q_sizes))
        if q_tile * ht * hy * hx > PAIRS_PER_CHUNK or nt * ht * nx * hx > HALO_COPIES * k_sizes[0] * k_sizes[2]:
            continue
        rows = group * q_tile
        pairs = group * nt * ny * nx * q_tile * ht * hy * hx
        # fitted on one thread (T=4, 64x64, k=7, D=32, T_q = 1 and 4; rms 4% of the time): a
        # (query, key) pair costs 2.0 ns + 15 ns / rows (small matmuls are less efficient;
        # the softmax part does not scale with D), the key and value halos cost their
        # copy, 0.93 ns per element, once per (time tile, x tile) over the whole height
        pair_ns = (2.0 + 15.0 / rows) * (0.4 + 0.6 * head_dim / 32)
        copy_ns = 0.93 * 2 * nt * ht * nx * hx * k_sizes[1] * head_dim
        cost = pairs * pair_ns + copy_ns
        if cost < best_cost:
            best, best_cost = tiles, cost
    return best


def _local_axis(pattern: Pattern, axis: int, length: int, tile: int, device, q_start: int = 0, q_len=None):
    """Halo of each tile along one axis.

    The queries are the cells ``q_start .. q_start + q_len - 1`` of an axis of ``length`` key
    cells (``q_start = T - T_q`` on the time axis of a streaming call).

    Returns:
        start ``(n_tiles,)`` first key of each halo (the halo has ``halo`` keys),
        valid ``(n_tiles, tile, halo)`` whether halo key ``m`` is in the window of
        the tile's query ``i`` (padded queries take the window of the last real one),
        key ``(n_tiles, halo)`` and query ``(n_tiles, tile)`` absolute coordinates.
    """
    q_len = length if q_len is None else q_len
    k = pattern.kernel_size[axis]
    halo = min(tile + k - 1, length)
    n = -(-q_len // tile)
    query = q_start + (torch.arange(n, device=device)[:, None] * tile + torch.arange(tile, device=device)).clamp(
        max=q_len - 1
    )
    lo, hi = window_start(query, length, k, pattern.boundary)
    start = lo[:, 0].clamp(max=length - halo)
    key = start[:, None] + torch.arange(halo, device=device)
    valid = (key[:, None, :] >= lo[..., None]) & (key[:, None, :] < hi[..., None])
    return start, valid, key, query


def _classes(valid: torch.Tensor) -> list[int]:
    """Class id per tile of one axis: tiles with the same window mask ``(tile, halo)`` share an id."""
    return torch.unique(valid.flatten(1), dim=0, return_inverse=True)[1].tolist()


def _local(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity, need_lse):
    """Undilated local windows (a dilated pattern reaches here once per dilation sub-sequence).

    Keys and values are copied once per call into the halos of the (time tile, x tile) pairs,
    rows in ``(y, t, x)`` order: the halo of a query tile (rows ``sy .. sy + hy`` of its pair's
    halo) is then one contiguous block, a view, and no tile gathers its keys. The key/value
    heads go in chunks whose halos fit ``HALO_BYTES`` (buffers reused from chunk to chunk; larger
    ones measured slower: cache misses, and fresh pages on every call past malloc's 32 MB mmap
    threshold), and a step (one time tile, one row of tiles, a chunk of x tiles) is batched
    products on a logits buffer of ``PAIRS_PER_STEP`` pairs: ``Q K^T`` (queries pre-scaled),
    ``+ bias`` (the window mask), softmax, ``P V``.
    """
    B, N, T_q, H, W, D = q.shape
    M, T = k.shape[1], k.shape[2]
    G, t0 = N // M, T - T_q
    BM = B * M
    dev = q.device
    tiles = _local_tiles(pattern, (T_q, H, W), (T, H, W), G, D)
    if tiles is None:
        return _local_gather(q, k, v, pattern, scale, labels, num_objects, causal_affinity, need_lse)
    tt, ty, tx = tiles
    (_, vt, kt, qt), (_, vy, ky, _), (_, vx, kx, _) = (
        _local_axis(pattern, a, L, t, dev, s, n)
        for a, (L, t, s, n) in enumerate(zip((T, H, W), (tt, ty, tx), (t0, 0, 0), (T_q, H, W)))
    )
    nt, ny, nx = vt.shape[0], vy.shape[0], vx.shape[0]
    ht, hy, hx = kt.shape[1], ky.shape[1], kx.shape[1]
    st, sy, sx = kt[:, 0].tolist(), ky[:, 0].tolist(), kx[:, 0].tolist()
    # the time axis carries causality (and the strict-earlier rule of affinities); all axes are separable
    if pattern.causal:
        vt = vt & (kt[:, None, :] <= qt[..., None])
    et = (vt & (kt[:, None, :] < qt[..., None]) if causal_affinity else vt) if labels is not None else vt
    padded = (nt * tt, ny * ty, nx * tx)
    rows, halo = G * tt * ty * tx, hy * ht * hx
    # without autograd (inference, no_grad) steps write into preallocated, reused buffers; under
    # autograd (the backward recomputes this forward) every op is functional
    inplace = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    # key/value heads per chunk: a divisor of B*N_kv whose key and value halos fit HALO_BYTES
    per_head = 2 * nt * nx * H * ht * hx * D * q.element_size()
    hc = max([d for d in range(1, BM + 1) if BM % d == 0 and d * per_head <= HALO_BYTES] or [1])
    hb = BM // hc

    # queries (and outputs) per chunk of heads and row of tiles: rows (g, tt, ty, tx) of one matmul
    # per tile, the G query heads of a key/value head among them (K and V are read once per kv
    # head); tiles as (x tile, head) pairs on one batch axis, the order of the key/value halos
    q_view = rearrange(_pad_cells(q, padded), "b (m g) (nt tt) (ny ty) (nx tx) d -> (b m) nt ny nx (g tt ty tx) d",
                       g=G, tt=tt, ty=ty, tx=tx)
    q_view = rearrange(q_view, "(hb hc) nt ny nx r d -> hb nt ny (nx hc) r d", hc=hc)
    if inplace:
        q_l = torch.mul(q_view, scale, out=q.new_empty(q_view.shape))
    else:
        q_l = q_view.contiguous() * scale
    out_l = q.new_empty(q_l.shape)
    lse_l = q.new_empty(q_l.shape[:-1]) if need_lse else None
    k_r, v_r = (rearrange(x, "b m t h w d -> (b m) h t w d") for x in (k, v))
    if labels is not None:
        lab_r = rearrange(labels, "b t h w -> b h t w")
        lab_l = torch.stack([lab_r[:, :, s:s + ht, r:r + hx] for s in st for r in sx]).unflatten(0, (nt, nx))
        aff_l = q.new_empty(*q_l.shape[:-1], num_objects)
    # a step covers a chunk of x tiles of one row of tiles: its logits stay within a cache-sized buffer
    x_chunk = max(1, min(nx, PAIRS_PER_STEP // (hc * rows * halo)))
    if inplace:
        buf = q.new_empty(x_chunk * hc, rows, halo)
        k_l, v_l = (q.new_empty(nt, nx * hc, H, ht, hx, D) for _ in range(2))

    def mask_of(t_mask: torch.Tensor, it: int, j: int, x0: int, x1: int) -> torch.Tensor:
        m = t_mask[it][None, :, None, None, None, :, None] & vy[j][None, None, :, None, :, None, None]
        m = m & vx[x0:x1, None, None, :, None, None, :]  # (nx, tt, ty, tx, hy, ht, hx)
        return rearrange(m, "nx tt ty tx hy ht hx -> nx 1 (tt ty tx) (hy ht hx)")

    # steps away from the borders share one window pattern: build each mask once
    cls_t = _classes(torch.cat([vt, et], dim=-1))
    cls_y, cls_x = _classes(vy), _classes(vx)
    masks: dict = {}

    def masks_of(it: int, j: int, x0: int, x1: int):
        key = (cls_t[it], cls_y[j], tuple(cls_x[x0:x1]))
        if key not in masks:
            m = mask_of(vt, it, j, x0, x1)
            # the window mask (small, per tile) repeats over the G query heads' rows; the keys do not
            m = rearrange([m] * G, "g c 1 q k -> c 1 (g q) k")
            bias = torch.zeros(m.shape, dtype=q.dtype, device=dev).masked_fill_(~m, float("-inf"))
            # (x tiles, 1, rows, halo) broadcasts over the heads of a chunk; one head needs no view
            masks[key] = (bias[:, 0] if hc == 1 else bias, mask_of(et, it, j, x0, x1) if labels is not None else None)
        return masks[key]

    for h in range(hb):
        heads = slice(h * hc, (h + 1) * hc)
        halos = [x[heads, :, s:s + ht, r:r + hx] for x in (k_r, v_r) for s in st for r in sx]
        if inplace:
            dsts = [d for x in (k_l, v_l) for d in x.unflatten(1, (nx, hc)).flatten(0, 1).unbind(0)]
            for dst, src in zip(dsts, halos):
                dst.copy_(src)
        else:
            k_l, v_l = (torch.stack(halos[i * nt * nx:(i + 1) * nt * nx]).unflatten(0, (nt, nx)).flatten(1, 2)
                        for i in range(2))
        if labels is not None:
            lab_b = torch.arange(h * hc, (h + 1) * hc, device=dev) // M  # batch of each head of the chunk
        # Python-side work per step is a few ops: views of whole rows are taken once per row
        whole = x_chunk >= nx
        for it in range(nt):
            q_h, out_h = q_l[h, it], out_l[h, it]
            k_t, v_t = k_l[it], v_l[it]
            for j in range(ny):
                y0 = sy[j]
                kj, vj = k_t[:, y0:y0 + hy].flatten(1, 3), v_t[:, y0:y0 + hy].flatten(1, 3)  # (nx * hc, halo, D)
                q_j, out_j = q_h[j], out_h[j]
                for x0 in range(0, nx, x_chunk):
                    x1 = min(nx, x0 + x_chunk)
                    c, a, b = x1 - x0, x0 * hc, x1 * hc
                    bias, elig = masks_of(it, j, x0, x1)
                    if whole:
                        qb, kb, vb, ob = q_j, kj.transpose(1, 2), vj, out_j
                    else:
                        qb, kb, vb, ob = q_j[a:b], kj[a:b].transpose(1, 2), vj[a:b], out_j[a:b]
                    if inplace:
                        logits = torch.bmm(qb, kb, out=buf if whole else buf[:b - a])
                        (logits if hc == 1 else logits.view(c, hc, rows, halo)).add_(bias)
                    else:
                        logits = torch.bmm(qb, kb)
                        logits = logits + bias if hc == 1 else (logits.view(c, hc, rows, halo) + bias).flatten(0, 1)
                    if need_lse:
                        lse_l[h, it, j, a:b] = torch.logsumexp(logits, dim=-1)
                    if inplace:
                        # in place (the aten op itself: softmax(out=) reaches it through a composite)
                        probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
                        torch.bmm(probs, vb, out=ob)
                    else:
                        probs = torch.softmax(logits, dim=-1)
                        ob.copy_(torch.bmm(probs, vb))
                    if labels is not None:
                        lab = lab_l[it, x0:x1][:, lab_b, y0:y0 + hy].flatten(-3)[:, :, None]  # (c, hc, 1, halo)
                        key_lab = torch.where(elig, lab, -1).flatten(0, 1)  # (c * hc, q, halo)
                        a_ = _affinity(probs.view(c * hc, G, -1, halo), key_lab, num_objects)
                        aff_l[h, it, j, a:b] = a_.view(c * hc, rows, num_objects)
    crop = (slice(None), slice(None), slice(0, T_q), slice(0, H), slice(0, W))

    def untile(x: torch.Tensor) -> torch.Tensor:
        # (hb, nt, ny, nx * hc, rows, C) -> (B, N, T_q, H, W, C)
        x = rearrange(x, "hb nt ny (nx hc) r c -> (hb hc) nt ny nx r c", hc=hc)
        return rearrange(x, "(b m) nt ny nx (g tt ty tx) c -> b (m g) (nt tt) (ny ty) (nx tx) c",
                         b=B, g=G, tt=tt, ty=ty, tx=tx)[crop]

    out = untile(out_l)
    lse = untile(lse_l[..., None])[..., 0] if need_lse else None
    if labels is None:
        return out, None, lse
    return out, rearrange(untile(aff_l), "b n t h w o -> b n o t h w"), lse


def _gather_tiles(pattern: Pattern, q_sizes: tuple[int, int, int], k_sizes: tuple[int, int, int], group: int):
    """Query tile per axis of :func:`_local_gather`: trades halo waste for matmul size.

    ``q_sizes`` are the query extents ``(T_q, H, W)``, ``k_sizes`` the key extents ``(T, H, W)``;
    ``group`` query heads share each tile's keys (GQA): their work counts, their rows do not
    count against the per-query-head pair budget.
    """
    best, best_cost = (1, 1, 1), math.inf
    for tiles in _tile_candidates(q_sizes):
        q_tile = math.prod(tiles)
        halo = math.prod(min(t + k - 1, L) for t, k, L in zip(tiles, pattern.kernel_size, k_sizes))
        n_tiles = math.prod(-(-L // t) for t, L in zip(tiles, q_sizes))
        padded = n_tiles * q_tile
        # measured on 2 cores (T=4, 64x64, k=7, D=32): attention work ~ padded queries * halo
        # (times the query heads sharing the keys), the halo gather ~ halo / tile (once per
        # key/value head), and a fixed price per tile (small matmuls)
        cost = group * padded * halo + padded * halo / q_tile * 48 + n_tiles * 8000
        if q_tile * halo > PAIRS_PER_CHUNK:
            continue
        if cost < best_cost:
            best, best_cost = tiles, cost
    return best


def _local_gather(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity, need_lse):
    """Undilated local windows, each block of query tiles gathering its key halos (``index_select``).

    Memory per step is bounded by the chunk whatever the window; :func:`_local` takes this path
    when its whole-video halos would hold too many copies of K and V (windows near the video's
    size, where tiles must be tiny).
    """
    B, N, T_q, H, W, D = q.shape
    M, T = k.shape[1], k.shape[2]
    G, t0 = N // M, T - T_q
    dev = q.device
    tt, ty, tx = _gather_tiles(pattern, (T_q, H, W), (T, H, W), G)
    (_, vt, kt, qt), (_, vy, ky, _), (_, vx, kx, _) = (
        _local_axis(pattern, a, L, t, dev, s, n)
        for a, (L, t, s, n) in enumerate(zip((T, H, W), (tt, ty, tx), (t0, 0, 0), (T_q, H, W)))
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
    if need_lse:
        lse = q.new_empty(B, N, *padded, 1)
        lse_split = rearrange(lse, split, tt=tt, ty=ty, tx=tx)
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
    explicit = labels is not None or need_lse

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
            # the G query heads of a key/value head are rows of one matmul: the window mask
            # (small, per tile) repeats over them, the keys do not
            rows = rearrange([m] * G, "g nx q k -> nx (g q) k") if G > 1 else m
            if not explicit:
                masks[key] = (torch.zeros(rows.shape, dtype=q.dtype, device=dev).masked_fill_(~rows, float("-inf"))[None],)
            else:
                masks[key] = (rows, mask_of(et, it, j, x0, x1) if labels is not None else None)
        return masks[key]

    untile = "(b m) nx (g tt ty tx) c -> b (m g) nx tt ty tx c"
    dims = dict(b=B, g=G, tt=tt, ty=ty)
    for it, j, x0, x1 in blocks:
        flat = (kt[it][:, None, None] * H + ky[j][None, :, None]) * W + kx[x0:x1, None, None, :]  # (nx, ht, hy, hx)
        flat = flat.reshape(-1)
        kh, vh = (rearrange(x.index_select(2, flat), "b m (c k) d -> (b m) c k d", c=x1 - x0) for x in (kf, vf))
        qb = rearrange(q_split[:, :, it, j, x0:x1], "b (m g) nx tt ty tx d -> (b m) nx (g tt ty tx) d", g=G) * scale
        if not explicit:
            (bias,) = masks_of(it, j, x0, x1)
            # 4-D operands and mask (batch-heads, tiles, ...) so that the fused CPU kernel takes them
            o = F.scaled_dot_product_attention(qb, kh, vh, attn_mask=bias, scale=1.0)
            out_split[:, :, it, j, x0:x1] = rearrange(o, untile, **dims)
            continue
        mask, elig = masks_of(it, j, x0, x1)
        logits = torch.matmul(qb, kh.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out_split[:, :, it, j, x0:x1] = rearrange(torch.matmul(probs, vh), untile, **dims)
        if need_lse:
            lse_split[:, :, it, j, x0:x1] = rearrange(torch.logsumexp(logits, dim=-1, keepdim=True), untile, **dims)
        if labels is not None:
            lab = rearrange(lab_flat.index_select(1, flat), "b (c k) -> b c 1 k", c=x1 - x0)
            p = rearrange(probs, "(b m) c (g q) k -> b (m g) c q k", b=B, g=G)
            a = _affinity(p, torch.where(elig, lab, -1), num_objects)
            aff_split[:, :, it, j, x0:x1] = rearrange(a, "b n nx (tt ty tx) o -> b n nx tt ty tx o", tt=tt, ty=ty)
    out = out[:, :, :T_q, :H, :W]
    lse = lse[:, :, :T_q, :H, :W, 0] if need_lse else None
    if labels is None:
        return out, None, lse
    return out, rearrange(aff[:, :, :T_q, :H, :W], "b n t h w o -> b n o t h w"), lse


def _local_dilated(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity, need_lse):
    """Dilated windows: the plain window inside each dilation sub-sequence.

    Along an axis with dilation ``d`` the cells of residue ``r`` (``c mod d = r``) form a
    sub-sequence in which the window rule (clip/shift, causal) applies unchanged; a strided
    view ``x[r::d]`` is that sub-sequence, so each residue triple is one undilated call. In
    time, the query frames of residue ``r`` are again the last ones of its sub-sequence.
    """
    B, N, T_q, H, W, D = q.shape
    T = k.shape[2]
    t0 = T - T_q
    dt, dh, dw = pattern.dilation
    plain = Pattern("local", pattern.kernel_size, pattern.stride, pattern.boundary, pattern.causal)
    out = q.new_empty(B, N, T_q, H, W, D)
    aff = q.new_empty(B, N, num_objects, T_q, H, W) if labels is not None else None
    lse = q.new_empty(B, N, T_q, H, W) if need_lse else None
    for rt in range(min(dt, T)):
        first = t0 + (rt - t0) % dt  # first query frame of residue rt (absolute time)
        if first >= T:
            continue
        qs = slice(first - t0, None, dt)
        for rh in range(min(dh, H)):
            for rw in range(min(dw, W)):
                sub = (slice(rh, None, dh), slice(rw, None, dw))
                o, a, l = _local(
                    q[:, :, qs, sub[0], sub[1]], k[:, :, rt::dt, sub[0], sub[1]], v[:, :, rt::dt, sub[0], sub[1]],
                    plain, scale, None if labels is None else labels[:, rt::dt, sub[0], sub[1]],
                    num_objects, causal_affinity, need_lse,
                )
                out[:, :, qs, sub[0], sub[1]] = o
                if labels is not None:
                    aff[:, :, :, qs, sub[0], sub[1]] = a
                if need_lse:
                    lse[:, :, qs, sub[0], sub[1]] = l
    return out, aff, lse


def _pad_cells(x: torch.Tensor, sizes: tuple[int, int, int], value: float = 0.0, front: int = 0) -> torch.Tensor:
    """Pad the ``(T, H, W)`` axes of ``(B, N, T, H, W, C)`` at their ends to ``sizes`` (no copy when none).

    ``front`` frames of the padding go before the first frame instead of after the last.
    """
    T, H, W = x.shape[2:5]
    if (T, H, W) == tuple(sizes):
        return x
    return F.pad(x, (0, 0, 0, sizes[2] - W, 0, sizes[1] - H, front, sizes[0] - T - front), value=value)


# ----------------------------------------------------------------------------- strided


def _strided(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity, need_lse):
    B, N, T_q, H, W, D = q.shape
    M_kv, T = k.shape[1], k.shape[2]
    G, t0 = N // M_kv, T - T_q
    dev = q.device
    # a step at least the axis length leaves every cell alone in its class along that axis
    st, sh, sw = (min(s, L) for s, L in zip(pattern.stride, (T, H, W)))
    Tc, Hc, Wc = -(-T // st), -(-H // sh), -(-W // sw)
    padded = (Tc * st, Hc * sh, Wc * sw)
    M = Tc * Hc * Wc
    # the query frames t0..T-1 start at class row tb: lay out only rows tb..Tc-1 (front-padded
    # to a multiple of st), so a streaming call does not compute the cached frames' queries
    tb = t0 // st
    front = t0 - tb * st
    Tq_c = Tc - tb
    Mq = Tq_c * Hc * Wc
    # split views (no copy): [..., rt, rh, rw, tc, hc, wc, :] is the cell (tc*st + rt, hc*sh + rh, wc*sw + rw)
    split = "b n (tc st) (hc sh) (wc sw) c -> b n st sh sw tc hc wc c"
    ks, vs = (rearrange(_pad_cells(x, padded), split, st=st, sh=sh, sw=sw) for x in (k, v))
    q_padded = (Tq_c * st, Hc * sh, Wc * sw)
    qs = rearrange(_pad_cells(q, q_padded, front=front), split, st=st, sh=sh, sw=sw)
    out = q.new_empty(B, N, *q_padded, D)
    out_s = rearrange(out, split, st=st, sh=sh, sw=sw)
    if need_lse:
        lse = q.new_empty(B, N, *q_padded, 1)
        lse_s = rearrange(lse, split, st=st, sh=sh, sw=sw)
    coord = torch.meshgrid(*(torch.arange(n, device=dev) for n in padded), indexing="ij")
    # padding keys are invalid; within a class t = tc * st + rt, so causality compares tc
    real = rearrange((coord[0] < T) & (coord[1] < H) & (coord[2] < W), "(tc st) (hc sh) (wc sw) -> st sh sw 1 (tc hc wc)",
                     st=st, sh=sh, sw=sw)
    tc_key = torch.arange(Tc, device=dev).repeat_interleave(Hc * Wc)
    # query rows are (g, tc, hc, wc): the G heads sharing a key/value head are rows of one matmul
    tc_query = (tb + torch.arange(Tq_c, device=dev)).repeat_interleave(Hc * Wc).repeat(G)
    valid = real & (tc_key[None, :] <= tc_query[:, None]) if pattern.causal else real
    need_mask = pattern.causal or not bool(real.all())
    # per class (rt, rh, rw): whether any of its (query, key) pairs is masked (padding, causality);
    # the classes that have none skip the masked_fill
    masked_cls = (~valid).flatten(3).any(dim=-1) if need_mask else None
    if labels is not None:
        elig = valid & (tc_key[None, :] < tc_query[:, None]) if causal_affinity else valid
        # when every query row of a class sees the same eligible keys (one query frame), the
        # affinity masks are per key: (.., 1, K) broadcast, never materialised per (query, key)
        if elig.shape[3] > 1 and bool((elig == elig[:, :, :, :1]).all()):
            elig = elig[:, :, :, :1]
        lab_s = rearrange(_pad_cells(labels[:, None, ..., None], padded, -1)[:, 0, ..., 0],
                          "b (tc st) (hc sh) (wc sw) -> b st sh sw (tc hc wc)", st=st, sh=sh, sw=sw)
        aff = q.new_empty(B, N, *q_padded, num_objects)
        aff_s = rearrange(aff, split, st=st, sh=sh, sw=sw)
    rows_all = G * Mq
    # chunks: classes of one (rt, rh) at a time, and the queries of a class in rows when it is large;
    # the budget is per query head (as in a plain call), so a key/value head's chunk holds G of them
    budget = G * PAIRS_PER_CHUNK
    if rows_all * M <= budget:
        n_cls, q_rows = max(1, budget // (rows_all * M)), rows_all
    else:
        n_cls, q_rows = 1, max(1, budget // M)
    to_class = "b n sw tc hc wc c -> b n sw (tc hc wc) c"
    q_to_class = "b (m g) sw tc hc wc c -> b m sw (g tc hc wc) c"
    from_class = "b m sw (g tc hc wc) c -> b (m g) sw tc hc wc c"
    for rt in range(st):
        for rh in range(sh):
            qb = rearrange(qs[:, :, rt, rh], q_to_class, g=G)
            kb, vb = (rearrange(x[:, :, rt, rh], to_class) for x in (ks, vs))
            ob = qb.new_empty(qb.shape)
            ab = qb.new_empty(*qb.shape[:-1], num_objects) if labels is not None else None
            lb = qb.new_empty(*qb.shape[:-1], 1) if need_lse else None
            for c0 in range(0, sw, n_cls):
                c1 = min(sw, c0 + n_cls)
                kk, vv = kb[:, :, c0:c1], vb[:, :, c0:c1]
                for r0 in range(0, rows_all, q_rows):
                    r1 = min(rows_all, r0 + q_rows)
                    m = valid[rt, rh, c0:c1, r0:r1] if valid.shape[3] > 1 else valid[rt, rh, c0:c1]
                    logits = torch.matmul(qb[:, :, c0:c1, r0:r1] * scale, kk.transpose(-1, -2))
                    if need_mask and bool(masked_cls[rt, rh, c0:c1].any()):
                        logits = logits.masked_fill(~m, float("-inf"))
                    probs = torch.softmax(logits, dim=-1)
                    ob[:, :, c0:c1, r0:r1] = torch.matmul(probs, vv)
                    if need_lse:
                        lb[:, :, c0:c1, r0:r1] = torch.logsumexp(logits, dim=-1, keepdim=True)
                    if labels is not None:
                        e = elig[rt, rh, c0:c1, r0:r1] if elig.shape[3] > 1 else elig[rt, rh, c0:c1, :1]
                        key_lab = torch.where(e, lab_s[:, rt, rh, c0:c1, None, :], -1)
                        # every class holds a real key (padding is under one step), so no row is NaN
                        ab[:, :, c0:c1, r0:r1] = _affinity(probs, key_lab, num_objects, finite=True)
            dims = dict(g=G, tc=Tq_c, hc=Hc)
            out_s[:, :, rt, rh] = rearrange(ob, from_class, **dims)
            if labels is not None:
                aff_s[:, :, rt, rh] = rearrange(ab, from_class, **dims)
            if need_lse:
                lse_s[:, :, rt, rh] = rearrange(lb, from_class, **dims)
    out = out[:, :, front:front + T_q, :H, :W]
    lse = lse[:, :, front:front + T_q, :H, :W, 0] if need_lse else None
    if labels is None:
        return out, None, lse
    return out, rearrange(aff[:, :, front:front + T_q, :H, :W], "b n t h w o -> b n o t h w"), lse


_IMPLS = {"grid": _grid, "local": _local, "strided": _strided}


# ----------------------------------------------------------------------------- extra keys


def extra_attention(q: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor, scale: float):
    """Dense attention of every query over the extra keys, with its log-sum-exp.

    Args:
        q: ``(B, N, T_q, H, W, D)``.
        k_x, v_x: ``(B, N_kv, L, D)``, ``L >= 1``; query head ``n`` reads head ``n // (N // N_kv)``.
        scale: logit scale.

    Returns:
        ``out`` ``(B, N, T_q, H, W, D)`` and ``lse`` ``(B, N, T_q, H, W)``, in the dtype of ``q``.
    """
    B, N, T_q, H, W, D = q.shape
    M, L = k_x.shape[1], k_x.shape[2]
    G = N // M
    # the G query heads of a key/value head are rows of one matmul: k_x, v_x are read as they are
    qg = rearrange(q, "b (m g) t h w d -> b m (g t h w) d", g=G)
    rows = max(1, G * PAIRS_PER_CHUNK // L)  # per query head, as the pattern part
    outs, lses = [], []
    for r0 in range(0, qg.shape[2], rows):
        logits = torch.matmul(qg[:, :, r0:r0 + rows] * scale, k_x.transpose(-1, -2))
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.matmul(torch.exp(logits - lse[..., None]), v_x))
        lses.append(lse)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
    dims = dict(g=G, t=T_q, h=H, w=W)
    return rearrange(out, "b m (g t h w) d -> b (m g) t h w d", **dims), rearrange(lse, "b m (g t h w) -> b (m g) t h w", **dims)


def extra_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
):
    """The extra keys' share of the backward of a joint softmax (pattern keys + extra keys).

    With ``lse`` the joint log-sum-exp, ``P = exp(scale * q.k_x - lse)`` are the extra keys'
    joint probabilities and ``dS = P * (dO.v_x - delta)``, where ``delta = dO.O + sum_o g_o A_o
    - g_lse`` of the joint outputs (as in the fused kernels' backward).

    Args:
        grad_out, q: ``(B, N, T_q, H, W, D)``; k_x, v_x: ``(B, N_kv, L, D)``.
        lse, delta: ``(B, N, T_q, H, W)``.

    Returns:
        ``dq`` (the extra keys' part) ``(B, N, T_q, H, W, D)``, ``dk_x``, ``dv_x``
        ``(B, N_kv, L, D)``, in the compute dtype (float32, or float64 for float64 input).
    """
    B, N, T_q, H, W, D = q.shape
    M, L = k_x.shape[1], k_x.shape[2]
    G = N // M
    acc = _compute_dtype(q)
    to_rows = "b (m g) t h w d -> b m (g t h w) d"
    qg, go = (rearrange(x.to(acc), to_rows, g=G) for x in (q, grad_out))
    lse_r, delta_r = (rearrange(x.to(acc), "b (m g) t h w -> b m (g t h w)", g=G) for x in (lse, delta))
    kx, vx = k_x.to(acc), v_x.to(acc)
    dq = torch.empty_like(qg)
    dk_x, dv_x = torch.zeros_like(kx), torch.zeros_like(vx)
    rows = max(1, G * PAIRS_PER_CHUNK // L)
    for r0 in range(0, qg.shape[2], rows):
        sl = slice(r0, r0 + rows)
        p = torch.exp(torch.matmul(qg[:, :, sl], kx.transpose(-1, -2)) * scale - lse_r[:, :, sl, None])
        ds = p * (torch.matmul(go[:, :, sl], vx.transpose(-1, -2)) - delta_r[:, :, sl, None])
        dq[:, :, sl] = torch.matmul(ds, kx) * scale
        dk_x += torch.matmul(ds.transpose(-1, -2), qg[:, :, sl]) * scale
        dv_x += torch.matmul(p.transpose(-1, -2), go[:, :, sl])
    return rearrange(dq, "b m (g t h w) d -> b (m g) t h w d", g=G, t=T_q, h=H, w=W), dk_x, dv_x


def merge_extra(out, aff, lse, out_x, lse_x):
    """Join the pattern part ``(out, aff, lse)`` and the extra keys' ``(out_x, lse_x)`` exactly.

    The joint softmax is the pattern softmax reweighted by ``exp(lse - lse_joint)``, so the
    affinities (probabilities of pattern keys) take the same weight.

    Returns:
        ``(out, aff, lse)`` of the joint attention (``aff`` ``None`` without labels).
    """
    out_j, lse_j = merge_pair(out, lse, out_x, lse_x)
    if aff is not None:
        aff = aff * rearrange(torch.exp(lse - lse_j), "b n t h w -> b n 1 t h w")
    return out_j, aff, lse_j


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    *,
    extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    return_lse: bool = False,
):
    """Sparse attention over ``pattern`` in plain PyTorch (arguments already checked).

    Args:
        q: ``(B, N, T_q, H, W, D)``, the last ``T_q`` of the ``T`` key frames.
        k, v: ``(B, N_kv, T, H, W, D)``, ``N % N_kv == 0``; any strides; float16/bfloat16/float32
            are computed in float32, float64 in float64.
        pattern: the connectivity pattern (a local pattern may carry a dilation).
        scale: logit scale.
        labels: ``(B, T, H, W)`` integer ids in ``[-1, num_objects)``.
        num_objects: ``O``.
        causal_affinity: affinities only from keys of strictly earlier frames.
        extra_kv: ``(k_x, v_x)``, each ``(B, N_kv, L, D)``: keys every query attends besides its
            pattern, in the same softmax, in no affinity. ``L = 0`` is the same as ``None``.
        return_lse: also return the log-sum-exp over every attended key.

    Returns:
        ``out`` ``(B, N, T_q, H, W, D)`` in the input dtype; with labels also the affinity
        ``(B, N, O, T_q, H, W)``; with ``return_lse`` also ``lse`` ``(B, N, T_q, H, W)``
        (appended last). Affinity and lse are float32 (float64 for float64 input).
    """
    compute = _compute_dtype(q)
    qf, kf, vf = (x.to(compute) for x in (q, k, v))
    if labels is not None:
        labels = labels.long()
    with_extra = extra_kv is not None and extra_kv[0].shape[2] > 0
    need_lse = return_lse or with_extra
    impl = _IMPLS[pattern.kind]
    if pattern.kind == "local" and pattern.dilation != (1, 1, 1):
        impl = _local_dilated
    out, aff, lse = impl(qf, kf, vf, pattern, scale, labels, num_objects, causal_affinity, need_lse)
    if with_extra:
        out_x, lse_x = extra_attention(qf, *(x.to(compute) for x in extra_kv), scale)
        out, aff, lse = merge_extra(out, aff, lse, out_x, lse_x)
    results = [out.to(q.dtype)]
    if labels is not None:
        results.append(aff.to(compute))
    if return_lse:
        results.append(lse.to(compute))
    return results[0] if len(results) == 1 else tuple(results)
