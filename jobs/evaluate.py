"""Held-out evaluation of a trained MLN against CE and MSE, written as a report.

``evaluate`` trains classifiers with each loss on every evaluation group and
writes five files into the output folder, each atomically:

- ``report.json``: the resolved config, the environment and every number,
- ``report.md``: one table per classifier and a summary computed from the numbers,
- ``accuracy.png``: mean test accuracy per group with confidence intervals,
- ``curves.png``: mean test accuracy against the inner step,
- ``learned_loss.png``: the learned loss against the true class's probability.

The groups are held-out generated tasks of the linear, "mlp" and "poly"
families, the configured scikit-learn datasets and the configured CSV tables.
Generated tasks come from the stream ``eval.seed``. Config validation makes
it differ from ``train.seed``, and tasks are keyed by seed, so the held-out
tasks are not the training tasks.
"""

from __future__ import annotations

import dataclasses
import io
import datetime
import hashlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jobs.checkpoint import atomic_write_bytes
from jobs.data import Table, load_csv, load_sklearn_dataset, table_tasks
from mln_core.config import Config, EvalConfig, InnerConfig
from mln_core.evaluation import (
    BASELINES,
    REPORTED_LOSSES,
    TRAINED_LOSSES,
    ChunkResult,
    GroupResult,
    baseline_loss_curves,
    candidate_lrs,
    concat_chunks,
    evaluate_chunk,
    learned_loss_curve,
    select_group,
)
from mln_core.loss_net import MetaLossNet, ParamLayout
from mln_core.tasks import TaskBatch, generate_tasks

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "curves.png", "learned_loss.png")

# Generated groups are produced and trained this many tasks at a time, which
# bounds memory for large eval.linear_tasks and eval.nonlinear_tasks.
_TASKS_PER_CHUNK = 256
_GENERATED_FAMILIES = ("linear", "mlp", "poly")
_LEARNED_LOSS_CLASSES = (2, 10)
_TEACHERS = {"linear": "a linear teacher", "mlp": "a random MLP teacher", "poly": "a quadratic polynomial teacher"}
_CLASSIFIER_TITLES = {"linear": "Linear classifier", "mlp": "MLP classifier"}
_LABELS = {"mln": "MLN", "ce": "CE", "mse": "MSE", "ce_tuned": "CE tuned", "mse_tuned": "MSE tuned"}
_COLORS = {"mln": "tab:red", "ce": "tab:blue", "mse": "tab:green", "ce_tuned": "tab:cyan", "mse_tuned": "tab:olive"}

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class _Group:
    """One evaluation group: a named set of tasks, produced in chunks."""

    name: str  # unique, used as the key in the report
    kind: str  # "generated", "dataset" or "csv"
    description: str
    num_tasks: int
    chunks: Callable[[], Iterator[TaskBatch]]


def evaluate(config: Config, net: MetaLossNet, out_dir: Path, progress: Progress | None = None) -> dict:
    """Compare the MLN ``net`` with CE and MSE on every evaluation group and write the report into ``out_dir``.

    Returns the content of ``report.json``, with null for undefined numbers.
    ``progress`` receives the lines that are logged at INFO level: one at the
    start, one per finished group and classifier, and one after writing.
    """
    steps, groups = plan_groups(config)
    out_dir = Path(out_dir)

    # Tasks move to the device of the MLN's weights.
    # NOTE: only the CPU path has been run so far.
    meta_params = {name: value.detach() for name, value in net.named_parameters()}
    device = next(iter(meta_params.values())).device
    _report_progress(
        progress,
        f"evaluating {len(groups)} groups x {len(config.eval.classifiers)} classifiers, {steps} inner steps, on {device}",
    )

    # Train every loss on every group, once per classifier.
    results: dict[str, dict[str, GroupResult]] = {}
    for classifier in config.eval.classifiers:
        inner_config = config.inner.model_copy(update={"classifier": classifier})
        results[classifier] = {}
        for group in groups:
            started = time.perf_counter()
            result = _evaluate_group(group, inner_config, config.eval, steps, net, meta_params, device)
            results[classifier][group.name] = result
            _report_progress(progress, _progress_line(classifier, group, result, time.perf_counter() - started))

    report = write_report(config, net, groups, results, steps, device, out_dir)
    _report_progress(progress, f"wrote {', '.join(REPORT_FILES)} to {out_dir}")
    return report


def plan_groups(config: Config) -> tuple[int, list[_Group]]:
    """Return the inner steps and the evaluation groups of ``config``; raise ValueError when there are none."""
    if not config.eval.classifiers:
        raise ValueError("eval.classifiers is empty: list at least one of linear and mlp")
    steps = config.inner.steps if config.eval.steps is None else config.eval.steps
    groups = _build_groups(config)
    if not groups:
        raise ValueError(
            "nothing to evaluate: eval.linear_tasks and eval.nonlinear_tasks are 0 and eval.datasets and "
            "eval.csv are empty. Set at least one of them"
        )
    return steps, groups


def write_report(
    config: Config,
    net: MetaLossNet,
    groups: list[_Group],
    results: dict[str, dict[str, GroupResult]],
    steps: int,
    device: torch.device,
    out_dir: Path,
    executor: str | None = None,
) -> dict:
    """Write the five report files into ``out_dir`` from per-classifier, per-group results; return the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write the numbers first, so a failing plot still leaves them on disk.
    # A group of one task has no confidence interval (NaN), and JSON has no NaN, so it becomes null.
    report = _replace_nonfinite(_report_dict(config, net, groups, results, steps, device))
    if executor is not None:
        report["environment"]["executor"] = executor
    _write_atomic(out_dir / "report.json", lambda f: f.write(_to_json(report).encode()))
    _write_atomic(out_dir / "report.md", lambda f: f.write(_render_markdown(report).encode()))
    _write_figure(out_dir / "accuracy.png", _plot_accuracy(report))
    _write_figure(out_dir / "curves.png", _plot_curves(report))
    _write_figure(out_dir / "learned_loss.png", _plot_learned_loss(report))
    return report


# ---------------------------------------------------------------- groups


def _build_groups(config: Config) -> list[_Group]:
    """List the evaluation groups. Real tables are loaded and split here, so a bad CSV fails before any training."""
    eval_config = config.eval
    groups = []
    for family in _GENERATED_FAMILIES:
        count = eval_config.linear_tasks if family == "linear" else eval_config.nonlinear_tasks
        if count > 0:
            groups.append(_generated_group(config, family, count))

    tables = [load_sklearn_dataset(name) for name in eval_config.datasets]
    tables += [load_csv(csv_config) for csv_config in eval_config.csv]
    kinds = ["dataset"] * len(eval_config.datasets) + ["csv"] * len(eval_config.csv)
    names = {group.name for group in groups}
    for table, kind in zip(tables, kinds):
        name = table.name if kind == "dataset" else f"{table.name} (CSV)"
        # Two CSV files may share a stem, and every group needs its own key.
        suffix = 2
        while name in names:
            name = f"{table.name} (CSV #{suffix})"
            suffix += 1
        names.add(name)
        groups.append(_table_group(table, kind, name, eval_config))
    return groups


def _generated_group(config: Config, family: str, count: int) -> _Group:
    task_config = config.tasks.model_copy(update={"family": family})
    seed = config.eval.seed

    def chunks() -> Iterator[TaskBatch]:
        for start in range(0, count, _TASKS_PER_CHUNK):
            yield generate_tasks(task_config, seed, range(start, min(start + _TASKS_PER_CHUNK, count)))

    (d_low, d_high), (c_low, c_high) = task_config.num_features, task_config.num_classes
    return _Group(
        name=f"{family} tasks",
        kind="generated",
        description=(
            f"{count} held-out generated tasks with {_TEACHERS[family]} (seed {seed}, "
            f"D {d_low}-{d_high}, C {c_low}-{c_high}, {task_config.train_size} training samples)"
        ),
        num_tasks=count,
        chunks=chunks,
    )


def _table_group(table: Table, kind: str, name: str, eval_config: EvalConfig) -> _Group:
    tasks = table_tasks(table, eval_config.splits, eval_config.seed, eval_config.val_fraction, eval_config.test_fraction)
    return _Group(
        name=name,
        kind=kind,
        description=(
            f"{eval_config.splits} random splits of {table.name} ({table.num_rows} rows, D {table.num_features}, "
            f"C {table.num_classes}, {tasks.train_x.shape[1]} training rows per split)"
        ),
        num_tasks=tasks.size,
        chunks=lambda: iter([tasks]),
    )


def _evaluate_group(
    group: _Group,
    inner_config: InnerConfig,
    eval_config: EvalConfig,
    steps: int,
    net: MetaLossNet,
    meta_params: dict[str, torch.Tensor],
    device: torch.device,
) -> GroupResult:
    per_loss: dict[str, list[ChunkResult]] = {loss: [] for loss in TRAINED_LOSSES}
    for chunk in group.chunks():
        chunk = chunk.to(device)
        for loss in TRAINED_LOSSES:
            lrs = candidate_lrs(loss, inner_config.lr, eval_config.lr_grid)
            per_loss[loss].append(
                evaluate_chunk(
                    chunk,
                    inner_config,
                    loss,
                    lrs,
                    steps=steps,
                    curve_points=eval_config.curve_points,
                    net=net,
                    meta_params=meta_params,
                )
            )
    joined = {loss: concat_chunks(chunks) for loss, chunks in per_loss.items()}
    return select_group(joined, inner_config.lr, CONFIDENCE)


def _report_progress(progress: Progress | None, message: str) -> None:
    logger.info("%s", message)
    if progress is not None:
        progress(message)


def _progress_line(classifier: str, group: _Group, result: GroupResult, seconds: float) -> str:
    parts = []
    for name in REPORTED_LOSSES:
        loss = result.losses[name]
        lr = f" (lr {loss.lr:g})" if name.endswith("_tuned") else ""
        parts.append(f"{_LABELS[name]} {100 * loss.mean:.1f}%{lr}")
    tasks = "1 task" if group.num_tasks == 1 else f"{group.num_tasks} tasks"
    return f"{classifier} classifier, {group.name} ({tasks}, {seconds:.1f} s): " + ", ".join(parts)


# ---------------------------------------------------------------- report.json


def _report_dict(
    config: Config,
    net: MetaLossNet,
    groups: Sequence[_Group],
    results: dict[str, dict[str, GroupResult]],
    steps: int,
    device: torch.device,
) -> dict:
    layout = ParamLayout(net)
    flat = layout.flatten(net).cpu().contiguous()
    return {
        "config": config.model_dump(mode="json"),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(device),
        "loss_net": {
            "parameters": layout.numel,
            "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        },
        "protocol": {
            "inner_steps": steps,
            "shared_lr": config.inner.lr,
            "lr_grid": list(config.eval.lr_grid),
            "confidence": CONFIDENCE,
            "accuracy_unit": "fraction in [0, 1]; report.md shows percent",
            "tuning": "each tuned baseline uses the lr with the highest mean validation accuracy over the group's "
            "tasks, the smallest such lr on a tie. Test accuracy is never used to choose it.",
            "interval": "Student t interval of the mean over tasks, and a paired one for MLN minus a baseline",
        },
        "groups": [
            {"name": g.name, "kind": g.kind, "description": g.description, "tasks": g.num_tasks} for g in groups
        ],
        "results": {
            classifier: {name: _group_json(result) for name, result in by_group.items()}
            for classifier, by_group in results.items()
        },
        "summary": {classifier: _summary_lines(by_group) for classifier, by_group in results.items()},
        "learned_loss": _learned_loss_json(net),
    }


def _group_json(result: GroupResult) -> dict:
    return {
        "tasks": result.num_tasks,
        "curve_steps": list(result.curve_steps),
        "losses": {
            name: {
                "lr": loss.lr,
                "mean": loss.mean,
                "ci": loss.ci,
                "val_mean": loss.val_mean,
                "test_accuracy": list(loss.test_accuracy),
                "curve": list(loss.curve),
            }
            for name, loss in result.losses.items()
        },
        "mln_minus": {name: {"mean": d.mean, "ci": d.ci} for name, d in result.differences.items()},
        "lr_sweep": {
            name: [{"lr": p.lr, "val_mean": p.val_mean, "test_mean": p.test_mean} for p in points]
            for name, points in result.sweeps.items()
        },
    }


def _learned_loss_json(net: MetaLossNet) -> dict:
    """Tabulate the MLN, CE and MSE against the true class's probability, each shifted to 0 at p = 1."""
    meta_params = {name: value.detach() for name, value in net.named_parameters()}
    device = next(iter(meta_params.values())).device
    prob_true = torch.linspace(0.01, 1.0, 100)  # [P], last point is p = 1
    curves = {}
    for num_classes in _LEARNED_LOSS_CLASSES:
        mln = learned_loss_curve(net, meta_params, num_classes, prob_true.to(device)).cpu()
        values = {"mln": mln, **baseline_loss_curves(num_classes, prob_true)}
        curves[str(num_classes)] = {
            "prob_true": prob_true.tolist(),
            **{name: (curve - curve[-1]).tolist() for name, curve in values.items()},
        }
    return curves


def _environment(device: torch.device) -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "node": platform.node(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


def _to_json(report: dict) -> str:
    return json.dumps(_replace_nonfinite(report), indent=2, allow_nan=False) + "\n"


def _replace_nonfinite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _replace_nonfinite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_nonfinite(item) for item in value]
    return value


# ---------------------------------------------------------------- summary and report.md


def _summary_lines(by_group: dict[str, GroupResult]) -> list[str]:
    """Describe, from the numbers, where the MLN beats each baseline and where a baseline still wins."""
    lines = []
    for baseline in ("ce", "mse"):
        lines.append(_same_settings_line(baseline, by_group))
    for baseline in ("ce_tuned", "mse_tuned"):
        lines.append(_tuned_line(baseline, by_group))
    return lines


def _same_settings_line(baseline: str, by_group: dict[str, GroupResult]) -> str:
    better, worse, unclear = [], [], []
    for name, result in by_group.items():
        difference = result.differences[baseline]
        described = f"{name} ({_signed_pp(difference.mean)} ± {_pp(difference.ci)} pp)"
        if difference.mean - difference.ci > 0:
            better.append(described)
        elif difference.mean + difference.ci < 0:
            worse.append(described)
        else:
            unclear.append(name)

    label = _LABELS[baseline]
    parts = []
    if better:
        parts.append(f"beats {label} significantly on {len(better)} of {len(by_group)} groups: {_join(better)}")
    else:
        scope = "the one group" if len(by_group) == 1 else f"the {len(by_group)} groups"
        parts.append(f"beats {label} significantly on none of {scope}")
    if worse:
        parts.append(f"is significantly worse on {_join(worse)}")
    if unclear:
        parts.append(f"shows no significant difference on {_join(unclear)}")
    return f"With the same learning rate and steps, the MLN {'. It '.join(parts)}."


def _tuned_line(baseline: str, by_group: dict[str, GroupResult]) -> str:
    wins = []
    for name, result in by_group.items():
        difference = result.differences[baseline]
        if difference.mean < 0:
            wins.append((difference.mean, name, difference, result.losses[baseline].lr))
    label = _LABELS[baseline]
    if not wins:
        return f"{label} has a lower or equal mean test accuracy than the MLN on every group."

    # Largest margins first, because those are the cases a user should look at.
    wins.sort()
    described = []
    for _, name, difference, lr in wins:
        significance = "significant" if difference.mean + difference.ci < 0 else "not significant"
        described.append(f"{name} by {_pp(-difference.mean)} ± {_pp(difference.ci)} pp at lr {lr:g} ({significance})")
    return f"{label} still beats the MLN on {len(wins)} of {len(by_group)} groups: {_join(described)}."


def _render_markdown(report: dict) -> str:
    protocol = report["protocol"]
    confidence = round(100 * protocol["confidence"])
    lines = [
        "# MLN evaluation",
        "",
        f"Mean test accuracy in % ± half-width of the {confidence} % confidence interval (Student t over tasks).",
        f"MLN, CE and MSE all train for {protocol['inner_steps']} inner steps at the shared learning rate "
        f"{protocol['shared_lr']:g}, as in Hai et al. (arXiv 2111.10583). CE tuned and MSE tuned use the "
        f"learning rate from {{{', '.join(f'{lr:g}' for lr in protocol['lr_grid'])}}} plus the shared one "
        "with the best mean validation accuracy. The chosen rate is in brackets.",
        "",
        "## Groups",
        "",
    ]
    lines += [f"- **{g['name']}**: {g['description']}." for g in report["groups"]]
    lines += [
        "",
        "For the real datasets every split resamples the same rows, so their intervals show the spread over "
        "splits, not over new data from the same source.",
    ]

    for classifier, by_group in report["results"].items():
        lines += ["", f"## {_CLASSIFIER_TITLES[classifier]}", ""]
        lines += _accuracy_table(by_group)
        lines += ["", f"MLN minus each baseline, in percentage points (paired over tasks, {confidence} % CI):", ""]
        lines += _difference_table(by_group)
        lines += ["", "Summary:", ""]
        lines += [f"- {line}" for line in report["summary"][classifier]]

    lines += [
        "",
        "## Figures",
        "",
        "- `accuracy.png`: the tables above as bars with confidence intervals.",
        "- `curves.png`: mean test accuracy against the inner step.",
        "- `learned_loss.png`: the learned loss against the true class's probability next to CE and MSE. "
        "The MLN's loss is defined only up to an additive constant, so every curve is shifted to 0 at p = 1.",
        "",
        f"Environment: torch {report['environment']['torch']}, {report['environment']['platform']}, "
        f"device {report['environment']['device']}. Loss network: {report['loss_net']['parameters']} parameters, "
        f"sha256 {report['loss_net']['sha256'][:16]}.",
        "",
    ]
    return "\n".join(lines)


def _accuracy_table(by_group: dict) -> list[str]:
    rows = ["| group | MLN | CE | MSE | CE tuned (lr) | MSE tuned (lr) |", "|---|---|---|---|---|---|"]
    for name, group in by_group.items():
        cells = [name]
        for loss in REPORTED_LOSSES:
            entry = group["losses"][loss]
            cell = f"{_pp(entry['mean'])} ± {_pp(entry['ci'])}"
            if loss.endswith("_tuned"):
                cell += f" ({entry['lr']:g})"
            cells.append(cell)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _difference_table(by_group: dict) -> list[str]:
    header = "| group | " + " | ".join(f"MLN − {_LABELS[b]}" for b in BASELINES) + " |"
    rows = [header, "|---" * (len(BASELINES) + 1) + "|"]
    for name, group in by_group.items():
        cells = [name]
        for baseline in BASELINES:
            difference = group["mln_minus"][baseline]
            cells.append(f"{_signed_pp(difference['mean'])} ± {_pp(difference['ci'])}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _pp(fraction: float) -> str:
    """Format an accuracy fraction as percent with one decimal, or n/a when it is undefined."""
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    return f"{100 * fraction:.1f}"


def _signed_pp(fraction: float) -> str:
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    text = f"{100 * fraction:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------- figures


def _plot_accuracy(report: dict) -> Figure:
    """Draw one panel per classifier: grouped bars of mean test accuracy with confidence intervals."""
    classifiers = list(report["results"])
    group_names = [g["name"] for g in report["groups"]]
    figure = Figure(figsize=(max(7.0, 1.3 * len(group_names) + 2), 3.6 * len(classifiers)), layout="constrained")
    axes = figure.subplots(len(classifiers), 1, squeeze=False)[:, 0]
    width = 0.8 / len(REPORTED_LOSSES)
    positions = np.arange(len(group_names))

    for ax, classifier in zip(axes, classifiers):
        by_group = report["results"][classifier]
        for i, loss in enumerate(REPORTED_LOSSES):
            means = [100 * by_group[name]["losses"][loss]["mean"] for name in group_names]
            errors = [100 * _finite_or_zero(by_group[name]["losses"][loss]["ci"]) for name in group_names]
            ax.bar(
                positions + (i - (len(REPORTED_LOSSES) - 1) / 2) * width,
                means,
                width,
                yerr=errors,
                capsize=2,
                label=_LABELS[loss],
                color=_COLORS[loss],
            )
        ax.set_xticks(positions, group_names, rotation=20, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{classifier} classifier: mean ± {round(100 * CONFIDENCE)} % CI")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(REPORTED_LOSSES), fontsize="small")
    return figure


def _plot_curves(report: dict) -> Figure:
    """Draw mean test accuracy against the inner step, one panel per group, for one classifier."""
    # Curves show the linear classifier, the inner loop's default. When it was not
    # evaluated, the first evaluated classifier is plotted instead.
    classifier = "linear" if "linear" in report["results"] else next(iter(report["results"]))
    by_group = report["results"][classifier]
    columns = min(4, len(by_group))
    rows = math.ceil(len(by_group) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.0 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()

    for ax, (name, group) in zip(axes, by_group.items()):
        for loss in REPORTED_LOSSES:
            entry = group["losses"][loss]
            tuned = loss.endswith("_tuned")
            label = f"{_LABELS[loss]} (lr {entry['lr']:g})" if tuned else _LABELS[loss]
            curve = [100 * value for value in entry["curve"]]
            ax.plot(group["curve_steps"], curve, linestyle="--" if tuned else "-", color=_COLORS[loss], label=label)
        ax.set_title(name)
        ax.set_xlabel("inner step")
        ax.set_ylabel("mean test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(by_group) :]:
        ax.set_visible(False)
    figure.suptitle(f"{classifier} classifier, shared lr {report['protocol']['shared_lr']:g}")
    return figure


def _plot_learned_loss(report: dict) -> Figure:
    """Draw the learned loss next to CE and MSE for each class count in the report."""
    curves = report["learned_loss"]
    figure = Figure(figsize=(5.0 * len(curves), 4.0), layout="constrained")
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    low, high = report["config"]["tasks"]["num_classes"]

    for ax, (num_classes, values) in zip(axes, curves.items()):
        for loss in ("mln", "ce", "mse"):
            ax.plot(values["prob_true"], values[loss], color=_COLORS[loss], label=_LABELS[loss])
        ax.axvline(1.0 / int(num_classes), color="grey", linestyle=":", label="uniform prediction, p = 1/C")
        outside = "" if low <= int(num_classes) <= high else f", outside the training range C {low}-{high}"
        ax.set_title(f"C = {num_classes}{outside}")
        ax.set_xlabel("probability of the true class p (others share 1 - p)")
        ax.set_ylabel("loss minus its value at p = 1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle("The MLN's loss is defined up to an additive constant, so each curve is shifted to 0 at p = 1")
    return figure


def _finite_or_zero(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


# ---------------------------------------------------------------- files


def _write_figure(path: Path, figure: Figure) -> None:
    FigureCanvasAgg(figure)
    _write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=120))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(path, buffer.getvalue())
