"""Synthetic videos, dataset loaders, clip sampling, losses and checkpoint files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vos import checkpoint as ckpt
from vos.files import save_json
from vos.datasets import (
    ClipSampler,
    SyntheticClips,
    detect_layout,
    load_sequence,
    open_dataset,
    perturb_labels,
    select_objects,
    youtube_vos,
)
from vos.losses import bootstrap_ratio, bootstrapped_cross_entropy, soft_iou_loss, vos_loss
from vos.masks import davis_palette
from vos.synthetic import render_video, train_video_id, val_video_id, validation_videos

DAVIS_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "davis-sample"


# ----------------------------------------------------------------------------- synthetic


def test_render_is_deterministic_per_id_and_ids_differ():
    v1, l1 = render_video(7, 5, 32, 40)
    v2, l2 = render_video(7, 5, 32, 40)
    assert v1.shape == (5, 3, 32, 40) and l1.shape == (5, 32, 40)
    assert v1.dtype == torch.float32 and l1.dtype == torch.int64
    assert 0 <= float(v1.min()) and float(v1.max()) <= 1
    assert torch.equal(v1, v2) and torch.equal(l1, l2)
    v3, _ = render_video(9, 5, 32, 40)
    assert not torch.equal(v1, v3)


def test_frames_rendered_directly_match_the_full_video():
    full_v, full_l = render_video(11, 9, 32, 32)
    part_v, part_l = render_video(11, 3, 32, 32, start=2, frame_step=3)
    assert torch.equal(part_l, full_l[2::3])
    # pixel noise is drawn per call, the scene is not
    assert (part_v - full_v[2::3]).abs().mean() < 0.05


def test_train_and_validation_ids_are_disjoint():
    train = {train_video_id(0, step, rank, i) for step in range(200) for rank in range(2) for i in range(4)}
    val = {val_video_id(i) for i in range(2000)}
    assert len(train) == 1600  # distinct keys give distinct videos
    assert all(v % 2 == 0 for v in train) and all(v % 2 == 1 for v in val)
    assert not train & val
    assert train_video_id(0, 1, 0, 0) != train_video_id(1, 1, 0, 0)  # the seed matters


def test_validation_videos_move_occlude_and_leave_the_frame():
    videos = validation_videos(6, 30, 32, 32)
    again = validation_videos(6, 30, 32, 32)
    assert [n for n, _, _ in videos] == [n for n, _, _ in again]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(videos, again))
    copy_iou, left_and_back, several = [], False, False
    for name, video, labels in videos:
        n = int(labels.max())
        several |= n >= 2
        first = labels[0]
        for obj in range(1, n + 1):
            assert (first == obj).any(), f"{name}: object {obj} missing from frame 0"
            area = (labels == obj).flatten(1).sum(1)
            gone = torch.nonzero(area == 0).flatten()
            if len(gone) and (area[int(gone[0]):] > 0).any():
                left_and_back = True
            inter = ((labels == obj) & (first == obj)).flatten(1).sum(1).float()
            union = ((labels == obj) | (first == obj)).flatten(1).sum(1).float()
            copy_iou.append((inter / union.clamp_min(1))[1:].mean())
    assert several and left_and_back
    # the objects move: copying the first mask is far from the truth
    assert float(torch.stack(copy_iou).mean()) < 0.5


def test_texture_dir_textures_the_video(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
    clips = SyntheticClips(3, 32, texture_dir=str(tmp_path))
    v1, l1 = clips.sample(np.random.default_rng(5))
    v2, l2 = clips.sample(np.random.default_rng(5))
    v0, l0 = SyntheticClips(3, 32).sample(np.random.default_rng(5))
    assert torch.equal(v1, v2) and torch.equal(l1, l0)  # same scene geometry, other pixels
    assert not torch.equal(v1, v0)
    with pytest.raises(ValueError, match="missing is not a directory"):
        SyntheticClips(3, 32, texture_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        SyntheticClips(3, 32, texture_dir=str(tmp_path / "empty"))


def test_select_objects_keeps_reference_objects_only():
    labels = torch.zeros(3, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 5
    labels[1, 1, 1] = 2
    labels[2, 2, 2] = 7  # only in the frame to segment: cannot be asked for
    labels[2, 3, 3] = 5
    out, k = select_objects(labels, 2, max_objects=3)
    assert k == 2
    assert out[0, 0, 0] == 2 and out[1, 1, 1] == 1 and out[2, 3, 3] == 2 and out[2, 2, 2] == 0
    out, k = select_objects(labels, 2, max_objects=1)
    assert k == 1 and int(out.max()) == 1


def test_perturb_labels_corrupts_only_the_chosen_frames():
    _, labels = render_video(3, 4, 32, 32)
    out = perturb_labels(labels, range(1, 3), np.random.default_rng(0), max_shift=3, max_grow=1, prob=1.0)
    again = perturb_labels(labels, range(1, 3), np.random.default_rng(0), max_shift=3, max_grow=1, prob=1.0)
    assert torch.equal(out, again)
    assert torch.equal(out[0], labels[0]) and torch.equal(out[3], labels[3])
    assert any(not torch.equal(out[t], labels[t]) for t in (1, 2))
    for t in (1, 2):
        assert set(torch.unique(out[t]).tolist()) <= set(torch.unique(labels[t]).tolist())
        # shifted by at most 3 pixels and grown by at most 1: the masks still overlap the truth
        assert ((out[t] > 0) & (labels[t] > 0)).sum() > 0.3 * (labels[t] > 0).sum()
    assert torch.equal(perturb_labels(labels, range(1, 3), np.random.default_rng(0), prob=0.0), labels)


# ----------------------------------------------------------------------------- loaders


def _jpg(path: Path, h: int = 12, w: int = 16, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _palette_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette(davis_palette())
    img.save(path)


def _ids(value: int, h: int = 12, w: int = 16) -> np.ndarray:
    ids = np.zeros((h, w), np.uint8)
    ids[2:6, 3:9] = value
    return ids


def test_davis2017_layout(tmp_path):
    for seq in ("a", "b"):
        for f in range(3):
            _jpg(tmp_path / "JPEGImages" / "480p" / seq / f"{f:05d}.jpg")
            _palette_png(tmp_path / "Annotations" / "480p" / seq / f"{f:05d}.png", _ids(2))
    (tmp_path / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "ImageSets" / "2017" / "train.txt").write_text("a\nb\n")
    (tmp_path / "ImageSets" / "2017" / "val.txt").write_text("b\n")
    assert detect_layout(tmp_path) == "davis"
    assert [s.name for s in open_dataset(tmp_path)] == ["a", "b"]
    (val,) = open_dataset(tmp_path, "val")
    assert val.name == "b" and len(val) == 3 and val.fully_annotated
    frames, masks = load_sequence(val)
    assert frames.shape == (3, 12, 16, 3) and masks[0].max() == 2
    with pytest.raises(ValueError, match="test.txt"):
        open_dataset(tmp_path, "test")
    # an image without its mask is named
    _jpg(tmp_path / "JPEGImages" / "480p" / "b" / "00003.jpg")
    with pytest.raises(ValueError, match=r"00003\.jpg: image has no mask"):
        open_dataset(tmp_path, "val")


def test_youtube_vos_layout_with_late_objects(tmp_path):
    split = tmp_path / "valid"
    for f in range(0, 15, 5):
        _jpg(split / "JPEGImages" / "v1" / f"{f:05d}.jpg")
    _palette_png(split / "Annotations" / "v1" / "00000.png", _ids(1))
    _palette_png(split / "Annotations" / "v1" / "00005.png", _ids(2))  # object 2 appears later
    meta = {"videos": {"v1": {"objects": {"1": {"category": "x", "frames": ["00000", "00005", "00010"]},
                                          "2": {"category": "y", "frames": ["00005", "00010"]}}}}}
    (split / "meta.json").write_text(json.dumps(meta))
    assert detect_layout(tmp_path) == "youtube"
    (seq,) = youtube_vos(tmp_path, "valid")
    assert seq.first_frames == {1: 0, 2: 1}
    assert seq.masks[2] is None and not seq.fully_annotated
    with pytest.raises(ValueError, match="no fully annotated"):
        ClipSampler([seq], 2, 8)
    # a mask meta.json relies on must exist
    os.remove(split / "Annotations" / "v1" / "00005.png")
    with pytest.raises(ValueError, match=r"00005\.png: mask listed in"):
        youtube_vos(tmp_path, "valid")
    # train: every image needs its mask
    train = tmp_path / "train"
    _jpg(train / "JPEGImages" / "v2" / "00000.jpg")
    _jpg(train / "JPEGImages" / "v2" / "00005.jpg")
    _palette_png(train / "Annotations" / "v2" / "00000.png", _ids(1))
    (train / "meta.json").write_text(json.dumps({"videos": {"v2": {"objects": {"1": {"frames": ["00000"]}}}}}))
    with pytest.raises(ValueError, match=r"v2/00005\.jpg: image has no mask"):
        youtube_vos(tmp_path, "train")


def test_per_sequence_layout_binary_and_rgb_masks(tmp_path):
    (tmp_path / "s" / "Annotations").mkdir(parents=True)
    for f in range(4):
        _jpg(tmp_path / "s" / "JPEGImages" / f"{f:05d}.jpg", value=40 * f)
        Image.fromarray(_ids(255)).save(tmp_path / "s" / "Annotations" / f"{f:05d}.png")  # 8-bit 0/255
    assert detect_layout(tmp_path) == "sequences"
    (seq,) = open_dataset(tmp_path)
    _, masks = load_sequence(seq)
    assert set(np.unique(masks[0])) == {0, 1}
    sampler = ClipSampler([seq], 3, 8)
    v1, l1 = sampler.sample(np.random.default_rng(3))
    v2, l2 = sampler.sample(np.random.default_rng(3))
    assert v1.shape == (3, 3, 8, 8) and l1.shape == (3, 8, 8)
    assert torch.equal(v1, v2) and torch.equal(l1, l2)
    assert set(torch.unique(l1).tolist()) <= {0, 1}
    # an RGB mask is refused, naming the file
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "s" / "Annotations" / "00002.png")
    with pytest.raises(ValueError, match=r"00002\.png: mask has mode 'RGB'"):
        load_sequence(seq)
    # a mask without its image too
    Image.fromarray(_ids(255)).save(tmp_path / "s" / "Annotations" / "00009.png")
    with pytest.raises(ValueError, match=r"00009\.png: mask has no image"):
        open_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset layout"):
        detect_layout(tmp_path / "s" / "JPEGImages")


@pytest.mark.skipif(not DAVIS_SAMPLE.is_dir(), reason="the shared DAVIS sample is not on this machine")
def test_davis_sample_folder_reads():
    seqs = open_dataset(DAVIS_SAMPLE)
    assert [s.name for s in seqs] == ["kite-surf", "scooter-black"]
    assert [len(s) for s in seqs] == [50, 43]
    video, labels = ClipSampler(seqs, 3, 64).sample(np.random.default_rng(0))
    assert video.shape == (3, 3, 64, 64) and set(torch.unique(labels).tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- losses


def test_bootstrapped_ce_is_plain_ce_at_ratio_one_and_keeps_the_hardest_pixels():
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    plain = F.cross_entropy(logits, target)
    torch.testing.assert_close(bootstrapped_cross_entropy(logits, target, 1.0), plain)
    pixel = F.cross_entropy(logits, target, reduction="none").flatten(1)
    hardest = pixel.sort(dim=1, descending=True).values[:, :3].mean()  # 0.1 of 30 pixels
    torch.testing.assert_close(bootstrapped_cross_entropy(logits, target, 0.1), hardest)
    assert bootstrapped_cross_entropy(logits, target, 0.1) > plain
    assert bootstrap_ratio(0, ramp_steps=100) == 1.0 and bootstrap_ratio(50, ramp_steps=100) == pytest.approx(0.575)
    assert bootstrap_ratio(500, ramp_steps=100) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="ratio"):
        bootstrapped_cross_entropy(logits, target, 0.0)
    with pytest.raises(ValueError, match="target ids"):
        bootstrapped_cross_entropy(logits, target + 3, 1.0)
    with pytest.raises(ValueError, match="target must have shape"):
        bootstrapped_cross_entropy(logits, target[:, :4], 1.0)


def test_soft_iou_and_absent_objects():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4] = 1
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    wrong = F.one_hot(1 - target, 3).permute(0, 3, 1, 2).float() * 40
    valid = torch.tensor([[True, True, False]])
    assert soft_iou_loss(perfect, target, valid) < 1e-3
    assert soft_iou_loss(wrong, target, valid) > 0.95
    # channel 2 is absent: its logits (even -inf, as SST gives) change nothing
    spoiled = perfect.clone()
    spoiled[:, 2] = float("-inf")
    loss, parts = vos_loss(spoiled, target, step=0, valid=valid)
    ref, _ = vos_loss(perfect[:, :2], target, step=0)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(ref), abs=1e-5)
    assert set(parts) == {"ce", "iou", "ratio"}


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_and_atomic_failure(tmp_path, monkeypatch):
    path = tmp_path / "run" / "ckpt.pt"
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {"a": 1}, "step": 3})
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"model": {}, "config": {}, "step": 4})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 3  # the old checkpoint is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp file left
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="ckpt.pt: not a readable checkpoint"):
        ckpt.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    save_json(tmp_path / "m.json", {"J&F": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"J&F": 0.5}
