"""Meta-objectives: how far a trained classifier is from a good one (lower is better).

``teacher_cosine`` is the paper's measure of the difference between the learned
linear classifier and the ground truth. Both are written as augmented rows
``A = [W | b]`` of shape ``[C, D + 1]``. Predictions do not change when every
row gets the same vector added or when A is scaled by a positive factor, so
the measure removes both first:

    A_c = A - mean over valid classes of A's rows
    teacher_cosine = 1 - <A_c, A*_c> / (||A_c|| ||A*_c|| + eps)   (Frobenius)

It is 0 when the classifiers agree up to those changes and at most 2.
"""

from __future__ import annotations

import torch
from torch.func import vmap

from mln_core import inner
from mln_core.tasks import TaskBatch

_EPS = 1e-8


def _centred_rows(rows: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    mask = class_mask[..., None].to(rows.dtype)  # [T, C, 1]
    mean = (rows * mask).sum(-2, keepdim=True) / mask.sum(-2, keepdim=True)
    return (rows - mean) * mask


def teacher_cosine(params: inner.Params, tasks: TaskBatch) -> torch.Tensor:
    """1 - cosine similarity of the centred rows of classifier and teacher, per task ``[T]``."""
    if tasks.teacher is None or "weight" not in params:
        raise ValueError("teacher_cosine needs linear tasks and a linear classifier")
    learned = torch.cat([params["weight"], params["bias"][..., None]], dim=-1)  # [T, C, D + 1]
    learned = _centred_rows(learned, tasks.class_mask).flatten(1)
    teacher = _centred_rows(tasks.teacher, tasks.class_mask).flatten(1)
    # eps inside the square root keeps the gradient finite at the all-zero start.
    cosine = (learned * teacher).sum(-1) / (
        torch.sqrt((learned**2).sum(-1) + _EPS) * torch.sqrt((teacher**2).sum(-1) + _EPS)
    )
    return 1.0 - cosine


def val_cross_entropy(params: inner.Params, tasks: TaskBatch) -> torch.Tensor:
    """Validation cross-entropy per task ``[T]``."""
    logits = vmap(inner.masked_logits)(params, tasks.val_x, tasks.class_mask)  # [T, N, C]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tasks.val_y, reduction="none").mean(-1)


def val_error(params: inner.Params, tasks: TaskBatch) -> torch.Tensor:
    """Validation error rate per task ``[T]`` (not differentiable)."""
    return 1.0 - inner.accuracy(params, tasks.val_x, tasks.val_y, tasks.class_mask)


OBJECTIVES = {"teacher_cosine": teacher_cosine, "val_ce": val_cross_entropy, "val_error": val_error}
