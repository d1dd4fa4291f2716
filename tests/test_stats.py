"""Tests for the Student's t confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mln_core.stats import ConfidenceInterval, mean_ci, paired_difference_ci

# Quantiles t_{p, df} of Student's t distribution: the t-table values 2.776, 2.132
# and 3.182, given to 10 significant digits.
T_975_DF4 = 2.776445105
T_95_DF4 = 2.131846786
T_975_DF3 = 3.182446305


def test_mean_ci_hand_computed() -> None:
    # [1..5]: mean 3, sample std sqrt(2.5), standard error sqrt(2.5 / 5).
    mean, half_width = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half_width == pytest.approx(T_975_DF4 * math.sqrt(0.5), rel=1e-8)
    assert half_width == pytest.approx(1.963243, abs=1e-6)


def test_mean_ci_lower_confidence_narrower() -> None:
    interval = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.90)
    assert interval.half_width == pytest.approx(T_95_DF4 * math.sqrt(0.5), rel=1e-8)
    assert interval.half_width < mean_ci([1.0, 2.0, 3.0, 4.0, 5.0]).half_width


def test_mean_ci_bounds() -> None:
    interval = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert isinstance(interval, ConfidenceInterval)
    assert interval.low == pytest.approx(3.0 - 1.963243, abs=1e-6)
    assert interval.high == pytest.approx(3.0 + 1.963243, abs=1e-6)


def test_mean_ci_single_value_nan() -> None:
    mean, half_width = mean_ci([0.7])
    assert mean == 0.7
    assert math.isnan(half_width)


def test_mean_ci_constant_values_zero_width() -> None:
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)


def test_mean_ci_accepts_arrays_and_tensors() -> None:
    expected = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    from_array = mean_ci(np.arange(1, 6, dtype=np.float32))
    from_tensor = mean_ci(torch.arange(1, 6, dtype=torch.float32))
    assert from_array == pytest.approx(expected)
    assert from_tensor == pytest.approx(expected)


def test_mean_ci_nan_propagates() -> None:
    mean, half_width = mean_ci([1.0, float("nan"), 3.0])
    assert math.isnan(mean)
    assert math.isnan(half_width)


def test_mean_ci_coverage_near_nominal() -> None:
    # Across many normal samples of size 8, about 95% of intervals contain the true mean.
    generator = np.random.default_rng(0)
    samples = generator.normal(loc=2.0, scale=3.0, size=(4000, 8))
    covered = [abs(mean_ci(row).mean - 2.0) <= mean_ci(row).half_width for row in samples]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


@pytest.mark.parametrize("values", [[], [[1.0, 2.0], [3.0, 4.0]]])
def test_mean_ci_rejects_bad_shapes(values: list) -> None:
    with pytest.raises(ValueError, match="values"):
        mean_ci(values)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95.0, -0.5])
def test_mean_ci_rejects_bad_confidence(confidence: float) -> None:
    with pytest.raises(ValueError, match=f"confidence={confidence}"):
        mean_ci([1.0, 2.0], confidence=confidence)


def test_paired_difference_hand_computed() -> None:
    # Differences [0.1, 0, 0.1, 0.05]: mean 0.0625, squared deviations sum 0.006875.
    a = [0.9, 0.8, 0.85, 0.7]
    b = [0.8, 0.8, 0.75, 0.65]
    mean, half_width = paired_difference_ci(a, b)
    assert mean == pytest.approx(0.0625, abs=1e-12)
    assert half_width == pytest.approx(T_975_DF3 * math.sqrt(0.006875 / 3) / 2, rel=1e-8)
    assert half_width == pytest.approx(0.076174, abs=1e-6)


def test_paired_difference_narrower_than_unpaired() -> None:
    # Task difficulty varies a lot, but a beats b by about 0.02 on every task.
    generator = np.random.default_rng(1)
    difficulty = generator.uniform(0.5, 0.95, size=20)
    a = difficulty + 0.02 + generator.normal(scale=0.005, size=20)
    b = difficulty
    paired = paired_difference_ci(a, b)
    assert paired.low > 0.0
    assert paired.half_width < mean_ci(a).half_width


def test_paired_difference_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="a with 3 and b with 2"):
        paired_difference_ci([1.0, 2.0, 3.0], [1.0, 2.0])
