"""Training losses of the VOS model: bootstrapped cross-entropy and a soft IoU term.

Logits are ``(B, O, H, W)`` with the background as object 0; targets ``(B, H, W)`` ids.
Objects a sample does not have (variable object counts padded to one ``O``) are marked
by ``valid`` and take no probability mass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (B, O, H, W), got {tuple(logits.shape)}")
    B, O, H, W = logits.shape
    if target.shape != (B, H, W):
        raise ValueError(f"target must have shape {(B, H, W)} to match logits, got {tuple(target.shape)}")
    if target.dtype.is_floating_point:
        raise TypeError(f"target must hold integer object ids, got {target.dtype}")
    if target.numel() and (target.min() < 0 or target.max() >= O):
        raise ValueError(f"target ids must lie in [0, {O}), got [{int(target.min())}, {int(target.max())}]")
    if valid is None:
        return logits
    if valid.shape != (B, O) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape {(B, O)}, got {valid.dtype} {tuple(valid.shape)}")
    # absent objects get a large negative logit rather than -inf so that gradients stay finite
    return logits.masked_fill(~valid[:, :, None, None], -1e4)


def bootstrap_ratio(step: int, start: float = 1.0, end: float = 0.15, ramp_steps: int = 1000) -> float:
    """Fraction of hardest pixels kept: linear from ``start`` to ``end`` over ``ramp_steps``."""
    if ramp_steps <= 0:
        return end
    f = min(max(step / ramp_steps, 0.0), 1.0)
    return start + (end - start) * f


def bootstrapped_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ratio: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean cross-entropy over the ``ratio`` fraction of each sample's pixels with the highest loss.

    Args:
        logits: ``(B, O, H, W)``.
        target: ``(B, H, W)`` ids in ``[0, O)``.
        ratio: in ``(0, 1]``; ``1`` is plain cross-entropy.
        valid: optional ``(B, O)`` bool, the objects each sample has.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    logits = _check(logits, target, valid)
    pixel = F.cross_entropy(logits.float(), target.long(), reduction="none").flatten(1)  # (B, HW)
    k = max(1, int(round(ratio * pixel.shape[1])))
    if k >= pixel.shape[1]:
        return pixel.mean()
    return pixel.topk(k, dim=1, sorted=False).values.mean()


def soft_iou_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None, eps: float = 1.0
) -> torch.Tensor:
    """``1 - soft IoU`` of the softmax probabilities, averaged over each sample's foreground objects.

    ``eps`` smooths the ratio so that an object absent from both prediction and target
    costs nothing.
    """
    logits = _check(logits, target, valid)
    B, O = logits.shape[:2]
    prob = logits.float().softmax(dim=1)
    onehot = F.one_hot(target.long(), O).permute(0, 3, 1, 2).to(prob.dtype)
    inter = (prob * onehot).sum((2, 3))
    union = (prob + onehot - prob * onehot).sum((2, 3))
    iou = (inter + eps) / (union + eps)  # (B, O)
    weight = torch.ones(B, O, device=logits.device) if valid is None else valid.float()
    weight[:, 0] = 0  # the background is scored through the objects
    if weight.sum() == 0:
        return logits.sum() * 0.0
    return ((1 - iou) * weight).sum() / weight.sum()


def vos_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    step: int,
    valid: Optional[torch.Tensor] = None,
    ramp_steps: int = 1000,
    end_ratio: float = 0.15,
    iou_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bootstrapped cross-entropy (hardest-pixel ratio ramped down over training) plus soft IoU.

    Returns:
        the loss and its parts as floats (for logging).
    """
    ratio = bootstrap_ratio(step, 1.0, end_ratio, ramp_steps)
    ce = bootstrapped_cross_entropy(logits, target, ratio, valid)
    iou = soft_iou_loss(logits, target, valid)
    return ce + iou_weight * iou, {"ce": float(ce.detach()), "iou": float(iou.detach()), "ratio": ratio}
