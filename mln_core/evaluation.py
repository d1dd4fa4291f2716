"""Held-out comparison of the MLN with cross-entropy (CE) and mean squared error (MSE).

Evaluation has two phases so that a distributed layer can split the first:

1. ``evaluate_chunk`` trains one classifier per task with one loss at each
   learning rate and returns validation and test accuracy ``[L, T]`` and a
   learning curve ``[L, R, T]`` (L learning rates, R curve points). Chunks
   of tasks are independent, and ``concat_chunks`` joins them along T.
2. ``select_group`` turns the joined results of a group of tasks into
   summary numbers. The learning rate of a tuned baseline is chosen on mean
   validation accuracy only, so test accuracy never influences the choice.

Two protocols are reported. "mln", "ce" and "mse" all train at the inner
config's own learning rate, as in Hai et al. (arXiv 2111.10583), where every
loss shares one setting. "ce_tuned" and "mse_tuned" give each baseline its
best learning rate from a grid, which is the comparison a practitioner faces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, vmap

from mln_core import inner, losses
from mln_core.config import InnerConfig
from mln_core.loss_net import MetaLossNet
from mln_core.stats import mean_ci, paired_difference_ci
from mln_core.tasks import TaskBatch

TRAINED_LOSSES = ("mln", "ce", "mse")
REPORTED_LOSSES = ("mln", "ce", "mse", "ce_tuned", "mse_tuned")
BASELINES = ("ce", "mse", "ce_tuned", "mse_tuned")
_TUNED_FROM = {"ce_tuned": "ce", "mse_tuned": "mse"}

# Keeps log() finite when a plotted probability is exactly 0.
_MIN_PROB = 1e-12


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """Accuracies of one loss on a chunk of T tasks, at L learning rates."""

    loss: str
    lrs: tuple[float, ...]  # [L]
    curve_steps: tuple[int, ...]  # [R] inner steps at which the curve is recorded
    task_index: torch.Tensor  # [T] int64
    val_accuracy: torch.Tensor  # [L, T] after the last step
    test_accuracy: torch.Tensor  # [L, T] after the last step
    curve: torch.Tensor  # [L, R, T] test accuracy at each curve step


@dataclasses.dataclass(frozen=True)
class LossResult:
    """One reported loss on one group: its learning rate and test accuracy over the group's tasks."""

    lr: float
    mean: float  # mean test accuracy, a fraction in [0, 1]
    ci: float  # half-width of the confidence interval of ``mean``
    val_mean: float  # mean validation accuracy at ``lr``
    test_accuracy: tuple[float, ...]  # [T]
    curve: tuple[float, ...]  # [R] mean test accuracy at each curve step


@dataclasses.dataclass(frozen=True)
class Difference:
    """Paired difference of test accuracy, MLN minus one baseline, over the same tasks."""

    mean: float
    ci: float  # half-width, and the difference is significant when |mean| > ci


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """Mean accuracies of a baseline at one learning rate of the grid."""

    lr: float
    val_mean: float
    test_mean: float


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """Everything reported for one group of tasks and one classifier."""

    num_tasks: int
    confidence: float
    curve_steps: tuple[int, ...]  # [R]
    losses: Mapping[str, LossResult]  # keyed by REPORTED_LOSSES
    differences: Mapping[str, Difference]  # MLN minus each of BASELINES
    sweeps: Mapping[str, tuple[SweepPoint, ...]]  # "ce" and "mse", one point per learning rate


def candidate_lrs(loss: str, inner_lr: float, lr_grid: Sequence[float]) -> tuple[float, ...]:
    """Learning rates to train ``loss`` at: the MLN only at ``inner_lr``, the baselines also on the grid."""
    _check_loss_name(loss)
    if loss == "mln":
        return (float(inner_lr),)
    return tuple(sorted({float(lr) for lr in lr_grid} | {float(inner_lr)}))


def curve_steps(steps: int, points: int) -> tuple[int, ...]:
    """Inner steps at which to record test accuracy: ``points`` evenly spaced values from 0 to ``steps``.

    Rounding can make neighbouring points equal when ``points > steps + 1``, so
    the result may be shorter than ``points``. A single point is the last step.
    """
    if steps < 1 or points < 1:
        raise ValueError(f"steps={steps} and points={points} must both be at least 1")
    if points == 1:
        return (steps,)
    return tuple(sorted({int(round(s)) for s in np.linspace(0, steps, points)}))


def evaluate_chunk(
    tasks: TaskBatch,
    inner_config: InnerConfig,
    loss: str,
    lrs: Sequence[float],
    *,
    steps: int,
    curve_points: int,
    net: MetaLossNet | None = None,
    meta_params: dict[str, torch.Tensor] | None = None,
) -> ChunkResult:
    """Train a classifier per task with ``loss`` at each of ``lrs`` and record its accuracies.

    ``loss`` is "mln", "ce" or "mse". The MLN needs ``net``, and its weights
    are ``meta_params`` if given, else the net's own parameters. Results are
    on the CPU whatever device ``tasks`` is on.
    """
    loss_fn, loss_params = _loss_function(loss, net, meta_params)
    if not lrs:
        raise ValueError(f"lrs is empty for loss {loss!r}: pass at least one learning rate")
    recorded = curve_steps(steps, curve_points)
    val_rows, test_rows, curve_rows = [], [], []

    for lr in lrs:
        curve: dict[int, torch.Tensor] = {}

        def record(step: int, params: inner.Params) -> None:
            if step in recorded:
                curve[step] = inner.accuracy(params, tasks.test_x, tasks.test_y, tasks.class_mask)

        # No gradient reaches the MLN weights at evaluation, so skip building the graph.
        with torch.no_grad():
            params = inner.unroll(tasks, inner_config, loss_fn, loss_params, steps=steps, lr=float(lr), on_step=record)
            val_rows.append(inner.accuracy(params, tasks.val_x, tasks.val_y, tasks.class_mask))
            test_rows.append(inner.accuracy(params, tasks.test_x, tasks.test_y, tasks.class_mask))
        curve_rows.append(torch.stack([curve[s] for s in recorded]))  # [R, T]

    return ChunkResult(
        loss=loss,
        lrs=tuple(float(lr) for lr in lrs),
        curve_steps=recorded,
        task_index=tasks.task_index.cpu(),
        val_accuracy=torch.stack(val_rows).cpu(),  # [L, T]
        test_accuracy=torch.stack(test_rows).cpu(),  # [L, T]
        curve=torch.stack(curve_rows).cpu(),  # [L, R, T]
    )


def concat_chunks(chunks: Sequence[ChunkResult]) -> ChunkResult:
    """Join results of one loss on consecutive chunks of tasks along T."""
    if not chunks:
        raise ValueError("cannot concatenate an empty list of chunk results")
    first = chunks[0]
    for chunk in chunks[1:]:
        if (chunk.loss, chunk.lrs, chunk.curve_steps) != (first.loss, first.lrs, first.curve_steps):
            raise ValueError(
                f"chunk of loss {chunk.loss!r} (lrs {chunk.lrs}, curve steps {chunk.curve_steps}) does not match "
                f"loss {first.loss!r} (lrs {first.lrs}, curve steps {first.curve_steps}): evaluate every chunk "
                "with the same loss, learning rates, steps and curve points"
            )
    return ChunkResult(
        loss=first.loss,
        lrs=first.lrs,
        curve_steps=first.curve_steps,
        task_index=torch.cat([c.task_index for c in chunks]),
        val_accuracy=torch.cat([c.val_accuracy for c in chunks], dim=1),
        test_accuracy=torch.cat([c.test_accuracy for c in chunks], dim=1),
        curve=torch.cat([c.curve for c in chunks], dim=2),
    )


def select_group(results: Mapping[str, ChunkResult], inner_lr: float, confidence: float = 0.95) -> GroupResult:
    """Summarise the results of "mln", "ce" and "mse" on one group of tasks.

    The untuned losses are read at ``inner_lr``. Each tuned baseline takes the
    learning rate with the highest mean validation accuracy, and the smallest
    such rate on a tie. Paired differences compare the MLN with each baseline
    task by task.
    """
    _check_group_results(results, inner_lr)
    chosen_row = {loss: results[loss].lrs.index(float(inner_lr)) for loss in TRAINED_LOSSES}
    for tuned, base in _TUNED_FROM.items():
        chosen_row[tuned] = select_lr_index(results[base].lrs, results[base].val_accuracy)

    summaries = {}
    for name in REPORTED_LOSSES:
        result = results[_TUNED_FROM.get(name, name)]
        summaries[name] = _summarise(result, chosen_row[name], confidence)

    mln_test = results["mln"].test_accuracy[chosen_row["mln"]]
    differences = {}
    for name in BASELINES:
        base_test = results[_TUNED_FROM.get(name, name)].test_accuracy[chosen_row[name]]
        mean, half_width = paired_difference_ci(mln_test, base_test, confidence)
        differences[name] = Difference(mean=float(mean), ci=float(half_width))

    sweeps = {name: _sweep(results[name]) for name in ("ce", "mse")}
    return GroupResult(
        num_tasks=int(results["mln"].test_accuracy.shape[1]),
        confidence=confidence,
        curve_steps=results["mln"].curve_steps,
        losses=summaries,
        differences=differences,
        sweeps=sweeps,
    )


def select_lr_index(lrs: Sequence[float], val_accuracy: torch.Tensor) -> int:
    """Return the row of ``val_accuracy`` ``[L, T]`` with the highest mean over tasks, the smallest lr among ties."""
    val_mean = val_accuracy.to(torch.float64).mean(dim=1).tolist()  # [L]
    best = max(val_mean)
    tied = [row for row, value in enumerate(val_mean) if value == best]
    return min(tied, key=lambda row: lrs[row])


def learned_loss_curve(
    net: MetaLossNet, meta_params: dict[str, torch.Tensor], num_classes: int, prob_true: torch.Tensor
) -> torch.Tensor:
    """Evaluate the MLN's per-sample loss ``[P]`` when the true class has probability ``prob_true`` ``[P]``.

    The other ``num_classes - 1`` classes share ``1 - prob_true`` equally.
    """
    prob, onehot = _spread_probabilities(num_classes, prob_true)
    with torch.no_grad():
        return functional_call(net, meta_params, (prob, onehot))


def baseline_loss_curves(num_classes: int, prob_true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluate CE and MSE ``[P]`` at the probabilities that ``learned_loss_curve`` uses.

    They come from the same functions as the inner loop's losses, so CE is
    ``-log p`` and MSE is the Brier score ``sum_c (p_c - y_c)^2``.
    """
    prob, onehot = _spread_probabilities(num_classes, prob_true)
    logits = prob.clamp_min(_MIN_PROB).log()  # [P, C], softmax gives back prob
    target = onehot.argmax(-1)  # [P]
    class_mask = torch.ones(num_classes, dtype=torch.bool)

    def per_sample(loss_fn: losses.LossFn) -> torch.Tensor:
        # The losses average over samples, so map them over single-sample batches.
        def one_sample(row_logits: torch.Tensor, row_target: torch.Tensor) -> torch.Tensor:
            return loss_fn({}, row_logits[None], row_target[None], class_mask)

        return vmap(one_sample)(logits, target)

    return {"ce": per_sample(losses.cross_entropy), "mse": per_sample(losses.mean_squared_error)}


def _spread_probabilities(num_classes: int, prob_true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is invalid: a classification task has at least 2 classes")
    prob_true = torch.as_tensor(prob_true, dtype=torch.float32)
    if prob_true.ndim != 1 or bool(((prob_true < 0) | (prob_true > 1)).any()):
        raise ValueError("prob_true must be a 1-D tensor of probabilities in [0, 1]")
    rest = ((1.0 - prob_true) / (num_classes - 1))[:, None].expand(-1, num_classes - 1)  # [P, C - 1]
    prob = torch.cat([prob_true[:, None], rest], dim=1)  # [P, C], class 0 is the true class
    onehot = torch.zeros_like(prob)
    onehot[:, 0] = 1.0
    return prob, onehot


def _loss_function(
    loss: str, net: MetaLossNet | None, meta_params: dict[str, torch.Tensor] | None
) -> tuple[losses.LossFn, dict[str, torch.Tensor]]:
    _check_loss_name(loss)
    if loss != "mln":
        return losses.BASELINES[loss], {}
    if net is None:
        raise ValueError("loss 'mln' needs the trained MetaLossNet: pass net=")
    if meta_params is None:
        meta_params = dict(net.named_parameters())
    return losses.meta_loss(net), {name: value.detach() for name, value in meta_params.items()}


def _check_loss_name(loss: str) -> None:
    if loss not in TRAINED_LOSSES:
        raise ValueError(f"loss={loss!r} is invalid: use one of {TRAINED_LOSSES}")


def _check_group_results(results: Mapping[str, ChunkResult], inner_lr: float) -> None:
    missing = [loss for loss in TRAINED_LOSSES if loss not in results]
    if missing:
        raise ValueError(f"results for {missing} are missing: evaluate every loss in {TRAINED_LOSSES}")
    task_index = results["mln"].task_index
    for loss in TRAINED_LOSSES:
        result = results[loss]
        if float(inner_lr) not in result.lrs:
            raise ValueError(f"loss {loss!r} was not trained at inner lr {inner_lr}: include it in the chunk's lrs")
        if not torch.equal(result.task_index, task_index):
            raise ValueError(f"loss {loss!r} was evaluated on other tasks than 'mln': use the same task batch")


def _summarise(result: ChunkResult, row: int, confidence: float) -> LossResult:
    test = result.test_accuracy[row]  # [T]
    mean, half_width = mean_ci(test, confidence)
    return LossResult(
        lr=result.lrs[row],
        mean=float(mean),
        ci=float(half_width),
        val_mean=float(result.val_accuracy[row].to(torch.float64).mean()),
        test_accuracy=tuple(test.tolist()),
        curve=tuple(result.curve[row].to(torch.float64).mean(dim=1).tolist()),
    )


def _sweep(result: ChunkResult) -> tuple[SweepPoint, ...]:
    val_mean = result.val_accuracy.to(torch.float64).mean(dim=1)  # [L]
    test_mean = result.test_accuracy.to(torch.float64).mean(dim=1)  # [L]
    return tuple(
        SweepPoint(lr=lr, val_mean=float(v), test_mean=float(t)) for lr, v, t in zip(result.lrs, val_mean, test_mean)
    )
