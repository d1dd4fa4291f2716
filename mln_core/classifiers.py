"""Classifiers trained in the inner loop, as pure functions of a parameter dict.

Parameters carry a leading task dimension T when initialised. The logits
functions receive one task at a time because the inner loop maps them with vmap.
"""

from __future__ import annotations

import torch

from mln_core import rng
from mln_core.config import InnerConfig

_INIT_STREAM = 31


def init_params(config: InnerConfig, key: torch.Tensor, num_features: int, num_classes: int) -> dict[str, torch.Tensor]:
    """Initial classifier parameters for T tasks, one per entry of ``key`` ``[T]``.

    The linear classifier starts at zero: its objective is convex, and weights of
    padded features and classes then stay exactly zero. The MLP needs random
    weights to break symmetry; they are drawn from the task's key.
    """
    tasks = key.shape[0]
    if config.classifier == "linear":
        return {
            "weight": torch.zeros(tasks, num_classes, num_features),
            "bias": torch.zeros(tasks, num_classes),
        }
    width = config.hidden_width
    init_key = rng.mix64(key ^ _INIT_STREAM)
    return {
        "w1": rng.normal(rng.mix64(init_key ^ 1), (width, num_features)) * num_features**-0.5,  # [T, H, D]
        "b1": torch.zeros(tasks, width),
        "w2": rng.normal(rng.mix64(init_key ^ 2), (num_classes, width)) * width**-0.5,  # [T, C, H]
        "b2": torch.zeros(tasks, num_classes),
    }


def logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, C]`` of one task's classifier on inputs ``x`` ``[N, D]``."""
    if "weight" in params:
        return x @ params["weight"].T + params["bias"]
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return hidden @ params["w2"].T + params["b2"]
