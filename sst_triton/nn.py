"""``nn.Module`` wrappers: sparse multi-head self-attention over a ``(B, C, T, H, W)`` feature map."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from einops import rearrange
from torch import nn

from .ops import sparse_attention
from .patterns import IntOr3, Pattern


class KVCache(NamedTuple):
    """Projected keys and values of the frames a streaming :class:`SparseAttention3d` has seen.

    Attributes:
        k, v: ``(B, kv_heads, T_c, H, W, head_dim)``, oldest frame first.
    """

    k: torch.Tensor
    v: torch.Tensor


class SparseAttention3d(nn.Module):
    """Multi-head self-attention in which each cell attends to a sparse spatiotemporal pattern.

    Args:
        dim: channels ``C`` of the input and output.
        num_heads: query heads ``N``; ``dim`` must be divisible by it.
        pattern: one :class:`~sst_triton.Pattern` for every head, or a sequence of patterns
            that split the heads into equal consecutive groups (e.g. SST's LocalStrided:
            ``[Pattern.local(7), Pattern.strided((1, 4, 4))]``).
        scale: logit scale; ``None`` means ``1 / sqrt(head_dim)`` (SST uses ``1.0``).
        qkv_bias: bias in the fused q/k/v projection.
        backend: passed to the attention call (``None`` picks Triton on CUDA, PyTorch on CPU).
        kv_heads: key/value heads ``N_kv`` (grouped-query attention; ``1`` is MQA). ``None``
            means ``num_heads``. Query head ``n`` reads key/value head ``n // (N // N_kv)``;
            with several patterns each pattern's group of query heads has its own
            ``kv_heads / len(pattern)`` key/value heads, so ``kv_heads`` must divide
            ``num_heads`` and be divisible by the number of patterns.
        dilation: int or ``(dt, dh, dw)`` given to every local pattern (NATTEN's dilation);
            ``None`` keeps each pattern's own.
        extra_dim: channels of the ``extra_tokens`` the module may attend to (text or register
            tokens of a video diffusion transformer); they get their own key/value projection.
            ``None``: the module takes no extra tokens.

    The fused projection ``qkv`` maps ``C`` to ``(N + 2 * N_kv) * head_dim`` channels laid out
    as ``[q | k | v]`` (with ``N_kv = N`` this is the usual ``(three heads head_dim)`` layout).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        pattern: Union[Pattern, Sequence[Pattern]] = Pattern.local(7),
        scale: Optional[float] = None,
        qkv_bias: bool = True,
        backend: Optional[str] = None,
        *,
        kv_heads: Optional[int] = None,
        dilation: Optional[IntOr3] = None,
        extra_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        patterns = [pattern] if isinstance(pattern, Pattern) else list(pattern)
        if not patterns or not all(isinstance(p, Pattern) for p in patterns):
            raise TypeError(f"pattern must be a Pattern or a non-empty sequence of Patterns, got {pattern!r}")
        if num_heads % len(patterns):
            raise ValueError(f"num_heads ({num_heads}) must be divisible by the number of patterns ({len(patterns)})")
        kv_heads = num_heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"kv_heads must be an int >= 1 dividing num_heads ({num_heads}), got {kv_heads!r}")
        if kv_heads % len(patterns):
            raise ValueError(
                f"kv_heads ({kv_heads}) must be divisible by the number of patterns ({len(patterns)}): "
                "each pattern's query heads have their own key/value heads"
            )
        if dilation is not None:
            if not any(p.kind == "local" for p in patterns):
                raise ValueError(f"dilation applies to local patterns, and none of {patterns} is local")
            patterns = [
                Pattern.local(p.kernel_size, p.boundary, p.causal, dilation) if p.kind == "local" else p
                for p in patterns
            ]
        if extra_dim is not None and (isinstance(extra_dim, bool) or not isinstance(extra_dim, int) or extra_dim < 1):
            raise ValueError(f"extra_dim must be an int >= 1 or None, got {extra_dim!r}")
        self.dim, self.num_heads, self.head_dim, self.kv_heads = dim, num_heads, dim // num_heads, kv_heads
        self.patterns = patterns
        self.scale = scale
        self.backend = backend
        self.extra_dim = extra_dim
        self.qkv = nn.Linear(dim, (num_heads + 2 * kv_heads) * self.head_dim, bias=qkv_bias)
        self.extra_kv = nn.Linear(extra_dim, 2 * kv_heads * self.head_dim, bias=qkv_bias) if extra_dim else None
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of a feature map, as views of the fused projection.

        Args:
            x: ``(B, C, T, H, W)``.

        Returns:
            ``q`` ``(B, num_heads, T, H, W, head_dim)``; ``k``, ``v``
            ``(B, kv_heads, T, H, W, head_dim)`` (strided views: the kernels read them in place).
        """
        qkv = self.qkv(rearrange(x, "b c t h w -> b t h w c"))
        q_ch, kv_ch = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_ch, kv_ch, kv_ch], dim=-1)
        to_heads = "b t h w (n d) -> b n t h w d"
        return (
            rearrange(q, to_heads, d=self.head_dim),
            rearrange(k, to_heads, d=self.head_dim),
            rearrange(v, to_heads, d=self.head_dim),
        )

    def forward(
        self,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        num_objects: Optional[int] = None,
        causal_affinity: bool = True,
        *,
        extra_tokens: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        return_cache: bool = False,
        cache_frames: Optional[int] = None,
    ):
        """Attend.

        Without ``cache`` every frame of ``x`` attends to every frame of ``x``. With ``cache``
        (streaming), the frames of ``x`` are the newest ones: their queries attend to the
        cached keys/values followed by their own (``T_q = T_new`` query frames against
        ``T = T_c + T_new`` key frames, aligned to the end), and only they are computed.

        Args:
            x: ``(B, C, T_new, H, W)``.
            labels: ``(B, T_c + T_new, H, W)`` object ids in ``[-1, num_objects)`` (``-1``
                unknown) of every key frame, cached ones first (``T_c = 0`` without cache).
            num_objects: ``O``, with ``labels``.
            causal_affinity: affinities only from keys of strictly earlier frames.
            extra_tokens: ``(B, L, extra_dim)`` tokens every cell also attends to, in the same
                softmax (joint attention; needs ``extra_dim`` at construction).
            cache: :class:`KVCache` of the previous frames, or ``None``.
            return_cache: also return the :class:`KVCache` of the key frames of this call
                (cached + new), for the next call.
            cache_frames: keep only the newest ``cache_frames`` frames in the returned cache
                (``None``: all), so a stream runs in constant memory.

        Returns:
            ``y`` ``(B, C, T_new, H, W)``; with labels also the affinities
            ``(B, num_heads, O, T_new, H, W)``; with ``return_cache`` the new :class:`KVCache`
            appended last.
        """
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}, T, H, W), got {tuple(x.shape)}")
        if cache_frames is not None and (isinstance(cache_frames, bool) or not isinstance(cache_frames, int)
                                         or cache_frames < 1):
            raise ValueError(f"cache_frames must be an int >= 1 or None, got {cache_frames!r}")
        q, k, v = self.project(x)
        if cache is not None:
            if not isinstance(cache, tuple) or len(cache) != 2:
                raise TypeError(f"cache must be a KVCache(k, v), got {type(cache).__name__}")
            B, _, _, H, W, d = k.shape
            for name, c in zip(("cache.k", "cache.v"), cache):
                if c.dim() != 6 or (c.shape[0], c.shape[1], *c.shape[3:]) != (B, self.kv_heads, H, W, d):
                    raise ValueError(
                        f"{name} must have shape (B, kv_heads, T_c, H, W, head_dim) = "
                        f"({B}, {self.kv_heads}, T_c, {H}, {W}, {d}), got {tuple(c.shape)}"
                    )
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        extra = None
        if extra_tokens is not None:
            if self.extra_kv is None:
                raise ValueError("extra_tokens were given to a module built without extra_dim")
            if extra_tokens.dim() != 3 or extra_tokens.shape[0] != x.shape[0] or extra_tokens.shape[2] != self.extra_dim:
                raise ValueError(
                    f"extra_tokens must have shape (B, L, extra_dim) = ({x.shape[0]}, L, {self.extra_dim}), "
                    f"got {tuple(extra_tokens.shape)}"
                )
            extra = rearrange(
                self.extra_kv(extra_tokens), "b l (two n d) -> two b n l d", two=2, n=self.kv_heads
            )
        group, kv_group = self.num_heads // len(self.patterns), self.kv_heads // len(self.patterns)
        outs, affs = [], []
        for i, pattern in enumerate(self.patterns):
            heads, kv = slice(i * group, (i + 1) * group), slice(i * kv_group, (i + 1) * kv_group)
            res = sparse_attention(
                q[:, heads], k[:, kv], v[:, kv], pattern, self.scale, labels, num_objects, causal_affinity,
                self.backend, extra_kv=None if extra is None else (extra[0][:, kv], extra[1][:, kv]),
            )
            if labels is None:
                outs.append(res)
            else:
                outs.append(res[0])
                affs.append(res[1])
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        y = rearrange(self.proj(rearrange(out, "b n t h w d -> b t h w (n d)")), "b t h w c -> b c t h w")
        results = [y]
        if labels is not None:
            results.append(torch.cat(affs, dim=1) if len(affs) > 1 else affs[0])
        if return_cache:
            keep = k.shape[2] if cache_frames is None else cache_frames
            # copies: a view would keep this call's whole fused projection (queries too) alive
            results.append(KVCache(k[:, :, -keep:].contiguous(), v[:, :, -keep:].contiguous()))
        return results[0] if len(results) == 1 else tuple(results)
