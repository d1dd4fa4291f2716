"""Generated classification tasks, drawn in batches of T.

A task is a pure function of (TaskConfig, seed, task index). Tasks in one batch
may differ in D and C, so every batch is padded to the configuration's maximum
D and C: padded feature columns are zero (they never reach a prediction) and
padded classes are switched off by ``class_mask``.
"""

from __future__ import annotations

import dataclasses

import torch

from mln_core import rng
from mln_core.config import TaskConfig

_FAMILY_STREAM = {"linear": 1, "mlp": 2, "poly": 3}

# Stream ids, one per independent quantity of a task.
_NUM_FEATURES, _NUM_CLASSES, _INPUTS, _WEIGHT, _BIAS, _HIDDEN_W, _HIDDEN_B, _QUADRATIC = range(10, 18)
_NOISE_FLIP, _NOISE_CLASS = 20, 21

NEG_INF_LOGIT = -1e4  # finite, so masked classes give exp() == 0 without NaN gradients


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """T tasks padded to a common D and C.

    ``teacher`` is the linear teacher as augmented rows ``[T, C, D + 1]`` (weight
    columns, then bias); it is None for nonlinear families.
    """

    seed: int
    task_index: torch.Tensor  # [T] int64
    num_features: torch.Tensor  # [T] int64
    num_classes: torch.Tensor  # [T] int64
    class_mask: torch.Tensor  # [T, C] bool
    train_x: torch.Tensor  # [T, N_train, D]
    train_y: torch.Tensor  # [T, N_train] int64
    val_x: torch.Tensor  # [T, N_val, D]
    val_y: torch.Tensor  # [T, N_val]
    test_x: torch.Tensor  # [T, N_test, D]
    test_y: torch.Tensor  # [T, N_test]
    teacher: torch.Tensor | None = None  # [T, C, D + 1]

    @property
    def size(self) -> int:
        return int(self.task_index.shape[0])

    def to(self, device: torch.device | str) -> TaskBatch:
        moved = {
            f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return TaskBatch(**moved)

    def select(self, rows: slice | torch.Tensor) -> TaskBatch:
        """Return the tasks at ``rows`` (a slice or an index tensor) as a new batch."""
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = value[rows] if isinstance(value, torch.Tensor) else value
        return TaskBatch(**picked)


def concat(batches: list[TaskBatch]) -> TaskBatch:
    """Join batches of equal padding into one."""
    if not batches:
        raise ValueError("cannot concatenate an empty list of task batches")
    joined = {}
    for f in dataclasses.fields(TaskBatch):
        values = [getattr(b, f.name) for b in batches]
        if f.name == "seed":
            joined[f.name] = values[0]
        elif values[0] is None:
            joined[f.name] = None
        else:
            joined[f.name] = torch.cat(values)
    return TaskBatch(**joined)


# Tasks per vectorised pass. Larger passes stop fitting in cache and run slower
# per task (measured with benchmarks/inner_loop.py on a 2-core AMD EPYC).
_TASKS_PER_PASS = 32


def generate_tasks(config: TaskConfig, seed: int, task_index: torch.Tensor | range | list[int]) -> TaskBatch:
    """Generate the tasks ``task_index`` of the stream ``seed``, vectorised over tasks."""
    index = torch.as_tensor(list(task_index) if isinstance(task_index, range) else task_index, dtype=torch.int64)
    if index.ndim != 1:
        raise ValueError(f"task_index must be one-dimensional, got shape {tuple(index.shape)}")
    if index.numel() > _TASKS_PER_PASS:
        return concat([_generate(config, seed, part) for part in index.split(_TASKS_PER_PASS)])
    return _generate(config, seed, index)


def _generate(config: TaskConfig, seed: int, index: torch.Tensor) -> TaskBatch:
    key = rng.fold_keys(seed, _FAMILY_STREAM[config.family], index)  # [T]
    d_max, c_max = config.num_features[1], config.num_classes[1]
    n_train, n_val, n_test = config.train_size, config.val_size, config.test_size
    n_total = n_train + n_val + n_test

    num_features = rng.integers(rng.mix64(key ^ _NUM_FEATURES), *config.num_features)  # [T]
    num_classes = rng.integers(rng.mix64(key ^ _NUM_CLASSES), *config.num_classes)  # [T]
    feature_mask = torch.arange(d_max) < num_features[:, None]  # [T, D]
    class_mask = torch.arange(c_max) < num_classes[:, None]  # [T, C]

    x = rng.normal(rng.mix64(key ^ _INPUTS), (n_total, d_max)) * feature_mask[:, None, :]  # [T, N, D]
    logits, teacher = _teacher_logits(config, key, x, num_features, feature_mask, class_mask)
    y = logits.masked_fill(~class_mask[:, None, :], NEG_INF_LOGIT).argmax(-1)  # [T, N]

    train_y = y[:, :n_train]
    if config.label_noise > 0:
        flip = rng.uniform(rng.mix64(key ^ _NOISE_FLIP), (n_train,)) < config.label_noise
        random_class = torch.floor(rng.uniform(rng.mix64(key ^ _NOISE_CLASS), (n_train,)) * num_classes[:, None])
        train_y = torch.where(flip, random_class.to(torch.int64), train_y)

    return TaskBatch(
        seed=seed,
        task_index=index,
        num_features=num_features,
        num_classes=num_classes,
        class_mask=class_mask,
        train_x=x[:, :n_train],
        train_y=train_y,
        val_x=x[:, n_train : n_train + n_val],
        val_y=y[:, n_train : n_train + n_val],
        test_x=x[:, n_train + n_val :],
        test_y=y[:, n_train + n_val :],
        teacher=teacher,
    )


def _teacher_logits(
    config: TaskConfig,
    key: torch.Tensor,
    x: torch.Tensor,
    num_features: torch.Tensor,
    feature_mask: torch.Tensor,
    class_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the teacher's logits ``[T, N, C]`` and, for linear tasks, its rows ``[T, C, D + 1]``."""
    d_max, c_max = feature_mask.shape[1], class_mask.shape[1]
    # Scale weights by 1/sqrt(D) so logits have unit variance whatever D is.
    inv_sqrt_d = num_features.to(torch.float32).rsqrt()[:, None, None]  # [T, 1, 1]
    both_masks = class_mask[:, :, None] & feature_mask[:, None, :]  # [T, C, D]
    bias = config.imbalance * rng.normal(rng.mix64(key ^ _BIAS), (c_max,)) * class_mask  # [T, C]

    if config.family == "linear":
        weight = rng.normal(rng.mix64(key ^ _WEIGHT), (c_max, d_max)) * inv_sqrt_d * both_masks  # [T, C, D]
        logits = torch.einsum("tnd,tcd->tnc", x, weight) + bias[:, None, :]
        return logits, torch.cat([weight, bias[:, :, None]], dim=-1)

    if config.family == "mlp":
        width = config.teacher_width
        # Pre-activations of standard deviation 2 put tanh in its nonlinear range.
        hidden_w = 2.0 * rng.normal(rng.mix64(key ^ _HIDDEN_W), (width, d_max)) * inv_sqrt_d * feature_mask[:, None, :]
        hidden_b = rng.normal(rng.mix64(key ^ _HIDDEN_B), (width,))
        hidden = torch.tanh(torch.einsum("tnd,thd->tnh", x, hidden_w) + hidden_b[:, None, :])  # [T, N, H]
        out_w = rng.normal(rng.mix64(key ^ _WEIGHT), (c_max, width)) * width**-0.5  # [T, C, H]
        return torch.einsum("tnh,tch->tnc", hidden, out_w) + bias[:, None, :], None

    # poly: a quadratic form per class plus a linear term, each of unit scale.
    quad = rng.normal(rng.mix64(key ^ _QUADRATIC), (c_max, d_max, d_max))  # [T, C, D, D]
    quad = quad * (both_masks[:, :, :, None] & feature_mask[:, None, None, :]) * inv_sqrt_d[..., None] ** 2
    weight = rng.normal(rng.mix64(key ^ _WEIGHT), (c_max, d_max)) * inv_sqrt_d * both_masks
    logits = torch.einsum("tnd,tcde,tne->tnc", x, quad, x) + torch.einsum("tnd,tcd->tnc", x, weight)
    return logits + bias[:, None, :], None
