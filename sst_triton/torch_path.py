"""The PyTorch path that CPU tensors take: sparse, chunked over queries.

Memory is ``O(chunk * |I_p| * D)`` per step, never ``O(S^2)``. Gradients come from
autograd through ordinary tensor ops (the max of the affinity reaches the key that
attained it).
"""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from .patterns import Pattern, window_start

# Bound on query * key pairs (per batch-head) materialised at once.
PAIRS_PER_CHUNK = 1 << 20


def _axis_candidates(pattern: Pattern, axis: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key coordinates along one axis for every query coordinate: ``(L, K_axis)`` index and validity."""
    i = torch.arange(length, device=device)
    if pattern.kind == "local":
        k = pattern.kernel_size[axis]
        lo, hi = window_start(i, length, k, pattern.boundary)
        cand = lo[:, None] + torch.arange(min(k, length), device=device)[None, :]
        valid = cand < hi[:, None]
    else:
        s = pattern.stride[axis]
        cand = (i % s)[:, None] + s * torch.arange(-(-length // s), device=device)[None, :]
        valid = cand < length
    return cand.clamp(max=length - 1), valid


def key_table(pattern: Pattern, T: int, H: int, W: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of every query: ``(S, K)`` flat key indices and a validity mask (``K = max_keys``)."""
    if pattern.kind == "grid":
        t, y, x = torch.meshgrid(
            torch.arange(T, device=device), torch.arange(H, device=device), torch.arange(W, device=device),
            indexing="ij",
        )
        t, y, x = (rearrange(c, "t h w -> (t h w) 1") for c in (t, y, x))
        # other coordinates along an axis of length L, skipping the query's own: j -> j + (j >= i)
        xs = torch.arange(W, device=device)[None, :].expand(t.shape[0], W)
        ys = torch.arange(H - 1, device=device)[None, :]
        ys = ys + (ys >= y)
        ts = torch.arange(T - 1, device=device)[None, :]
        ts = ts + (ts >= t)
        row = (t * H + y) * W + xs
        col = (t * H + ys) * W + x
        tube = (ts * H + y) * W + x
        idx = torch.cat([row, col, tube], dim=1)
        valid = torch.ones_like(idx, dtype=torch.bool)
    else:
        (ct, vt), (cy, vy), (cx, vx) = (
            _axis_candidates(pattern, a, n, device) for a, n in enumerate((T, H, W))
        )
        # outer product over the three axes: query (t, y, x) -> key (t', y', x')
        idx = (ct[:, None, None, :, None, None] * H + cy[None, :, None, None, :, None]) * W + cx[None, None, :, None, None, :]
        valid = vt[:, None, None, :, None, None] & vy[None, :, None, None, :, None] & vx[None, None, :, None, None, :]
        idx = rearrange(idx, "t h w a b c -> (t h w) (a b c)")
        valid = rearrange(valid, "t h w a b c -> (t h w) (a b c)")
    if pattern.causal:
        q_t = torch.arange(T * H * W, device=device)[:, None] // (H * W)
        valid = valid & (idx // (H * W) <= q_t)
    return idx, valid


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
    """Sparse attention by gathering each query's keys.

    Args:
        q, k, v: ``(B, N, T, H, W, D)``.
        labels: ``(B, T, H, W)`` ids in ``[-1, num_objects)``.

    Returns:
        ``out`` ``(B, N, T, H, W, D)`` in the input dtype, and with labels the
        affinity ``(B, N, O, T, H, W)`` in float32.
    """
    B, N, T, H, W, D = q.shape
    S = T * H * W
    compute = torch.float32
    qf, kf, vf = (rearrange(x, "b n t h w d -> b n (t h w) d").to(compute) for x in (q, k, v))
    idx, valid = key_table(pattern, T, H, W, device=q.device)
    K = idx.shape[1]
    chunk = max(1, PAIRS_PER_CHUNK // max(1, K * B * N))
    if labels is not None:
        flat_labels = rearrange(labels, "b t h w -> b (t h w)").long()
        key_t = idx // (H * W)
    outs, affs = [], []
    for start in range(0, S, chunk):
        sl = slice(start, min(S, start + chunk))
        ci, cv = idx[sl], valid[sl]
        kk, vv = kf[:, :, ci], vf[:, :, ci]  # (B, N, Q, K, D)
        logits = torch.einsum("bnqd,bnqkd->bnqk", qf[:, :, sl], kk) * scale
        probs = torch.softmax(logits.masked_fill(~cv, float("-inf")), dim=-1)
        outs.append(torch.einsum("bnqk,bnqkd->bnqd", probs, vv))
        if labels is not None:
            key_labels = flat_labels[:, ci]  # (B, Q, K)
            eligible = cv[None] & (key_labels >= 0)
            if causal_affinity:
                q_t = torch.arange(sl.start, sl.stop, device=q.device)[:, None] // (H * W)
                eligible = eligible & (key_t[sl] < q_t)[None]
            # ineligible keys go to an extra bucket O that is dropped afterwards
            bucket = torch.where(eligible, key_labels, num_objects)[:, None].expand_as(probs)
            aff = probs.new_zeros(B, N, probs.shape[2], num_objects + 1)
            aff = aff.scatter_reduce(-1, bucket, probs, reduce="amax", include_self=True)
            affs.append(aff[..., :num_objects])
    out = rearrange(torch.cat(outs, dim=2), "b n (t h w) d -> b n t h w d", t=T, h=H, w=W).to(q.dtype)
    if labels is None:
        return out
    aff = rearrange(torch.cat(affs, dim=2), "b n (t h w) o -> b n o t h w", t=T, h=H, w=W)
    return out, aff
