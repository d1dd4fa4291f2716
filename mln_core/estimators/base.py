"""The interface every meta-gradient estimator implements, and shared bookkeeping.

An estimator receives only its worker's share of a meta-step. Sums over tasks (or
over population members) go through ``reduce``, a sum over all workers that
is the identity in a single process, so every worker ends with the same
gradient and the distributed layer only has to pass an all-reduce in.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch

from mln_core import inner, losses, objective
from mln_core.config import Config
from mln_core.loss_net import MetaLossNet, ParamLayout
from mln_core.tasks import TaskBatch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def local_sum(values: torch.Tensor) -> torch.Tensor:
    """Return ``values`` unchanged: the ``reduce`` of a single process, which has nothing to add."""
    return values


@dataclasses.dataclass(frozen=True)
class MetaGradient:
    """One meta-step's estimate, identical on every worker after ``reduce``."""

    gradient: torch.Tensor  # [M] flat, of the mean meta-objective
    objective: float  # mean meta-objective over the step's tasks
    metrics: dict[str, float]


class Estimator(Protocol):
    splits_tasks: bool  # False when every worker must see the whole task batch

    def estimate(self, meta_flat: torch.Tensor, tasks: TaskBatch, step: int, reduce: Reduce = local_sum) -> MetaGradient:
        """Estimate the gradient of the mean meta-objective at ``meta_flat`` ``[M]``."""
        ...


class TaskObjective:
    """Meta-objective per task ``[T]`` of classifiers trained with the MLN at given weights."""

    def __init__(self, config: Config, net: MetaLossNet, layout: ParamLayout) -> None:
        self.inner_config = config.inner
        self.loss_fn = losses.meta_loss(net)
        self.objective_fn = objective.OBJECTIVES[config.estimator.objective]
        self.layout = layout

    def __call__(
        self, meta_flat: torch.Tensor, tasks: TaskBatch, graph_steps: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (objective ``[T]``, validation accuracy ``[T]``)."""
        meta_params = self.layout.unflatten(meta_flat)
        params = inner.unroll(tasks, self.inner_config, self.loss_fn, meta_params, graph_steps=graph_steps)
        with torch.no_grad():
            val_accuracy = inner.accuracy(params, tasks.val_x, tasks.val_y, tasks.class_mask)
        return self.objective_fn(params, tasks), val_accuracy
