"""Evaluation spread over Ray with Ray Data gives the numbers of the local evaluation."""

from __future__ import annotations

import pytest

from cluster.ray_eval import evaluate_on_ray
from jobs.evaluate import REPORT_FILES, evaluate
from mln_core.meta_train import init_loss_net
from tests.helpers import tiny_config

pytestmark = pytest.mark.ray

# 260 linear tasks make two chunks of the local evaluation's 256, so the join across chunks is exercised.
EVAL = (
    "eval.linear_tasks=260",
    "eval.nonlinear_tasks=4",
    "eval.datasets=[iris]",
    "eval.splits=3",
    "eval.classifiers=[linear]",
    "eval.lr_grid=[0.1,1.0]",
    "eval.steps=3",
    "eval.curve_points=2",
)


@pytest.fixture(scope="module")
def reports(local_ray, tmp_path_factory) -> dict:
    config = tiny_config(*EVAL)
    net = init_loss_net(config)
    local_dir, ray_dir = tmp_path_factory.mktemp("local_eval"), tmp_path_factory.mktemp("ray_eval")
    return {
        "local": evaluate(config, net, local_dir),
        "ray": evaluate_on_ray(config, net, ray_dir),
        "ray_dir": ray_dir,
    }


@pytest.mark.timeout(300)
def test_ray_eval_matches_local_numbers(reports: dict) -> None:
    assert reports["ray"]["results"] == reports["local"]["results"]


@pytest.mark.timeout(300)
def test_ray_eval_matches_local_summary(reports: dict) -> None:
    assert reports["ray"]["groups"] == reports["local"]["groups"]
    assert reports["ray"]["summary"] == reports["local"]["summary"]
    assert reports["ray"]["loss_net"] == reports["local"]["loss_net"]


@pytest.mark.timeout(300)
def test_ray_eval_writes_report_files(reports: dict) -> None:
    for name in REPORT_FILES:
        assert (reports["ray_dir"] / name).stat().st_size > 0, name
    assert reports["ray"]["environment"]["executor"] == "ray"
