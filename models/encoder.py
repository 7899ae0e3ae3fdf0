"""The SST encoder: sparse spatiotemporal self-attention layers over the frame buffer.

Each layer also returns its per-head object affinities for the current (last) frame:
how strongly each current-frame cell attends to earlier cells of each object.

With causal patterns (a streaming SST) a frame's layer outputs depend only on it and earlier
frames, so :meth:`SparseEncoder.stream` can keep each layer's keys and values of past frames
and compute the newest frame's queries only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from einops import rearrange
from torch import nn

from sst_triton import Pattern
from sst_triton.nn import KVCache, SparseAttention3d
from sst_triton.ops import sparse_attention

ATTENTIONS = ("grid", "local", "strided", "local_strided")


def make_pattern(
    attn: str,
    kernel_size: Union[int, Sequence[int]] = (7, 7, 7),
    stride: Union[int, Sequence[int]] = (1, 2, 2),
    causal: bool = False,
) -> Union[Pattern, list[Pattern]]:
    """The connectivity of an ``attn`` variant.

    ``local_strided`` (the paper's LocalStrided) gives half of the heads the local cube and
    half the strided pattern. ``causal`` keeps only keys of the same or earlier frames (every
    kind: the grid's time column, the local cube's earlier half, the strided time classes).
    """
    if attn == "grid":
        return Pattern.grid(causal=causal)
    if attn == "local":
        return Pattern.local(kernel_size, causal=causal)
    if attn == "strided":
        return Pattern.strided(stride, causal=causal)
    if attn == "local_strided":
        return [Pattern.local(kernel_size, causal=causal), Pattern.strided(stride, causal=causal)]
    raise ValueError(f"attn must be one of {ATTENTIONS}, got {attn!r}")


def _order_free(pattern: Pattern) -> bool:
    """Whether a query's keys do not depend on the order of the frames (non-causal, every frame
    in its class along time): grid, or strided with a time step of 1."""
    if pattern.causal:
        return False
    return pattern.kind == "grid" or (pattern.kind == "strided" and pattern.stride[0] == 1)


class FeedForward(nn.Sequential):
    """Position-wise ``Linear -> GELU -> Linear`` on channels-last tensors."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``.

    Pre-norm bounds the inputs of the unscaled (``scale=1``) dot products.

    Args:
        dim: channels ``C``.
        num_heads: attention heads.
        pattern: a Pattern, or a list splitting the heads into groups.
        mlp_ratio: hidden width of the feed-forward network, in multiples of ``dim``.
        scale: attention logit scale (the paper's ``1.0``; ``None`` = ``1/sqrt(head_dim)``).
        backend: attention backend (``None``: Triton on CUDA, PyTorch on CPU).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        pattern: Union[Pattern, Sequence[Pattern]],
        mlp_ratio: float = 2.0,
        scale: Optional[float] = 1.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SparseAttention3d(dim, num_heads, pattern, scale=scale, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, num_objects: int, newest_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x: ``(B, C, T, H, W)``.
            labels: ``(B, T, H, W)`` ids in ``[-1, num_objects)``, ``-1`` unknown.
            newest_only: compute only the newest frame's output (the last layer: nothing reads
                the other frames' outputs), its queries against every frame's keys.

        Returns:
            ``(B, C, T, H, W)`` (``T = 1`` with ``newest_only``) and the current frame's
            affinities ``(B, heads, O, H, W)``.
        """
        h = self.norm1(rearrange(x, "b c t h w -> b t h w c"))
        y, affinity = self._attend(h, labels, num_objects, newest_only)
        if newest_only:
            x = x[:, :, -1:]
        x = rearrange(x, "b c t h w -> b t h w c") + y
        x = x + self.ffn(self.norm2(x))
        return rearrange(x, "b t h w c -> b c t h w"), affinity

    def stream(
        self, x: torch.Tensor, cache: Optional[KVCache], labels: Optional[torch.Tensor] = None,
        num_objects: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], KVCache]:
        """The newest frame only, its queries against the cached keys/values and its own.

        Equal to :meth:`forward`'s newest frame when the patterns are causal and ``cache`` holds
        this layer's keys/values of the earlier frames of the same clip.

        Args:
            x: ``(B, C, 1, H, W)`` the newest frame's layer input.
            cache: keys/values ``(B, kv_heads, T_c, H, W, head_dim)`` of the earlier frames, or
                ``None`` (no earlier frame).
            labels: ``(B, T_c + 1, H, W)`` ids of the cached frames then the newest (``-1``), or
                ``None``: no affinities.

        Returns:
            ``(B, C, 1, H, W)``, the affinities ``(B, heads, O, H, W)`` (``None`` without labels),
            and this frame's keys/values ``(B, kv_heads, 1, H, W, head_dim)`` for later frames.
        """
        h = rearrange(self.norm1(rearrange(x, "b c t h w -> b t h w c")), "b t h w c -> b c t h w")
        if labels is None:
            y, kv = self.attn(h, cache=cache, return_cache=True, cache_frames=1)
            affinity = None
        else:
            y, affinity, kv = self.attn(h, labels, num_objects, cache=cache, return_cache=True, cache_frames=1)
            affinity = affinity[:, :, :, 0]
        x = rearrange(x + y, "b c t h w -> b t h w c")
        x = x + self.ffn(self.norm2(x))
        return rearrange(x, "b t h w c -> b c t h w"), affinity, kv

    def _attend(self, h: torch.Tensor, labels: torch.Tensor, num_objects: int,
                newest_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every frame, and object affinities of the newest frame only.

        The decoder reads only the current frame's affinities, so they are computed by a
        second call whose queries are that one frame (``T_q = 1`` against all ``T`` key frames,
        the version-2 contract of ``sst_triton``) instead of for every frame: per-object
        affinities cost more than the attention itself on the CPU path.

        Args:
            h: normalised ``(B, T, H, W, C)``.

        Returns:
            ``(B, T, H, W, C)`` attention output (``T = 1`` with ``newest_only``: that frame's
            output comes from the same call as its affinities) and affinities ``(B, heads, O, H, W)``.
        """
        attn = self.attn
        # views of the fused projection: the kernels take any strides, so nothing is copied
        q, k, v = attn.project(rearrange(h, "b t h w c -> b c t h w"))
        group, kv_group = attn.num_heads // len(attn.patterns), attn.kv_heads // len(attn.patterns)
        outs, affs = [], []
        for i, pattern in enumerate(attn.patterns):
            heads, kv = slice(i * group, (i + 1) * group), slice(i * kv_group, (i + 1) * kv_group)
            qh, kh, vh = q[:, heads], k[:, kv], v[:, kv]
            newest, aff = sparse_attention(qh[:, :, -1:], kh, vh, pattern, attn.scale, labels, num_objects,
                                           backend=attn.backend)
            if newest_only:
                outs.append(newest)
            elif _order_free(pattern) and qh.shape[2] > 1:
                # the earlier frames' queries only: their keys moved after the newest frame's (the
                # queries are the last frames of a call), which a pattern blind to frame order allows
                order = lambda x: torch.cat([x[:, :, -1:], x[:, :, :-1]], dim=2)
                earlier = sparse_attention(qh[:, :, :-1], order(kh), order(vh), pattern, attn.scale,
                                           backend=attn.backend)
                outs.append(torch.cat([earlier, newest], dim=2))
            else:
                outs.append(sparse_attention(qh, kh, vh, pattern, attn.scale, backend=attn.backend))
            affs.append(aff[:, :, :, 0])
        out = rearrange(torch.cat(outs, dim=1), "b n t h w d -> b t h w (n d)")
        return attn.proj(out), torch.cat(affs, dim=1)


class SparseEncoder(nn.Module):
    """``depth`` :class:`EncoderLayer` s and a final LayerNorm.

    Args:
        dim: channels ``C``.
        depth: layers ``L``.
        num_heads: heads per layer.
        pattern: connectivity of every layer (see :func:`make_pattern`).
        mlp_ratio, scale, backend: as in :class:`EncoderLayer`.
    """

    def __init__(
        self,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        pattern: Union[Pattern, Sequence[Pattern]] = Pattern.local(7),
        mlp_ratio: float = 2.0,
        scale: Optional[float] = 1.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, pattern, mlp_ratio, scale, backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.depth, self.num_heads = depth, num_heads

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, num_objects: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x: ``(B, C, T, H, W)`` buffer frames then the current frame, position encoded.
            labels: ``(B, T, H, W)`` ids in ``[-1, num_objects)``; the current frame is ``-1``.
            num_objects: ``O``, background included.

        Returns:
            the current frame's encoding ``(B, C, H, W)`` and the affinities of every layer
            and head ``(B, L * heads, O, H, W)``.
        """
        affinities = []
        for i, layer in enumerate(self.layers):
            x, affinity = layer(x, labels, num_objects, newest_only=(i == len(self.layers) - 1))
            affinities.append(affinity)
        out = self.norm(rearrange(x[:, :, -1], "b c h w -> b h w c"))
        return rearrange(out, "b h w c -> b c h w"), torch.cat(affinities, dim=1)

    def stream(
        self, x: torch.Tensor, caches: Optional[Sequence[KVCache]], labels: Optional[torch.Tensor] = None,
        num_objects: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[KVCache]]:
        """One streaming step: the newest frame through every layer (``T_q = 1``).

        Args:
            x: ``(B, C, 1, H, W)`` the newest frame, position encoded.
            caches: per layer, the keys/values of the earlier frames (``None``: no earlier frame).
            labels: ``(B, T_c + 1, H, W)`` ids of the cached frames then the newest (``-1``), or
                ``None`` (no affinities: a frame that is only remembered).
            num_objects: ``O``, with ``labels``.

        Returns:
            the newest frame's encoding ``(B, C, H, W)``, its affinities ``(B, L * heads, O, H, W)``
            (``None`` without labels) and its keys/values of every layer, to cache.
        """
        if caches is not None and len(caches) != self.depth:
            raise ValueError(f"caches must hold one KVCache per layer ({self.depth}), got {len(caches)}")
        affinities, kvs = [], []
        for i, layer in enumerate(self.layers):
            x, affinity, kv = layer.stream(x, None if caches is None else caches[i], labels, num_objects)
            affinities.append(affinity)
            kvs.append(kv)
        out = rearrange(self.norm(rearrange(x[:, :, -1], "b c h w -> b h w c")), "b h w c -> b c h w")
        return out, (None if labels is None else torch.cat(affinities, dim=1)), kvs
