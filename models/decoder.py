"""CFBI-like decoder: one logit map per object from shared features and that object's affinities."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .backbone import ConvNormAct, ResidualBlock


class ObjectDecoder(nn.Module):
    """Per object: current-frame embedding + encoder output + the object's and background's
    affinities -> convolutions -> upsampling through the backbone skips -> one logit.

    Concatenating ``[shared, object]`` and convolving is computed as the sum of two
    convolutions, so the shared part runs once per frame instead of once per object.

    With a label ``prior`` (each object's probability read from memory by training-free label
    propagation, :mod:`models.label_propagation`), the prior and its log are two more
    per-object inputs, and the output is ``log prior`` (upsampled) plus the decoder's
    correction gated by the prior's own uncertainty ``4 p (1 - p)`` (1 where the propagation
    hesitates, at object boundaries; near 0 where it is sure). The correction's last
    convolution starts at zero: an untrained decoder reproduces the propagation exactly, and
    training learns to refine it where it is unsure (sharper boundaries from the skips, cells
    the features confuse) but cannot overrule it wholesale: what the clips teach about
    synthetic objects' shapes does not carry to real ones, the propagation's confidence does.

    Args:
        dim: channels of the embedding and of the encoder output.
        affinity_channels: affinities per object, ``L * heads``.
        skip_channels: channels of the backbone skips, finest first.
        hidden: decoder width.
        prior: take a label prior (see above).
        prior_gate: gate the correction by ``4 p (1 - p)``; ``False`` adds it as it is.
    """

    def __init__(self, dim: int, affinity_channels: int, skip_channels: Sequence[int], hidden: int = 32,
                 prior: bool = False, prior_gate: bool = True) -> None:
        super().__init__()
        self.prior, self.prior_gate = prior, prior_gate
        self.shared = nn.Conv2d(2 * dim, hidden, 1)
        # own and background affinities, and the own share of all objects' affinity (+ the prior and its log)
        self.object = nn.Conv2d(3 * affinity_channels + (2 if prior else 0), hidden, 1, bias=False)
        self.fuse = nn.Sequential(nn.GroupNorm(min(8, hidden // 4) or 1, hidden), nn.ReLU(inplace=True))
        self.block = ResidualBlock(hidden)
        # coarsest skip first: the order of upsampling
        self.skips = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in reversed(list(skip_channels)))
        self.refine = nn.ModuleList(ConvNormAct(hidden, hidden) for _ in skip_channels)
        self.head = nn.Conv2d(hidden, 1, 3, 1, 1)
        if prior:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(
        self,
        embedding: torch.Tensor,
        encoding: torch.Tensor,
        affinity: torch.Tensor,
        skips: Sequence[torch.Tensor],
        size: tuple[int, int],
        prior: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Args:
            embedding: current frame's backbone embedding ``(B, C, h, w)``.
            encoding: encoder output for the current frame ``(B, C, h, w)``.
            affinity: ``(B, A, O, h, w)``, object 0 = background.
            skips: current frame's backbone skips, finest first, ``(B, C_i, H/2**(i+1), W/2**(i+1))``.
            size: output ``(H, W)``.
            prior: ``(B, O, h, w)`` label probabilities from memory (needed iff built with ``prior``).

        Returns:
            logits ``(B, O, H, W)``.
        """
        B, A, O = affinity.shape[:3]
        own = affinity
        background = repeat(affinity[:, :, :1], "b a 1 h w -> b a o h w", o=O)
        # how much of the affinity to any labelled cell goes to this object: a cue that is
        # invariant to how peaked each head's softmax is
        share = affinity / affinity.sum(dim=2, keepdim=True).clamp_min(1e-6)
        per_object = rearrange(torch.cat([own, background, share], dim=1), "b a o h w -> (b o) a h w")
        if (prior is None) == self.prior:
            raise ValueError("prior must be given exactly when the decoder was built with prior=True")
        log_prior = None
        if prior is not None:
            # 1e-3 floor: a cell the propagation gives no mass still gets a finite, correctable logit
            log_prior = rearrange(prior.float().clamp_min(1e-3).log(), "b o h w -> (b o) 1 h w")
            per_object = torch.cat([per_object, rearrange(prior, "b o h w -> (b o) 1 h w").to(per_object.dtype),
                                    log_prior.to(per_object.dtype)], dim=1)
        shared = self.shared(torch.cat([embedding, encoding], dim=1))
        x = repeat(shared, "b c h w -> (b o) c h w", o=O) + self.object(per_object)
        x = self.block(self.fuse(x))
        for proj, refine, skip in zip(self.skips, self.refine, reversed(list(skips))):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = refine(x + repeat(proj(skip), "b c h w -> (b o) c h w", o=O))
        logits = self.head(x)
        if log_prior is not None:
            if self.prior_gate:
                p = rearrange(prior.float(), "b o h w -> (b o) 1 h w")
                logits = logits * F.interpolate(4 * p * (1 - p), size=logits.shape[-2:], mode="bilinear",
                                                align_corners=False)
            logits = logits + F.interpolate(log_prior, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return rearrange(logits, "(b o) 1 h w -> b o h w", b=B)
