"""Reading and writing object-id masks: palette PNGs (DAVIS 2017) and 8-bit binary masks.

A mask is a ``(H, W)`` uint8 array of object ids, ``0`` = background.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .files import atomic_write
from .layout import MASK_MODE_HELP, MASK_MODES


def davis_palette() -> list[int]:
    """The DAVIS colour palette: id ``i`` gets the colour of the bits of ``i`` (the VOC scheme)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Object ids of a mask file.

    Palette PNGs give their indices. 8-bit grayscale masks whose only values are 0 and
    255 (DAVIS 2016) give one object (255 -> 1); other grayscale masks are read as ids.
    RGB masks are refused: their colours are not ids.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an RGB/RGBA or otherwise unsupported image, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    with Image.open(path) as img:
        mode = img.mode
        if mode == "P":
            return np.array(img, dtype=np.uint8)
        if mode in MASK_MODES:
            arr = np.array(img)
        else:
            raise ValueError(f"{path}: mask has mode {mode!r}; {MASK_MODE_HELP}")
    if mode == "1":
        return arr.astype(np.uint8)
    values = np.unique(arr)
    if values.max(initial=0) > 255:
        raise ValueError(f"{path}: mask ids go up to {int(values.max())}; at most 255 objects are supported")
    if np.isin(values, (0, 255)).all():
        return (arr == 255).astype(np.uint8)
    return arr.astype(np.uint8)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write ``(H, W)`` ids as a DAVIS palette PNG, atomically (temp file + rename)."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask for {path} must be 2-D (H, W), got shape {mask.shape}")
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"mask for {path} has ids outside [0, 255]")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(davis_palette())
    atomic_write(path, lambda f: img.save(f, format="PNG"))
