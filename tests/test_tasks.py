import pytest
import torch

from mln_core import rng
from mln_core.config import TaskConfig
from mln_core.tasks import concat, generate_tasks


def test_uniform_range_and_moments():
    values = rng.uniform(torch.tensor([3, 4]), (50_000,))
    assert values.shape == (2, 50_000)
    assert values.min() > 0
    assert values.max() < 1
    assert abs(float(values.mean()) - 0.5) < 0.01


def test_normal_moments():
    values = rng.normal(torch.tensor(7), (100_000,))
    assert abs(float(values.mean())) < 0.02
    assert abs(float(values.std()) - 1.0) < 0.02


def test_integers_inclusive_range():
    values = rng.integers(rng.fold_keys(1, torch.arange(5000)), 2, 5)
    assert set(values.tolist()) == {2, 3, 4, 5}


@pytest.mark.parametrize("family", ["linear", "mlp", "poly"])
def test_task_independent_of_batch(family):
    config = TaskConfig(family=family)
    batch = generate_tasks(config, seed=3, task_index=range(10))
    alone = generate_tasks(config, seed=3, task_index=[7])
    assert torch.equal(batch.train_x[7], alone.train_x[0])
    assert torch.equal(batch.test_y[7], alone.test_y[0])
    assert torch.equal(batch.class_mask[7], alone.class_mask[0])


def test_seeds_give_different_tasks():
    config = TaskConfig()
    first = generate_tasks(config, 0, range(4))
    second = generate_tasks(config, 1, range(4))
    assert not torch.equal(first.train_x, second.train_x)


def test_shapes_and_padding():
    config = TaskConfig(num_features=(3, 8), num_classes=(2, 5), train_size=20, val_size=10, test_size=30)
    tasks = generate_tasks(config, 0, range(16))
    assert tasks.train_x.shape == (16, 20, 8)
    assert tasks.val_x.shape == (16, 10, 8)
    assert tasks.test_y.shape == (16, 30)
    assert tasks.teacher.shape == (16, 5, 9)
    for t in range(16):
        d, c = int(tasks.num_features[t]), int(tasks.num_classes[t])
        assert 3 <= d <= 8
        assert 2 <= c <= 5
        assert torch.all(tasks.train_x[t, :, d:] == 0)
        assert int(tasks.train_y[t].max()) < c
        assert int(tasks.class_mask[t].sum()) == c
        assert torch.all(tasks.teacher[t, c:] == 0)


def test_linear_labels_follow_teacher():
    tasks = generate_tasks(TaskConfig(), 0, range(4))
    weight, bias = tasks.teacher[..., :-1], tasks.teacher[..., -1]
    logits = torch.einsum("tnd,tcd->tnc", tasks.test_x, weight) + bias[:, None, :]
    logits = logits.masked_fill(~tasks.class_mask[:, None, :], -1e4)
    assert torch.equal(logits.argmax(-1), tasks.test_y)


def test_label_noise_rate():
    clean = generate_tasks(TaskConfig(train_size=2000), 0, range(8))
    noisy = generate_tasks(TaskConfig(train_size=2000, label_noise=0.3), 0, range(8))
    changed = (clean.train_y != noisy.train_y).float().mean()
    # A replaced label keeps its class with probability 1/C, so fewer than 30 % change.
    assert 0.15 < float(changed) < 0.3
    assert torch.equal(clean.test_y, noisy.test_y)


def test_imbalance_skews_class_frequencies():
    def smallest_class_share(imbalance: float) -> float:
        config = TaskConfig(num_classes=(4, 4), test_size=4000, imbalance=imbalance)
        tasks = generate_tasks(config, 0, range(16))
        counts = torch.stack([torch.bincount(y, minlength=4) for y in tasks.test_y]).float()
        return float((counts.min(-1).values / counts.sum(-1)).mean())

    assert smallest_class_share(0.0) > 0.1
    assert smallest_class_share(3.0) < smallest_class_share(0.0) / 2


@pytest.mark.parametrize("family", ["mlp", "poly"])
def test_nonlinear_tasks_have_no_teacher(family):
    tasks = generate_tasks(TaskConfig(family=family), 0, range(4))
    assert tasks.teacher is None
    # Every task uses more than one class.
    assert all(len(torch.unique(y)) > 1 for y in tasks.test_y)


def test_concat_and_select_round_trip():
    tasks = generate_tasks(TaskConfig(), 0, range(6))
    joined = concat([tasks.select(slice(0, 2)), tasks.select(slice(2, 6))])
    assert torch.equal(joined.train_x, tasks.train_x)
    assert torch.equal(joined.task_index, tasks.task_index)


def test_invalid_ranges_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        TaskConfig(num_classes=(1, 3))
    with pytest.raises(ValueError, match="num_features"):
        TaskConfig(num_features=(5, 2))
