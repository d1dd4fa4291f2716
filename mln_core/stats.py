"""Confidence intervals for evaluation results over tasks or splits, from Student's t distribution.

The intervals assume the per-task values (or per-task differences) are
independent draws. Non-finite inputs propagate to the result as in NumPy,
so a diverged run shows up as nan or inf instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats as scipy_stats

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


class ConfidenceInterval(NamedTuple):
    """Sample mean and the half-width of its two-sided confidence interval.

    ``half_width`` is nan for a single value, because a sample of one has no
    spread to estimate. Unpacks as ``(mean, half_width)``.
    """

    mean: float
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> ConfidenceInterval:
    """Compute the mean of ``values`` and its Student's t confidence interval.

    The half-width is t_{(1 + confidence) / 2, n - 1} * s / sqrt(n), with s the
    sample standard deviation (ddof=1). Raises ValueError for an empty input
    or a confidence outside (0, 1).
    """
    sample = _as_vector(values, "values")
    _check_confidence(confidence)

    mean = float(sample.mean())
    if sample.size == 1:
        return ConfidenceInterval(mean, math.nan)

    standard_error = sample.std(ddof=1) / math.sqrt(sample.size)
    critical = scipy_stats.t.ppf((1.0 + confidence) / 2.0, df=sample.size - 1)
    return ConfidenceInterval(mean, float(critical * standard_error))


def paired_difference_ci(a: ArrayLike, b: ArrayLike, confidence: float = 0.95) -> ConfidenceInterval:
    """Compute the mean of the paired differences ``a - b`` and its t confidence interval.

    ``a[i]`` and ``b[i]`` must come from the same task, such as one loss
    against another on task i. Pairing removes the between-task variance,
    so this interval is usually much narrower than comparing two separate
    ``mean_ci`` intervals. Raises ValueError when the lengths differ.
    """
    first = _as_vector(a, "a")
    second = _as_vector(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"paired values need equal lengths, got a with {first.size} and b with {second.size}: "
            "pass one value per task in both"
        )
    return mean_ci(first - second, confidence)


def _as_vector(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {vector.shape}: flatten it or pass one value per task")
    if vector.size == 0:
        raise ValueError(f"{name} is empty: a confidence interval needs at least one value")
    return vector


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} is invalid: expected a value in (0, 1), such as 0.95")
