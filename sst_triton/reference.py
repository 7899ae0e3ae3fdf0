"""Dense, masked float64 reference of the contract: ``O(S^2)``, for tests only."""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from .patterns import Pattern, coords, dense_mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
):
    """Materialise the ``S x S`` map, mask it, softmax it.

    Args:
        q, k, v: ``(B, N, T, H, W, D)``.
        labels: ``(B, T, H, W)`` ids in ``[-1, num_objects)``.

    Returns:
        ``out`` ``(B, N, T, H, W, D)`` in float64, and with labels the affinity
        ``(B, N, O, T, H, W)`` in float64.
    """
    B, N, T, H, W, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = (rearrange(x.double(), "b n t h w d -> b n (t h w) d") for x in (q, k, v))
    mask = dense_mask(pattern, T, H, W, device=q.device)
    logits = scale * qf @ kf.transpose(-1, -2)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    out = rearrange(probs @ vf, "b n (t h w) d -> b n t h w d", t=T, h=H, w=W)
    if labels is None:
        return out
    t = coords(T, H, W, device=q.device)[0]
    eligible = mask & (t[None, :] < t[:, None]) if causal_affinity else mask
    flat = rearrange(labels, "b t h w -> b (t h w)")
    objects = torch.arange(num_objects, device=q.device)
    # (B, O, S_query, S_key): key has object o and is in the (causal) pattern of the query
    hit = eligible[None, None] & (flat[:, None, None, :] == objects[None, :, None, None])
    aff = (probs[:, :, None] * hit[:, None].double()).amax(dim=-1)
    return out, rearrange(aff, "b n o (t h w) -> b n o t h w", t=T, h=H, w=W)
