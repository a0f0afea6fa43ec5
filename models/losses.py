"""Training losses.

- :func:`dice_ce_loss`: cross-entropy + soft Dice over the foreground classes (segmentation logits
  (N, C, H, W), integer targets (N, H, W) in 0..C-1; ``ignore_index`` pixels excluded).
- :func:`heatmap_loss`: weighted MSE between predicted and Gaussian target heatmaps (foreground
  pixels up-weighted so the mostly-empty maps do not collapse to zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
                 dice_weight: float = 1.0, ignore_index: int = 255, eps: float = 1.0,
                 union_classes: tuple[int, ...] | None = None, union_weight: float = 1.0) -> torch.Tensor:
    """CE + (1 − mean soft Dice of the present foreground classes). With ``union_classes`` (e.g. (1, 2):
    capillary ∪ blurred) a Dice term on their summed probability is added (``union_weight``), so a
    vessel found but given the sibling class still counts as found (it drives sensitivity)."""
    ce = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    valid = (target != ignore_index).unsqueeze(1).float()
    t = target.clone()
    t[t == ignore_index] = 0
    prob = logits.softmax(1) * valid
    onehot = F.one_hot(t, logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum((0, 2, 3))[1:] > 0
    fg = dice[1:][present] if present.any() else dice[1:2]
    loss = ce + dice_weight * (1 - fg.mean())
    if union_classes:
        pu = prob[:, list(union_classes)].sum(1)
        tu = onehot[:, list(union_classes)].sum(1)
        du = (2 * (pu * tu).sum() + eps) / (pu.sum() + tu.sum() + eps)
        loss = loss + union_weight * (1 - du)
    return loss


def heatmap_loss(pred: torch.Tensor, target: torch.Tensor, fg_weight: float = 20.0,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """pred/target (N, K, H, W); valid (N, K) 0/1 masks absent points."""
    w = 1.0 + fg_weight * target
    err = w * (pred - target) ** 2
    if valid is not None:
        err = err * valid[:, :, None, None]
        return err.sum() / (valid.sum().clamp(min=1) * pred.shape[-1] * pred.shape[-2])
    return err.mean()
