"""Where things are on disk, coded once: image suffixes, mask modes, dataset folder layouts.

- DAVIS 2017: ``JPEGImages/480p/<seq>/*.jpg``, ``Annotations/480p/<seq>/*.png``,
  ``ImageSets/2017/<split>.txt``.
- YouTube-VOS: ``<split>/JPEGImages/<seq>/``, ``<split>/Annotations/<seq>/``, ``<split>/meta.json``.
- Per sequence: ``<seq>/JPEGImages/`` and ``<seq>/Annotations/``.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # frames and textures
MASK_SUFFIX = ".png"
# PIL modes whose pixel values are object ids (palette indices, or 8-bit 0/255 for one object)
MASK_MODES = ("P", "L", "1", "I;16", "I")
MASK_MODE_HELP = ("expected a palette PNG (mode 'P', index = object id) "
                  "or an 8-bit grayscale mask (0/255 for one object)")

DAVIS_RESOLUTION = "480p"
YOUTUBE_SPLITS = ("train", "valid")
DEFAULT_EVAL_SPLIT = {"davis": "val", "youtube": "valid"}


def images_in(folder: Path) -> list[Path]:
    """Image files of ``folder`` (not recursive), in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def masks_in(folder: Path) -> list[Path]:
    """Mask files of ``folder``, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == MASK_SUFFIX and p.is_file())


def davis_images(root: Path, sequence: str) -> Path:
    return root / "JPEGImages" / DAVIS_RESOLUTION / sequence


def davis_annotations(root: Path, sequence: str = "") -> Path:
    return root / "Annotations" / DAVIS_RESOLUTION / sequence


def davis_split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "2017" / f"{split}.txt"


def is_davis(root: Path) -> bool:
    return (root / "JPEGImages").is_dir() and (root / "ImageSets").is_dir()


def is_youtube(root: Path) -> bool:
    return any((root / s / "meta.json").is_file() for s in YOUTUBE_SPLITS)


def sequence_dirs(root: Path) -> list[Path]:
    """``<root>/<seq>`` folders of the per-sequence layout (those with ``JPEGImages``)."""
    return [d for d in sorted(root.iterdir()) if (d / "JPEGImages").is_dir()]
