"""Pictures of what a segmenter did: masks blended over frames, and animated GIFs.

Colours are the DAVIS palette's (:func:`vos.masks.davis_palette`), so an overlay
matches the palette PNG written for the same frame.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_write
from .masks import davis_palette

_COLOURS = np.asarray(davis_palette(), dtype=np.float32).reshape(256, 3)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another id: the outline of every object, inside each object."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return edge & (mask > 0)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, outline: bool = True) -> np.ndarray:
    """Blend object colours over a frame.

    Args:
        image: ``(H, W, 3)`` uint8 RGB frame.
        mask: ``(H, W)`` object ids (0 = background, left untouched).
        alpha: weight of the frame on object pixels (the official overlay's convention).
        outline: draw each object's outline in its full colour.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} must have the image's (H, W) {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = image.copy()
    fg = mask > 0  # only object pixels are touched: background costs nothing
    ids = mask[fg].astype(np.intp)
    blended = alpha * image[fg].astype(np.float32) + (1.0 - alpha) * _COLOURS[ids]
    out[fg] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if outline:
        edge = _edges(mask)
        out[edge] = _COLOURS[mask[edge].astype(np.intp)].astype(np.uint8)
    return out


def save_image(path: str | os.PathLike, image: np.ndarray, quality: int = 90) -> None:
    """Write an ``(H, W, 3)`` uint8 image atomically; the format follows the suffix (.jpg, .png)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: image suffix must be .jpg, .jpeg or .png")
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    atomic_write(path, lambda f: img.save(f, format=fmt, **({"quality": quality} if fmt == "JPEG" else {})))


def save_gif(
    path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 10.0, max_width: int | None = 320
) -> None:
    """An animated, looping GIF of ``(H, W, 3)`` uint8 frames, written atomically.

    Args:
        path: the ``.gif`` file.
        frames: the frames, all of one size.
        fps: frames per second.
        max_width: frames wider than this are scaled down (keeps GIFs small); ``None`` keeps the size.
    """
    path = Path(path)
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    if any(img.size != images[0].size for img in images):
        raise ValueError(f"{path}: frames differ in size")
    w, h = images[0].size
    if max_width is not None and w > max_width:
        size = (max_width, max(1, round(h * max_width / w)))
        images = [img.resize(size, Image.BILINEAR) for img in images]
    # A palette of its own per frame keeps the object colours faithful; the octree is ~100x
    # faster than median cut at the same look.
    images = [img.quantize(colors=256, method=Image.Quantize.FASTOCTREE) for img in images]
    duration = max(20, round(1000 / fps))
    atomic_write(
        path,
        lambda f: images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0, disposal=1
        ),
    )
