"""Generator pool and per-rank feeder, without Ray Train."""

from __future__ import annotations

import pickle

import pytest
import torch

from mln_core.meta_train import task_share
from mln_core.tasks import generate_tasks
from tests.helpers import tiny_config

CONFIG = tiny_config("train.steps=12", "cluster.num_workers=2", "cluster.generators=2")


def test_compact_batch_drops_only_test_split() -> None:
    from cluster.generators import compact_for_training

    tasks = generate_tasks(CONFIG.tasks, seed=3, task_index=range(4))
    compact = compact_for_training(tasks)

    assert compact.test_x.shape == (4, 0, tasks.test_x.shape[2])
    assert compact.test_y.shape == (4, 0)
    for name in ("task_index", "class_mask", "train_x", "train_y", "val_x", "val_y", "teacher"):
        assert torch.equal(getattr(compact, name), getattr(tasks, name)), name
    assert len(pickle.dumps(compact)) < len(pickle.dumps(tasks)) / 2


@pytest.fixture
def pool(local_ray):
    import ray

    from cluster.generators import start_pool

    pool = start_pool(CONFIG.tasks, size=2, label=None)
    yield pool
    ray.kill(pool)


def feeder_for(pool, rank: int, window: int = 3):
    from cluster.generators import TaskFeeder

    return TaskFeeder(
        pool, CONFIG.train.seed, lambda step: task_share(CONFIG, step, rank, 2), 0, CONFIG.train.steps, window, rank
    )


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_feeder_returns_rank_share_in_order(pool) -> None:
    feeder = feeder_for(pool, rank=1)

    for step in range(CONFIG.train.steps):
        batch = feeder.next(step)
        expected = generate_tasks(CONFIG.tasks, CONFIG.train.seed, task_share(CONFIG, step, 1, 2))
        assert batch.step == step
        assert batch.tasks.task_index.tolist() == list(task_share(CONFIG, step, 1, 2))
        assert torch.equal(batch.tasks.train_x, expected.train_x)
        assert batch.attempts == 1


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_feeder_keeps_window_of_requests(pool) -> None:
    feeder = feeder_for(pool, rank=0, window=3)
    assert [r.step for r in feeder.pending] == [0, 1, 2]

    feeder.next(0)
    assert [r.step for r in feeder.pending] == [1, 2, 3]

    with pytest.raises(RuntimeError, match="expected step 1"):
        feeder.next(2)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_feeder_replaces_killed_generator(pool) -> None:
    import ray

    feeder = feeder_for(pool, rank=0, window=4)
    feeder.next(0)
    (_, first), _ = ray.get(pool.handles.remote())
    ray.kill(first, no_restart=True)

    batches = [feeder.next(step) for step in range(1, CONFIG.train.steps)]
    stats = ray.get(pool.stats.remote())

    assert stats["replacements"] == 1
    assert [b.step for b in batches] == list(range(1, CONFIG.train.steps))
    # Rank 0 sends even steps to generator 0, so its requests in flight had to be sent again.
    assert any(b.attempts > 1 for b in batches if b.step % 2 == 0)
    assert all(b.attempts == 1 for b in batches if b.step % 2 == 1)
    for batch in batches:
        assert batch.tasks.task_index.tolist() == list(task_share(CONFIG, batch.step, 0, 2))
