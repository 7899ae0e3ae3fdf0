"""What a user would run instead of sst_triton, for the same pattern: the references of perf/.

- dense SDPA with a boolean ``(S, S)`` mask from :func:`sst_triton.patterns.dense_mask`
  (the ``O(S^2)`` baseline the SST paper argues against);
- FlexAttention (``torch.nn.attention.flex_attention``) compiled with ``torch.compile``,
  with a ``mask_mod`` that states the same pattern and a block mask built once.

Shared by the CPU and GPU benchmark files: every helper takes and returns
``(B, N, T, H, W, D)`` tensors, like :func:`sst_triton.sparse_attention`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from sst_triton.patterns import Pattern, connectivity, dense_mask


def dense_sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Dense masked attention.

    Args:
        q, k, v: ``(B, N, T, H, W, D)``.
        mask: ``(S, S)`` bool, ``True`` = attend (e.g. ``dense_mask(pattern, T, H, W)``).

    Returns:
        ``(B, N, T, H, W, D)``.
    """
    _, _, T, H, W, _ = q.shape
    qf, kf, vf = (rearrange(x, "b n t h w d -> b n (t h w) d") for x in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return rearrange(out, "b n (t h w) d -> b n t h w d", t=T, h=H, w=W)


def pattern_mask_mod(pattern: Pattern, T: int, H: int, W: int) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the pattern over flat ``(t h w)`` indices."""

    def mask_mod(b, h, q_idx, kv_idx):
        return connectivity(pattern, T, H, W, q_idx, kv_idx)

    return mask_mod


def flex_block_mask(pattern: Pattern, T: int, H: int, W: int, device="cpu"):
    """The pattern's block mask, shared by every batch element and head (build once, reuse)."""
    from torch.nn.attention.flex_attention import create_block_mask

    S = T * H * W
    return create_block_mask(pattern_mask_mod(pattern, T, H, W), None, None, S, S, device=device)


@functools.lru_cache(maxsize=None)
def compiled_flex_attention() -> Callable:
    """``torch.compile(flex_attention)``: FlexAttention's supported (fast) way to run."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: Optional[float] = None
) -> torch.Tensor:
    """Compiled FlexAttention over a block mask from :func:`flex_block_mask`.

    Args:
        q, k, v: ``(B, N, T, H, W, D)``.

    Returns:
        ``(B, N, T, H, W, D)``.
    """
    _, _, T, H, W, _ = q.shape
    qf, kf, vf = (rearrange(x, "b n t h w d -> b n (t h w) d") for x in (q, k, v))
    out = compiled_flex_attention()(qf, kf, vf, block_mask=block_mask, scale=scale)
    return rearrange(out, "b n (t h w) d -> b n t h w d", t=T, h=H, w=W)


__all__ = [
    "dense_mask",
    "dense_sdpa_attention",
    "pattern_mask_mod",
    "flex_block_mask",
    "compiled_flex_attention",
    "flex_sparse_attention",
]
