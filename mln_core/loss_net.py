"""The meta-loss network (MLN) and its drop-in loss module.

One small MLP ``f`` is shared by all classes. For a sample with predicted
probabilities ``p`` and one-hot target ``y`` the loss is
``sum_c f(p_c, y_c)`` over the task's valid classes, so the same network
serves any number of classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from mln_core.config import LossNetConfig

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
}


def onehot_targets(target: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot ``[..., C]`` of class indices; unlike ``F.one_hot`` it works under vmap."""
    return (target[..., None] == torch.arange(num_classes, device=target.device)).to(dtype)


class MetaLossNet(nn.Module):
    """Per-class loss ``f(p_c, y_c)``, summed over valid classes."""

    def __init__(self, config: LossNetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = 2
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, config.hidden_width), _ACTIVATIONS[config.activation]()]
            width_in = config.hidden_width
        layers.append(nn.Linear(width_in, 1))
        self.mlp = nn.Sequential(*layers)
        self.tanh_via_sigmoid = config.activation == "tanh"

    def _tanh_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as ``self.mlp`` with tanh, computed with sigmoid.

        tanh(z) = 2 sigmoid(2 z) - 1, and the factor 2 and the shift -1 fold
        into the neighbouring layers' weights, which are tiny, instead of the
        activations, which are [..., C, H]. torch.tanh ran 12 times slower than
        torch.sigmoid on torch 2.13's CPU build (2.6 million floats: 3.9 ms
        against 0.32 ms on a 2-core AMD EPYC), and these activations are most
        of the inner loop's work.
        """
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # 2-D inputs let linear fuse the bias add into the matmul
        weight, bias = linears[0].weight, linears[0].bias
        for layer in linears[1:]:
            x = torch.sigmoid(nn.functional.linear(x, 2.0 * weight, 2.0 * bias))
            # The next layer's input is 2 s - 1 instead of s, so scale its weight and shift its bias.
            weight, bias = 2.0 * layer.weight, layer.bias - layer.weight.sum(-1)
        return nn.functional.linear(x, weight, bias).reshape(*leading, weight.shape[0])

    def forward(self, prob: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the loss of each sample: ``prob`` and one-hot ``target`` are ``[..., C]``, the result ``[...]``."""
        # Centre both inputs on 0 so the first layer starts in tanh's linear range.
        pairs = torch.stack([2.0 * prob - 1.0, 2.0 * target - 1.0], dim=-1)  # [..., C, 2]
        if self.tanh_via_sigmoid:
            per_class = self._tanh_mlp(pairs).squeeze(-1)  # [..., C]
        else:
            per_class = self.mlp(pairs).squeeze(-1)
        if class_mask is not None:
            per_class = per_class * class_mask
        return per_class.sum(-1)


class ParamLayout:
    """Maps a module's parameters to one flat vector and back.

    Estimators and the all-reduce work on flat vectors ``[M]`` (or ``[P, M]``
    for a population); ``unflatten`` turns a row back into the dict that
    ``torch.func.functional_call`` takes.
    """

    def __init__(self, module: nn.Module) -> None:
        self.names = [name for name, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat.shape[-1] != self.numel:
            raise ValueError(f"flat parameter vector has {flat.shape[-1]} entries, expected {self.numel}")
        chunks = torch.split(flat, self.sizes, dim=-1)
        return {
            name: chunk.reshape(flat.shape[:-1] + shape)
            for name, chunk, shape in zip(self.names, chunks, self.shapes)
        }

    def load_into(self, module: nn.Module, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for param, value in zip(module.parameters(), self.unflatten(flat).values()):
                param.copy_(value)


def mln_per_sample(
    net: MetaLossNet,
    meta_params: dict[str, torch.Tensor],
    logits: torch.Tensor,
    target: torch.Tensor,
    class_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Apply the MLN with explicit parameters: ``logits [N, C]``, ``target [N]`` to losses ``[N]``."""
    prob = torch.softmax(logits, dim=-1)
    onehot = onehot_targets(target, logits.shape[-1], logits.dtype)
    return functional_call(net, meta_params, (prob, onehot, class_mask))


class MetaLoss(nn.Module):
    """A trained MLN as a drop-in replacement for ``torch.nn.CrossEntropyLoss``.

    ``loss_fn(logits, target)`` takes logits ``[N, C]`` and class indices
    ``[N]``; ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``. The network's
    parameters are frozen (``requires_grad=False``), so only the classifier
    being trained receives gradients.
    """

    def __init__(self, net: MetaLossNet, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r} is invalid: use 'mean', 'sum' or 'none'")
        self.net = net.requires_grad_(False)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits [N, C] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"target must contain class indices (int64), got dtype {target.dtype}")
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise ValueError(f"logits have {num_classes} class; the MLN needs at least 2")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
            raise ValueError(
                f"target contains class indices outside [0, {num_classes - 1}] (min {int(target.min())}, "
                f"max {int(target.max())}); ignore_index is not supported, so drop those samples first"
            )
        # The MLN's weights set the compute dtype; the loss comes back in the logits' dtype.
        weight_dtype = next(self.net.parameters()).dtype
        prob = torch.softmax(logits.to(weight_dtype), dim=-1)
        onehot = onehot_targets(target.long(), num_classes, weight_dtype)
        losses = self.net(prob, onehot).to(logits.dtype)
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses
