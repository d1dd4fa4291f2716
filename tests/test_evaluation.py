"""Held-out evaluation: per-chunk training, learning-rate selection and the written report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jobs import evaluate as evaluate_job
from mln_core import evaluation, inner, losses
from mln_core.config import Config, CsvConfig, EvalConfig, InnerConfig, LossNetConfig, TaskConfig, TrainConfig
from mln_core.evaluation import ChunkResult
from mln_core.loss_net import onehot_targets
from mln_core.meta_train import init_loss_net
from mln_core.tasks import concat, generate_tasks

STEPS = 6


@pytest.fixture(scope="module")
def config() -> Config:
    return Config(
        tasks=TaskConfig(num_features=(2, 5), num_classes=(2, 4), train_size=16, val_size=32, test_size=64),
        loss_net=LossNetConfig(hidden_width=8, depth=2),
        inner=InnerConfig(steps=STEPS, lr=0.3),
        train=TrainConfig(seed=0),
        eval=EvalConfig(
            seed=17,
            linear_tasks=5,
            nonlinear_tasks=3,
            datasets=("iris",),
            splits=3,
            lr_grid=(0.1, 1.0),
            classifiers=("linear", "mlp"),
            curve_points=4,
        ),
    )


@pytest.fixture(scope="module")
def net(config):
    return init_loss_net(config)


@pytest.fixture(scope="module")
def tasks(config):
    return generate_tasks(config.tasks, config.eval.seed, range(6))


def run_chunk(tasks, config, net, loss, lrs=(0.1, 0.3, 1.0)):
    return evaluation.evaluate_chunk(
        tasks, config.inner, loss, lrs, steps=STEPS, curve_points=config.eval.curve_points, net=net
    )


def synthetic_result(loss: str, lrs, val_accuracy, test_accuracy) -> ChunkResult:
    """Build a ChunkResult from accuracy lists ``[L][T]`` with a flat learning curve."""
    val = torch.tensor(val_accuracy, dtype=torch.float32)
    test = torch.tensor(test_accuracy, dtype=torch.float32)
    return ChunkResult(
        loss=loss,
        lrs=tuple(lrs),
        curve_steps=(0, STEPS),
        task_index=torch.arange(test.shape[1]),
        val_accuracy=val,
        test_accuracy=test,
        curve=test[:, None, :].expand(-1, 2, -1).clone(),
    )


# ---------------------------------------------------------------- evaluate_chunk


@pytest.mark.parametrize("loss", ["mln", "ce", "mse"])
def test_chunk_result_shapes(tasks, config, net, loss):
    lrs = (0.1, 0.3, 1.0)
    result = run_chunk(tasks, config, net, loss, lrs)
    num_points = len(result.curve_steps)

    assert result.loss == loss
    assert result.lrs == lrs
    assert result.val_accuracy.shape == (3, tasks.size)
    assert result.test_accuracy.shape == (3, tasks.size)
    assert result.curve.shape == (3, num_points, tasks.size)
    assert result.curve_steps[0] == 0
    assert result.curve_steps[-1] == STEPS
    assert torch.equal(result.curve[:, -1], result.test_accuracy)
    assert bool(((result.test_accuracy >= 0) & (result.test_accuracy <= 1)).all())


def test_chunk_curve_starts_at_initial_classifier(tasks, config, net):
    result = run_chunk(tasks, config, net, "ce", (0.3,))
    # The linear classifier starts at zero, so every logit ties and argmax picks class 0.
    class0_share = (tasks.test_y == 0).float().mean(-1)

    assert torch.allclose(result.curve[0, 0], class0_share)


@pytest.mark.parametrize("loss", ["mln", "ce"])
def test_chunks_concatenated_equal_whole_batch(tasks, config, net, loss):
    whole = run_chunk(tasks, config, net, loss)
    parts = [run_chunk(tasks.select(slice(0, 2)), config, net, loss), run_chunk(tasks.select(slice(2, 6)), config, net, loss)]
    joined = evaluation.concat_chunks(parts)

    assert torch.equal(joined.task_index, whole.task_index)
    assert torch.equal(joined.val_accuracy, whole.val_accuracy)
    assert torch.equal(joined.test_accuracy, whole.test_accuracy)
    assert torch.equal(joined.curve, whole.curve)


def test_concat_chunks_rejects_mismatched_lrs(tasks, config, net):
    first = run_chunk(tasks.select(slice(0, 2)), config, net, "ce", (0.1,))
    second = run_chunk(tasks.select(slice(2, 4)), config, net, "ce", (0.3,))

    with pytest.raises(ValueError, match="does not match"):
        evaluation.concat_chunks([first, second])


@pytest.mark.parametrize("loss, loss_fn", [("ce", losses.cross_entropy), ("mse", losses.mean_squared_error)])
def test_baselines_match_direct_unroll(tasks, config, net, loss, loss_fn):
    lrs = (0.1, 1.0)
    result = run_chunk(tasks, config, net, loss, lrs)

    for row, lr in enumerate(lrs):
        params = inner.unroll(tasks, config.inner, loss_fn, {}, steps=STEPS, lr=lr)
        expected_val = inner.accuracy(params, tasks.val_x, tasks.val_y, tasks.class_mask)
        expected_test = inner.accuracy(params, tasks.test_x, tasks.test_y, tasks.class_mask)
        assert torch.equal(result.val_accuracy[row], expected_val)
        assert torch.equal(result.test_accuracy[row], expected_test)


def test_mln_matches_direct_unroll(tasks, config, net):
    result = run_chunk(tasks, config, net, "mln", (0.3,))
    meta_params = {name: value.detach() for name, value in net.named_parameters()}
    params = inner.unroll(tasks, config.inner, losses.meta_loss(net), meta_params, steps=STEPS, lr=0.3)

    assert torch.equal(result.test_accuracy[0], inner.accuracy(params, tasks.test_x, tasks.test_y, tasks.class_mask))


def test_mln_without_net_raises(tasks, config):
    with pytest.raises(ValueError, match="net="):
        evaluation.evaluate_chunk(tasks, config.inner, "mln", (0.3,), steps=STEPS, curve_points=2)


def test_unknown_loss_raises(tasks, config):
    with pytest.raises(ValueError, match="loss='hinge' is invalid"):
        evaluation.evaluate_chunk(tasks, config.inner, "hinge", (0.3,), steps=STEPS, curve_points=2)


@pytest.mark.parametrize(
    "steps, points, expected",
    [(10, 1, (10,)), (10, 2, (0, 10)), (10, 3, (0, 5, 10)), (3, 10, (0, 1, 2, 3)), (20, 5, (0, 5, 10, 15, 20))],
)
def test_curve_steps_cases(steps, points, expected):
    assert evaluation.curve_steps(steps, points) == expected


def test_candidate_lrs_include_inner_lr():
    assert evaluation.candidate_lrs("mln", 0.3, (0.1, 1.0)) == (0.3,)
    assert evaluation.candidate_lrs("ce", 0.3, (1.0, 0.1)) == (0.1, 0.3, 1.0)
    assert evaluation.candidate_lrs("mse", 0.1, (0.1, 1.0)) == (0.1, 1.0)


# ---------------------------------------------------------------- select_group


def test_tuned_lr_chosen_on_validation_not_test():
    lrs = (0.1, 0.3, 1.0)
    # Validation prefers lr 0.1, test would prefer lr 1.0.
    ce = synthetic_result(
        "ce", lrs, val_accuracy=[[0.9, 0.9], [0.5, 0.5], [0.6, 0.6]], test_accuracy=[[0.2, 0.3], [0.5, 0.5], [0.9, 1.0]]
    )
    mse = synthetic_result(
        "mse", lrs, val_accuracy=[[0.1, 0.1], [0.2, 0.2], [0.8, 0.8]], test_accuracy=[[0.9, 0.9], [0.4, 0.4], [0.3, 0.3]]
    )
    mln = synthetic_result("mln", (0.3,), val_accuracy=[[0.5, 0.5]], test_accuracy=[[0.6, 0.8]])
    result = evaluation.select_group({"mln": mln, "ce": ce, "mse": mse}, inner_lr=0.3)

    assert result.losses["ce_tuned"].lr == 0.1
    assert result.losses["ce_tuned"].mean == pytest.approx(0.25)
    assert result.losses["mse_tuned"].lr == 1.0
    assert result.losses["mse_tuned"].mean == pytest.approx(0.3)


def test_untuned_losses_use_inner_lr():
    lrs = (0.1, 0.3, 1.0)
    ce = synthetic_result("ce", lrs, [[0.9, 0.9], [0.5, 0.5], [0.6, 0.6]], [[0.2, 0.3], [0.5, 0.7], [0.9, 1.0]])
    mse = synthetic_result("mse", lrs, [[0.9, 0.9], [0.5, 0.5], [0.6, 0.6]], [[0.2, 0.3], [0.4, 0.4], [0.9, 1.0]])
    mln = synthetic_result("mln", (0.3,), [[0.5, 0.5]], [[0.6, 0.8]])
    result = evaluation.select_group({"mln": mln, "ce": ce, "mse": mse}, inner_lr=0.3)

    assert result.losses["mln"].lr == 0.3
    assert result.losses["ce"].lr == 0.3
    assert result.losses["ce"].test_accuracy == pytest.approx((0.5, 0.7))
    assert result.losses["mse"].mean == pytest.approx(0.4)
    assert result.num_tasks == 2


def test_tuned_lr_tie_takes_smallest():
    lrs = (0.1, 0.3, 1.0)
    ce = synthetic_result("ce", lrs, [[0.5, 0.5], [0.7, 0.7], [0.7, 0.7]], [[0.1, 0.1], [0.2, 0.2], [0.9, 0.9]])
    mln = synthetic_result("mln", (0.3,), [[0.5, 0.5]], [[0.6, 0.8]])
    result = evaluation.select_group({"mln": mln, "ce": ce, "mse": ce}, inner_lr=0.3)

    assert result.losses["ce_tuned"].lr == 0.3


def test_select_lr_index_tie_with_unsorted_lrs():
    val_accuracy = torch.tensor([[0.7, 0.7], [0.7, 0.7], [0.5, 0.5]])

    assert evaluation.select_lr_index((1.0, 0.3, 0.1), val_accuracy) == 1


def test_paired_difference_is_mln_minus_baseline():
    lrs = (0.3,)
    ce = synthetic_result("ce", lrs, [[0.5, 0.5, 0.5]], [[0.5, 0.6, 0.7]])
    mse = synthetic_result("mse", lrs, [[0.5, 0.5, 0.5]], [[0.9, 0.9, 0.9]])
    mln = synthetic_result("mln", lrs, [[0.5, 0.5, 0.5]], [[0.7, 0.7, 0.8]])
    result = evaluation.select_group({"mln": mln, "ce": ce, "mse": mse}, inner_lr=0.3)

    assert result.differences["ce"].mean == pytest.approx(0.4 / 3, abs=1e-6)
    assert result.differences["mse"].mean == pytest.approx(-0.5 / 3, abs=1e-6)
    assert result.differences["ce"].ci > 0
    assert result.losses["mln"].ci > 0


def test_select_group_rejects_missing_inner_lr():
    ce = synthetic_result("ce", (0.1, 1.0), [[0.5], [0.5]], [[0.5], [0.5]])
    mln = synthetic_result("mln", (0.3,), [[0.5]], [[0.5]])

    with pytest.raises(ValueError, match="not trained at inner lr 0.3"):
        evaluation.select_group({"mln": mln, "ce": ce, "mse": ce}, inner_lr=0.3)


# ---------------------------------------------------------------- loss curves


@pytest.mark.parametrize("num_classes", [2, 10])
def test_learned_loss_curve_equals_net(net, num_classes):
    prob_true = torch.linspace(0.0, 1.0, 11)
    meta_params = dict(net.named_parameters())
    curve = evaluation.learned_loss_curve(net, meta_params, num_classes, prob_true)

    rest = (1.0 - prob_true[:, None]) / (num_classes - 1)
    prob = torch.cat([prob_true[:, None], rest.expand(-1, num_classes - 1)], dim=1)  # [P, C]
    onehot = onehot_targets(torch.zeros(11, dtype=torch.int64), num_classes, torch.float32)
    with torch.no_grad():
        expected = net(prob, onehot)
    assert curve.shape == (11,)
    assert torch.allclose(curve, expected)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_baseline_loss_curves_closed_form(num_classes):
    prob_true = torch.linspace(0.05, 1.0, 20)
    curves = evaluation.baseline_loss_curves(num_classes, prob_true)
    brier = (1 - prob_true) ** 2 * (1 + 1 / (num_classes - 1))

    assert torch.allclose(curves["ce"], -prob_true.log(), atol=1e-5)
    assert torch.allclose(curves["mse"], brier, atol=1e-5)


# ---------------------------------------------------------------- jobs.evaluate


GROUPS = ["linear tasks", "mlp tasks", "poly tasks", "iris", "toy (CSV)"]


@pytest.fixture(scope="module")
def report_config(config, tmp_path_factory) -> Config:
    """Return ``config`` plus a 40-row CSV table whose class is the sign of x1 + x2."""
    generator = np.random.default_rng(0)
    x = generator.normal(size=(40, 2))
    rows = ["x1,x2,label"] + [f"{a:.4f},{b:.4f},{'yes' if a + b > 0 else 'no'}" for a, b in x]
    path = tmp_path_factory.mktemp("csv") / "toy.csv"
    path.write_text("\n".join(rows) + "\n")
    csv_config = CsvConfig(path=str(path), target="label")
    return config.model_copy(update={"eval": config.eval.model_copy(update={"csv": (csv_config,)})})


@pytest.fixture(scope="module")
def written_report(report_config, net, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    messages: list[str] = []
    report = evaluate_job.evaluate(report_config, net, out_dir, progress=messages.append)
    return out_dir, report, messages


def test_evaluate_writes_all_files(written_report):
    out_dir, _, _ = written_report

    for name in evaluate_job.REPORT_FILES:
        assert (out_dir / name).stat().st_size > 0, name
    for name in ("accuracy.png", "curves.png", "learned_loss.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(evaluate_job.REPORT_FILES)


def test_report_json_holds_config_and_results(written_report, report_config):
    out_dir, report, _ = written_report
    loaded = json.loads((out_dir / "report.json").read_text())

    assert loaded["config"] == report_config.model_dump(mode="json")
    assert Config.model_validate(loaded["config"]) == report_config
    assert loaded["environment"]["torch"] == torch.__version__
    assert list(loaded["results"]) == ["linear", "mlp"]
    assert list(loaded["results"]["linear"]) == GROUPS
    assert loaded["results"]["linear"]["toy (CSV)"]["tasks"] == 3
    iris = loaded["results"]["linear"]["iris"]
    assert iris["tasks"] == 3
    assert len(iris["losses"]["mln"]["test_accuracy"]) == 3
    assert iris["losses"]["ce_tuned"]["lr"] in (0.1, 0.3, 1.0)
    assert set(iris["mln_minus"]) == {"ce", "mse", "ce_tuned", "mse_tuned"}
    assert loaded["results"]["mlp"]["linear tasks"]["tasks"] == 5
    assert loaded["results"] == report["results"]


def test_report_markdown_mentions_every_group(written_report):
    out_dir, _, _ = written_report
    markdown = (out_dir / "report.md").read_text()

    for group in GROUPS:
        assert f"| {group} |" in markdown, group
    assert "## Linear classifier" in markdown
    assert "## MLP classifier" in markdown
    assert "| group | MLN | CE | MSE | CE tuned (lr) | MSE tuned (lr) |" in markdown


def test_evaluate_reports_progress(written_report):
    _, _, messages = written_report

    # One line at the start, one per group and classifier, one at the end.
    assert len(messages) == 1 + len(GROUPS) * 2 + 1
    assert any(message.startswith("linear classifier, iris") for message in messages)


def test_generated_groups_use_eval_seed(config):
    groups = evaluate_job._build_groups(config)
    generated = [group for group in groups if group.kind == "generated"]

    assert [group.name for group in generated] == ["linear tasks", "mlp tasks", "poly tasks"]
    for group in generated:
        batch = next(group.chunks())
        assert batch.seed == config.eval.seed
        assert batch.seed != config.train.seed


def test_generated_groups_chunk_large_counts(config, monkeypatch):
    monkeypatch.setattr(evaluate_job, "_TASKS_PER_CHUNK", 2)
    group = evaluate_job._build_groups(config)[0]
    chunks = list(group.chunks())
    whole = generate_tasks(config.tasks, config.eval.seed, range(5))

    assert [chunk.size for chunk in chunks] == [2, 2, 1]
    assert torch.equal(concat(chunks).train_x, whole.train_x)


def test_summary_states_where_tuned_baseline_wins():
    lrs = (0.1, 0.3)
    # CE tuned (lr 0.1 by validation) beats the MLN by 20 points on every task.
    ce = synthetic_result("ce", lrs, [[0.9, 0.9, 0.9], [0.5, 0.5, 0.5]], [[0.9, 0.8, 0.9], [0.5, 0.4, 0.4]])
    mse = synthetic_result("mse", lrs, [[0.1, 0.1, 0.1], [0.5, 0.5, 0.5]], [[0.9, 0.9, 0.9], [0.4, 0.3, 0.4]])
    mln = synthetic_result("mln", (0.3,), [[0.5, 0.5, 0.5]], [[0.7, 0.6, 0.7]])
    group = evaluation.select_group({"mln": mln, "ce": ce, "mse": mse}, inner_lr=0.3)
    lines = evaluate_job._summary_lines({"toy": group})

    assert lines[0].startswith("With the same learning rate and steps, the MLN beats CE significantly on 1 of 1")
    assert "toy (+23.3" in lines[0]
    assert "beats MSE significantly on 1 of 1" in lines[1]
    assert lines[2].startswith("CE tuned still beats the MLN on 1 of 1 groups: toy by 20.0")
    assert "at lr 0.1 (significant)" in lines[2]
    assert lines[3] == "MSE tuned has a lower or equal mean test accuracy than the MLN on every group."


def test_report_json_replaces_nan_with_null():
    text = evaluate_job._to_json({"ci": math.nan, "values": [1.0, math.inf]})

    assert json.loads(text) == {"ci": None, "values": [1.0, None]}


def test_evaluate_single_task_has_null_ci(config, net, tmp_path):
    eval_config = config.eval.model_copy(
        update={"linear_tasks": 1, "nonlinear_tasks": 0, "datasets": (), "classifiers": ("linear",)}
    )
    single = config.model_copy(update={"eval": eval_config})
    report = evaluate_job.evaluate(single, net, tmp_path)
    loaded = json.loads((tmp_path / "report.json").read_text())

    assert loaded["results"]["linear"]["linear tasks"]["losses"]["mln"]["ci"] is None
    assert loaded["results"]["linear"]["linear tasks"]["mln_minus"]["ce"]["ci"] is None
    assert report["results"] == loaded["results"]
    assert "n/a" in (tmp_path / "report.md").read_text()


def test_evaluate_without_groups_raises(config, net, tmp_path):
    eval_config = config.eval.model_copy(update={"linear_tasks": 0, "nonlinear_tasks": 0, "datasets": ()})
    empty = config.model_copy(update={"eval": eval_config})

    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_job.evaluate(empty, net, tmp_path / "out")
    assert not (tmp_path / "out").exists()
