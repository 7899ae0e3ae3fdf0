"""Train SST for video object segmentation, then score it on the synthetic validation videos.

    python train.py --attn strided                      # the default: pretrained EfficientNet-Lite0, synthetic clips
    python train.py --attn local --data /path/to/DAVIS  # DAVIS 2017 / YouTube-VOS / per-sequence folders
    torchrun --nproc_per_node=2 train.py --attn local   # DistributedDataParallel (gloo on CPU, NCCL on CUDA)
    python train.py --out runs/x --resume               # continue exactly where runs/x stopped

Every option is a field of vos.config.RunConfig (its default is stated there). The run
directory gets config.json, ckpt.pt (rewritten atomically every --ckpt-every steps and at
the end), metrics.json (J&F of the model and of the copy baseline on the synthetic validation
videos: what `evaluate.py --checkpoint RUN/ckpt.pt --data synthetic` reproduces) and
validation/ (masks, overlays and GIFs).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from vos.config import add_arguments, from_args
from vos.training import train


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run = parser.add_argument_group("where and how this process runs (not part of the configuration)")
    run.add_argument("--out", default=None, help="run directory (default: runs/<attn>-<date>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
    run.add_argument("--threads", type=int, default=1,
                     help="torch CPU threads; 1 by default because on a CPU shared with other jobs two OpenMP "
                          "threads stall (measured 7x slower per frame at load 5 on 2 cores), while one keeps "
                          "the default run within 15 minutes either way; 0: torch's choice")
    return parser.parse_args(argv)


def check_paths(args: argparse.Namespace) -> None:
    """Folders named on the command line must exist before anything is built."""
    if args.name is not None and args.name != "synthetic" and not Path(args.name).is_dir():
        raise ValueError(f"--data must be 'synthetic' or a dataset folder; {args.name} is neither")
    if args.texture_dir is not None and not Path(args.texture_dir).is_dir():
        raise ValueError(f"--texture-dir {args.texture_dir} is not a directory")
    if args.backbone_weights is not None and not Path(args.backbone_weights).is_file():
        raise ValueError(f"--backbone-weights {args.backbone_weights}: no such file")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's choice), got {args.threads}")


def main(argv: Optional[list[str]] = None) -> Path:
    args = parse_args(argv)
    try:
        check_paths(args)
        return train(from_args(args), args.out, args.resume, args.device, args.threads)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
