"""Positional encodings over ``(t, y, x)`` added to the frame buffer before the encoder.

Each module maps a grid size ``(T, H, W)`` to a ``(C, T, H, W)`` tensor. The sinusoidal one
also has a streaming form (:meth:`SinusoidalPositionEncoding3d.ring`) whose time code of a frame
is fixed when the frame arrives, so that cached keys and values stay valid as the buffer slides.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _split_channels(dim: int) -> tuple[int, int, int]:
    """Channels for ``t``, ``y`` and ``x``: even counts that add up to ``dim``."""
    if dim < 6 or dim % 2:
        raise ValueError(f"dim must be even and >= 6 for a (t, y, x) positional encoding, got {dim}")
    per_axis = 2 * (dim // 6)
    return per_axis, per_axis, dim - 2 * per_axis


def sinusoid(n: int, channels: int, temperature: float = 10000.0, device=None) -> torch.Tensor:
    """``(channels, n)``: sines then cosines of positions ``0..n-1`` at geometric frequencies."""
    pos = torch.arange(n, device=device, dtype=torch.float32)
    half = channels // 2
    freq = torch.exp(-math.log(temperature) * torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = freq[:, None] * pos[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=0)


def ring_time_code(frame_index: torch.Tensor, channels: int, period: int) -> torch.Tensor:
    """The streaming time code: zero for the first frame, a point on a circle for every other.

    A frame's code is fixed when it arrives (it depends on its own index only), so the keys and
    values a streaming encoder caches never go stale; and it is bounded whatever the length of
    the video, unlike an absolute index, which reaches values training never saw while the
    first frame is kept in memory. Frame ``n >= 1`` sits at phase ``2 pi (n mod period) /
    period`` with harmonics ``1 .. period // 2`` (cycled over the channel pairs): any
    ``period`` consecutive frames get distinct codes, and the sines and cosines make a code's
    dot product with another depend on their cyclic distance, so an attention head can read
    recency relative to the query frame. The first frame (index 0), the one kept while the
    rest slide, is the only code of norm zero.

    Args:
        frame_index: ``(B, T)`` int frame indices counted from the first (annotated) frame.
        channels: even number of channels.
        period: how many consecutive frames get distinct codes (``tau + 1``).

    Returns:
        ``(B, channels, T)`` float32.
    """
    index = frame_index.long()
    harmonics = 1 + torch.arange(channels // 2, device=index.device) % max(1, period // 2)
    phase = (2 * math.pi / period) * (index % period).float()  # (B, T)
    angles = harmonics[None, :, None].float() * phase[:, None, :]  # (B, channels / 2, T)
    code = torch.cat([angles.sin(), angles.cos()], dim=1)
    return code * (index != 0)[:, None, :].float()


class SinusoidalPositionEncoding3d(nn.Module):
    """Fixed sines and cosines of ``t``, ``y`` and ``x`` on separate channel groups (no parameters).

    Args:
        dim: channels ``C`` (even, >= 6).
        temperature: longest wavelength, as in "Attention is all you need".
    """

    def __init__(self, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.channels = _split_channels(dim)
        self.temperature = temperature

    def forward(self, size: Sequence[int], device=None) -> torch.Tensor:
        """``(T, H, W)`` -> ``(C, T, H, W)`` float32."""
        T, H, W = size
        ct, cy, cx = self.channels
        et = sinusoid(T, ct, self.temperature, device)
        ey = sinusoid(H, cy, self.temperature, device)
        ex = sinusoid(W, cx, self.temperature, device)
        return torch.cat([
            et[:, :, None, None].expand(ct, T, H, W),
            ey[:, None, :, None].expand(cy, T, H, W),
            ex[:, None, None, :].expand(cx, T, H, W),
        ], dim=0)

    def ring(self, size: Sequence[int], frame_index: torch.Tensor, period: int) -> torch.Tensor:
        """The streaming encoding: :func:`ring_time_code` on the time channels, ``y`` and ``x``
        as in :meth:`forward`.

        Args:
            size: ``(H, W)``.
            frame_index: ``(B, T)`` frame indices counted from the first frame.
            period: frames with distinct time codes (``tau + 1``).

        Returns:
            ``(B, C, T, H, W)`` float32.
        """
        H, W = size
        B, T = frame_index.shape
        ct, cy, cx = self.channels
        device = frame_index.device
        et = ring_time_code(frame_index, ct, period)
        ey = sinusoid(H, cy, self.temperature, device)
        ex = sinusoid(W, cx, self.temperature, device)
        return torch.cat([
            et[:, :, :, None, None].expand(B, ct, T, H, W),
            ey[None, :, None, :, None].expand(B, cy, T, H, W),
            ex[None, :, None, None, :].expand(B, cx, T, H, W),
        ], dim=1)


class LearnedPositionEncoding3d(nn.Module):
    """A learned table per axis, resized (linearly) to the grid and summed.

    Resizing instead of indexing keeps every entry in use, whatever the grid size.

    Args:
        dim: channels ``C``.
        size: ``(T, H, W)`` of the tables (the grid the model mostly sees).
    """

    def __init__(self, dim: int, size: Sequence[int] = (4, 16, 16)) -> None:
        super().__init__()
        self.dim = dim
        T, H, W = size
        self.t = nn.Parameter(torch.randn(1, dim, T) * 0.02)
        self.y = nn.Parameter(torch.randn(1, dim, H) * 0.02)
        self.x = nn.Parameter(torch.randn(1, dim, W) * 0.02)

    @staticmethod
    def _resize(table: torch.Tensor, n: int) -> torch.Tensor:
        if table.shape[-1] == n:
            return table[0]
        return F.interpolate(table, size=n, mode="linear", align_corners=True)[0]

    def forward(self, size: Sequence[int], device=None) -> torch.Tensor:
        """``(T, H, W)`` -> ``(C, T, H, W)``."""
        T, H, W = size
        et, ey, ex = self._resize(self.t, T), self._resize(self.y, H), self._resize(self.x, W)
        return (
            rearrange(et, "c t -> c t 1 1") + rearrange(ey, "c h -> c 1 h 1") + rearrange(ex, "c w -> c 1 1 w")
        )


POSITION_ENCODINGS = ("sinusoidal", "learned", "none")


def build_position_encoding(kind: str, dim: int) -> Optional[nn.Module]:
    """``"sinusoidal"`` (the paper's best), ``"learned"`` or ``"none"`` (returns ``None``)."""
    if kind == "sinusoidal":
        return SinusoidalPositionEncoding3d(dim)
    if kind == "learned":
        return LearnedPositionEncoding3d(dim)
    if kind == "none":
        return None
    raise ValueError(f"pos_enc must be one of {POSITION_ENCODINGS}, got {kind!r}")
