"""The DAVIS 2017 semi-supervised measures: region similarity J, boundary accuracy F, and
their per-object Mean / Recall / Decay, computed exactly as the official
``davis2017-evaluation`` does (numbers identical to its CSVs), on numpy and scipy.

The facts carried over from the official evaluation, all of which change the numbers:

- The frames scored are the ground-truth frames (the annotated PNGs, sorted by name) less
  the first and the last.
- The objects are ids ``1 .. max id`` of the first ground-truth frame (ids missing from
  that frame are still scored; ids that only appear later are not).
- Void (255) in the ground truth is turned into background *before* anything else, so
  void pixels count as background in both J and F (the official ``void_pixels`` masks are
  computed after that conversion and are always empty).
- J = |pred & gt| / |pred | gt|, and 1 when both are empty.
- F compares the one-pixel boundary maps of ``seg2bmap`` (a pixel is on the boundary when it
  differs from its east, south or south-east neighbour, with special rules on the last row
  and column; a mask that fills the whole frame has no boundary at all), each boundary
  dilated by a disk of radius ``ceil(0.008 * image diagonal)`` (scikit-image's ``disk``:
  ``x^2 + y^2 <= r^2``; pixels outside the image do not dilate). Empty boundaries:
  prediction empty and ground truth not -> precision 1, recall 0; the reverse ->
  precision 0, recall 1; both -> 1, 1. F = 0 when precision + recall = 0.
- Per object: Mean = nanmean, Recall = fraction of frames whose value is > 0.5 (strictly),
  Decay = mean of the first quartile bin minus mean of the last, the bins' edges being
  ``round(linspace(1, n, 5) + 1e-10) - 1`` cast to uint8 (so they wrap past 255 frames,
  as the official code's do) and each bin including its right edge.
- Global: the plain mean over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2.

Prediction ids above the number of ground-truth objects make the official script stop;
so does :func:`evaluate_sequences` (``ValueError``). When the highest predicted id is *below*
the number of objects (an object never predicted in the scored frames) the official script
stops too, with a misleading message; here that object is scored as an empty prediction
and a warning is issued.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import maximum_filter1d

__all__ = [
    "VOID_ID",
    "GLOBAL_KEYS",
    "OBJECT_KEYS",
    "disk",
    "boundary_radius",
    "seg2bmap",
    "dilate_disk",
    "jaccard",
    "f_measure",
    "db_statistics",
    "evaluate_sequence",
    "score_sequence",
    "summarize",
    "evaluate_sequences",
    "per_sequence_means",
]

VOID_ID = 255
GLOBAL_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
OBJECT_KEYS = GLOBAL_KEYS[1:]


def disk(radius: int) -> np.ndarray:
    """Scikit-image's ``disk(radius)``: ``(2r+1, 2r+1)`` bool, ``x^2 + y^2 <= r^2``."""
    radius = int(radius)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    axis = np.arange(-radius, radius + 1)
    return (axis[:, None] ** 2 + axis[None, :] ** 2) <= radius**2


def boundary_radius(shape: Sequence[int], bound_th: float = 0.008) -> int:
    """Tolerance in pixels: ``bound_th`` itself when ``>= 1``, else ``ceil(bound_th * hypot(H, W))``."""
    if bound_th >= 1:
        return int(bound_th)
    return int(np.ceil(bound_th * np.linalg.norm(shape)))


def seg2bmap(seg: np.ndarray, width: int | None = None, height: int | None = None) -> np.ndarray:
    """One-pixel-wide boundary map of a mask, offset half a pixel towards the origin.

    Args:
        seg: ``(H, W)`` mask; any non-zero value is foreground.
        width, height: size of the map to return (default: the mask's). When they differ
            from the mask's, each boundary pixel ``(y, x)`` is moved to
            ``(y + floor(height / H), x + floor(width / H))`` of a ``(height, width)`` map,
            which is what the official code does (its ``width / h`` included); a pixel
            that lands outside the map is an error there and here.

    Returns:
        ``(height, width)`` bool boundary map.
    """
    seg = np.asarray(seg).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"seg must be 2-D (H, W), got shape {seg.shape}")
    h, w = seg.shape
    width = w if width is None else int(width)
    height = h if height is None else int(height)
    if width > w or height > h:
        raise ValueError(f"cannot convert a {w}x{h} mask to a larger {width}x{height} boundary map")

    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    # The last row only looks east and the last column only south; the corner never counts.
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    if width == w and height == h:
        return b

    ys, xs = np.nonzero(b)
    rows = ys + math.floor(height / h)
    cols = xs + math.floor(width / h)
    if ys.size and (rows.max() >= height or cols.max() >= width):
        raise ValueError(f"boundary pixels of a {w}x{h} mask fall outside a {width}x{height} map")
    bmap = np.zeros((height, width), dtype=bool)
    bmap[rows, cols] = True
    return bmap


def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
    """Region similarity of binary masks ``(..., H, W)``: IoU over the last two axes, 1 where both are empty."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} must have the same shape")
    inter = np.count_nonzero(gt & pred, axis=(-2, -1))
    union = np.count_nonzero(gt | pred, axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``(H, W)`` ``mask`` by :func:`disk` ``(radius)``, pixels outside the image being 0.

    Equal to ``scipy.ndimage.binary_dilation(mask, structure=disk(radius))`` (and to the
    official ``cv2.dilate``), computed as the union over the disk's rows ``dy`` of a
    horizontal run of half-width ``floor(sqrt(r^2 - dy^2))`` shifted by ``dy``: a few 1-D
    maximum filters instead of one pass per structure element.
    """
    mask = np.asarray(mask, dtype=bool)
    h = mask.shape[0]
    out = np.zeros_like(mask)
    src = mask.view(np.uint8)
    for dy in range(min(radius, h - 1) + 1):  # rows further than the image is tall reach nothing
        half = math.isqrt(radius * radius - dy * dy)
        run = maximum_filter1d(src, 2 * half + 1, axis=1, mode="constant", cval=0).view(bool)
        out[dy:] |= run[: h - dy]
        if dy:
            out[: h - dy] |= run[dy:]
    return out


def _count_matched(boundary: np.ndarray, other: np.ndarray, radius: int) -> int:
    """How many pixels of ``boundary`` lie within the radius-``radius`` disk of a pixel of ``other``.

    The dilation of ``other`` is computed only over its bounding box grown by the radius:
    nothing outside that box can be reached, and the box keeps the cost proportional to
    the object rather than to the frame.
    """
    ys, xs = np.nonzero(other)
    if ys.size == 0:
        return 0
    h, w = other.shape
    y0, y1 = max(ys.min() - radius, 0), min(ys.max() + radius + 1, h)
    x0, x1 = max(xs.min() - radius, 0), min(xs.max() + radius + 1, w)
    dilated = dilate_disk(other[y0:y1, x0:x1], radius)
    return int(np.count_nonzero(dilated & boundary[y0:y1, x0:x1]))


def f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """Boundary F-measure of two ``(H, W)`` binary masks, with the official empty-boundary cases."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"gt {gt.shape} and pred {pred.shape} must be 2-D masks of the same shape")
    radius = boundary_radius(pred.shape, bound_th)
    pred_b = seg2bmap(pred)
    gt_b = seg2bmap(gt)
    n_pred = int(np.count_nonzero(pred_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = _count_matched(pred_b, gt_b, radius) / n_pred
        recall = _count_matched(gt_b, pred_b, radius) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """Mean, Recall (fraction > 0.5) and Decay of one object's per-frame values ``(n,)``."""
    values = np.asarray(per_frame, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"per_frame must be a non-empty 1-D array, got shape {values.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        # The official bin edges go through uint8: past 255 frames they wrap, and so do ours.
        edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64).astype(np.uint8)
        first = values[edges[0] : int(edges[1]) + 1]
        last = values[edges[3] : int(edges[4]) + 1]
        decay = float(np.nanmean(first) - np.nanmean(last))
    return mean, recall, decay


def _as_id_video(name: str, video) -> np.ndarray:
    arr = np.asarray(video.cpu() if hasattr(video, "cpu") else video)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a (T, H, W) array of object ids, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TypeError(f"{name} must hold integer object ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{name} has ids outside [0, 255] (range {arr.min()}..{arr.max()})")
    return arr


def evaluate_sequence(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    *,
    name: str = "sequence",
    frame_names: Sequence[str] | None = None,
    bound_th: float = 0.008,
) -> dict[int, dict[str, np.ndarray]]:
    """Per-frame J and F of every object of one sequence.

    Args:
        prediction: ``(T, H, W)`` predicted ids for the ``T`` ground-truth frames (its first
            and last frames are not looked at).
        ground_truth: ``(T, H, W)`` ids; 255 = void, scored as background (as officially).
        name: the sequence's name, for messages.
        frame_names: the ``T`` frame names, for messages.
        bound_th: F's tolerance (fraction of the diagonal, or pixels when ``>= 1``).

    Returns:
        ``{object id: {"J": (T-2,), "F": (T-2,)}}`` for ids ``1 .. max id of frame 0``.

    Raises:
        ValueError: shapes differ, fewer than 3 frames, or a predicted id the ground truth
            does not have (naming the frame).
    """
    pred = _as_id_video(f"prediction of {name}", prediction)
    gt = _as_id_video(f"ground truth of {name}", ground_truth)
    if pred.shape != gt.shape:
        raise ValueError(f"{name}: prediction {pred.shape} and ground truth {gt.shape} differ in (T, H, W)")
    if gt.shape[0] < 3:
        raise ValueError(f"{name}: {gt.shape[0]} frames; the first and last are not scored, so at least 3 are needed")
    frame_names = list(frame_names) if frame_names is not None else [f"frame {t}" for t in range(gt.shape[0])]
    gt = np.where(gt == VOID_ID, 0, gt)
    num_objects = int(gt[0].max())
    pred, gt, scored = pred[1:-1], gt[1:-1], frame_names[1:-1]

    max_pred = int(pred.max(initial=0))
    if max_pred > num_objects:
        t = int(np.argmax(pred.reshape(len(pred), -1).max(axis=1) > num_objects))
        raise ValueError(
            f"{name}: prediction {scored[t]} has id {int(pred[t].max())} but the ground truth's first frame "
            f"has {num_objects} object(s) (ids 1..{num_objects}); the official evaluation refuses this too"
        )
    if max_pred < num_objects:
        warnings.warn(
            f"{name}: the scored predictions never contain id(s) {max_pred + 1}..{num_objects}; they are scored "
            "as empty (the official evaluation stops on this)",
            stacklevel=2,
        )

    results = {}
    for obj in range(1, num_objects + 1):
        gt_o = gt == obj
        pred_o = pred == obj
        j = np.asarray(jaccard(gt_o, pred_o), dtype=np.float64)
        f = np.array([f_measure(g, p, bound_th) for g, p in zip(gt_o, pred_o)], dtype=np.float64)
        results[obj] = {"J": j, "F": f}
    return results


def score_sequence(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    *,
    name: str = "sequence",
    frame_names: Sequence[str] | None = None,
    bound_th: float = 0.008,
) -> dict[str, dict[str, float]]:
    """Per-object statistics of one sequence: ``{"<name>_<id>": {"J-Mean", ..., "F-Decay"}}``.

    Arguments as :func:`evaluate_sequence`; merge the dicts of many sequences and pass them
    to :func:`summarize` for the global numbers (that is all :func:`evaluate_sequences` does).
    """
    per_object = {}
    for obj, values in evaluate_sequence(
        prediction, ground_truth, name=name, frame_names=frame_names, bound_th=bound_th
    ).items():
        jm, jr, jd = db_statistics(values["J"])
        fm, fr, fd = db_statistics(values["F"])
        per_object[f"{name}_{obj}"] = {
            "J-Mean": jm, "J-Recall": jr, "J-Decay": jd, "F-Mean": fm, "F-Recall": fr, "F-Decay": fd,
        }
    return per_object


def summarize(per_object: Mapping[str, Mapping[str, float]]) -> dict:
    """``{"global": {...}, "per_object": {...}}`` from per-object statistics: plain means over all objects."""
    per_object = {k: dict(v) for k, v in per_object.items()}
    if not per_object:
        warnings.warn("no object to score: every sequence's first ground-truth frame is empty", stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        glob = {
            key: float(np.mean([o[key] for o in per_object.values()])) if per_object else float("nan")
            for key in OBJECT_KEYS
        }
    glob = {"J&F-Mean": (glob["J-Mean"] + glob["F-Mean"]) / 2, **glob}
    return {"global": glob, "per_object": per_object}


def evaluate_sequences(
    predictions: Mapping[str, np.ndarray],
    ground_truth: Mapping[str, np.ndarray],
    *,
    bound_th: float = 0.008,
    frame_names: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """The DAVIS 2017 semi-supervised results of many sequences.

    Args:
        predictions: ``{sequence: (T, H, W) predicted ids}``, one entry per ground-truth
            sequence, aligned frame by frame with it (numpy arrays or CPU tensors; the first
            and last frames are not scored, so they may hold anything).
        ground_truth: ``{sequence: (T, H, W) ids}`` (255 = void); its order is the report's.
        bound_th: F's tolerance.
        frame_names: optional ``{sequence: T names}`` used in error messages.

    Returns:
        ``{"global": {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"},
        "per_object": {"<sequence>_<id>": {the same keys less "J&F-Mean"}}}``, floats
        (NaN where the official code gives NaN, e.g. no object at all).

    Raises:
        ValueError: a sequence without a prediction, or any error of :func:`evaluate_sequence`.
    """
    missing = [s for s in ground_truth if s not in predictions]
    if missing:
        raise ValueError(f"predictions has no entry for sequence(s) {missing}")
    extra = [s for s in predictions if s not in ground_truth]
    if extra:
        warnings.warn(f"predictions for sequence(s) without ground truth are ignored: {extra}", stacklevel=2)
    per_object: dict[str, dict[str, float]] = {}
    for seq, gt in ground_truth.items():
        names = None if frame_names is None else frame_names.get(seq)
        per_object.update(score_sequence(predictions[seq], gt, name=seq, frame_names=names, bound_th=bound_th))
    return summarize(per_object)


def per_sequence_means(results: Mapping, sequences: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{sequence: {"objects", "J-Mean", "F-Mean", "J&F-Mean"}}``: means over each sequence's objects."""
    table = {}
    for seq in sequences:
        objs = [v for k, v in results["per_object"].items() if k.rsplit("_", 1)[0] == seq]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            jm = float(np.mean([o["J-Mean"] for o in objs])) if objs else float("nan")
            fm = float(np.mean([o["F-Mean"] for o in objs])) if objs else float("nan")
        table[seq] = {"objects": len(objs), "J-Mean": jm, "F-Mean": fm, "J&F-Mean": (jm + fm) / 2}
    return table
