"""Dense, masked float64 reference of the contract: ``O(S^2)``, for tests only.

It is written the obvious way on purpose (repeat K/V for GQA, materialise the mask, one
softmax over pattern and extra keys together), so that it shares no trick with the sparse
paths it checks.
"""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange, repeat

from .patterns import Pattern, dense_mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    num_objects: Optional[int] = None,
    causal_affinity: bool = True,
    *,
    extra_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    return_lse: bool = False,
):
    """Materialise the ``S_q x (S + L)`` map, mask it, softmax it, in float64.

    Args:
        q: ``(B, N, T_q, H, W, D)``; its frames are the last ``T_q`` of the ``T`` key frames.
        k, v: ``(B, N_kv, T, H, W, D)``; query head ``n`` reads key/value head
            ``n // (N // N_kv)``.
        pattern: the connectivity pattern (its dilation included).
        labels: ``(B, T, H, W)`` ids in ``[-1, num_objects)``.
        extra_kv: ``(k_x, v_x)``, each ``(B, N_kv, L, D)``: keys every query attends, in the
            softmax but in no affinity.
        return_lse: also return the natural log-sum-exp over every attended key.

    Returns:
        ``out`` ``(B, N, T_q, H, W, D)`` float64; with labels also the affinity
        ``(B, N, O, T_q, H, W)``; with ``return_lse`` also ``lse`` ``(B, N, T_q, H, W)``
        (appended last).
    """
    B, N, T_q, H, W, D = q.shape
    N_kv, T = k.shape[1], k.shape[2]
    group = N // N_kv
    scale = D ** -0.5 if scale is None else scale
    qf = rearrange(q.double(), "b n t h w d -> b n (t h w) d")
    kf, vf = (repeat(x.double(), "b m t h w d -> b (m g) (t h w) d", g=group) for x in (k, v))
    mask = dense_mask(pattern, T, H, W, device=q.device, T_q=T_q)  # (S_q, S)
    S = kf.shape[2]
    if extra_kv is not None:
        kx, vx = (repeat(x.double(), "b m l d -> b (m g) l d", g=group) for x in extra_kv)
        kf, vf = torch.cat([kf, kx], dim=2), torch.cat([vf, vx], dim=2)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], kx.shape[2])], dim=1)
    logits = (scale * qf @ kf.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[..., None])
    out = rearrange(probs @ vf, "b n (t h w) d -> b n t h w d", t=T_q, h=H, w=W)
    results = [out]
    if labels is not None:
        idx = torch.arange(T * H * W, device=q.device)
        t_key, t_query = idx // (H * W), idx[(T - T_q) * H * W:] // (H * W)
        eligible = mask[:, :S] & (t_key[None, :] < t_query[:, None]) if causal_affinity else mask[:, :S]
        flat = rearrange(labels, "b t h w -> b (t h w)")
        objects = torch.arange(num_objects, device=q.device)
        # (B, O, S_query, S_key): key has object o and is in the (causal) pattern of the query
        hit = eligible[None, None] & (flat[:, None, None, :] == objects[None, :, None, None])
        aff = (probs[:, :, None, :, :S] * hit[:, None].double()).amax(dim=-1)
        results.append(rearrange(aff, "b n o (t h w) -> b n o t h w", t=T_q, h=H, w=W))
    if return_lse:
        results.append(rearrange(lse, "b n (t h w) -> b n t h w", t=T_q, h=H, w=W))
    return results[0] if len(results) == 1 else tuple(results)
