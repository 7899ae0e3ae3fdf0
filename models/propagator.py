"""Streaming propagation of object masks through a video of any length at constant memory.

Each frame is segmented from a buffer of at most ``tau`` earlier frames (their cached
embeddings and predicted labels at feature resolution), then joins the buffer. Objects
can be added at any frame (the YouTube-VOS protocol) and removed.

With a streaming model (``SST(streaming=True)``) the buffer holds every encoder layer's keys
and values of its frames instead of their embeddings, and a step computes the newest frame's
queries only (``T_q = 1``): a frame's keys/values are computed once, when it arrives, and
evicted with it (the first frame's stay).
"""
from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from sst_triton.nn import KVCache

from .label_propagation import CONTEXT, cell_values, channel_argmax
from .sst import SST, downsample_labels

MaskLike = Union[torch.Tensor, np.ndarray]
Annotation = Union[MaskLike, tuple]


@dataclass
class _Entry:
    """One buffered frame: what the encoder needs of it, nothing at input resolution."""

    index: int
    embedding: Optional[torch.Tensor]  # (dim, h, w); None in a streaming buffer (kv replaces it)
    labels: torch.Tensor  # (h, w) long: 0 background, i + 1 = objects[i], -1 unknown
    keys: Optional[torch.Tensor] = None  # (C, h, w) unit backbone features, for the label prior
    values: Optional[torch.Tensor] = None  # (1 + K, h, w) each cell's share of every object
    kv: Optional[list[KVCache]] = None  # streaming: per layer (1, kv_heads, 1, h, w, head_dim)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the entry holds (for :meth:`Propagator.buffer_bytes`)."""
        cached = [t for pair in (self.kv or []) for t in pair]
        return [t for t in (self.embedding, self.labels, self.keys, self.values, *cached) if t is not None]


@dataclass
class _Frame:
    """The current frame after the backbone: what the prediction and the buffer read of it."""

    size: tuple[int, int]  # (H, W) of the frame
    padded: tuple[int, int]  # (Hp, Wp), multiples of the backbone's stride
    embedding: torch.Tensor  # (1, dim, h, w)
    skips: list[torch.Tensor]
    keys: Optional[torch.Tensor]  # (1, C, h, w) unit backbone features, with a label prior


class Propagator:
    """Segments a video frame by frame with an :class:`SST` model.

    The buffer holds the ``tau`` most recent frames; with ``keep_first`` the first
    annotated frame stays in it for the whole video and takes one of the ``tau`` slots, so
    the encoder always sees at most ``tau + 1`` frames, as in training. Memory is therefore
    bounded by ``tau`` whatever the length of the video.

    Output channel ``0`` is the background and channel ``i + 1`` the object
    ``objects[i]`` (user ids, in the order they were added).

    A model with a ``label_prior`` reads it from a longer memory: the first frame and the
    ``prior_context`` most recent ones (their backbone features and predicted cell labels,
    small maps at the backbone's stride), as the training-free baseline does.

    A streaming model (``model.streaming``) keeps each encoder layer's keys/values of the buffer
    frames instead of their embeddings and computes only the newest frame's queries; its ring
    time code tells ``model.tau + 1`` frames after the first apart, so ``tau`` may be at most
    ``model.tau + 1`` with ``keep_first`` and ``model.tau`` without.

    Args:
        model: a trained :class:`SST` (put in eval mode).
        tau: buffer length; ``None`` takes the model's ``tau``.
        keep_first: keep the first annotated frame in the buffer.
        prior_context: recent frames of the label prior's memory (besides the first).
    """

    def __init__(self, model: SST, tau: Optional[int] = None, keep_first: bool = True,
                 prior_context: int = CONTEXT) -> None:
        if not isinstance(model, SST):
            raise TypeError(f"model must be an SST, got {type(model).__name__}")
        tau = model.tau if tau is None else tau
        if isinstance(tau, bool) or not isinstance(tau, numbers.Integral) or tau < 1:
            raise ValueError(f"tau must be an int >= 1, got {tau!r}")
        self.model = model.eval()
        self.tau = int(tau)
        self.keep_first = bool(keep_first)
        # the frames after the first a step sees: the recent ones and the newest
        ring = self.tau if self.keep_first else self.tau + 1
        if model.streaming and ring > model.time_period:
            raise ValueError(
                f"tau={self.tau} (keep_first={self.keep_first}) puts {ring} frames after the first in a "
                f"streaming model's buffer, but its time code tells only tau + 1 = {model.time_period} apart: "
                f"tau must be <= {model.time_period if self.keep_first else model.tau}"
            )
        if isinstance(prior_context, bool) or not isinstance(prior_context, numbers.Integral) or prior_context < 0:
            raise ValueError(f"prior_context must be an int >= 0, got {prior_context!r}")
        self.prior_context = int(prior_context)
        self.reset()

    # -- state ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the video: buffer, objects and frame size."""
        self.objects: list[int] = []
        self._first: Optional[_Entry] = None
        self._recent: deque[_Entry] = deque(maxlen=self.tau - 1 if self.keep_first else self.tau)
        self._memory: deque[_Entry] = deque(maxlen=self.prior_context)  # the prior's recent frames
        self._size: Optional[tuple[int, int]] = None
        self._index = 0

    @property
    def buffer(self) -> list[_Entry]:
        """The frames the next step attends to, oldest first (at most ``tau``)."""
        return ([self._first] if self._first is not None else []) + list(self._recent)

    @property
    def memory(self) -> list[_Entry]:
        """The frames the label prior reads, oldest first (the first and ``prior_context`` recent)."""
        return ([self._first] if self._first is not None else []) + list(self._memory)

    def _entries(self) -> list[_Entry]:
        seen: dict[int, _Entry] = {}
        for e in self.buffer + self.memory:
            seen[id(e)] = e
        return list(seen.values())

    def buffer_bytes(self) -> int:
        """Bytes held by the buffer's and the prior memory's tensors."""
        return sum(t.numel() * t.element_size() for e in self._entries() for t in e.tensors())

    def remove(self, *object_ids: int) -> None:
        """Stop tracking objects: their pixels become background in the buffer."""
        for obj in object_ids:
            if obj not in self.objects:
                raise ValueError(f"object {obj!r} is not tracked (tracked: {self.objects})")
            channel = self.objects.index(obj) + 1
            for entry in self._entries():
                labels = entry.labels
                entry.labels = torch.where(labels == channel, 0, torch.where(labels > channel, labels - 1, labels))
                if entry.values is not None:  # the removed object's share becomes background
                    v = entry.values
                    entry.values = torch.cat([v[:1] + v[channel:channel + 1], v[1:channel], v[channel + 1:]])
            self.objects.remove(obj)

    # -- one frame --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(
        self,
        frame: torch.Tensor,
        mask: Optional[MaskLike] = None,
        objects: Optional[Iterable[int]] = None,
    ) -> torch.Tensor:
        """Segment the next frame.

        Args:
            frame: ``(3, H, W)`` float in ``[0, 1]`` (or uint8 in ``[0, 255]``); every frame of a
                video has the same size.
            mask: optional ``(H, W)`` integer object ids of this frame (0 = background). Its
                objects are added (new ids) or re-annotated (known ids): their pixels are
                taken from the mask instead of the prediction.
            objects: which ids of ``mask`` to take; ``None`` takes every non-zero id in it
                (so a YouTube-VOS mask that holds only the new objects works as it is).

        Returns:
            probabilities ``(1 + len(objects), H, W)`` float32, background first, then
            :attr:`objects` in order; they sum to 1 over channels.
        """
        image = self._check_frame(frame)
        annotated = self._check_mask(mask, objects, image.shape[-2:])
        if not self.objects and not annotated:
            raise ValueError(
                "no object to segment yet: pass mask= (and optionally objects=) with the first annotated frame"
            )
        current = self._extract(image)
        probs, kv = self._predict(current)
        probs = self._apply_annotation(probs, annotated)
        self._remember(current, probs, kv)
        self._index += 1
        return probs

    def _extract(self, image: torch.Tensor) -> _Frame:
        """The frame's only backbone pass (padded to the stride)."""
        model = self.model
        H, W = image.shape[-2:]
        Hp, Wp = model.pad_size(H, W)
        device = next(model.parameters()).device
        padded = F.pad(image[None].to(device), (0, Wp - W, 0, Hp - H), mode="replicate")
        embedding, skips, keys = model.extract(padded)
        return _Frame((H, W), (Hp, Wp), embedding, skips, keys)

    def _predict(self, current: _Frame) -> tuple[torch.Tensor, Optional[list[KVCache]]]:
        """Probabilities ``(1 + K, H, W)`` of the current frame from the buffer, and with a
        streaming model its keys/values of every layer (computed even with nothing to segment:
        later frames attend to them)."""
        buffer, K = self.buffer, len(self.objects)
        (H, W), size = current.size, current.padded
        propagate = bool(K and buffer)
        labels = None
        if propagate:
            labels = torch.stack([e.labels for e in buffer] + [torch.full_like(buffer[0].labels, -1)])[None]
        logits, kv = None, None
        if self.model.streaming:
            caches = self._caches(buffer)
            if propagate:
                logits, kv = self.model.segment_newest(current.embedding, self._index, caches, labels, current.skips,
                                                       K + 1, size, self._prior(current.keys, K))
            else:
                kv = self.model.encode_newest(current.embedding, self._index, caches)[2]
        elif propagate:
            embeddings = torch.stack([e.embedding for e in buffer] + [current.embedding[0]], dim=1)[None]
            logits = self.model.segment(embeddings, labels, current.skips, K + 1, size,
                                        self._prior(current.keys, K))
        if logits is not None:
            return logits[0, :, :H, :W].float().softmax(dim=0), kv
        # nothing to propagate from: only the annotation says where objects are
        probs = torch.zeros(K + 1, H, W, device=current.embedding.device)
        probs[0] = 1.0
        return probs, kv

    def _caches(self, buffer: list[_Entry]) -> Optional[list[KVCache]]:
        """Per encoder layer, the buffer frames' keys/values in order (``None``: empty buffer)."""
        if not buffer:
            return None
        return [KVCache(torch.cat([e.kv[i].k for e in buffer], dim=2), torch.cat([e.kv[i].v for e in buffer], dim=2))
                for i in range(len(buffer[0].kv))]

    def _prior(self, keys: Optional[torch.Tensor], K: int) -> Optional[torch.Tensor]:
        """The label prior ``(1, K + 1, h, w)`` read from the memory (``None`` without a prior)."""
        if keys is None:
            return None
        memory = self.memory
        if not memory:  # keep_first=False with prior_context=0: no knowledge
            return torch.full((1, K + 1) + keys.shape[-2:], 1.0 / (K + 1), device=keys.device)
        return self.model.read_prior(keys, torch.stack([e.keys for e in memory])[None],
                                     torch.stack([e.values for e in memory])[None])

    def _remember(self, current: _Frame, probs: torch.Tensor, kv: Optional[list[KVCache]]) -> None:
        """The frame joins the buffer (and the prior's memory) with its predicted labels."""
        (H, W), (Hp, Wp) = current.size, current.padded
        stride, O = self.model.stride, len(self.objects) + 1
        labels = F.pad(channel_argmax(probs), (0, Wp - W, 0, Hp - H), value=-1)
        feature_labels = downsample_labels(labels[None, None], stride, O)[0, 0]
        # a streaming buffer needs only the keys/values: the embedding would be dead weight
        entry = _Entry(self._index, None if kv is not None else current.embedding[0], feature_labels, kv=kv)
        if current.keys is not None:
            entry.keys, entry.values = current.keys[0], cell_values(labels[None], stride, O)[0]
        if self.keep_first and self._first is None:
            self._first = entry
        else:
            self._recent.append(entry)  # the deque's maxlen evicts the oldest recent frame
            if current.keys is not None:
                self._memory.append(entry)

    def _apply_annotation(self, probs: torch.Tensor, annotated: dict[int, torch.Tensor]) -> torch.Tensor:
        """Add new objects' channels and overwrite annotated objects' pixels with the mask."""
        new = [obj for obj in annotated if obj not in self.objects]
        if new:
            probs = torch.cat([probs, probs.new_zeros(len(new), *probs.shape[1:])])
            self.objects.extend(new)
            for entry in self._entries():  # remembered frames did not have the new objects
                if entry.values is not None:
                    entry.values = torch.cat([entry.values, entry.values.new_zeros(len(new), *entry.values.shape[1:])])
        for obj, pixels in annotated.items():
            channel = self.objects.index(obj) + 1
            pixels = pixels.to(probs.device)
            # a re-annotated object is exactly its mask: drop its prediction elsewhere
            probs[channel] = 0.0
            probs[:, pixels] = 0.0
            probs[channel, pixels] = 1.0
        if annotated:
            total = probs.sum(dim=0, keepdim=True)
            probs[0] = torch.where(total[0] == 0, 1.0, probs[0])
            probs = probs / probs.sum(dim=0, keepdim=True)
        return probs

    def _check_frame(self, frame) -> torch.Tensor:
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"frame must be a tensor (3, H, W), got {type(frame).__name__}")
        if frame.dim() != 3 or frame.shape[0] != 3:
            raise ValueError(f"frame must have shape (3, H, W), got {tuple(frame.shape)}")
        if frame.dtype == torch.uint8:
            frame = frame.float() / 255.0
        elif not frame.is_floating_point():
            raise TypeError(f"frame must be float in [0, 1] or uint8, got {frame.dtype}")
        size = tuple(frame.shape[-2:])
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise ValueError(f"frame has size {size} but this video's frames are {self._size}; call reset() first")
        return frame.float()

    def _check_mask(self, mask, objects, size) -> dict[int, torch.Tensor]:
        """``{object id: (H, W) bool pixels}`` of the annotation, after checking it."""
        if mask is None:
            if objects is not None:
                raise ValueError("objects were given without a mask: pass mask=(H, W) object ids too")
            return {}
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be an integer tensor or array (H, W), got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dtype == torch.bool:
            raise TypeError(f"mask must hold integer object ids, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(size):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the frame is {tuple(size)} (H, W)")
        mask = mask.long()
        if mask.numel() and int(mask.min()) < 0:
            raise ValueError(f"mask ids must be >= 0 (0 = background), got {int(mask.min())}")
        present = [int(v) for v in torch.unique(mask).tolist() if v != 0]
        if objects is None:
            ids = present
        else:
            if isinstance(objects, numbers.Integral):
                objects = [objects]
            ids = []
            for obj in objects:
                if isinstance(obj, bool) or not isinstance(obj, numbers.Integral) or obj < 1:
                    raise ValueError(f"objects must be positive int ids (0 is the background), got {obj!r}")
                if int(obj) not in present:
                    raise ValueError(f"object {int(obj)} has no pixel in mask (ids in mask: {present})")
                ids.append(int(obj))
        return {obj: mask == obj for obj in ids}

    # -- a whole video ----------------------------------------------------------------------

    def iter_video(
        self, frames: Iterable[torch.Tensor], annotations: Mapping[int, Annotation]
    ) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Stream a video: one ``(probabilities (1 + K, H, W), object ids)`` per frame.

        Args:
            frames: ``(3, H, W)`` frames (a ``(T, 3, H, W)`` tensor, a list, a generator...).
            annotations: frame index -> mask ``(H, W)``, or ``(mask, objects)``; the first
                annotated frame must come before any frame that is to be segmented.
                Frames before it give empty (all background) results.
        """
        self.reset()
        for t, frame in enumerate(frames):
            mask, objects = _split_annotation(annotations.get(t))
            if not self.objects and mask is None:
                # nothing to track yet: the frame is background
                self._check_frame(frame)
                yield torch.ones(1, *frame.shape[-2:]), []
                continue
            yield self.step(frame, mask, objects), list(self.objects)

    def segment_video(self, frames: Iterable[torch.Tensor], annotations: Mapping[int, Annotation]) -> torch.Tensor:
        """Object ids of every frame, ``(T, H, W)`` long (0 = background)."""
        out = []
        for probs, objects in self.iter_video(frames, annotations):
            ids = torch.tensor([0] + objects, dtype=torch.long)
            out.append(ids[channel_argmax(probs).cpu()])
        return torch.stack(out)


def _split_annotation(annotation) -> tuple[Optional[MaskLike], Optional[Sequence[int]]]:
    if annotation is None:
        return None, None
    if isinstance(annotation, tuple):
        if len(annotation) != 2:
            raise ValueError("an annotation must be a mask or a (mask, objects) pair")
        return annotation
    return annotation, None


__all__ = ["Propagator"]
