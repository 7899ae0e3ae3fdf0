"""Score video object segmentation with the official DAVIS 2017 measures, and run a model
(or the copy-first-frame baseline) over a dataset: masks, overlays, GIFs, speed and scores.

    # score a folder of predictions
    python evaluate.py --predictions PRED --ground-truth GT --out results.json
    # run a trained model, write masks/overlays/GIFs, score where ground truth exists
    python evaluate.py --checkpoint RUN/ckpt.pt --data synthetic|DIR --out OUTDIR
    # the same for the baseline that copies the first frame's mask to every frame
    python evaluate.py --baseline copy --data ../shared/data/davis-sample --out OUTDIR

The numbers are those of davis2017-evaluation (see models/davis_metrics.py for every rule
carried over); results.json holds the global and per-object statistics, and the two
official CSVs are written next to it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.davis_metrics import GLOBAL_KEYS, VOID_ID, per_sequence_means, score_sequence, summarize
from models.mask_io import read_mask, write_mask

MASK_MODES = ("P", "L", "1", "I;16", "I")  # what models.mask_io.read_mask decodes as ids

HELP_EPILOG = """\
ground-truth layouts: GT/<seq>/<frame>.png, GT/<seq>/Annotations/<frame>.png, or a DAVIS 2017
root (GT/Annotations/480p/<seq>/, sequences from GT/ImageSets/2017/<split>.txt). Predictions:
PRED/<seq>/<frame>.png for every ground-truth frame but the first and the last. Masks are
palette PNGs (index = object id; 255 = void in ground truth) or 8-bit 0/255 (one object).

errors (nothing is scored; the official evaluation also stops on each of these):
  a missing prediction frame; a prediction whose size differs from its ground truth;
  a predicted id above the ground truth's object count; an RGB/RGBA mask; a sequence
  with fewer than 3 ground-truth frames; a sequence missing from PRED.
warnings (scored as the official evaluation does, unless said otherwise):
  void (255) ground-truth pixels: scored as background, as officially;
  ids that first appear after the first ground-truth frame: not scored, as officially;
  a sequence whose first ground-truth frame is empty: no object scored, as officially;
  prediction files without a ground-truth frame: ignored, as officially;
  an object id never predicted in the scored frames: scored as an empty prediction
  (the official script stops here instead).
note: 8-bit 0/255 masks are read as object 1 (DAVIS 2016 format), where the official 2017
code would read 255 as void (ground truth) or as id 255 (predictions).
"""


# ---------------------------------------------------------------------------------------
# Scoring folders


@dataclass
class GTSequence:
    """A ground-truth sequence: its annotated frames in order (name = file stem)."""

    name: str
    masks: list[Path]

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.masks]


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())


def find_ground_truth(root: str | os.PathLike, sequences: Optional[Sequence[str]] = None, split: str = "val") -> list[GTSequence]:
    """The ground-truth sequences under ``root`` (see the layouts in ``--help``), in name order.

    Raises:
        ValueError: no such folder, no sequence, a requested sequence that is not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--ground-truth {root}: no such folder")
    davis_root = root / "Annotations" / "480p"
    found: dict[str, Path] = {}
    if davis_root.is_dir():
        listing = root / "ImageSets" / "2017" / f"{split}.txt"
        names = (
            [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
            if listing.is_file() and sequences is None
            else sorted(d.name for d in davis_root.iterdir() if d.is_dir())
        )
        found = {n: davis_root / n for n in names}
    else:
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            if (d / "Annotations").is_dir():
                found[d.name] = d / "Annotations"
            elif any(p.suffix.lower() == ".png" for p in d.iterdir()):
                found[d.name] = d
    if sequences is not None:
        unknown = [s for s in sequences if s not in found]
        if unknown:
            raise ValueError(f"--sequences {unknown} not found under {root} (have: {sorted(found)})")
        found = {s: found[s] for s in sequences}
    if not found:
        raise ValueError(f"--ground-truth {root}: no sequence folder with PNG masks")
    out = []
    for name, folder in found.items():
        if not folder.is_dir():
            raise ValueError(f"ground-truth folder {folder} of sequence {name!r} does not exist")
        masks = _pngs(folder)
        if len(masks) < 3:
            raise ValueError(
                f"{folder}: {len(masks)} ground-truth frame(s); the first and last are not scored, so at least 3 are needed"
            )
        out.append(GTSequence(name, masks))
    return out


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (W, H) of an image from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except OSError as err:
        raise ValueError(f"{path}: cannot read image ({err})") from None


def _check_mask_header(path: Path, size: Optional[tuple[int, int]], against: Optional[Path]) -> tuple[int, int]:
    mode, wh = _header(path)
    if mode not in MASK_MODES:
        raise ValueError(
            f"{path}: mask has mode {mode!r}; expected a palette PNG (mode 'P', index = object id) "
            "or an 8-bit grayscale mask (0/255 for one object)"
        )
    if size is not None and wh != size:
        raise ValueError(f"{path}: mask is {wh[0]}x{wh[1]} but {against} is {size[0]}x{size[1]}")
    return wh


def check_predictions(pred_root: str | os.PathLike, gt: Sequence[GTSequence]) -> dict[str, list[Path]]:
    """Every prediction file the evaluation will read, checked from headers before any work.

    Returns:
        ``{sequence: prediction paths of the scored frames}`` (first and last GT frames excluded).

    Raises:
        ValueError: a missing folder or frame, a mask that is RGB, or whose size differs from its ground truth.
    """
    pred_root = Path(pred_root)
    if not pred_root.is_dir():
        raise ValueError(f"--predictions {pred_root}: no such folder")
    files = {}
    for seq in gt:
        folder = pred_root / seq.name
        if not folder.is_dir():
            raise ValueError(f"{folder}: predictions for sequence {seq.name!r} not found")
        size = _check_mask_header(seq.masks[0], None, None)
        paths = []
        for gt_path in seq.masks[1:-1]:
            _check_mask_header(gt_path, size, seq.masks[0])
            path = folder / f"{gt_path.stem}.png"
            if not path.is_file():
                raise ValueError(f"{path}: prediction missing for ground-truth frame {gt_path}")
            _check_mask_header(path, size, gt_path)
            paths.append(path)
        stems = set(seq.frame_names)
        orphans = [p.name for p in _pngs(folder) if p.stem not in stems]
        if orphans:
            warnings.warn(f"{folder}: {len(orphans)} prediction file(s) without a ground-truth frame are ignored "
                          f"(e.g. {orphans[0]})", stacklevel=2)
        files[seq.name] = paths
    return files


def _ground_truth_ids(seq_name: str, masks: Sequence[np.ndarray], where: str) -> None:
    """Warn about the cases the official evaluation tolerates in ground truth."""
    first = np.where(masks[0] == VOID_ID, 0, masks[0])
    if not first.any():
        warnings.warn(f"{where}: the first ground-truth frame of {seq_name!r} has no object; nothing is scored",
                      stacklevel=3)
    if any((m == VOID_ID).any() for m in masks):
        warnings.warn(f"{seq_name}: void (255) ground-truth pixels are scored as background, as officially",
                      stacklevel=3)
    late = sorted(set(np.unique(np.stack(masks))) - set(range(int(first.max()) + 1)) - {VOID_ID})
    if late:
        warnings.warn(f"{seq_name}: id(s) {[int(i) for i in late]} are not in the first ground-truth frame and are "
                      "not scored, as officially", stacklevel=3)


def score_folders(
    pred_root: str | os.PathLike,
    gt_root: str | os.PathLike,
    sequences: Optional[Sequence[str]] = None,
    *,
    split: str = "val",
    bound_th: float = 0.008,
    progress: bool = True,
) -> tuple[dict, list[str]]:
    """Score a folder of predictions against a folder of ground truth.

    Returns:
        ``(results, sequence names)``; ``results`` as :func:`models.davis_metrics.summarize`.
    """
    gt = find_ground_truth(gt_root, sequences, split)
    pred_files = check_predictions(pred_root, gt)
    per_object: dict[str, dict[str, float]] = {}
    for seq in tqdm(gt, desc="sequences", unit="seq", disable=not progress, file=sys.stderr):
        gt_masks = [read_mask(p) for p in seq.masks]
        _ground_truth_ids(seq.name, gt_masks, str(seq.masks[0]))
        pred = np.zeros((len(gt_masks), *gt_masks[0].shape), dtype=np.uint8)  # first/last are not scored
        for t, path in enumerate(pred_files[seq.name], start=1):
            pred[t] = read_mask(path)
        names = [str(seq.masks[0])] + [str(p) for p in pred_files[seq.name]] + [str(seq.masks[-1])]
        per_object.update(score_sequence(pred, np.stack(gt_masks), name=seq.name, frame_names=names, bound_th=bound_th))
    return summarize(per_object), [s.name for s in gt]


# ---------------------------------------------------------------------------------------
# Writing and printing results


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_safe(obj):
    """NaN/inf -> null: results.json stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.3f}"  # pandas' float_format="%.3f", NaN empty


def write_results(results: Mapping, json_path: str | os.PathLike, split: str = "val") -> list[Path]:
    """results.json plus the official CSVs (``global_results-<split>.csv``, ``per-sequence_results-<split>.csv``)
    next to it, each written atomically.

    Returns:
        the paths written.
    """
    json_path = Path(json_path)
    payload = {"global": dict(results["global"]), "per_object": dict(results["per_object"])}
    _atomic_write_text(json_path, json.dumps(_json_safe(payload), indent=2) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(GLOBAL_KEYS)
    w.writerow([_fmt(results["global"][k]) for k in GLOBAL_KEYS])
    global_csv = json_path.parent / f"global_results-{split}.csv"
    _atomic_write_text(global_csv, buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Sequence", "J-Mean", "F-Mean"])
    for name, stats in results["per_object"].items():
        w.writerow([name, _fmt(stats["J-Mean"]), _fmt(stats["F-Mean"])])
    seq_csv = json_path.parent / f"per-sequence_results-{split}.csv"
    _atomic_write_text(seq_csv, buf.getvalue())
    return [json_path, global_csv, seq_csv]


def format_report(results: Mapping, sequences: Sequence[str]) -> str:
    """The per-sequence table (means over each sequence's objects) and the global line."""
    table = per_sequence_means(results, sequences)
    width = max([len("sequence")] + [len(s) for s in sequences])
    lines = [f"{'sequence':<{width}}  objects  J-Mean  F-Mean  J&F-Mean"]
    for seq, row in table.items():
        lines.append(f"{seq:<{width}}  {row['objects']:>7}  {row['J-Mean']:6.3f}  {row['F-Mean']:6.3f}  {row['J&F-Mean']:8.3f}")
    g = results["global"]
    lines.append("-" * len(lines[0]))
    lines.append(f"global over {len(results['per_object'])} object(s): " + "  ".join(f"{k} {g[k]:.3f}" for k in GLOBAL_KEYS))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Running a segmenter over a dataset


@dataclass
class Video:
    """One video to segment.

    Attributes:
        name: sequence name.
        frame_names: ``T`` frame names (output file stems).
        load: returns ``(frames (T, H, W, 3) uint8 or float in [0, 1], masks)``, masks a list of ``T`` ``(H, W)``
            id arrays or ``None`` where a frame has no annotation.
        first_frames: object id -> frame that gives it (YouTube-VOS); empty: every object of
            the first frame's mask is given on frame 0 (DAVIS).
        youtube: write the YouTube-VOS submission layout.
    """

    name: str
    frame_names: list[str]
    load: Callable[[], tuple[np.ndarray, list[Optional[np.ndarray]]]]
    first_frames: dict[int, int] = field(default_factory=dict)
    youtube: bool = False


def synthetic_videos(count: int, num_frames: int, size: int, max_objects: int = 3,
                     texture_dir: Optional[str] = None) -> list[Video]:
    """The fixed synthetic validation videos (the ones train.py scores), frames as float32 in [0, 1]."""
    from einops import rearrange

    from models.synthetic import list_texture_images, validation_videos

    textures = list_texture_images(texture_dir) if texture_dir else None
    out = []
    for name, video, labels in validation_videos(count, num_frames, size, size, max_objects, textures):
        frames = rearrange(video, "t c h w -> t h w c").numpy()
        masks = [m for m in labels.numpy().astype(np.uint8)]
        out.append(Video(name, [f"{t:05d}" for t in range(len(masks))], lambda f=frames, m=masks: (f, m)))
    return out


def _as_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def dataset_videos(root: str | os.PathLike, split: Optional[str], sequences: Optional[Sequence[str]]) -> list[Video]:
    """The videos of a dataset folder in any layout models.datasets reads."""
    from models.datasets import detect_layout, load_sequence, open_dataset

    layout = detect_layout(root)
    split = split or {"davis": "val", "youtube": "valid"}.get(layout)
    seqs = open_dataset(root, split)
    if sequences is not None:
        by_name = {s.name: s for s in seqs}
        unknown = [s for s in sequences if s not in by_name]
        if unknown:
            raise ValueError(f"--sequences {unknown} not found in {root} (have: {sorted(by_name)})")
        seqs = [by_name[s] for s in sequences]
    return [
        Video(s.name, s.frame_names, lambda s=s: load_sequence(s), dict(s.first_frames), youtube=(layout == "youtube"))
        for s in seqs
    ]


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
        layer = given.setdefault(t, np.zeros(mask.shape, np.uint8))
        layer[mask == obj] = obj
    return given


def copy_first_frame(frames: np.ndarray, given: Mapping[int, np.ndarray]) -> np.ndarray:
    """The baseline: every frame repeats the masks given so far (later objects pasted on top).

    Args:
        frames: ``(T, H, W, 3)`` (only their count and size are used).
        given: ``{frame: (H, W) ids}`` as :func:`given_masks`.

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


class ModelSegmenter:
    """Segments a video with a trained SST through the streaming propagator
    (:meth:`models.Propagator.segment_video`: one frame at a time, memory bounded by tau).

    Args:
        checkpoint: a checkpoint written by train.py.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        short_side: run the model on frames resized to this short side (bilinear; given
            masks nearest) and bring the ids back to full size (nearest); ``None``: full size.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", short_side: Optional[int] = None) -> None:
        import torch

        from models.checkpoint import load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.config = load_model(checkpoint, map_location="cpu")
        self.model.to(self.device)
        self.tau = int(self.config.get("tau", self.model.tau))
        if short_side is not None and short_side < 8:
            raise ValueError(f"--infer-short-side must be >= 8, got {short_side}")
        self.short_side = short_side

    def _size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) the model runs at."""
        if self.short_side is None or min(h, w) == self.short_side:
            return h, w
        scale = self.short_side / min(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(self, frames: np.ndarray, given: Mapping[int, np.ndarray]) -> np.ndarray:
        import torch
        from einops import rearrange

        from models import Propagator

        T, H, W = frames.shape[:3]
        h, w = self._size(H, W)
        prop = Propagator(self.model, tau=self.tau, keep_first=True)

        def stream():
            for f in frames:
                # uint8 frames are scaled by the propagator; synthetic frames come as floats in [0, 1]
                x = torch.from_numpy(np.ascontiguousarray(rearrange(f, "h w c -> c h w"))).to(self.device)
                if (h, w) != (H, W):
                    x = torch.nn.functional.interpolate(x[None].float(), size=(h, w), mode="bilinear",
                                                        align_corners=False, antialias=True)[0]
                    x = x.div_(255) if f.dtype == np.uint8 else x
                yield x

        annotations = {t: torch.from_numpy(_resize_ids(m, h, w).astype(np.int64)) for t, m in given.items()}
        ids = prop.segment_video(stream(), annotations).numpy().astype(np.uint8)
        if (h, w) != (H, W):
            ids = np.stack([_resize_ids(m, H, W) for m in ids])
            for t, m in given.items():  # a given object is exactly its mask on its frame, as in the propagator
                objs = np.unique(m[m > 0])
                ids[t] = np.where(m > 0, m, np.where(np.isin(ids[t], objs), 0, ids[t]))
        return ids


def _resize_ids(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W)`` ids to ``(h, w)``."""
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST))


def _peak_memory_mib(device: Optional[str]) -> tuple[str, float]:
    if device == "cuda":
        import torch

        return "peak CUDA memory allocated", torch.cuda.max_memory_allocated() / 2**20
    return "peak resident memory of the process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_dataset(
    videos: Sequence[Video],
    segment: Callable[[np.ndarray, Mapping[int, np.ndarray]], np.ndarray],
    out_dir: str | os.PathLike,
    *,
    overlays: bool = True,
    gif_fps: float = 10.0,
    bound_th: float = 0.008,
    progress: bool = True,
) -> tuple[Optional[dict], list[str], dict]:
    """Segment every video, write its masks, overlays and GIF, and score it where it has ground truth.

    Layout under ``out_dir``: ``masks/<seq>/<frame>.png`` (DAVIS) or
    ``masks/Annotations/<seq>/<frame>.png`` (YouTube-VOS submission), ``overlays/<seq>/<frame>.jpg``
    and ``overlays/<seq>.gif``.

    Returns:
        ``(results or None when nothing had full ground truth, scored sequence names, speed)``
        with ``speed = {"frames", "seconds", "fps"}`` over the segmenter's calls only.
    """
    from models.visualize import overlay, save_gif, save_image

    out_dir = Path(out_dir)
    per_object: dict[str, dict[str, float]] = {}
    scored: list[str] = []
    total_frames, total_seconds = 0, 0.0
    bar = tqdm(videos, desc="sequences", unit="seq", disable=not progress, file=sys.stderr)
    for video in bar:
        frames, masks = video.load()
        given = given_masks(video, masks)
        start = time.perf_counter()
        pred = segment(frames, given)
        total_seconds += time.perf_counter() - start
        total_frames += len(frames)
        if pred.shape != frames.shape[:3]:
            raise RuntimeError(f"{video.name}: segmenter returned {pred.shape}, expected {frames.shape[:3]}")

        mask_dir = out_dir / "masks" / ("Annotations" if video.youtube else "") / video.name
        for name, m in zip(video.frame_names, pred):
            write_mask(mask_dir / f"{name}.png", m)
        if overlays:
            blended = [overlay(f, m) for f, m in zip(_as_uint8(frames), pred)]
            for name, img in zip(video.frame_names, blended):
                save_image(out_dir / "overlays" / video.name / f"{name}.jpg", img)
            save_gif(out_dir / "overlays" / f"{video.name}.gif", blended, fps=gif_fps)

        if all(m is not None for m in masks) and not video.youtube:
            _ground_truth_ids(video.name, masks, video.name)
            seq_objects = score_sequence(pred, np.stack(masks), name=video.name, frame_names=video.frame_names,
                                         bound_th=bound_th)
            per_object.update(seq_objects)
            scored.append(video.name)
            if seq_objects:
                jf = np.mean([(o["J-Mean"] + o["F-Mean"]) / 2 for o in seq_objects.values()])
                bar.set_postfix_str(f"{video.name} J&F {jf:.3f}")
    speed = {"frames": total_frames, "seconds": total_seconds, "fps": total_frames / max(total_seconds, 1e-9)}
    return (summarize(per_object) if scored else None), scored, speed


# ---------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DAVIS 2017 J&F of a prediction folder, or of a model / the copy baseline run over a dataset.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--predictions", metavar="PRED", help="folder of predicted masks PRED/<seq>/<frame>.png")
    what.add_argument("--checkpoint", metavar="CKPT", help="checkpoint written by train.py, run over --data")
    what.add_argument("--baseline", choices=["copy"], help="copy the first frame's mask to every frame, over --data")
    p.add_argument("--ground-truth", metavar="GT", help="ground-truth folder (with --predictions)")
    p.add_argument("--data", metavar="synthetic|DIR",
                   help="dataset to run over: 'synthetic' (train.py's validation videos) or a DAVIS 2017, "
                        "YouTube-VOS or <seq>/JPEGImages+Annotations folder")
    p.add_argument("--sequences", nargs="+", metavar="SEQ", help="only these sequences")
    p.add_argument("--split", default=None,
                   help="dataset split (DAVIS: val, YouTube-VOS: valid); also names the CSVs (default val)")
    p.add_argument("--out", metavar="PATH",
                   help="results JSON path (ending in .json; CSVs beside it) or output folder "
                        "(default: PRED/results.json when scoring, runs/eval-<what> when running)")
    p.add_argument("--bound-th", type=float, default=0.008,
                   help="F tolerance: fraction of the image diagonal, or pixels when >= 1 (official 0.008)")
    p.add_argument("--device", default="auto", help="model device: auto, cpu, cuda")
    p.add_argument("--infer-short-side", type=int, default=None, metavar="PX",
                   help="run the model at this short side (e.g. 240 for 480p DAVIS); masks are written and "
                        "scored at full size (default: full size)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay frames and GIFs")
    p.add_argument("--gif-fps", type=float, default=10.0, help="frames per second of the GIFs")
    p.add_argument("--synthetic-videos", type=int, default=None,
                   help="synthetic validation videos (default: the checkpoint's, else 16)")
    p.add_argument("--synthetic-frames", type=int, default=None,
                   help="frames per synthetic video (default: the checkpoint's, else 30)")
    p.add_argument("--synthetic-size", type=int, default=None,
                   help="height = width of synthetic videos (default: the checkpoint's crop, else 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _output_paths(out: Optional[str], default_dir: Path) -> tuple[Path, Path]:
    """(folder for masks/overlays, results.json path)."""
    if out is None:
        return default_dir, default_dir / "results.json"
    out_path = Path(out)
    if out_path.suffix.lower() == ".json":
        return out_path.parent, out_path
    return out_path, out_path / "results.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    modes = [m for m in ("predictions", "checkpoint", "baseline") if getattr(args, m)]
    if len(modes) != 1:
        parser.error("give exactly one of --predictions, --checkpoint, --baseline")
    if args.bound_th <= 0:
        parser.error(f"--bound-th must be > 0, got {args.bound_th}")
    split = args.split or "val"
    with warnings.catch_warnings():  # restores the caller's warning state on return
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        return _run(parser, args, modes[0], split)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, mode: str, split: str) -> int:
    try:
        if args.predictions:
            if not args.ground_truth:
                parser.error("--predictions needs --ground-truth")
            if args.data or args.checkpoint:
                parser.error("--data is for --checkpoint/--baseline, not --predictions")
            _, json_path = _output_paths(args.out, Path(args.predictions))
            results, sequences = score_folders(args.predictions, args.ground_truth, args.sequences, split=split,
                                               bound_th=args.bound_th, progress=not args.no_progress)
            print(format_report(results, sequences))
            for path in write_results(results, json_path, split):
                print(f"wrote {path}")
            return 0

        if not args.data:
            parser.error(f"--{mode} needs --data synthetic|DIR")
        if args.infer_short_side is not None and not args.checkpoint:
            parser.error("--infer-short-side is for --checkpoint")
        segmenter = (ModelSegmenter(args.checkpoint, args.device, args.infer_short_side) if args.checkpoint
                     else copy_first_frame)
        if args.data == "synthetic":
            # by default the videos train.py validated on, so that the numbers are comparable
            cfg = getattr(segmenter, "config", {})
            ev, data = cfg.get("eval", {}), cfg.get("data", {})
            settings = {
                "count": ev.get("videos", 16) if args.synthetic_videos is None else args.synthetic_videos,
                "num_frames": ev.get("frames", 30) if args.synthetic_frames is None else args.synthetic_frames,
                "size": data.get("crop", 64) if args.synthetic_size is None else args.synthetic_size,
                "max_objects": data.get("max_objects", 3),
                "texture_dir": data.get("texture_dir"),
            }
            for key in ("count", "num_frames", "size"):
                if settings[key] < 1 or (key == "num_frames" and settings[key] < 3):
                    parser.error(f"synthetic {key} must be >= {3 if key == 'num_frames' else 1}, got {settings[key]}")
            videos = synthetic_videos(**settings)
            data_name = "synthetic"
        else:
            videos = dataset_videos(args.data, args.split, args.sequences)
            data_name = Path(args.data).resolve().name
        if args.data == "synthetic" and args.sequences:
            keep = set(args.sequences)
            unknown = keep - {v.name for v in videos}
            if unknown:
                parser.error(f"--sequences {sorted(unknown)} are not synthetic validation videos")
            videos = [v for v in videos if v.name in keep]

        device = None
        if args.checkpoint:
            device = segmenter.device.type
            what = f"{Path(args.checkpoint).parent.name or Path(args.checkpoint).stem}-{data_name}"
        else:
            what = f"baseline-copy-{data_name}"
        out_dir, json_path = _output_paths(args.out, Path("runs") / f"eval-{what}")
        results, scored, speed = run_dataset(videos, segmenter, out_dir, overlays=not args.no_overlays,
                                             gif_fps=args.gif_fps, bound_th=args.bound_th,
                                             progress=not args.no_progress)
        mem_label, mem = _peak_memory_mib(device)
        speed_path = out_dir / "speed.json"
        _atomic_write_text(speed_path, json.dumps(
            {**speed, "device": device or "cpu", "peak_memory_mib": mem, "peak_memory_kind": mem_label}, indent=2) + "\n")
        print(f"{speed['frames']} frames in {speed['seconds']:.2f} s: {speed['fps']:.1f} frames/s; "
              f"{mem_label}: {mem:.0f} MiB")
        print(f"wrote masks to {out_dir / 'masks'}" + ("" if args.no_overlays else f", overlays and GIFs to {out_dir / 'overlays'}"))
        if results is None:
            print("no sequence has ground truth on every frame: nothing scored")
            return 0
        print(format_report(results, scored))
        for path in write_results(results, json_path, split):
            print(f"wrote {path}")
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
