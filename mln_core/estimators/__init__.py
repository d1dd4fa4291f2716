"""Meta-gradient estimators behind one interface (see ``base.Estimator``)."""

from __future__ import annotations

from mln_core.config import Config
from mln_core.estimators.backprop import BackpropEstimator
from mln_core.estimators.base import Estimator, MetaGradient, Reduce, TaskObjective, local_sum
from mln_core.estimators.es import EvolutionStrategy
from mln_core.loss_net import MetaLossNet, ParamLayout

__all__ = ["Estimator", "MetaGradient", "Reduce", "local_sum", "make_estimator"]


def make_estimator(
    config: Config, net: MetaLossNet, layout: ParamLayout, rank: int = 0, world_size: int = 1
) -> Estimator:
    """Build the configured estimator for worker ``rank`` of ``world_size``."""
    task_objective = TaskObjective(config, net, layout)
    if config.estimator.kind == "es":
        return EvolutionStrategy(config, task_objective, config.train.seed, rank, world_size)
    return BackpropEstimator(config, task_objective)
