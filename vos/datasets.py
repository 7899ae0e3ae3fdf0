"""VOS datasets on disk, and the training clips drawn from them (or from synthetic videos).

Three layouts are read:

- DAVIS 2017: ``JPEGImages/480p/<seq>/*.jpg``, ``Annotations/480p/<seq>/*.png``,
  ``ImageSets/2017/{train,val}.txt``.
- YouTube-VOS: ``<split>/JPEGImages/<seq>/*.jpg``, ``<split>/Annotations/<seq>/*.png`` and
  ``<split>/meta.json`` for ``split`` in ``train``/``valid``; in ``valid`` only the frame on
  which each object first appears is annotated, and objects may first appear after frame 0.
- Per sequence: ``<seq>/JPEGImages/*.jpg`` and ``<seq>/Annotations/*.png``.

Masks are palette PNGs (index = object id) or 8-bit binary (0/255, one object); see
:func:`vos.masks.read_mask`. An annotated split where an image has no mask, or a mask
that is RGB, is an error naming the file.

Training clips are drawn by :class:`ClipSampler` (files) or :class:`SyntheticClips`; both
are deterministic in the ``numpy`` generator they are handed, which the training loop
derives from ``(seed, step, rank, sample)``: the data order is a function of the step, so a
resumed run sees exactly the clips an uninterrupted one would have.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from .layout import (
    MASK_SUFFIX, davis_annotations, davis_images, davis_split_file, images_in, is_davis, is_youtube, sequence_dirs,
)
from .masks import read_mask
from .synthetic import list_texture_images, render_video, train_video_id


@dataclass
class VideoSequence:
    """One video on disk.

    Attributes:
        name: sequence name.
        images: every frame's image, in temporal order.
        masks: per frame, its mask file or ``None`` where the frame is not annotated.
        first_frames: object id -> index of the frame that first annotates it (YouTube-VOS);
            empty when every object is given on frame 0 (DAVIS).
    """

    name: str
    images: list[Path]
    masks: list[Optional[Path]]
    first_frames: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.images]

    @property
    def fully_annotated(self) -> bool:
        return all(m is not None for m in self.masks)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as ``(H, W, 3)`` uint8; a clear error naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None


def _paired(name: str, image_dir: Path, mask_dir: Path, require_all: bool) -> VideoSequence:
    """Match images and masks by file stem."""
    if not image_dir.is_dir():
        raise ValueError(f"sequence {name!r}: image folder {image_dir} does not exist")
    images = images_in(image_dir)
    if not images:
        raise ValueError(f"sequence {name!r}: no images in {image_dir}")
    masks_by_stem = {p.stem: p for p in mask_dir.glob(f"*{MASK_SUFFIX}")} if mask_dir.is_dir() else {}
    masks = []
    for img in images:
        mask = masks_by_stem.pop(img.stem, None)
        if mask is None and require_all:
            raise ValueError(f"{img}: image has no mask (expected {mask_dir / (img.stem + MASK_SUFFIX)})")
        masks.append(mask)
    if masks_by_stem:
        orphan = sorted(masks_by_stem.values())[0]
        raise ValueError(f"{orphan}: mask has no image (expected {image_dir / (orphan.stem + '.jpg')})")
    return VideoSequence(name, images, masks)


def davis2017(root: str | os.PathLike, split: str = "val") -> list[VideoSequence]:
    """The sequences of a DAVIS 2017 ``split`` (a file ``ImageSets/2017/<split>.txt``)."""
    root = Path(root)
    listing = davis_split_file(root, split)
    if not listing.is_file():
        raise ValueError(f"DAVIS 2017 split file not found: {listing}")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return [
        _paired(n, davis_images(root, n), davis_annotations(root, n), require_all=True)
        for n in names
    ]


def youtube_vos(root: str | os.PathLike, split: str = "train") -> list[VideoSequence]:
    """The sequences of a YouTube-VOS ``split`` (``train`` or ``valid``), as ``meta.json`` lists them.

    Every object's first annotated frame comes from ``meta.json``; in ``train`` every image
    must have its mask, in ``valid`` the masks ``meta.json`` names must exist.
    """
    base = Path(root) / split
    meta_path = base / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"YouTube-VOS meta file not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{meta_path}: not a YouTube-VOS meta.json ({err})") from None
    sequences = []
    for name in sorted(meta):
        seq = _paired(name, base / "JPEGImages" / name, base / "Annotations" / name, require_all=(split == "train"))
        index = {stem: i for i, stem in enumerate(seq.frame_names)}
        for obj, info in meta[name].get("objects", {}).items():
            frames = sorted(info.get("frames", []))
            if not frames:
                continue
            if frames[0] not in index:
                raise ValueError(f"{meta_path}: object {obj} of {name!r} starts on frame {frames[0]!r}, which has no image")
            i = index[frames[0]]
            if seq.masks[i] is None:
                raise ValueError(
                    f"{base / 'Annotations' / name / (frames[0] + MASK_SUFFIX)}: mask listed in {meta_path} does not exist"
                )
            seq.first_frames[int(obj)] = i
        sequences.append(seq)
    return sequences


def per_sequence(root: str | os.PathLike) -> list[VideoSequence]:
    """Every ``<root>/<seq>`` that has a ``JPEGImages`` folder; each image needs its mask."""
    root = Path(root)
    seqs = [_paired(d.name, d / "JPEGImages", d / "Annotations", require_all=True) for d in sequence_dirs(root)]
    if not seqs:
        raise ValueError(f"{root}: no sequences (expected <seq>/JPEGImages and <seq>/Annotations)")
    return seqs


def detect_layout(root: str | os.PathLike) -> str:
    """``"davis"``, ``"youtube"`` or ``"sequences"``, from the folders present."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist")
    if is_davis(root):
        return "davis"
    if is_youtube(root):
        return "youtube"
    if sequence_dirs(root):
        return "sequences"
    raise ValueError(
        f"{root}: unknown dataset layout (expected DAVIS 2017 JPEGImages/ + ImageSets/, "
        "YouTube-VOS train|valid/meta.json, or <seq>/JPEGImages + <seq>/Annotations)"
    )


def open_dataset(root: str | os.PathLike, split: Optional[str] = None) -> list[VideoSequence]:
    """The sequences of ``root`` in whichever layout it has.

    ``split`` defaults to ``train`` (DAVIS, YouTube-VOS); the per-sequence layout has none.
    """
    layout = detect_layout(root)
    if layout == "davis":
        return davis2017(root, split or "train")
    if layout == "youtube":
        return youtube_vos(root, split or "train")
    return per_sequence(root)


def load_sequence(seq: VideoSequence) -> tuple[np.ndarray, list[Optional[np.ndarray]]]:
    """Decode a whole sequence: frames ``(T, H, W, 3)`` uint8, and per frame its ``(H, W)`` ids or ``None``."""
    frames = np.stack([read_image(p) for p in seq.images])
    masks = []
    for img, m in zip(seq.images, seq.masks):
        if m is None:
            masks.append(None)
            continue
        ids = read_mask(m)
        if ids.shape != frames.shape[1:3]:
            raise ValueError(f"{m}: mask is {ids.shape[1]}x{ids.shape[0]} but image {img} is {frames.shape[2]}x{frames.shape[1]}")
        masks.append(ids)
    return frames, masks


def select_objects(labels: torch.Tensor, num_reference: int, max_objects: int) -> tuple[torch.Tensor, int]:
    """Keep the objects a clip's reference frames show, as ids ``1..K``; the rest becomes background.

    The model segments the last frame from the first ``num_reference`` frames and their
    labels: an object none of them shows cannot be asked for.

    Args:
        labels: ``(T, H, W)`` ids.
        num_reference: ``T - 1`` usually.
        max_objects: keep at most this many (the largest ones).

    Returns:
        relabelled ``(T, H, W)`` int64 and ``K``.
    """
    counts = torch.bincount(labels[:num_reference].flatten().long(), minlength=int(labels.max()) + 1)
    counts[0] = 0
    present = torch.nonzero(counts).flatten()
    if len(present) > max_objects:
        present = present[counts[present].argsort(descending=True)[:max_objects]].sort().values
    lut = torch.zeros(len(counts), dtype=torch.int64)
    lut[present] = torch.arange(1, len(present) + 1)
    return lut[labels.long()], len(present)


def perturb_labels(labels: torch.Tensor, frames: Sequence[int], rng: np.random.Generator,
                   max_shift: int = 4, max_grow: int = 2, prob: float = 0.5) -> torch.Tensor:
    """Corrupt some frames' labels the way propagated masks go wrong: each object shifted by up
    to ``max_shift`` pixels and grown or shrunk by up to ``max_grow``.

    At inference the buffer holds the model's own predictions, not the truth; training on
    slightly wrong reference labels teaches the model to correct errors instead of copying them.

    Args:
        labels: ``(T, H, W)`` ids.
        frames: the frames that may be corrupted (each with probability ``prob``).

    Returns:
        a corrupted copy.
    """
    out = labels.clone()
    H, W = labels.shape[1:]
    for t in frames:
        if rng.random() >= prob:
            continue
        ids = [int(o) for o in torch.unique(labels[t]) if o > 0]
        frame = torch.zeros_like(labels[t])
        for o in [ids[i] for i in rng.permutation(len(ids))]:  # random depth order of the corrupted masks
            mask = (labels[t] == o).float()[None, None]
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
            mask = F.pad(mask, (max_shift,) * 4)[..., max_shift - dy : max_shift - dy + H, max_shift - dx : max_shift - dx + W]
            grow = int(rng.integers(-max_grow, max_grow + 1))
            if grow > 0:
                mask = F.max_pool2d(mask, 2 * grow + 1, 1, grow)
            elif grow < 0:
                mask = -F.max_pool2d(-mask, -2 * grow + 1, 1, -grow)
            frame[mask[0, 0] > 0] = o
        out[t] = frame
    return out


class SyntheticClips:
    """Training clips from fresh synthetic videos (even ids, see :mod:`vos.synthetic`).

    Args:
        num_frames: ``T`` per clip.
        size: clip height and width.
        max_objects: objects per video, at most.
        max_frame_step: frames of a clip are this many time steps apart at most.
        texture_dir: folder of images to texture the videos with (optional).
        first_far: fraction of clips whose first frame is further back in time.
        max_first_gap: how much further back, at most (frames).
    """

    def __init__(
        self,
        num_frames: int,
        size: int,
        max_objects: int = 3,
        max_frame_step: int = 2,
        texture_dir: Optional[str] = None,
        first_far: float = 0.5,
        max_first_gap: int = 20,
    ) -> None:
        self.num_frames, self.size, self.max_objects, self.max_frame_step = num_frames, size, max_objects, max_frame_step
        self.first_far, self.max_first_gap = first_far, max_first_gap
        self.textures = list_texture_images(texture_dir) if texture_dir else None

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, 3, S, S)`` float in [0, 1] and ``(T, S, S)`` int64 ids."""
        vid = train_video_id(*(int(x) for x in rng.integers(0, 2**31, 3)))
        step = int(rng.integers(1, self.max_frame_step + 1))
        start = int(rng.integers(0, 40))
        times = [start + i * step for i in range(self.num_frames)]
        if rng.random() < self.first_far:
            # the propagator keeps the video's first frame in its buffer: train on clips whose
            # first frame lies further back than the others, as it does at inference
            gap = int(rng.integers(1, self.max_first_gap + 1))
            times = [start] + [t + gap for t in times[1:]]
        return render_video(
            vid, self.num_frames, self.size, self.size,
            max_objects=self.max_objects, texture_files=self.textures, times=times,
        )


class ClipSampler:
    """Training clips from fully annotated sequences on disk: frames in order with random gaps,
    a random scale, crop and flip.

    Args:
        sequences: the sequences to draw from (this rank's shard).
        num_frames: ``T`` per clip.
        size: output height and width.
        max_skip: consecutive clip frames are at most this many frames apart.
        scale: range of the short side after resizing, relative to ``size``.
    """

    def __init__(
        self,
        sequences: Sequence[VideoSequence],
        num_frames: int,
        size: int,
        max_skip: int = 5,
        scale: tuple[float, float] = (1.0, 1.5),
    ) -> None:
        usable = [s for s in sequences if s.fully_annotated and len(s) >= 1]
        if not usable:
            raise ValueError("no fully annotated sequence to train on")
        self.sequences, self.num_frames, self.size, self.max_skip, self.scale = usable, num_frames, size, max_skip, scale

    def _frame_indices(self, rng: np.random.Generator, n: int) -> list[int]:
        T = self.num_frames
        skip = max(1, min(self.max_skip, (n - 1) // max(1, T - 1)))
        if n < T:  # short sequence: repeat frames rather than fail
            return sorted(int(i) for i in rng.integers(0, n, T))
        gaps = rng.integers(1, skip + 1, T - 1)
        start = int(rng.integers(0, n - int(gaps.sum())))
        return [start] + [start + int(g) for g in np.cumsum(gaps)]

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, 3, S, S)`` float in [0, 1] and ``(T, S, S)`` int64 ids."""
        seq = self.sequences[int(rng.integers(len(self.sequences)))]
        idx = self._frame_indices(rng, len(seq))
        imgs = [Image.fromarray(read_image(seq.images[i])) for i in idx]
        masks = []
        for i in idx:
            m = read_mask(seq.masks[i])
            m = np.where(m == 255, 0, m).astype(np.uint8)  # DAVIS 2017 void -> background
            if m.shape != (imgs[0].height, imgs[0].width):
                raise ValueError(f"{seq.masks[i]}: mask size {m.shape[::-1]} differs from its image {imgs[0].size}")
            masks.append(Image.fromarray(m))
        w, h = imgs[0].size
        short = self.size * rng.uniform(*self.scale)
        nw, nh = max(self.size, round(w * short / min(w, h))), max(self.size, round(h * short / min(w, h)))
        # prefer a crop that shows some object of the first frame
        first = np.asarray(masks[0].resize((nw, nh), Image.NEAREST))
        x0 = y0 = 0
        for _ in range(5):
            x0, y0 = int(rng.integers(0, nw - self.size + 1)), int(rng.integers(0, nh - self.size + 1))
            if (first[y0 : y0 + self.size, x0 : x0 + self.size] > 0).any():
                break
        flip = bool(rng.random() < 0.5)
        box = (x0, y0, x0 + self.size, y0 + self.size)
        frames, labels = [], []
        for img, m in zip(imgs, masks):
            img = img.resize((nw, nh), Image.BILINEAR).crop(box)
            m = m.resize((nw, nh), Image.NEAREST).crop(box)
            if flip:
                img, m = img.transpose(Image.FLIP_LEFT_RIGHT), m.transpose(Image.FLIP_LEFT_RIGHT)
            frames.append(np.asarray(img, dtype=np.float32) / 255.0)
            labels.append(np.asarray(m, dtype=np.int64))
        video = torch.from_numpy(rearrange(np.stack(frames), "t h w c -> t c h w").copy())
        return video, torch.from_numpy(np.stack(labels))
