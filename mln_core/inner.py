"""The batched inner loop: K functional optimizer steps on T tasks at once.

``torch.func.grad`` gives one task's classifier gradient and ``vmap`` maps it
over the task dimension, so there is no Python loop over tasks. The loop over
steps stays in Python; gradients flow through it to the MLN weights when the
caller asks for them (backpropagation estimator).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, vmap

from mln_core import classifiers, rng
from mln_core.config import InnerConfig
from mln_core.losses import LossFn
from mln_core.tasks import NEG_INF_LOGIT, TaskBatch

Params = dict[str, torch.Tensor]
_MINIBATCH_STREAM = 41
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def task_keys(tasks: TaskBatch) -> torch.Tensor:
    """Return one int64 key ``[T]`` per task, shared by initialisation and minibatch sampling."""
    return rng.fold_keys(tasks.seed, tasks.task_index)


def masked_logits(params: Params, x: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Compute one task's logits ``[N, C]`` with padded classes pushed to a large negative value."""
    return classifiers.logits(params, x).masked_fill(~class_mask, NEG_INF_LOGIT)


def accuracy(params: Params, x: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """Accuracy per task ``[T]`` of batched parameters on ``x`` ``[T, N, D]``."""
    logits = vmap(masked_logits)(params, x, class_mask)  # [T, N, C]
    return (logits.argmax(-1) == y).to(torch.float32).mean(-1)


def _minibatch(tasks: TaskBatch, keys: torch.Tensor, step: int, batch_size: int | None):
    if batch_size is None:
        return tasks.train_x, tasks.train_y
    n_train = tasks.train_x.shape[1]
    scores = rng.uniform(rng.fold_keys(keys, _MINIBATCH_STREAM, step), (n_train,))  # [T, N]
    rows = scores.argsort(dim=-1)[:, :batch_size]  # [T, B]
    x = torch.gather(tasks.train_x, 1, rows[:, :, None].expand(-1, -1, tasks.train_x.shape[2]))
    return x, torch.gather(tasks.train_y, 1, rows)


def _update(config: InnerConfig, lr: float, params: Params, grads: Params, state: dict, step: int):
    if config.optimizer == "sgd":
        return {k: params[k] - lr * grads[k] for k in params}, state
    if config.optimizer == "momentum":
        velocity = {k: config.momentum * state.get(k, 0.0) + grads[k] for k in params}
        return {k: params[k] - lr * velocity[k] for k in params}, velocity
    beta1, beta2 = _ADAM_BETAS
    first = {k: beta1 * state.get(("m", k), 0.0) + (1 - beta1) * grads[k] for k in params}
    second = {k: beta2 * state.get(("v", k), 0.0) + (1 - beta2) * grads[k] ** 2 for k in params}
    correction1, correction2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
    # eps goes inside the square root: weights of padded features and classes have
    # zero gradients, and sqrt's derivative at 0 would make the meta-gradient NaN.
    new_params = {
        k: params[k] - lr * (first[k] / correction1) / torch.sqrt(second[k] / correction2 + _ADAM_EPS**2)
        for k in params
    }
    return new_params, {**{("m", k): v for k, v in first.items()}, **{("v", k): v for k, v in second.items()}}


def unroll(
    tasks: TaskBatch,
    config: InnerConfig,
    loss_fn: LossFn,
    meta_params: Params,
    *,
    steps: int | None = None,
    lr: float | None = None,
    graph_steps: int | None = None,
    on_step: Callable[[int, Params], None] | None = None,
) -> Params:
    """Train one classifier per task and return the final parameters ``{name: [T, ...]}``.

    ``graph_steps`` keeps the autograd graph to ``meta_params`` only through the
    last that many steps (truncated backpropagation); earlier steps see detached
    MLN weights. ``on_step(k, params)`` is called after step k (1-based) and
    once with k=0 before training.
    """
    steps = config.steps if steps is None else steps
    lr = config.lr if lr is None else lr
    keys = task_keys(tasks)
    params = classifiers.init_params(config, keys, tasks.train_x.shape[2], tasks.class_mask.shape[1])
    params = {k: v.to(tasks.train_x.device) for k, v in params.items()}

    def task_loss(inner_params: Params, meta: Params, x, y, class_mask) -> torch.Tensor:
        return loss_fn(meta, masked_logits(inner_params, x, class_mask), y, class_mask)

    # One task's gradient, mapped over T; the MLN weights are shared by all tasks.
    batched_grad = vmap(grad(task_loss), in_dims=(0, None, 0, 0, 0))
    first_graph_step = 0 if graph_steps is None else steps - graph_steps
    detached_meta = {k: v.detach() for k, v in meta_params.items()}
    state: dict = {}
    if on_step is not None:
        on_step(0, params)
    for step in range(steps):
        if step == first_graph_step and first_graph_step > 0:
            # Truncation: the graph starts here, so earlier steps are constants.
            params = {k: v.detach() for k, v in params.items()}
            state = {k: v.detach() for k, v in state.items()}
        meta = meta_params if step >= first_graph_step else detached_meta
        x, y = _minibatch(tasks, keys, step, config.batch_size)
        grads = batched_grad(params, meta, x, y, tasks.class_mask)
        params, state = _update(config, lr, params, grads, state, step)
        if on_step is not None:
            on_step(step + 1, params)
    return params
