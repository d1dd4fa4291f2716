"""Loss functions of the inner loop with one signature: (meta_params, logits, target, class_mask).

Baselines ignore ``meta_params``; the MLN reads its weights from it so that
vmap can batch a population of loss networks. Each returns the mean over
samples of one task.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mln_core.loss_net import MetaLossNet, mln_per_sample, onehot_targets

LossFn = Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(meta_params: dict, logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


def mean_squared_error(
    meta_params: dict, logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor
) -> torch.Tensor:
    """Squared error between softmax probabilities and the one-hot target (the Brier score)."""
    prob = torch.softmax(logits, dim=-1)
    onehot = onehot_targets(target, logits.shape[-1], prob.dtype)
    return (((prob - onehot) ** 2) * class_mask).sum(-1).mean()


def meta_loss(net: MetaLossNet) -> LossFn:
    """Return the MLN as a loss function whose weights are passed per call."""

    def loss(meta_params: dict, logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        return mln_per_sample(net, meta_params, logits, target, class_mask).mean()

    return loss


BASELINES: dict[str, LossFn] = {"ce": cross_entropy, "mse": mean_squared_error}
