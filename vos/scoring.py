"""Scoring a folder of predicted masks against ground truth with the official DAVIS 2017 measures.

Every prediction file is checked from its header before any work (missing frames, sizes,
modes); results are written as ``results.json`` plus the two official CSVs.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from .files import save_json, write_text
from .layout import MASK_MODE_HELP, MASK_MODES, MASK_SUFFIX, davis_annotations, davis_split_file, masks_in
from .masks import read_mask
from .metrics import GLOBAL_KEYS, VOID_ID, per_sequence_means, score_sequence, summarize

@dataclass
class GTSequence:
    """A ground-truth sequence: its annotated frames in order (name = file stem)."""

    name: str
    masks: list[Path]

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.masks]


def find_ground_truth(root: str | os.PathLike, sequences: Optional[Sequence[str]] = None, split: str = "val") -> list[GTSequence]:
    """The ground-truth sequences under ``root`` (see the layouts in ``--help``), in name order.

    Raises:
        ValueError: no such folder, no sequence, a requested sequence that is not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--ground-truth {root}: no such folder")
    davis_root = davis_annotations(root)
    found: dict[str, Path] = {}
    if davis_root.is_dir():
        listing = davis_split_file(root, split)
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
            elif masks_in(d):
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
        masks = masks_in(folder)
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
        raise ValueError(f"{path}: mask has mode {mode!r}; {MASK_MODE_HELP}")
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
            path = folder / f"{gt_path.stem}{MASK_SUFFIX}"
            if not path.is_file():
                raise ValueError(f"{path}: prediction missing for ground-truth frame {gt_path}")
            _check_mask_header(path, size, gt_path)
            paths.append(path)
        stems = set(seq.frame_names)
        orphans = [p.name for p in masks_in(folder) if p.stem not in stems]
        if orphans:
            warnings.warn(f"{folder}: {len(orphans)} prediction file(s) without a ground-truth frame are ignored "
                          f"(e.g. {orphans[0]})", stacklevel=2)
        files[seq.name] = paths
    return files


def warn_ground_truth(seq_name: str, masks: Sequence[np.ndarray], where: str) -> None:
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
        ``(results, sequence names)``; ``results`` as :func:`vos.metrics.summarize`.
    """
    gt = find_ground_truth(gt_root, sequences, split)
    pred_files = check_predictions(pred_root, gt)
    per_object: dict[str, dict[str, float]] = {}
    for seq in tqdm(gt, desc="sequences", unit="seq", disable=not progress, file=sys.stderr):
        gt_masks = [read_mask(p) for p in seq.masks]
        warn_ground_truth(seq.name, gt_masks, str(seq.masks[0]))
        pred = np.zeros((len(gt_masks), *gt_masks[0].shape), dtype=np.uint8)  # first/last are not scored
        for t, path in enumerate(pred_files[seq.name], start=1):
            pred[t] = read_mask(path)
        names = [str(seq.masks[0])] + [str(p) for p in pred_files[seq.name]] + [str(seq.masks[-1])]
        per_object.update(score_sequence(pred, np.stack(gt_masks), name=seq.name, frame_names=names, bound_th=bound_th))
    return summarize(per_object), [s.name for s in gt]


def _fmt(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.3f}"  # pandas' float_format="%.3f", NaN empty


def write_results(results: Mapping, json_path: str | os.PathLike, split: str = "val") -> list[Path]:
    """results.json plus the official CSVs (``global_results-<split>.csv``, ``per-sequence_results-<split>.csv``)
    next to it, each written atomically.

    Returns:
        the paths written.
    """
    json_path = Path(json_path)
    save_json(json_path, {"global": dict(results["global"]), "per_object": dict(results["per_object"])})

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(GLOBAL_KEYS)
    w.writerow([_fmt(results["global"][k]) for k in GLOBAL_KEYS])
    global_csv = json_path.parent / f"global_results-{split}.csv"
    write_text(global_csv, buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Sequence", "J-Mean", "F-Mean"])
    for name, stats in results["per_object"].items():
        w.writerow([name, _fmt(stats["J-Mean"]), _fmt(stats["F-Mean"])])
    seq_csv = json_path.parent / f"per-sequence_results-{split}.csv"
    write_text(seq_csv, buf.getvalue())
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


