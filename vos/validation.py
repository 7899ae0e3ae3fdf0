"""The one validation pipeline: run a segmenter over videos, write its masks (and overlays), score it.

train.py's end-of-run validation and ``evaluate.py --checkpoint/--baseline`` both call
:func:`run_videos` on the videos of :func:`synthetic_videos` / :func:`dataset_videos`, so
``evaluate.py --data synthetic`` reproduces a run's ``metrics.json`` by construction.
"""
from __future__ import annotations

import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .config import RunConfig
from .layout import MASK_SUFFIX
from .masks import write_mask
from .metrics import VOID_ID, score_sequence, summarize
from .scoring import warn_ground_truth
from .segmenters import ModelSegmenter, copy_first_frame

Segmenter = Callable[[np.ndarray, Mapping[int, np.ndarray]], np.ndarray]


@dataclass
class Video:
    """One video to segment.

    Attributes:
        name: sequence name.
        frame_names: ``T`` frame names (output file stems).
        load: returns ``(frames (T, H, W, 3) uint8 or float in [0, 1], masks)``, masks a list of ``T``
            ``(H, W)`` id arrays or ``None`` where a frame has no annotation.
        first_frames: object id -> frame that gives it (YouTube-VOS); empty: every object of
            the first frame's mask is given on frame 0 (DAVIS).
        youtube: write the YouTube-VOS submission layout.
    """

    name: str
    frame_names: list[str]
    load: Callable[[], tuple[np.ndarray, list[Optional[np.ndarray]]]]
    first_frames: dict[int, int] = field(default_factory=dict)
    youtube: bool = False


def synthetic_videos(config: RunConfig) -> list[Video]:
    """The fixed synthetic validation videos of a run (``config.eval`` and ``config.data``), frames
    float32 ``(T, H, W, 3)`` in ``[0, 1]``."""
    from einops import rearrange

    from .synthetic import list_texture_images, validation_videos

    data, ev = config.data, config.eval
    textures = list_texture_images(data.texture_dir) if data.texture_dir else None
    out = []
    for name, video, labels in validation_videos(ev.val_videos, ev.val_frames, data.crop, data.crop,
                                                 data.max_objects, textures):
        frames = rearrange(video, "t c h w -> t h w c").numpy()
        masks = list(labels.numpy().astype(np.uint8))
        out.append(Video(name, [f"{t:05d}" for t in range(len(masks))], lambda f=frames, m=masks: (f, m)))
    return out


def dataset_videos(root: str | os.PathLike, split: Optional[str], sequences: Optional[Sequence[str]]) -> list[Video]:
    """The videos of a dataset folder in any layout :mod:`vos.datasets` reads."""
    from .datasets import detect_layout, load_sequence, open_dataset
    from .layout import DEFAULT_EVAL_SPLIT

    layout = detect_layout(root)
    seqs = open_dataset(root, split or DEFAULT_EVAL_SPLIT.get(layout))
    if sequences is not None:
        by_name = {s.name: s for s in seqs}
        unknown = [s for s in sequences if s not in by_name]
        if unknown:
            raise ValueError(f"--sequences {unknown} not found in {root} (have: {sorted(by_name)})")
        seqs = [by_name[s] for s in sequences]
    return [Video(s.name, s.frame_names, lambda s=s: load_sequence(s), dict(s.first_frames), youtube=(layout == "youtube"))
            for s in seqs]


def given_masks(video: Video, masks: Sequence[Optional[np.ndarray]]) -> dict[int, np.ndarray]:
    """``{frame: (H, W) ids of the objects first given on that frame}``: the semi-supervised input.

    DAVIS: the whole first mask (void removed). YouTube-VOS: each object on the frame that
    first annotates it.
    """
    if not video.first_frames:
        if masks[0] is None:
            raise ValueError(f"{video.name}: the first frame has no mask to start from")
        return {0: np.where(masks[0] == VOID_ID, 0, masks[0]).astype(np.uint8)}
    given: dict[int, np.ndarray] = {}
    for obj, t in sorted(video.first_frames.items()):
        mask = masks[t]
        if mask is None:
            raise ValueError(f"{video.name}: object {obj} starts on frame {video.frame_names[t]}, which has no mask")
        given.setdefault(t, np.zeros(mask.shape, np.uint8))[mask == obj] = obj
    return given


def _as_uint8(frames: np.ndarray) -> np.ndarray:
    return frames if frames.dtype == np.uint8 else (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def _write_video(out_dir: Path, video: Video, frames: np.ndarray, pred: np.ndarray, overlays: bool, gif_fps: float) -> None:
    """``masks/<seq>/`` (YouTube-VOS: ``masks/Annotations/<seq>/``), and overlays + a GIF."""
    from .visualize import overlay, save_gif, save_image

    mask_dir = out_dir / "masks" / ("Annotations" if video.youtube else "") / video.name
    for name, m in zip(video.frame_names, pred):
        write_mask(mask_dir / f"{name}{MASK_SUFFIX}", m)
    if overlays:
        blended = [overlay(f, m) for f, m in zip(_as_uint8(frames), pred)]
        for name, img in zip(video.frame_names, blended):
            save_image(out_dir / "overlays" / video.name / f"{name}.jpg", img)
        save_gif(out_dir / "overlays" / f"{video.name}.gif", blended, fps=gif_fps)


def run_videos(
    videos: Sequence[Video],
    segment: Segmenter,
    out_dir: Optional[str | os.PathLike],
    *,
    overlays: int | bool = True,
    gif_fps: float = 10.0,
    bound_th: float = 0.008,
    progress: bool = True,
) -> tuple[Optional[dict], list[str], dict]:
    """Segment every video, write its masks (and overlays for the first ``overlays`` videos,
    all when ``True``) under ``out_dir`` (``None``: write nothing), and score it where it has
    full ground truth.

    Returns:
        ``(results or None when nothing was scored, scored sequence names, speed)`` with
        ``speed = {"frames", "seconds", "fps", "cpu_seconds", "fps_per_cpu_second"}`` over the
        segmenter's calls only (CPU time of this process, all its threads).
    """
    per_object: dict[str, dict[str, float]] = {}
    scored: list[str] = []
    frames_done, seconds, cpu_seconds = 0, 0.0, 0.0
    bar = tqdm(videos, desc="sequences", unit="seq", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i, video in enumerate(bar):
        frames, masks = video.load()
        start, cpu_start = time.perf_counter(), time.process_time()
        pred = segment(frames, given_masks(video, masks))
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        frames_done += len(frames)
        if pred.shape != frames.shape[:3]:
            raise RuntimeError(f"{video.name}: segmenter returned {pred.shape}, expected {frames.shape[:3]}")
        if out_dir is not None:
            _write_video(Path(out_dir), video, frames, pred, overlays is True or i < int(overlays), gif_fps)
        if all(m is not None for m in masks) and not video.youtube:
            warn_ground_truth(video.name, masks, video.name)
            objects = score_sequence(pred, np.stack(masks), name=video.name, frame_names=video.frame_names,
                                     bound_th=bound_th)
            per_object.update(objects)
            scored.append(video.name)
            if objects:
                bar.set_postfix_str(f"{video.name} J&F {np.mean([(o['J-Mean'] + o['F-Mean']) / 2 for o in objects.values()]):.3f}")
    # CPU time too: on a shared machine wall time measures the neighbours; with one thread,
    # frames per CPU-second is what an idle core gives
    speed = {"frames": frames_done, "seconds": seconds, "fps": frames_done / max(seconds, 1e-9),
             "cpu_seconds": cpu_seconds, "fps_per_cpu_second": frames_done / max(cpu_seconds, 1e-9)}
    return (summarize(per_object) if scored else None), scored, speed


def peak_memory(device: torch.device) -> dict[str, object]:
    """Peak memory of this process so far (CUDA allocator, else resident set)."""
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "CUDA allocated"}
    return {"peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "resident set of the process"}


def summary(results: Mapping) -> dict[str, float]:
    """``{"J&F", "J", "F"}`` of a :func:`vos.metrics.summarize` result."""
    g = results["global"]
    return {"J&F": g["J&F-Mean"], "J": g["J-Mean"], "F": g["F-Mean"]}


def validate(model: torch.nn.Module, config: RunConfig, out_dir: Optional[Path], device: torch.device,
             progress: bool = True) -> dict[str, object]:
    """train.py's validation: the model and the copy baseline on the synthetic validation videos.

    Returns:
        ``metrics.json``'s content: J&F/J/F of the model, ``baseline`` (copy), data, speed, globals.
    """
    videos = synthetic_videos(config)
    segmenter = ModelSegmenter(model, config.model.tau, device)
    with warnings.catch_warnings():
        # an object the model loses for the whole video is scored as empty: expected, not news
        warnings.simplefilter("ignore", UserWarning)
        ours, _, speed = run_videos(videos, segmenter, out_dir, overlays=config.eval.overlays, progress=progress)
        base, _, _ = run_videos(videos, copy_first_frame, None, progress=False)
    return {
        **summary(ours), "baseline": summary(base),
        "data": {"videos": len(videos), "frames": config.eval.val_frames, "size": config.data.crop,
                 "objects": len(ours["per_object"])},
        "propagation_fps": speed["fps"], "global": ours["global"], "baseline_global": base["global"],
    }


__all__ = ["Video", "synthetic_videos", "dataset_videos", "given_masks", "run_videos", "validate", "summary", "peak_memory"]
