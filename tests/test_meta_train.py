import math

import pytest
import torch

from mln_core.estimators import MetaGradient
from mln_core.meta_train import MetaTrainer
from tests.helpers import tiny_config


class _FixedEstimator:
    splits_tasks = True

    def __init__(self, gradient, objective=0.5):
        self.gradient, self.objective = gradient, objective

    def estimate(self, meta_flat, tasks, step, reduce=None):
        return MetaGradient(self.gradient, self.objective, {})


def test_nonfinite_gradient_skipped():
    trainer = MetaTrainer(tiny_config())
    before = trainer.meta_params.detach().clone()
    trainer.estimator = _FixedEstimator(torch.full_like(before, math.nan))
    metrics = trainer.train_step(trainer.generate_my_tasks())
    assert metrics["meta/skipped_nonfinite"] == 1.0
    assert torch.equal(trainer.meta_params.detach(), before)
    assert trainer.step == 1


def test_gradient_clipped_to_max_norm():
    trainer = MetaTrainer(tiny_config("train.grad_clip=0.5", "train.lr=1e-3"))
    gradient = torch.ones_like(trainer.meta_params) * 100.0
    trainer.estimator = _FixedEstimator(gradient)
    seen = []
    original_step = trainer.optimizer.step

    def record_step():
        seen.append(trainer.meta_params.grad.norm().item())
        original_step()

    trainer.optimizer.step = record_step
    metrics = trainer.train_step(trainer.generate_my_tasks())
    assert metrics["meta/grad_norm"] == pytest.approx(float(gradient.norm()))
    assert seen[0] == pytest.approx(0.5, rel=1e-5)


def test_meta_training_lowers_objective():
    trainer = MetaTrainer(tiny_config("train.tasks_per_step=16", "train.lr=0.01", "inner.steps=10"))
    objectives = [trainer.train_step(trainer.generate_my_tasks())["meta/objective"] for _ in range(30)]
    assert sum(objectives[-5:]) / 5 < sum(objectives[:5]) / 5


def test_same_seed_same_weights():
    first, second = MetaTrainer(tiny_config()), MetaTrainer(tiny_config())
    assert torch.equal(first.meta_params, second.meta_params)
    other = MetaTrainer(tiny_config("train.seed=5"))
    assert not torch.equal(first.meta_params, other.meta_params)


def test_too_few_tasks_for_workers_rejected():
    with pytest.raises(ValueError, match="tasks_per_step"):
        MetaTrainer(tiny_config("train.tasks_per_step=2"), rank=0, world_size=3)


def test_loss_net_copies_current_weights():
    trainer = MetaTrainer(tiny_config())
    trainer.train_step(trainer.generate_my_tasks())
    net = trainer.loss_net()
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(flat, trainer.meta_params.detach())
