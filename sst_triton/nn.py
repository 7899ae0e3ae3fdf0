"""``nn.Module`` wrappers: sparse multi-head self-attention over a ``(B, C, T, H, W)`` feature map."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from einops import rearrange
from torch import nn

from .ops import sparse_attention
from .patterns import Pattern


class SparseAttention3d(nn.Module):
    """Multi-head self-attention in which each cell attends to a sparse spatiotemporal pattern.

    Args:
        dim: channels ``C`` of the input and output.
        num_heads: attention heads; ``dim`` must be divisible by it.
        pattern: one :class:`~sst_triton.Pattern` for every head, or a sequence of patterns
            that split the heads into equal consecutive groups (e.g. SST's LocalStrided:
            ``[Pattern.local(7), Pattern.strided((1, 4, 4))]``).
        scale: logit scale; ``None`` means ``1 / sqrt(head_dim)`` (SST uses ``1.0``).
        qkv_bias: bias in the fused q/k/v projection.
        backend: passed to the attention call (``None`` picks Triton on CUDA, PyTorch on CPU).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        pattern: Union[Pattern, Sequence[Pattern]] = Pattern.local(7),
        scale: Optional[float] = None,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        patterns = [pattern] if isinstance(pattern, Pattern) else list(pattern)
        if not patterns or not all(isinstance(p, Pattern) for p in patterns):
            raise TypeError(f"pattern must be a Pattern or a non-empty sequence of Patterns, got {pattern!r}")
        if num_heads % len(patterns):
            raise ValueError(f"num_heads ({num_heads}) must be divisible by the number of patterns ({len(patterns)})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.patterns = patterns
        self.scale = scale
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        num_objects: Optional[int] = None,
        causal_affinity: bool = True,
    ):
        """Attend.

        Args:
            x: ``(B, C, T, H, W)``.
            labels: ``(B, T, H, W)`` object ids in ``[-1, num_objects)`` (``-1`` unknown).
            num_objects: ``O``, with ``labels``.

        Returns:
            ``(B, C, T, H, W)``; with labels also the affinities ``(B, heads, O, T, H, W)``.
        """
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}, T, H, W), got {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        qkv = self.qkv(rearrange(x, "b c t h w -> b t h w c"))
        # views of the fused projection: the kernels take any strides, so nothing is copied
        q, k, v = rearrange(qkv, "b t h w (three n d) -> three b n t h w d", three=3, n=self.num_heads)
        group = self.num_heads // len(self.patterns)
        outs, affs = [], []
        for i, pattern in enumerate(self.patterns):
            heads = slice(i * group, (i + 1) * group)
            res = sparse_attention(
                q[:, heads], k[:, heads], v[:, heads], pattern, self.scale,
                labels, num_objects, causal_affinity, self.backend,
            )
            if labels is None:
                outs.append(res)
            else:
                outs.append(res[0])
                affs.append(res[1])
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        y = rearrange(self.proj(rearrange(out, "b n t h w d -> b t h w (n d)")), "b t h w c -> b c t h w")
        if labels is None:
            return y
        return y, (torch.cat(affs, dim=1) if len(affs) > 1 else affs[0])
