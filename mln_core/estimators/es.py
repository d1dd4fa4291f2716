"""Antithetic evolution strategy with fitness shaping, the estimator of Hai et al. (arXiv 2111.10583).

Each of the P/2 noise vectors ``eps_j`` is drawn from (run seed, meta-step,
j), so any worker regenerates any member without communication. The MLN is
evaluated at ``theta +- sigma * eps_j`` on the same tasks; the estimate of the
gradient of the mean objective is

    g = sum_j (s(f+_j) - s(f-_j)) eps_j / (P sigma)

where ``s`` maps the P objectives to centered ranks in [-0.5, 0.5] (or is the
identity with fitness_shaping="none", which makes g an unbiased estimate of
the gradient of the Gaussian-smoothed objective).
"""

from __future__ import annotations

import torch
from torch.func import vmap

from mln_core import rng
from mln_core.config import Config
from mln_core.estimators.base import MetaGradient, Reduce, TaskObjective, local_sum
from mln_core.tasks import TaskBatch

_NOISE_STREAM = 51


def centered_ranks(values: torch.Tensor) -> torch.Tensor:
    """Map values ``[P]`` to their ranks scaled to [-0.5, 0.5] (ties broken by position)."""
    ranks = torch.empty_like(values)
    ranks[values.argsort()] = torch.arange(values.numel(), dtype=values.dtype, device=values.device)
    return ranks / max(values.numel() - 1, 1) - 0.5


class EvolutionStrategy:
    def __init__(self, config: Config, task_objective: TaskObjective, seed: int, rank: int = 0, world_size: int = 1):
        self.task_objective = task_objective
        self.es = config.estimator.es
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.splits_tasks = self.es.split == "tasks"

    def noise(self, step: int, pairs: torch.Tensor, numel: int) -> torch.Tensor:
        """Noise vectors ``[len(pairs), M]`` of the given antithetic pairs at a meta-step."""
        return rng.normal(rng.fold_keys(self.seed, _NOISE_STREAM, step, pairs), (numel,))

    def estimate(self, meta_flat: torch.Tensor, tasks: TaskBatch, step: int, reduce: Reduce = local_sum) -> MetaGradient:
        num_pairs = self.es.population // 2
        all_pairs = torch.arange(num_pairs)
        # Population split: this worker evaluates every world_size-th pair on all tasks.
        my_pairs = all_pairs if self.splits_tasks else all_pairs[self.rank :: self.world_size]
        meta_flat = meta_flat.detach()
        eps = self.noise(step, my_pairs, meta_flat.numel()).to(meta_flat.device)  # [J, M]
        members = torch.cat([meta_flat + self.es.sigma * eps, meta_flat - self.es.sigma * eps])  # [2J, M]

        with torch.no_grad():
            per_task, val_accuracy = vmap(self.task_objective, in_dims=(0, None))(members, tasks)  # [2J, T] each

        # Sums over this worker's tasks, placed into the full population; then one all-reduce.
        num_members = 2 * num_pairs
        fitness_sum = torch.zeros(num_members, device=meta_flat.device)
        accuracy_sum = torch.zeros(num_members, device=meta_flat.device)
        rows = torch.cat([my_pairs, my_pairs + num_pairs]).to(meta_flat.device)
        fitness_sum[rows] = per_task.sum(-1)
        accuracy_sum[rows] = val_accuracy.sum(-1)
        counts = torch.zeros(num_members, device=meta_flat.device)
        counts[rows] = float(tasks.size)
        packed = reduce(torch.cat([fitness_sum, accuracy_sum, counts]))
        fitness_sum, accuracy_sum, counts = packed.split(num_members)
        fitness = fitness_sum / counts  # [P] mean objective of each member

        if self.es.fitness_shaping == "centered_ranks":
            utility = centered_ranks(fitness)
        else:
            utility = fitness
        weights = utility[:num_pairs] - utility[num_pairs:]  # [P/2]
        all_eps = eps if self.splits_tasks else self.noise(step, all_pairs, meta_flat.numel()).to(meta_flat.device)
        gradient = weights @ all_eps / (num_members * self.es.sigma)
        return MetaGradient(
            gradient=gradient,
            objective=float(fitness.mean()),
            metrics={
                "inner/val_accuracy": float((accuracy_sum / counts).mean()),
                "meta/tasks": float(counts[0]),
                "es/fitness_std": float(fitness.std()),
            },
        )
