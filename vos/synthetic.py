"""Procedural video object segmentation data: nothing to download.

Every video is a pure function of an integer id. Its objects are textured blobs with
analytic trajectories (drift plus oscillation, growth and shrinkage, spin), painted in
a fixed depth order so they occlude each other, some of them swinging out of the frame
and back; the camera pans over a textured background. Because the motion is analytic,
any frame of a video is rendered directly, so a training clip costs only its own frames.

Training ids are even and validation ids are odd, so the two splits never share a video.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from .layout import IMAGE_SUFFIXES

# Texture sizes in pixels: objects carry a small tile, the background a larger one so
# that camera motion does not visibly repeat over a clip.
OBJECT_TEXTURE = 48
BACKGROUND_TEXTURE = 160


@dataclass(frozen=True)
class _Object:
    shape: np.ndarray  # (2, K) radial harmonics: amplitude, phase
    texture: np.ndarray  # (OBJECT_TEXTURE, OBJECT_TEXTURE, 3) float32
    center: np.ndarray  # (2,) x, y in units of the frame size, at t = 0
    velocity: np.ndarray  # (2,) per frame
    swing: np.ndarray  # (2,) oscillation amplitude
    swing_freq: float
    swing_phase: np.ndarray  # (2,)
    radius: float  # in units of min(H, W)
    grow: float  # relative amplitude of the size oscillation
    grow_freq: float
    grow_phase: float
    angle: float
    spin: float  # radians per frame
    aspect: float


@dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object, ...]
    background: np.ndarray  # (BACKGROUND_TEXTURE, BACKGROUND_TEXTURE, 3)
    pan: np.ndarray  # (2,) camera drift per frame, in background pixels per output pixel unit
    pan_swing: np.ndarray
    pan_freq: float
    pan_phase: float
    noise: float


def train_video_id(seed: int, *key: int) -> int:
    """An even video id drawn from ``(seed, *key)`` (e.g. step, rank, sample): the training split."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in key)]).generate_state(2, np.uint32)
    return 2 * ((int(state[0]) << 29) ^ int(state[1]))


def val_video_id(index: int) -> int:
    """The odd id of validation video ``index``: never a training id."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return 2 * index + 1


def list_texture_images(texture_dir: str | os.PathLike) -> list[Path]:
    """Image files of ``texture_dir`` (recursively), sorted so that draws are reproducible."""
    root = Path(texture_dir)
    if not root.is_dir():
        raise ValueError(f"texture_dir {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"texture_dir {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random ``cells x cells`` grid upsampled bilinearly, ``(size, size)``."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    grid[-1], grid[:, -1] = grid[0], grid[:, 0]  # tileable, so wrapped sampling has no seam
    pos = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = pos.astype(np.int64)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _procedural_texture(rng: np.random.Generator, size: int, contrast: float) -> np.ndarray:
    """Two colours mixed by gratings and value noise: ``(size, size, 3)`` float32 in [0, 1]."""
    c0 = rng.random(3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, contrast, 3), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mix = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 3)):
        # integer frequencies keep the tile seamless under wrapping
        fx, fy = rng.integers(-4, 5, 2)
        mix += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
    mix = 0.5 + 0.25 * mix + 0.5 * (_smooth_noise(rng, size, int(rng.integers(2, 6))) - 0.5)
    mix = np.clip(mix, 0, 1)[..., None]
    return (c0 * (1 - mix) + c1 * mix).astype(np.float32)


def _image_texture(rng: np.random.Generator, files: Sequence[Path], size: int) -> np.ndarray:
    path = files[int(rng.integers(len(files)))]
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = max(1, int(min(w, h) * rng.uniform(0.3, 1.0)))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            img = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
    except OSError as err:
        raise ValueError(f"{path}: cannot read texture image ({err})") from None
    return np.asarray(img, dtype=np.float32) / 255.0


def _scene(video_id: int, max_objects: int, textures: Optional[Sequence[Path]]) -> _Scene:
    words = [video_id & 0xFFFFFFFF, video_id >> 32]
    # separate streams: textures from a folder change the look of a video, never its motion
    rng = np.random.default_rng(words + [0])
    tex_rng = np.random.default_rng(words + [1])
    n = int(rng.integers(1, max_objects + 1))

    def texture(size: int, contrast: float) -> np.ndarray:
        if textures:
            return _image_texture(tex_rng, textures, size)
        return _procedural_texture(tex_rng, size, contrast)

    objects = []
    for _ in range(n):
        k = 5
        amp = rng.uniform(0, 0.22, k) / np.arange(1, k + 1)
        # a swing wide enough carries the object out of the frame and back in
        wide = rng.random() < 0.3
        swing = rng.uniform(0.2, 0.35, 2) if wide else rng.uniform(0.0, 0.12, 2)
        objects.append(
            _Object(
                shape=np.stack([amp, rng.uniform(0, 2 * np.pi, k)]).astype(np.float32),
                texture=texture(OBJECT_TEXTURE, 0.6),
                center=rng.uniform(0.25, 0.75, 2),
                velocity=rng.normal(0, 0.005, 2),
                swing=swing,
                swing_freq=float(rng.uniform(0.05, 0.12)),
                swing_phase=rng.uniform(0, 2 * np.pi, 2),
                radius=float(rng.uniform(0.14, 0.24)),
                grow=float(rng.uniform(0.0, 0.3)),
                grow_freq=float(rng.uniform(0.05, 0.2)),
                grow_phase=float(rng.uniform(0, 2 * np.pi)),
                angle=float(rng.uniform(0, 2 * np.pi)),
                spin=float(rng.normal(0, 0.08)),
                aspect=float(rng.uniform(0.6, 1.0)),
            )
        )
    return _Scene(
        objects=tuple(objects),
        background=texture(BACKGROUND_TEXTURE, 0.3),
        pan=rng.normal(0, 0.006, 2),
        pan_swing=rng.uniform(0, 0.08, 2),
        pan_freq=float(rng.uniform(0.05, 0.15)),
        pan_phase=float(rng.uniform(0, 2 * np.pi)),
        noise=float(rng.uniform(0.0, 0.03)),
    )


def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest-neighbour lookup with wrap-around; ``u``, ``v`` in texture pixels."""
    h, w = texture.shape[:2]
    return texture[np.floor(v).astype(np.int64) % h, np.floor(u).astype(np.int64) % w]


def _object_at(obj: _Object, t: float, camera: np.ndarray, xs: np.ndarray, ys: np.ndarray, scale: float):
    """Coverage mask and texture colours of one object at time ``t`` over pixel grids ``xs``, ``ys``."""
    cx, cy = obj.center + obj.velocity * t + obj.swing * np.sin(obj.swing_freq * t + obj.swing_phase) - camera
    r = obj.radius * (1 + obj.grow * math.sin(obj.grow_freq * t + obj.grow_phase)) * scale
    a = obj.angle + obj.spin * t
    dx, dy = xs - cx * xs.shape[1], ys - cy * xs.shape[0]
    # object-local coordinates, in units of the object's radius
    u = (math.cos(a) * dx + math.sin(a) * dy) / r
    v = (-math.sin(a) * dx + math.cos(a) * dy) / (r * obj.aspect)
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    k = np.arange(1, obj.shape.shape[1] + 1, dtype=np.float32)
    edge = 1 + (obj.shape[0][:, None, None] * np.cos(k[:, None, None] * phi + obj.shape[1][:, None, None])).sum(0)
    inside = rho <= edge
    tile = obj.texture.shape[0]
    return inside, _sample(obj.texture, (u + 1.5) * tile / 3, (v + 1.5) * tile / 3)


def render_video(
    video_id: int,
    num_frames: int,
    height: int = 64,
    width: int = 64,
    start: int = 0,
    frame_step: int = 1,
    max_objects: int = 3,
    texture_files: Optional[Sequence[Path]] = None,
    times: Optional[Sequence[int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render frames ``start, start + frame_step, ...`` (or the given ``times``) of video ``video_id``.

    Args:
        video_id: which video; the same id always gives the same pixels.
        num_frames: ``T``.
        height, width: ``H``, ``W`` in pixels.
        start, frame_step: the time of the first rendered frame and the step between frames.
        max_objects: the video has between 1 and this many objects (ids ``1..n``).
        texture_files: image files to texture objects and background with (see
            :func:`list_texture_images`); procedural textures when ``None``.
        times: the frame times to render, overriding ``num_frames``, ``start`` and ``frame_step``.

    Returns:
        ``video`` ``(T, 3, H, W)`` float32 in [0, 1] and ``labels`` ``(T, H, W)`` int64 object ids.
    """
    for name, value, low in (("num_frames", num_frames, 1), ("height", height, 8), ("width", width, 8),
                             ("frame_step", frame_step, 1), ("max_objects", max_objects, 1), ("start", start, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if times is None:
        times = [start + i * frame_step for i in range(num_frames)]
    times = [int(t) for t in times]
    if not times or min(times) < 0:
        raise ValueError(f"times must be a non-empty sequence of frame times >= 0, got {times}")
    num_frames = len(times)
    scene = _scene(int(video_id), max_objects, texture_files)
    noise_rng = np.random.default_rng([int(video_id) & 0xFFFFFFFF, int(video_id) >> 32, 2, *times])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    scale = min(height, width)
    bg_per_px = BACKGROUND_TEXTURE / (2.0 * max(height, width))
    frames = np.empty((num_frames, height, width, 3), np.float32)
    labels = np.zeros((num_frames, height, width), np.int64)
    for i in range(num_frames):
        t = float(times[i])
        # camera offset in units of the frame size; objects live in world coordinates
        camera = scene.pan * t + scene.pan_swing * math.sin(scene.pan_freq * t + scene.pan_phase)
        img = _sample(scene.background, (xs + camera[0] * width) * bg_per_px, (ys + camera[1] * height) * bg_per_px)
        lab = labels[i]
        for obj_id, obj in enumerate(scene.objects, start=1):  # later objects are in front
            inside, colour = _object_at(obj, t, camera, xs, ys, scale)
            img = np.where(inside[..., None], colour, img)
            lab[inside] = obj_id
        if scene.noise > 0:
            img = img + noise_rng.normal(0, scene.noise, img.shape).astype(np.float32)
        frames[i] = np.clip(img, 0, 1)
    return torch.from_numpy(rearrange(frames, "t h w c -> t c h w").copy()), torch.from_numpy(labels)


def validation_videos(
    count: int = 16,
    num_frames: int = 30,
    height: int = 64,
    width: int = 64,
    max_objects: int = 3,
    texture_files: Optional[Sequence[Path]] = None,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The fixed validation set: ``count`` videos with odd ids, as ``(name, video, labels)``.

    Every object of a validation video is visible in its first frame (the DAVIS protocol
    scores the objects of the first ground-truth frame); a video whose first frame misses
    one is replaced by the next odd id, deterministically.
    """
    videos = []
    index = 0
    while len(videos) < count:
        vid = val_video_id(index)
        index += 1
        video, labels = render_video(vid, num_frames, height, width, max_objects=max_objects, texture_files=texture_files)
        n = int(labels.max())
        first = torch.bincount(labels[0].flatten(), minlength=n + 1)
        if n == 0 or (first[1:] < 0.01 * height * width).any():
            continue
        videos.append((f"synth{vid:05d}", video, labels))
    return videos
