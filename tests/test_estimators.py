import pytest
import torch

from mln_core.estimators.es import centered_ranks
from mln_core.meta_train import MetaTrainer, task_share
from mln_core.tasks import concat, generate_tasks
from tests.helpers import tiny_config

ESTIMATORS = {
    "backprop": (),
    "backprop_truncated": ("estimator.backprop.truncation=2",),
    "es": ("estimator.kind=es", "estimator.es.population=8"),
    "es_unshaped": ("estimator.kind=es", "estimator.es.population=8", "estimator.es.fitness_shaping=none"),
    "es_val_error": ("estimator.kind=es", "estimator.es.population=8", "estimator.objective=val_error"),
}


def _estimate(overrides, step=0):
    trainer = MetaTrainer(tiny_config(*overrides))
    tasks = trainer.generate_my_tasks()
    return trainer, trainer.estimator.estimate(trainer.meta_params.detach(), tasks, step)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimate_shape_and_finite(name):
    trainer, result = _estimate(ESTIMATORS[name])
    assert result.gradient.shape == trainer.meta_params.shape
    assert torch.isfinite(result.gradient).all()
    assert 0.0 <= result.objective <= 2.0
    assert 0.0 <= result.metrics["inner/val_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimate_deterministic(name):
    _, first = _estimate(ESTIMATORS[name])
    _, second = _estimate(ESTIMATORS[name])
    assert torch.equal(first.gradient, second.gradient)
    assert first.objective == second.objective


def test_es_noise_changes_with_step():
    _, first = _estimate(ESTIMATORS["es"], step=0)
    _, second = _estimate(ESTIMATORS["es"], step=1)
    assert not torch.equal(first.gradient, second.gradient)


def test_es_agrees_with_backprop_on_tiny_problem():
    # 17 MLN weights; 8192 antithetic samples give a relative error near 0.07 (measured).
    common = (
        "loss_net.hidden_width=4", "loss_net.depth=1", "tasks.num_features=[2,4]", "tasks.num_classes=[2,3]",
        "inner.steps=3", "inner.lr=1.0", "estimator.objective=val_ce",
    )
    trainer, backprop = _estimate(common)
    _, es = _estimate((*common, "estimator.kind=es", "estimator.es.population=8192",
                       "estimator.es.sigma=0.01", "estimator.es.fitness_shaping=none"))
    cosine = torch.nn.functional.cosine_similarity(backprop.gradient, es.gradient, dim=0)
    relative_error = (es.gradient - backprop.gradient).norm() / backprop.gradient.norm()
    assert trainer.layout.numel == 17
    assert float(cosine) > 0.98
    assert float(relative_error) < 0.2


def test_centered_ranks():
    ranks = centered_ranks(torch.tensor([3.0, -1.0, 10.0, 0.5]))
    torch.testing.assert_close(ranks, torch.tensor([1 / 6, -0.5, 0.5, -1 / 6]))


def _sharded_estimate(overrides, world_size):
    """Run every shard of a 'distributed' step in one process, with reduce = sum over shards."""
    config = tiny_config(*overrides)
    trainers = [MetaTrainer(config, rank, world_size) for rank in range(world_size)]
    tasks = [t.generate_my_tasks() for t in trainers]
    partial = []

    def capture(values):
        partial.append(values)
        return values

    for trainer, share in zip(trainers, tasks):
        trainer.estimator.estimate(trainer.meta_params.detach(), share, 0, capture)
    total = sum(partial)
    results = [
        trainer.estimator.estimate(trainer.meta_params.detach(), share, 0, lambda values: total)
        for trainer, share in zip(trainers, tasks)
    ]
    return results


@pytest.mark.parametrize("name,extra", [
    ("backprop", ()),
    ("es", ("estimator.es.split=tasks",)),
    ("es", ("estimator.es.split=population",)),
])
def test_sharded_step_equals_single_process(name, extra):
    overrides = (*ESTIMATORS[name], *extra)
    _, single = _estimate(overrides)
    for result in _sharded_estimate(overrides, world_size=2):
        torch.testing.assert_close(result.gradient, single.gradient, rtol=1e-4, atol=1e-6)
        assert abs(result.objective - single.objective) < 1e-5


def test_task_share_partitions_step():
    config = tiny_config("train.tasks_per_step=7")
    shares = [task_share(config, 3, rank, 3) for rank in range(3)]
    assert [i for share in shares for i in share] == list(range(21, 28))
    assert task_share(config, 3, 1, 3, splits_tasks=False) == range(21, 28)


def test_shards_concatenate_to_full_batch():
    config = tiny_config()
    full = generate_tasks(config.tasks, 0, task_share(config, 2))
    parts = [generate_tasks(config.tasks, 0, task_share(config, 2, r, 2)) for r in range(2)]
    assert torch.equal(concat(parts).train_x, full.train_x)
