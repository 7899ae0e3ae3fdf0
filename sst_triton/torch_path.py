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
    outs, affs = [], []
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        qc = q[:, :, :, y0:y1]
        kc, vc = k[:, :, :, y0:y1], v[:, :, :, y0:y1]
        row = torch.einsum("bntyxd,bntywd->bntyxw", qc, kc)
        col = torch.einsum("bntyxd,bntgxd->bntyxg", qc, k)
        tube = torch.einsum("bntyxd,bnsyxd->bntyxs", qc, kc)
        col_valid = rearrange(y_all[None, :] != torch.arange(y0, y1, device=dev)[:, None], "y g -> 1 y 1 g")
        col = col.masked_fill(~col_valid, float("-inf"))
        tube = tube.masked_fill(~tube_valid, float("-inf"))
        probs = torch.softmax(torch.cat([row, col, tube], dim=-1) * scale, dim=-1)
        p_row, p_col, p_tube = probs.split([W, H, T], dim=-1)
        out = (
            torch.einsum("bntyxw,bntywd->bntyxd", p_row, vc)
            + torch.einsum("bntyxg,bntgxd->bntyxd", p_col, v)
            + torch.einsum("bntyxs,bnsyxd->bntyxd", p_tube, vc)
        )
        outs.append(out)
        if labels is not None:
            lab = labels[:, :, y0:y1]
            tube_lab = torch.where(tube_elig, rearrange(lab, "b s y x -> b 1 y x s"), -1)
            if causal_affinity:
                aff = _affinity(p_tube, tube_lab, num_objects)
            else:
                row_lab = rearrange(lab, "b t y w -> b t y 1 w").expand(-1, -1, -1, W, -1)
                col_lab = rearrange(labels, "b t g x -> b t 1 x g").expand(-1, -1, y1 - y0, -1, -1)
                col_lab = torch.where(col_valid[None], col_lab, -1)
                aff = _affinity(probs, torch.cat([row_lab, col_lab, tube_lab], dim=-1), num_objects)
            affs.append(aff)
    out = torch.cat(outs, dim=3)
    if labels is None:
        return out, None
    return out, rearrange(torch.cat(affs, dim=3), "b n t h w o -> b n o t h w")


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
                # work ~ padded queries * halo, plus a fixed price per tile (a small matmul)
                cost = padded * (halo + 2 * 32) + n_tiles * 2048
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
    (st, vt, kt, qt), (sy, vy, ky, _), (sx, vx, kx, _) = (
        _local_axis(pattern, a, L, t, dev) for a, (L, t) in enumerate(zip((T, H, W), (tt, ty, tx)))
    )
    nt, ny, nx = vt.shape[0], vy.shape[0], vx.shape[0]
    # the time axis carries causality (and the strict-earlier rule of affinities); all axes are separable
    if pattern.causal:
        vt = vt & (kt[:, None, :] <= qt[..., None])
    if labels is not None:
        et = vt & (kt[:, None, :] < qt[..., None]) if causal_affinity else vt
    q_pad = F.pad(q * scale, (0, 0, 0, nx * tx - W, 0, ny * ty - H, 0, nt * tt - T))
    q_tiles = rearrange(q_pad, "b n (nt tt) (ny ty) (nx tx) d -> b n ny (nt nx) (tt ty tx) d", tt=tt, ty=ty, tx=tx)
    # flat key index of every halo: one gather per tile row builds the (tile, halo) blocks
    flat = (kt[:, None, None, :, None, None] * H + ky[None, :, None, None, :, None]) * W + kx[None, None, :, None, None, :]
    flat = rearrange(flat, "nt ny nx ht hy hx -> ny (nt nx ht hy hx)")
    kf, vf = (rearrange(x, "b n t h w d -> b n (t h w) d") for x in (k, v))
    if labels is not None:
        lab_flat = rearrange(labels, "b t h w -> b (t h w)")

    def mask_of(t_mask: torch.Tensor, j: int) -> torch.Tensor:
        m = (
            t_mask[:, None, :, None, None, :, None, None]
            & vy[j][None, None, None, :, None, None, :, None]
            & vx[None, :, None, None, :, None, None, :]
        )  # (nt, nx, tt, ty, tx, ht, hy, hx)
        return rearrange(m, "nt nx tt ty tx ht hy hx -> (nt nx) (tt ty tx) (ht hy hx)")

    # tile rows away from the borders share one window pattern: build each mask once
    masks: dict = {}

    def masks_of(j: int):
        key = vy[j].numpy().tobytes() if vy.device.type == "cpu" else j
        if key not in masks:
            m = mask_of(vt, j)
            if labels is None:
                masks[key] = (torch.zeros(m.shape, dtype=q.dtype, device=dev).masked_fill_(~m, float("-inf"))[None],)
            else:
                masks[key] = (m, mask_of(et, j))
        return masks[key]

    outs, affs = [], []
    for j in range(ny):
        kh, vh = (rearrange(x.index_select(2, flat[j]), "b n (c m) d -> b n c m d", c=nt * nx) for x in (kf, vf))
        if labels is None:
            (bias,) = masks_of(j)
            # 4-D operands and mask (batch-heads, tiles, ...) so that the fused CPU kernel takes them
            o = F.scaled_dot_product_attention(
                q_tiles[:, :, j].flatten(0, 1), kh.flatten(0, 1), vh.flatten(0, 1), attn_mask=bias, scale=1.0
            )
            outs.append(o.unflatten(0, (B, N)))
            continue
        mask, elig = masks_of(j)
        probs = _softmax_out(torch.matmul(q_tiles[:, :, j], kh.transpose(-1, -2)), mask)
        outs.append(torch.matmul(probs, vh))
        lab = rearrange(lab_flat.index_select(1, flat[j]), "b (c m) -> b c 1 m", c=nt * nx)
        affs.append(_affinity(probs, torch.where(elig, lab, -1), num_objects))

    def untile(x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b n ny (nt nx) (tt ty tx) c -> b n (nt tt) (ny ty) (nx tx) c", nt=nt, tt=tt, ty=ty, tx=tx)
        return x[:, :, :T, :H, :W]

    out = untile(torch.stack(outs, dim=2))
    if labels is None:
        return out, None
    return out, rearrange(untile(torch.stack(affs, dim=2)), "b n t h w o -> b n o t h w")


# ----------------------------------------------------------------------------- strided


def _strided(q, k, v, pattern: Pattern, scale, labels, num_objects, causal_affinity):
    B, N, T, H, W, D = q.shape
    dev = q.device
    # a step at least the axis length leaves every cell alone in its class along that axis
    st, sh, sw = (min(s, L) for s, L in zip(pattern.stride, (T, H, W)))
    Tc, Hc, Wc = -(-T // st), -(-H // sh), -(-W // sw)
    pad = (0, 0, 0, Wc * sw - W, 0, Hc * sh - H, 0, Tc * st - T)
    classes = "b n (tc st) (hc sh) (wc sw) d -> b n (st sh sw) (tc hc wc) d"
    qc, kc, vc = (rearrange(F.pad(x, pad), classes, st=st, sh=sh, sw=sw) for x in (q, k, v))
    M = Tc * Hc * Wc
    # key validity (padding) per class, and the frame index within the class: t = tc * st + residue,
    # so the causal order inside a class is the order of tc
    coord = torch.meshgrid(
        *(torch.arange(n * s, device=dev) for n, s in ((Tc, st), (Hc, sh), (Wc, sw))), indexing="ij"
    )
    real = (coord[0] < T) & (coord[1] < H) & (coord[2] < W)
    real = rearrange(real, "(tc st) (hc sh) (wc sw) -> (st sh sw) 1 (tc hc wc)", st=st, sh=sh, sw=sw)
    tc = rearrange(torch.arange(Tc, device=dev)[:, None].expand(Tc, Hc * Wc), "tc hw -> (tc hw)")
    valid = real
    if pattern.causal:
        valid = valid & (tc[None, None, :] <= tc[None, :, None])
    need_mask = pattern.causal or bool((~real).any())
    if labels is not None:
        elig = valid & (tc[None, None, :] < tc[None, :, None]) if causal_affinity else valid
        lab = rearrange(F.pad(labels, pad[2:], value=-1), "b (tc st) (hc sh) (wc sw) -> b (st sh sw) (tc hc wc)",
                        st=st, sh=sh, sw=sw)
    C = st * sh * sw
    # chunk over classes, and over the queries of a class when a class alone is too big
    if M * M <= PAIRS_PER_CHUNK:
        n_cls, q_rows = PAIRS_PER_CHUNK // (M * M), M
    else:
        n_cls, q_rows = 1, max(1, PAIRS_PER_CHUNK // M)
    outs, affs = [], []
    for c0 in range(0, C, n_cls):
        c1 = min(C, c0 + n_cls)
        kk, vv = kc[:, :, c0:c1], vc[:, :, c0:c1]
        out_rows, aff_rows = [], []
        for r0 in range(0, M, q_rows):
            r1 = min(M, r0 + q_rows)
            logits = torch.matmul(qc[:, :, c0:c1, r0:r1], kk.transpose(-1, -2)) * scale
            mask = valid[c0:c1, r0:r1] if valid.shape[1] > 1 else valid[c0:c1]
            probs = _softmax_out(logits, mask if need_mask else None)
            out_rows.append(torch.matmul(probs, vv))
            if labels is not None:
                e = elig[c0:c1, r0:r1] if elig.shape[1] > 1 else elig[c0:c1]
                key_lab = torch.where(e, lab[:, c0:c1, None, :], -1)
                aff_rows.append(_affinity(probs, key_lab, num_objects))
        outs.append(torch.cat(out_rows, dim=3))
        if labels is not None:
            affs.append(torch.cat(aff_rows, dim=3))
    unclass = "b n (st sh sw) (tc hc wc) c -> b n (tc st) (hc sh) (wc sw) c"
    dims = dict(st=st, sh=sh, sw=sw, tc=Tc, hc=Hc)
    out = rearrange(torch.cat(outs, dim=2), unclass, **dims)[:, :, :T, :H, :W]
    if labels is None:
        return out, None
    aff = rearrange(torch.cat(affs, dim=2), unclass, **dims)[:, :, :T, :H, :W]
    return out, rearrange(aff, "b n t h w o -> b n o t h w")


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
