import pytest
import torch

from mln_core import inner, losses, objective
from mln_core.config import InnerConfig, LossNetConfig, TaskConfig
from mln_core.loss_net import MetaLossNet
from mln_core.tasks import generate_tasks

TASKS = TaskConfig(num_features=(2, 6), num_classes=(2, 4), train_size=24, val_size=16, test_size=32)


def _mln():
    torch.manual_seed(0)
    net = MetaLossNet(LossNetConfig(hidden_width=8))
    return losses.meta_loss(net), dict(net.named_parameters())


@pytest.mark.parametrize("classifier", ["linear", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_batched_equals_per_task_loop(classifier, optimizer, batch_size):
    config = InnerConfig(classifier=classifier, optimizer=optimizer, batch_size=batch_size, steps=5, lr=0.3)
    tasks = generate_tasks(TASKS, 0, range(6))
    loss_fn, meta = _mln()
    with torch.no_grad():
        batched = inner.unroll(tasks, config, loss_fn, meta)
        for t in range(tasks.size):
            single = inner.unroll(tasks.select(slice(t, t + 1)), config, loss_fn, meta)
            for name in batched:
                torch.testing.assert_close(batched[name][t], single[name][0], rtol=1e-5, atol=1e-6)


def test_cross_entropy_training_beats_chance():
    tasks = generate_tasks(TASKS, 0, range(16))
    params = inner.unroll(tasks, InnerConfig(steps=50, lr=1.0), losses.cross_entropy, {})
    accuracy = inner.accuracy(params, tasks.test_x, tasks.test_y, tasks.class_mask)
    chance = 1.0 / tasks.num_classes.float()
    assert float((accuracy - chance).mean()) > 0.3


def test_padded_classes_never_predicted():
    tasks = generate_tasks(TASKS, 0, range(16))
    params = inner.unroll(tasks, InnerConfig(steps=10, classifier="mlp"), losses.mean_squared_error, {})
    logits = torch.vmap(inner.masked_logits)(params, tasks.test_x, tasks.class_mask)
    assert torch.all(logits.argmax(-1) < tasks.num_classes[:, None])


def test_on_step_sees_every_step():
    tasks = generate_tasks(TASKS, 0, range(2))
    seen = []
    inner.unroll(tasks, InnerConfig(steps=3), losses.cross_entropy, {}, on_step=lambda k, p: seen.append(k))
    assert seen == [0, 1, 2, 3]


def test_truncation_cuts_gradient_to_early_steps():
    tasks = generate_tasks(TASKS, 0, range(4))
    loss_fn, meta = _mln()
    config = InnerConfig(steps=6, lr=0.5)
    full = inner.unroll(tasks, config, loss_fn, meta)
    truncated = inner.unroll(tasks, config, loss_fn, meta, graph_steps=2)
    for name in full:
        torch.testing.assert_close(full[name], truncated[name])
    weights = list(meta.values())
    full_grad = torch.autograd.grad(objective.teacher_cosine(full, tasks).sum(), weights, allow_unused=True, materialize_grads=True)
    cut_grad = torch.autograd.grad(objective.teacher_cosine(truncated, tasks).sum(), weights, allow_unused=True, materialize_grads=True)
    assert any(not torch.allclose(a, b) for a, b in zip(full_grad, cut_grad))


def test_teacher_cosine_invariances():
    tasks = generate_tasks(TaskConfig(num_features=(4, 4), num_classes=(3, 3)), 0, range(3))
    teacher_params = {"weight": tasks.teacher[..., :-1].clone(), "bias": tasks.teacher[..., -1].clone()}
    assert float(objective.teacher_cosine(teacher_params, tasks).abs().max()) < 1e-5

    shifted = {
        "weight": 2.5 * teacher_params["weight"] + torch.randn(3, 1, 4),
        "bias": 2.5 * teacher_params["bias"] + torch.randn(3, 1),
    }
    assert float(objective.teacher_cosine(shifted, tasks).abs().max()) < 1e-5

    opposite = {"weight": -teacher_params["weight"], "bias": -teacher_params["bias"]}
    torch.testing.assert_close(objective.teacher_cosine(opposite, tasks), torch.full((3,), 2.0))


def test_teacher_cosine_ignores_padded_classes():
    tasks = generate_tasks(TaskConfig(num_features=(4, 4), num_classes=(2, 5)), 0, range(8))
    params = {"weight": tasks.teacher[..., :-1].clone(), "bias": tasks.teacher[..., -1].clone()}
    params["weight"][~tasks.class_mask] = 7.0
    assert float(objective.teacher_cosine(params, tasks).abs().max()) < 1e-5


def test_validation_objectives_agree_with_accuracy():
    tasks = generate_tasks(TASKS, 0, range(8))
    params = inner.unroll(tasks, InnerConfig(steps=20, lr=1.0), losses.cross_entropy, {})
    error = objective.val_error(params, tasks)
    torch.testing.assert_close(error, 1 - inner.accuracy(params, tasks.val_x, tasks.val_y, tasks.class_mask))
    assert torch.all(objective.val_cross_entropy(params, tasks) > 0)
