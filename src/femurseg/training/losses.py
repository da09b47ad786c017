"""Training losses: the class-weighted cross-entropy of paper 002 (Eq. 1), soft Dice, and both.

All losses take **logits** ``(B, C, *S)`` (or log-probabilities: ``log_softmax`` of
log-probabilities is the identity, so validation can pass ``log(p)``) and an integer
target ``(B, *S)`` with values in ``[0, C)``.

Class-weighted cross-entropy (paper 002, Eq. 1; paper 001 Methods)::

    CE = -1/N sum_i ( Np/N y_i log p_i + Nb/N (1 - y_i) log(1 - p_i) )          (Eq. 1, literal)

N voxels, Np femur and Nb background voxels, y_i the label, p_i the femur probability.
Read literally, Eq. 1 weights the femur term by Np/N, the femur's *own* frequency, which
*down*-weights the rare femur class and contradicts the papers' sentence that the weighting
gives femur voxels "more importance". The default ``"wce"`` implements the intended
inverse-frequency weighting::

    CE = -1/N sum_i ( Nb/N y_i log p_i + Np/N (1 - y_i) log(1 - p_i) )          ("wce", default)

(femur errors weighted by the background fraction, background errors by the femur
fraction); ``"wce-literal"`` is Eq. 1 as printed. For C > 2 classes both generalise per
class: weight ``1 - N_c/N`` ("wce") or ``N_c/N`` ("wce-literal"). The normalisation stays
1/N as in Eq. 1 (not the sum of weights).

The class counts come from the target of the batch (all its voxels together; with the
paper's batch size 1: per volume) unless ``fractions`` ``(B, C)`` is given: training on 2D
slices or 3D patches passes the class fractions of each sample's whole (preprocessed)
volume, so a slice without femur still gets the volume's weights instead of a zero
background weight.

Soft Dice: ``1 - mean_c (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps)`` over the
foreground classes (c >= 1), summed over the batch's voxels. ``"dice-wce"`` adds "wce";
``"dice-ce"`` adds the unweighted cross-entropy (nnU-Net's default loss).

Why the weighting matters at a boundary: the minimiser of a class-weighted cross-entropy is
not the posterior p but p' with ``p'/(1-p') = (w_1/w_0) p/(1-p)``. With inverse-frequency
weights and a bone fraction of 11 % (a femur crop), w_1/w_0 = 8, so the weighted CE alone
calls a voxel bone (``p' >= 0.5``) wherever its true posterior is above ~0.11. Adding soft
Dice (whose own balance point is a posterior of 0.5 when the Dice is near 1) weakens the shift
but keeps its direction: partial-volume voxels just outside the surface lean towards bone. That
hardly moves a whole-bone Dice but it biases a thin compartment (the neck cortex, the
difference of two surfaces) outwards; "ce" and "dice-ce" have no such shift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from femurseg.core.errors import FemursegError

LOSSES = ("wce", "wce-literal", "ce", "dice", "dice-wce", "dice-ce")


def class_fractions(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of voxels of each class over the whole of ``target``: shape ``(C,)`` float64."""
    counts = torch.bincount(target.reshape(-1).long(), minlength=num_classes)[:num_classes]
    return counts.double() / max(target.numel(), 1)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, literal: bool = False,
                           fractions: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted cross-entropy (paper 002 Eq. 1); see the module docstring.

    Args:
        logits: ``(B, C, *S)`` logits (or log-probabilities).
        target: ``(B, *S)`` integer labels.
        literal: Eq. 1 as printed (class weight = own frequency) instead of inverse frequency.
        fractions: optional ``(B, C)`` or ``(C,)`` class fractions to weight with instead of
            the batch's own counts.

    Returns:
        Scalar loss (float32): ``-1/N sum_i w_{y_i} log p_{i, y_i}`` over all B * prod(S) voxels.
    """
    c = logits.shape[1]
    logp = F.log_softmax(logits.float(), dim=1)
    tgt = target.long()
    picked = logp.gather(1, tgt.unsqueeze(1)).squeeze(1)  # (B, *S): log p of the true class
    if fractions is None:
        frac = class_fractions(tgt, c).to(logp.device, torch.float32)
        frac = frac.expand(tgt.shape[0], c)
    else:
        frac = fractions.to(logp.device, torch.float32)
        if frac.ndim == 1:
            frac = frac.expand(tgt.shape[0], c)
    weights = frac if literal else 1.0 - frac  # (B, C)
    w = weights.gather(1, tgt.reshape(tgt.shape[0], -1)).reshape(tgt.shape)  # weight of each voxel's class
    return -(w * picked).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean over foreground classes of the soft Dice`` (sums over the whole batch)."""
    c = logits.shape[1]
    prob = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), c).movedim(-1, 1).float()
    dims = (0, *range(2, prob.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[1:].mean()


def deep_supervision_loss(loss_fn: Callable[..., torch.Tensor], outputs: Sequence[torch.Tensor], target: torch.Tensor,
                          fractions: torch.Tensor | None = None) -> torch.Tensor:
    """nnU-Net's deep-supervision loss: ``sum_k w_k loss_fn(outputs[k], target_k)``.

    ``outputs``: full-resolution logits ``(B, C, *S)`` first, then coarser ones (each ``S / 2**k``
    rounded up, see :class:`femurseg.models.unet.UNet`). ``target_k`` is ``target`` ``(B, *S)``
    resampled to output ``k``'s size by nearest neighbour; ``w_k = 2**-k``, normalised to sum 1.
    """
    weights = [2.0 ** -k for k in range(len(outputs))]
    total = sum(weights)
    loss = torch.zeros((), device=target.device)
    for w, logits in zip(weights, outputs):
        t = target
        if tuple(logits.shape[2:]) != tuple(target.shape[1:]):
            t = F.interpolate(target[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + (w / total) * loss_fn(logits, t, fractions=fractions)
    return loss


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss ``name`` as ``fn(logits, target, fractions=None) -> scalar``."""
    if name == "wce":
        return lambda lg, t, fractions=None: weighted_cross_entropy(lg, t, fractions=fractions)
    if name == "wce-literal":
        return lambda lg, t, fractions=None: weighted_cross_entropy(lg, t, literal=True, fractions=fractions)
    if name == "ce":
        return lambda lg, t, fractions=None: F.cross_entropy(lg.float(), t.long())
    if name == "dice":
        return lambda lg, t, fractions=None: soft_dice_loss(lg, t)
    if name == "dice-wce":
        return lambda lg, t, fractions=None: soft_dice_loss(lg, t) + weighted_cross_entropy(lg, t, fractions=fractions)
    if name == "dice-ce":
        ce = get_loss("ce")
        return lambda lg, t, fractions=None: soft_dice_loss(lg, t) + ce(lg, t)
    raise FemursegError(f"--loss: {name!r} is not one of {', '.join(LOSSES)}")
