"""The training loop: data order, optimisation, checkpoints, resumption and DDP.

Every random draw of step ``s`` on rank ``r`` (which clips, crops, perturbations, dropout) is
derived from ``(seed, s, r)``, so a run resumed after any interruption replays exactly what
an uninterrupted run would have done.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .datasets import ClipSampler, SyntheticClips, open_dataset, perturb_labels, select_objects
from .files import save_json
from .losses import vos_loss


@dataclass
class Process:
    """Where this process runs: DDP rank and world, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def step_rng(seed: int, step: int, rank: int, stream: int) -> np.random.Generator:
    """The generator of one (step, rank) and purpose: the whole data order in one function."""
    return np.random.default_rng([seed & 0xFFFFFFFF, step, rank, stream])


def make_batch(source, batch_size: int, frames: int, max_objects: int, seed: int, step: int, rank: int,
               perturb: float = 0.0):
    """A batch: video ``(B, T, 3, S, S)``, labels ``(B, T, S, S)``, the object count of each
    sample with the background ``(B,)``, and ``valid`` ``(B, O)`` marking each sample's objects."""
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


def ring_frame_index(tau: int, frames: int, batch_size: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """Frame indices ``(B, T)`` of a streaming model's training clips: the first frame is frame
    0, the others consecutive from a random ring phase (``1 + p``, ``p`` in ``[0, tau + 1)``), as
    a long video reaches every phase of the streaming time code."""
    phase = torch.from_numpy(step_rng(seed, step, rank, 3000).integers(0, tau + 1, batch_size))
    later = 1 + phase[:, None] + torch.arange(frames - 1)[None, :]
    return torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), later], dim=1)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
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


def build_source(config: RunConfig, rank: int, world: int):
    """Where training clips come from: synthetic videos, or the sequences of a dataset folder."""
    data = config.data
    if data.name == "synthetic":
        return SyntheticClips(config.clip_frames, data.crop, data.max_objects, texture_dir=data.texture_dir)
    sequences = open_dataset(data.name, data.split)
    # each rank draws from its own shard of the sequences (all of them when there are fewer than ranks)
    shard = sequences[rank::world] if len(sequences) >= world else sequences
    return ClipSampler(shard, config.clip_frames, data.crop)


def start_process(device_name: str, threads: Optional[int]) -> Process:
    """Rank, world and device from the launcher's environment; joins the process group under DDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device_name}: CUDA is not available on this machine")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if threads:
        torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(rank, world, device)


def run_directory(out: Optional[str], resume: bool, attn: str, proc: Process) -> Path:
    """The run directory: ``out``, or ``runs/<attn>-<date>-<time>`` (one stamp for all ranks)."""
    if out is not None:
        return Path(out)
    if resume:
        raise ValueError("--resume needs --out DIR: the run directory to continue")
    holder = [time.strftime("%Y%m%d-%H%M%S")]
    if proc.world > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path("runs") / f"{attn}-{holder[0]}"


def resume_state(out: Path, resume: bool, proc: Process) -> Optional[dict[str, Any]]:
    """The checkpoint to continue from (``None``: a fresh run); refuses to overwrite a run."""
    ckpt = out / "ckpt.pt"
    if not resume:
        if ckpt.exists():
            raise ValueError(f"{out} already holds a run ({ckpt}); pass --resume to continue it or another --out")
        return None
    if proc.main:
        # temp files of a checkpoint write that a kill interrupted: never read, just litter
        for stale in out.glob(f".{ckpt.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if ckpt.is_file():
        return load_checkpoint(ckpt)
    if proc.main:
        print(f"--resume: no checkpoint in {out} yet, starting from step 0", file=sys.stderr)
    return None


class Trainer:
    """Model, optimiser, schedule and scaler of a run, and how to checkpoint them.

    Args:
        config: the run configuration.
        proc: this process.
        state: a checkpoint to continue from, or ``None``.
    """

    def __init__(self, config: RunConfig, proc: Process, state: Optional[dict[str, Any]]) -> None:
        from models import SST

        self.config, self.proc = config, proc
        opt = config.optim
        torch.manual_seed(config.seed)  # the initial weights
        self.model = SST(**asdict(config.model)).to(proc.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        warmup = min(opt.warmup, opt.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(warmup, opt.steps))
        self.scaler = torch.amp.GradScaler(proc.device.type, enabled=(opt.amp == "fp16"))
        self.step = 0
        if state is not None:
            for name in ("model", "optimizer", "scheduler", "scaler"):
                getattr(self, name).load_state_dict(state[name])
            set_rng_states(state["rng"])
            self.step = state["step"]
        self.net = (DistributedDataParallel(self.model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
                    if proc.world > 1 else self.model)

    def save(self, path: Path) -> None:
        if self.proc.main:
            save_checkpoint(path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_states(), "step": self.step, "config": self.config.to_dict(),
            })

    def train_step(self, source) -> tuple[float, float, int]:
        """One optimiser step; returns ``(loss, mean IoU, clips)``."""
        c, dev = self.config, self.proc.device
        video, labels, num_objects, valid = make_batch(source, c.optim.batch_size, c.clip_frames, c.data.max_objects,
                                                       c.seed, self.step, self.proc.rank, c.data.perturb)
        # dropout and any other torch randomness of this step: a function of (seed, step, rank)
        torch.manual_seed(int(step_rng(c.seed, self.step, self.proc.rank, 0).integers(2**62)))
        video, labels, valid = video.to(dev), labels.to(dev), valid.to(dev)
        frame_index = None
        if c.model.streaming:
            frame_index = ring_frame_index(c.model.tau, c.clip_frames, video.shape[0], c.seed, self.step,
                                           self.proc.rank).to(dev)
        amp = c.optim.amp
        ctx = nullcontext() if amp == "none" else torch.autocast(dev.type, torch.bfloat16 if amp == "bf16" else torch.float16)
        with ctx:
            logits = self.net(video, labels, num_objects=num_objects, frame_index=frame_index)
        loss, parts = vos_loss(logits.float(), labels[:, -1], self.step, valid, ramp_steps=max(1, c.optim.steps // 2))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss.item(), 1 - float(parts["iou"]), video.shape[0] * self.proc.world


def fit(trainer: Trainer, out: Path) -> dict[str, float]:
    """Train to ``config.optim.steps``, checkpointing every ``ckpt_every`` steps and at the end."""
    config, proc = trainer.config, trainer.proc
    steps, start = config.optim.steps, trainer.step
    source = build_source(config, proc.rank, proc.world)
    bar = tqdm(total=steps, initial=start, disable=not proc.main, dynamic_ncols=True, desc=f"train {config.model.attn}")
    trainer.model.train()
    tic, cpu_tic, clips = time.perf_counter(), time.process_time(), 0
    while trainer.step < steps:
        loss, iou, n = trainer.train_step(source)
        clips += n
        bar.set_postfix(loss=f"{loss:.3f}", iou=f"{iou:.2f}", clips_s=f"{clips / (time.perf_counter() - tic):.1f}",
                        refresh=False)
        bar.update(1)
        if trainer.step % config.ckpt_every == 0 or trainer.step == steps:
            trainer.save(out / "ckpt.pt")
    bar.close()
    if start >= steps and proc.main:
        print(f"{out}: already trained to step {steps}", file=sys.stderr)
    seconds = time.perf_counter() - tic
    # CPU time too: on a shared machine the wall time measures the neighbours as well
    return {"steps": steps, "steps_this_process": steps - start, "train_seconds_this_process": seconds,
            "train_cpu_seconds_this_process": time.process_time() - cpu_tic,
            "clips_per_second": clips / max(1e-9, seconds), "device": str(proc.device), "world_size": proc.world,
            "threads": torch.get_num_threads()}


def train(config: RunConfig, out: Optional[str], resume: bool, device: str = "auto",
          threads: Optional[int] = None) -> Path:
    """A whole run: train (or continue), validate on the synthetic videos, write ``metrics.json``.

    Args:
        config: the configuration of a fresh run (a resumed run keeps its own).
        out: run directory (``None``: ``runs/<attn>-<date>-<time>``).
        resume: continue the run in ``out``.
    """
    from .validation import validate

    config.check()
    proc = start_process(device, threads)
    if config.optim.amp != "none" and proc.device.type != "cuda":
        raise ValueError(f"--amp {config.optim.amp} needs a CUDA device; this run is on {proc.device}")
    run_dir = run_directory(out, resume, config.model.attn, proc)
    state = resume_state(run_dir, resume, proc)
    if state is not None:
        config = RunConfig.from_dict(state["config"])  # a resumed run is the same run
    else:
        config.world_size = proc.world
    if config.world_size != proc.world:
        raise ValueError(f"{run_dir} was written by a run of {config.world_size} process(es); resume it with as many")
    trainer = Trainer(config, proc, state)
    if proc.main:
        save_json(run_dir / "config.json", config.to_dict())
    run = fit(trainer, run_dir)
    if proc.main:
        metrics = {**validate(trainer.model, config, run_dir / "validation", proc.device), "run": run}
        save_json(run_dir / "metrics.json", metrics)
        print({k: metrics[k] for k in ("J&F", "J", "F", "baseline")})
    if proc.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


__all__ = ["train", "Trainer", "fit", "make_batch", "ring_frame_index", "step_rng", "lr_lambda", "build_source"]
