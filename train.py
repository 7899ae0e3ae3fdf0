"""Train SST for video object segmentation, then score it on the synthetic validation videos.

    python train.py --attn strided                      # synthetic videos, CPU-sized defaults
    python train.py --attn local --data /path/to/DAVIS  # DAVIS 2017 / YouTube-VOS / per-sequence folders
    torchrun --nproc_per_node=2 train.py --attn local   # DistributedDataParallel (gloo on CPU, NCCL on CUDA)

Every random draw of step ``s`` on rank ``r`` (which clips, crops, dropout) is derived from
``(seed, s, r)``, so ``--resume`` after any interruption replays exactly what an
uninterrupted run would have done. The run directory gets ``config.json``, ``ckpt.pt``
(rewritten atomically every ``--ckpt-every`` steps and at the end), ``metrics.json``
(J&F of the model and of the copy-first-frame baseline) and ``overlays/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel

from models.checkpoint import load_checkpoint, save_checkpoint, save_json
from models.datasets import ClipSampler, SyntheticClips, open_dataset, perturb_labels, select_objects
from models.losses import vos_loss

ATTN = ("grid", "local", "strided", "local_strided")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--attn", choices=ATTN, default="strided", help="sparse attention pattern of the encoder")
    g.add_argument("--dim", type=int, default=None, help="encoder channels (SST default when unset)")
    g.add_argument("--layers", type=int, default=None, help="encoder layers (SST default when unset)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (SST default when unset)")
    g.add_argument("--backbone-stride", type=int, default=4,
                   help="backbone output stride (4: 16x16 attention maps at the 64x64 crop; 8 is ~3x cheaper but learns slower)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other SST keyword argument; VALUE is parsed as JSON when it can be (repeatable)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic', or a DAVIS 2017 / YouTube-VOS / per-sequence folder")
    g.add_argument("--split", default=None, help="split of a DAVIS or YouTube-VOS folder (default: train)")
    g.add_argument("--texture-dir", default=None, help="images to texture the synthetic videos with")
    g.add_argument("--crop", type=int, default=64, help="training clips are CROP x CROP pixels")
    g.add_argument("--frames", type=int, default=None,
                   help="frames per training clip, the last one segmented (default: tau + 1, what the propagator's buffer holds)")
    g.add_argument("--max-objects", type=int, default=3, help="objects per clip, at most")
    g.add_argument("--perturb", type=float, default=0.5,
                   help="probability that a middle reference frame's labels are shifted/grown/shrunk (mimics propagated masks)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=4, help="clips per step and per process")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW; warm-up, then cosine decay)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision (CUDA only)")
    g = p.add_argument_group("propagation and evaluation")
    g.add_argument("--tau", type=int, default=3, help="frames in the propagation buffer")
    g.add_argument("--val-videos", type=int, default=16, help="synthetic validation videos")
    g.add_argument("--val-frames", type=int, default=30, help="frames per validation video")
    g.add_argument("--overlays", type=int, default=4, help="validation videos drawn as overlay images")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default: runs/<attn>-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"attn": args.attn, "tau": args.tau, "backbone_stride": args.backbone_stride}
    for name, key in (("dim", "dim"), ("layers", "depth"), ("heads", "heads")):
        if getattr(args, name) is not None:
            kwargs[key] = getattr(args, name)
    for item in args.model_arg:
        if "=" not in item:
            raise ValueError(f"--model-arg must be KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        kwargs[key.strip().replace("-", "_")] = _json_value(value)
    return kwargs


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before anything is built."""
    if args.frames is None:
        args.frames = args.tau + 1
    for name in ("steps", "batch_size", "crop", "tau", "ckpt_every", "max_objects"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2 (reference frames + the one segmented), got {args.frames}")
    if args.val_frames < 3:
        raise ValueError(f"--val-frames must be >= 3 (the DAVIS protocol skips the first and last), got {args.val_frames}")
    if args.val_videos < 1:
        raise ValueError(f"--val-videos must be >= 1, got {args.val_videos}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise ValueError(f"--data must be 'synthetic' or a dataset folder; {args.data} is neither")
    if args.texture_dir is not None and not Path(args.texture_dir).is_dir():
        raise ValueError(f"--texture-dir {args.texture_dir} is not a directory")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def step_rng(seed: int, step: int, rank: int, stream: int) -> np.random.Generator:
    """The generator of one (step, rank) and purpose: the whole data order in one function."""
    return np.random.default_rng([seed & 0xFFFFFFFF, step, rank, stream])


def make_batch(source, batch_size: int, frames: int, max_objects: int, seed: int, step: int, rank: int,
               perturb: float = 0.0):
    """A batch: video ``(B, T, 3, S, S)``, labels ``(B, T, S, S)``, the object count of each
    sample with the background ``(B,)``, and ``valid`` ``(B, O)`` marking each sample's objects
    (``O`` the largest count)."""
    videos, labels, counts = [], [], []
    for i in range(batch_size):
        video, lab = source.sample(step_rng(seed, step, rank, 1000 + i))
        lab, k = select_objects(lab, frames - 1, max_objects)
        if perturb > 0:
            # the first frame's mask is given at inference, the later buffer frames are predictions
            lab = perturb_labels(lab, range(1, frames - 1), step_rng(seed, step, rank, 2000 + i), prob=perturb,
                                 max_shift=max(1, video.shape[-1] // 16), max_grow=max(1, video.shape[-1] // 32))
        videos.append(video)
        labels.append(lab)
        counts.append(k)
    counts = torch.tensor(counts)
    valid = torch.arange(1 + int(counts.max()))[None, :] <= counts[:, None]
    return torch.stack(videos), torch.stack(labels), counts + 1, valid


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 5% of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def rng_states() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        # tensors and plain numbers only, so that the checkpoint loads with weights_only=True
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def build_model(kwargs: dict[str, Any]) -> torch.nn.Module:
    from models import SST

    return SST(**kwargs)


def build_source(config: dict[str, Any], rank: int, world: int):
    data = config["data"]
    if data["name"] == "synthetic":
        return SyntheticClips(data["frames"], data["crop"], data["max_objects"], texture_dir=data["texture_dir"])
    sequences = open_dataset(data["name"], data["split"])
    # each rank draws from its own shard of the sequences (all of them when there are fewer than ranks)
    shard = sequences[rank::world] if len(sequences) >= world else sequences
    return ClipSampler(shard, data["frames"], data["crop"])


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def propagate(model: torch.nn.Module, video: torch.Tensor, first: torch.Tensor, tau: int, device: torch.device) -> torch.Tensor:
    """Segment a whole video with the streaming propagator from its first frame's mask.

    Args:
        video: ``(T, 3, H, W)`` in [0, 1].
        first: ``(H, W)`` ids ``0..K`` of frame 0.

    Returns:
        ``(T, H, W)`` uint8 predicted ids (frame 0 is the given mask).
    """
    from models import Propagator

    prop = Propagator(model, tau=tau, keep_first=True)
    return prop.segment_video((frame.to(device) for frame in video), {0: first}).to(torch.uint8)


def overlay(video: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """Frames with their ids painted in the DAVIS palette: ``(T, H, W, 3)`` uint8."""
    from models.visualize import overlay as paint

    frames = (rearrange(video, "t c h w -> t h w c").clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.stack([paint(frame, mask) for frame, mask in zip(frames, ids.numpy())])


def save_overlays(path: Path, video: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, columns: int = 8) -> None:
    """One image per video: the ground truth over the frames on top, the prediction below."""
    from PIL import Image

    times = np.linspace(0, video.shape[0] - 1, min(columns, video.shape[0])).round().astype(int)
    rows = [overlay(video[times], truth[times]), overlay(video[times], pred[times])]
    grid = rearrange(np.stack(rows), "r t h w c -> (r h) (t w) c")
    img = Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def evaluate_synthetic(model: torch.nn.Module, config: dict[str, Any], out: Path, device: torch.device) -> dict[str, Any]:
    """J&F of the model (streaming propagation) and of copying the first mask, on the
    synthetic validation videos, with the DAVIS 2017 protocol; overlays of a few videos."""
    from tqdm import tqdm

    from models.davis_metrics import evaluate_sequences
    from models.synthetic import list_texture_images, validation_videos

    ev, data = config["eval"], config["data"]
    textures = list_texture_images(data["texture_dir"]) if data["texture_dir"] else None
    videos = validation_videos(ev["videos"], ev["frames"], data["crop"], data["crop"], data["max_objects"], textures)
    model.eval()
    preds, copies, truth = {}, {}, {}
    tic = time.perf_counter()
    with torch.no_grad():
        for i, (name, video, labels) in enumerate(tqdm(videos, desc="validate", dynamic_ncols=True)):
            preds[name] = propagate(model, video, labels[0], config["tau"], device).numpy()
            copies[name] = labels[:1].expand_as(labels).to(torch.uint8).numpy()
            truth[name] = labels.to(torch.uint8).numpy()
            if i < ev["overlays"]:
                save_overlays(out / "overlays" / f"{name}.png", video, labels, torch.from_numpy(preds[name]))
    seconds = time.perf_counter() - tic
    with warnings.catch_warnings():
        # an object the model loses for the whole video is scored as empty: expected, not news
        warnings.simplefilter("ignore", UserWarning)
        ours, base = evaluate_sequences(preds, truth), evaluate_sequences(copies, truth)

    def summary(res: dict) -> dict[str, float]:
        g = res["global"]
        return {"J&F": g["J&F-Mean"], "J": g["J-Mean"], "F": g["F-Mean"]}

    return {
        **summary(ours),
        "baseline": summary(base),
        "data": {"videos": len(videos), "frames": ev["frames"], "size": data["crop"], "objects": len(ours["per_object"])},
        "propagation_fps": sum(v.shape[0] for v in preds.values()) / seconds,
        "global": ours["global"],
        "baseline_global": base["global"],
    }


def train(args: argparse.Namespace) -> Path:
    check_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if args.amp != "none" and device.type != "cuda":
        raise ValueError(f"--amp {args.amp} needs a CUDA device; this run is on {device}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    if args.out is None:
        if args.resume:
            raise ValueError("--resume needs --out DIR: the run directory to continue")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if world > 1:  # one directory for all ranks: rank 0's stamp
            holder = [stamp]
            dist.broadcast_object_list(holder, src=0)
            stamp = holder[0]
        args.out = str(Path("runs") / f"{args.attn}-{stamp}")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"

    state = None
    if args.resume:
        if rank == 0:
            # temp files of a checkpoint write that a kill interrupted: never read, just litter
            for stale in out.glob(f".{ckpt_path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        if ckpt_path.is_file():
            state = load_checkpoint(ckpt_path)
        elif rank == 0:
            print(f"--resume: no checkpoint in {out} yet, starting from step 0", file=sys.stderr)
    elif ckpt_path.exists():
        raise ValueError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it or another --out")

    if state is not None:
        config = state["config"]  # the run's own settings win: a resumed run is the same run
    else:
        config = {
            "model": model_kwargs(args),
            "data": {"name": args.data, "split": args.split, "texture_dir": args.texture_dir, "crop": args.crop,
                     "frames": args.frames, "max_objects": args.max_objects, "perturb": args.perturb},
            "optim": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                      "weight_decay": args.weight_decay, "warmup": min(args.warmup, args.steps), "amp": args.amp},
            "tau": args.tau,
            "seed": args.seed,
            "world_size": world,
            "ckpt_every": args.ckpt_every,
            "eval": {"videos": args.val_videos, "frames": args.val_frames, "overlays": args.overlays},
        }
    if config["world_size"] != world:
        raise ValueError(f"{ckpt_path} was written by a run of {config['world_size']} process(es); resume it with as many")
    seed, opt = config["seed"], config["optim"]

    torch.manual_seed(seed)  # the initial weights
    model = build_model(config["model"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt["warmup"], opt["steps"]))
    scaler = torch.amp.GradScaler(device.type, enabled=(opt["amp"] == "fp16"))
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        start = state["step"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "config.json", config)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    source = build_source(config, rank, world)

    def checkpoint(step: int) -> None:
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng_states(), "step": step, "config": config,
            })

    from tqdm import tqdm

    bar = tqdm(total=opt["steps"], initial=start, disable=rank != 0, dynamic_ncols=True, desc=f"train {config['model']['attn']}")
    model.train()
    tic, clips = time.perf_counter(), 0
    for step in range(start, opt["steps"]):
        video, labels, num_objects, valid = make_batch(
            source, opt["batch_size"], config["data"]["frames"], config["data"]["max_objects"], seed, step, rank,
            config["data"]["perturb"],
        )
        # dropout and any other torch randomness of this step: a function of (seed, step, rank)
        torch.manual_seed(int(step_rng(seed, step, rank, 0).integers(2**62)))
        video, labels, valid = video.to(device), labels.to(device), valid.to(device)
        with autocast(device, opt["amp"]):
            logits = net(video, labels, num_objects=num_objects)
        loss, parts = vos_loss(logits.float(), labels[:, -1], step, valid, ramp_steps=max(1, opt["steps"] // 2))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        clips += video.shape[0] * world
        done = step + 1
        if rank == 0:
            rate = clips / max(1e-9, time.perf_counter() - tic)
            bar.set_postfix(loss=f"{loss.item():.3f}", iou=f"{1 - parts['iou']:.2f}", clips_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
        if done % config["ckpt_every"] == 0 or done == opt["steps"]:
            checkpoint(done)
    bar.close()
    if start >= opt["steps"] and rank == 0:
        print(f"{out}: already trained to step {opt['steps']}", file=sys.stderr)

    train_seconds = time.perf_counter() - tic
    if rank == 0:
        metrics = evaluate_synthetic(model, config, out, device)
        metrics["run"] = {
            "steps": opt["steps"], "steps_this_process": opt["steps"] - start, "train_seconds_this_process": train_seconds,
            "clips_per_second": clips / max(1e-9, train_seconds), "device": str(device), "world_size": world,
            "threads": torch.get_num_threads(),
        }
        save_json(out / "metrics.json", metrics)
        print(json.dumps({k: metrics[k] for k in ("J&F", "J", "F", "baseline")}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
