"""train.py end to end with a tiny model: run files, exact resume after SIGKILL, two-process DDP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from vos.checkpoint import load_checkpoint, load_model
from vos.config import RunConfig
from vos.datasets import SyntheticClips
from vos.training import make_batch, ring_frame_index

ROOT = Path(__file__).resolve().parents[1]
# a model small enough that a step takes milliseconds; the pipeline is what is tested
TINY = [
    "--dim", "16", "--depth", "1", "--heads", "2", "--stride", "1", "3", "3",
    "--backbone", "small", "--backbone-stride", "4", "--no-label-prior", "--backbone-width", "8", "--decoder-dim", "8",
    "--crop", "32", "--frames", "3", "--tau", "2", "--batch-size", "2",
    "--val-videos", "2", "--val-frames", "5", "--overlays", "1", "--threads", "1",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def test_short_run_writes_config_checkpoint_metrics_and_overlays(tmp_path):
    out = tmp_path / "run"
    train.main(["--attn", "strided", "--steps", "3", "--out", str(out), "--ckpt-every", "2", *TINY])
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["attn"] == "strided" and config["optim"]["steps"] == 3 and config["world_size"] == 1
    state = load_checkpoint(out / "ckpt.pt")
    assert state["step"] == 3 and state["config"] == config
    model, cfg = load_model(out / "ckpt.pt")
    assert isinstance(cfg, RunConfig) and cfg.to_dict() == config and cfg.model.stride == (1, 3, 3)
    assert not model.training
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    metrics = json.loads((out / "metrics.json").read_text())
    for entry in (metrics, metrics["baseline"]):
        assert set(entry) >= {"J&F", "J", "F"}
        assert 0 <= entry["J"] <= 1 and 0 <= entry["F"] <= 1
        assert entry["J&F"] == pytest.approx((entry["J"] + entry["F"]) / 2)
    assert len(list((out / "validation" / "overlays").glob("*.gif"))) == 1


def test_evaluate_synthetic_reproduces_the_runs_validation_exactly(tmp_path, capsys):
    """One pipeline: evaluate.py --data synthetic on a run's checkpoint gives metrics.json's J&F."""
    out = tmp_path / "run"
    train.main(["--attn", "strided", "--steps", "2", "--out", str(out), *TINY])
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluate.main(["--checkpoint", str(out / "ckpt.pt"), "--data", "synthetic", "--out", str(tmp_path / "ev"),
                          "--no-overlays", "--no-progress"]) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())["global"]
    assert results["J&F-Mean"] == metrics["J&F"] and results["J-Mean"] == metrics["J"]
    assert evaluate.main(["--baseline", "copy", "--data", "synthetic", "--out", str(tmp_path / "copy"), "--no-overlays",
                          "--no-progress", "--synthetic-videos", "2", "--synthetic-frames", "5",
                          "--synthetic-size", "32"]) == 0
    copy = json.loads((tmp_path / "copy" / "results.json").read_text())["global"]
    assert copy["J&F-Mean"] == metrics["baseline"]["J&F"]
    # the copy baseline is scored on the same videos, and it is the truth on frame 0 only
    assert metrics["baseline"]["J&F"] < 1
    # a finished run directory is never overwritten by accident
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(["--attn", "strided", "--steps", "3", "--out", str(out), *TINY])


def test_bad_arguments_are_refused_before_work(tmp_path):
    with pytest.raises(SystemExit, match="--amp bf16 needs a CUDA device"):
        train.main(["--amp", "bf16", "--device", "cpu", "--out", str(tmp_path / "a"), *TINY])
    with pytest.raises(SystemExit, match="--resume needs --out"):
        train.main(["--resume", *TINY])
    with pytest.raises(SystemExit, match="--frames must be >= 2"):
        train.main(["--frames", "1", "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="nowhere is neither"):
        train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="--streaming needs --pos-enc sinusoidal or none"):
        train.main(["--streaming", "--pos-enc", "learned", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match=r"--frames must be <= tau \+ 2 = 5"):
        train.main(["--streaming", "--frames", "6", "--out", str(tmp_path / "e")])
    assert not any(tmp_path.iterdir())


def test_streaming_run_round_trips_and_validates_with_the_cached_propagator(tmp_path):
    out = tmp_path / "run"
    train.main(["--attn", "strided", "--steps", "2", "--streaming", "--out", str(out), *TINY])
    assert json.loads((out / "config.json").read_text())["model"]["streaming"] is True
    model, cfg = load_model(out / "ckpt.pt")
    assert cfg.model.streaming is True and model.streaming is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluate.main(["--checkpoint", str(out / "ckpt.pt"), "--data", "synthetic", "--out", str(tmp_path / "ev"),
                          "--no-overlays", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["global"]["J&F-Mean"] == metrics["J&F"]


def test_streaming_clips_start_at_frame_zero_then_a_random_ring_phase():
    index = ring_frame_index(tau=3, frames=4, batch_size=64, seed=0, step=7, rank=0)
    assert index.shape == (64, 4) and bool((index[:, 0] == 0).all())
    assert torch.equal(index[:, 2:] - index[:, 1:-1], torch.ones(64, 2, dtype=torch.long))  # consecutive
    assert set(index[:, 1].tolist()) == {1, 2, 3, 4}  # every phase of the tau + 1 ring slots
    assert torch.equal(index, ring_frame_index(3, 4, 64, seed=0, step=7, rank=0))
    assert not torch.equal(index, ring_frame_index(3, 4, 64, seed=0, step=8, rank=0))


def test_data_order_is_a_function_of_seed_step_and_rank():
    source = SyntheticClips(3, 32)
    a = make_batch(source, 2, 3, 3, seed=0, step=5, rank=0)
    b = make_batch(source, 2, 3, 3, seed=0, step=5, rank=0)
    other_rank = make_batch(source, 2, 3, 3, seed=0, step=5, rank=1)
    other_step = make_batch(source, 2, 3, 3, seed=0, step=6, rank=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other_rank[0]) and not torch.equal(a[0], other_step[0])
    video, labels, counts, valid = a
    assert video.shape == (2, 3, 3, 32, 32) and labels.shape == (2, 3, 32, 32)
    assert valid.shape == (2, int(counts.max())) and valid.sum(1).tolist() == counts.tolist()


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(tmp_path):
    steps = 20
    args = ["--attn", "local", "--steps", str(steps), "--ckpt-every", "4", *TINY]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, "--out", str(killed)],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = load_checkpoint(killed / "ckpt.pt")["step"]  # complete, never half-written
    assert 0 < interrupted_at < steps and interrupted_at % 4 == 0
    assert not (killed / "metrics.json").exists()

    resumed = _run([*args, "--out", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = _run([*args, "--out", str(tmp_path / "clean")])
    assert clean.returncode == 0, clean.stderr[-2000:]

    a, b = load_checkpoint(killed / "ckpt.pt"), load_checkpoint(tmp_path / "clean" / "ckpt.pt")
    assert a["step"] == b["step"] == steps
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    for key, value in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][key]["exp_avg"], value["exp_avg"])
    assert a["scheduler"] == b["scheduler"]
    scores = [json.loads((d / "metrics.json").read_text()) for d in (killed, tmp_path / "clean")]
    assert [{k: m[k] for k in ("J&F", "J", "F", "baseline")} for m in scores] == [
        {k: scores[1][k] for k in ("J&F", "J", "F", "baseline")}
    ] * 2
    assert not list(killed.glob(".*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        f"--master_port={_free_port()}", str(ROOT / "train.py"),
        "--attn", "local", "--steps", "3", "--device", "cpu", "--out", str(out), *TINY,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(out / "ckpt.pt")
    assert state["step"] == 3 and state["config"]["world_size"] == 2
    assert set(json.loads((out / "metrics.json").read_text())) >= {"J&F", "J", "F", "baseline"}
    # resuming with another number of processes would change the data order: refused
    again = _run(["--attn", "local", "--steps", "3", "--out", str(out), "--resume", *TINY])
    assert again.returncode != 0 and "2 process(es)" in again.stderr


def test_trains_on_a_dataset_folder(tmp_path):
    from PIL import Image

    from vos.masks import write_mask

    rng = np.random.default_rng(0)
    for seq in ("s1", "s2"):
        for f in range(4):
            (tmp_path / "data" / seq / "JPEGImages").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "data" / seq / "JPEGImages" / f"{f:05d}.jpg"
            )
            ids = np.zeros((40, 48), np.uint8)
            ids[5 + f : 20 + f, 10:30] = 1
            ids[25:35, 30:40] = 2
            write_mask(tmp_path / "data" / seq / "Annotations" / f"{f:05d}.png", ids)
    out = tmp_path / "run"
    train.main(["--data", str(tmp_path / "data"), "--steps", "2", "--out", str(out), *TINY])
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["name"] == str(tmp_path / "data")
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2 and (out / "metrics.json").is_file()
