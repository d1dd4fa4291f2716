"""Meta-gradient by backpropagation through the unrolled inner loop.

With ``truncation`` set, only the last that many inner steps carry a graph to
the MLN weights. This is biased (earlier steps are treated as constants) but
bounds memory and time; null backpropagates through all K steps.
"""

from __future__ import annotations

import torch

from mln_core.config import Config
from mln_core.estimators.base import MetaGradient, Reduce, TaskObjective, local_sum
from mln_core.tasks import TaskBatch


class BackpropEstimator:
    splits_tasks = True

    def __init__(self, config: Config, task_objective: TaskObjective) -> None:
        self.task_objective = task_objective
        self.truncation = config.estimator.backprop.truncation

    def estimate(self, meta_flat: torch.Tensor, tasks: TaskBatch, step: int, reduce: Reduce = local_sum) -> MetaGradient:
        leaf = meta_flat.detach().clone().requires_grad_(True)
        per_task, val_accuracy = self.task_objective(leaf, tasks, graph_steps=self.truncation)  # [T], [T]
        (grad_sum,) = torch.autograd.grad(per_task.sum(), leaf)

        # Distributed: one all-reduce of [gradient sum, objective sum, accuracy sum, task count].
        packed = torch.cat([
            grad_sum,
            torch.stack([per_task.detach().sum(), val_accuracy.sum(), torch.tensor(float(tasks.size))]),
        ])
        packed = reduce(packed)
        count = packed[-1]
        return MetaGradient(
            gradient=packed[:-3] / count,
            objective=float(packed[-3] / count),
            metrics={"inner/val_accuracy": float(packed[-2] / count), "meta/tasks": float(count)},
        )
