"""Positional encodings over ``(t, y, x)`` added to the frame buffer before the encoder.

Each module maps a grid size ``(T, H, W)`` to a ``(C, T, H, W)`` tensor.
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
