"""The outer loop's state and update: Adam on the flat MLN weights.

``MetaTrainer.train_step`` takes this worker's tasks and a ``reduce``. It is
the whole meta-step apart from fetching tasks, so the in-process driver and
the Ray workers call the same code.
"""

from __future__ import annotations

import math

import torch

from mln_core.config import Config
from mln_core.estimators import Reduce, local_sum, make_estimator
from mln_core.loss_net import MetaLossNet, ParamLayout
from mln_core.tasks import TaskBatch, generate_tasks

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteMetaGradientError(RuntimeError):
    """Raised when meta-gradients stay non-finite for MAX_CONSECUTIVE_SKIPS steps in a row."""


def init_loss_net(config: Config) -> MetaLossNet:
    """Build the MLN with weights drawn from ``train.seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        return MetaLossNet(config.loss_net)


def task_share(config: Config, step: int, rank: int = 0, world_size: int = 1, splits_tasks: bool = True) -> range:
    """Global indices of the training tasks that worker ``rank`` uses at meta-step ``step``.

    Step s uses tasks [s T, (s + 1) T) of the stream ``train.seed``. With task
    splitting, each worker takes a contiguous share, and shares differ by at most one task.
    """
    per_step = config.train.tasks_per_step
    start = step * per_step
    if not splits_tasks:
        return range(start, start + per_step)
    return range(start + rank * per_step // world_size, start + (rank + 1) * per_step // world_size)


class MetaTrainer:
    """MLN weights, optimizer and step counter of one run (one per worker)."""

    def __init__(self, config: Config, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> None:
        if config.train.tasks_per_step < world_size:
            raise ValueError(
                f"train.tasks_per_step={config.train.tasks_per_step} is smaller than the {world_size} workers: "
                "raise it so that every worker gets at least one task"
            )
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.net = init_loss_net(config).to(self.device)
        self.layout = ParamLayout(self.net)
        self.meta_params = torch.nn.Parameter(self.layout.flatten(self.net))  # [M]
        self.optimizer = torch.optim.Adam([self.meta_params], lr=config.train.lr)
        self.estimator = make_estimator(config, self.net, self.layout, rank, world_size)
        self.step = 0
        self.consecutive_skips = 0

    def my_task_indices(self, step: int | None = None) -> range:
        step = self.step if step is None else step
        return task_share(self.config, step, self.rank, self.world_size, self.estimator.splits_tasks)

    def generate_my_tasks(self) -> TaskBatch:
        tasks = generate_tasks(self.config.tasks, self.config.train.seed, self.my_task_indices())
        return tasks.to(self.device)

    def train_step(self, tasks: TaskBatch, reduce: Reduce = local_sum) -> dict[str, float]:
        """Estimate the meta-gradient on ``tasks``, then clip it and apply one Adam step."""
        result = self.estimator.estimate(self.meta_params.detach(), tasks, self.step, reduce)
        grad_norm = float(result.gradient.norm())
        metrics = {
            "meta/step": float(self.step),
            "meta/objective": result.objective,
            "meta/grad_norm": grad_norm,
            **result.metrics,
        }

        # Every worker has the same reduced gradient, so all of them skip or update alike.
        if not math.isfinite(grad_norm) or not math.isfinite(result.objective):
            metrics["meta/skipped_nonfinite"] = 1.0
            self.consecutive_skips += 1
            if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteMetaGradientError(
                    f"the meta-gradient was non-finite for {self.consecutive_skips} steps in a row (last at step "
                    f"{self.step}): lower inner.lr or train.lr, or change inner.optimizer"
                )
        else:
            self.consecutive_skips = 0
            scale = min(1.0, self.config.train.grad_clip / (grad_norm + 1e-12))
            self.meta_params.grad = result.gradient * scale
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            metrics["meta/skipped_nonfinite"] = 0.0
        self.step += 1
        return metrics

    def loss_net(self) -> MetaLossNet:
        """Return a copy of the MLN with the current weights, sharing no storage with the trainer."""
        net = init_loss_net(self.config)
        self.layout.load_into(net, self.meta_params.detach().cpu())
        return net

    def state_dict(self) -> dict:
        return {
            "meta_params": self.meta_params.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        flat = state["meta_params"]
        if flat.shape != self.meta_params.shape:
            raise ValueError(
                f"checkpoint has {tuple(flat.shape)} MLN weights but loss_net config gives {tuple(self.meta_params.shape)}"
            )
        with torch.no_grad():
            self.meta_params.copy_(flat.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
