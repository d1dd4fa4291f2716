import json
import os
import subprocess
import sys

import pytest

from jobs.cli import main
from tests.helpers import TINY

EVAL_SMALL = (
    "eval.linear_tasks=4", "eval.nonlinear_tasks=4", "eval.datasets=[iris]", "eval.splits=3",
    "eval.lr_grid=[0.1,1.0]", "eval.classifiers=[linear]",
)


def _sets(*overrides):
    return [arg for text in overrides for arg in ("--set", text)]


@pytest.mark.timeout(300)
def test_train_then_evaluate_in_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "jobs.cli", "train", "--run-dir", str(run_dir), *_sets(*TINY, *EVAL_SMALL)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=280, env={**os.environ})
    assert finished.returncode == 0, finished.stderr
    assert "step 6/6" in finished.stderr
    for name in ("checkpoint.pt", "metrics.jsonl", "training_curves.png"):
        assert (run_dir / name).is_file()
    for name in ("report.md", "report.json", "accuracy.png", "curves.png", "learned_loss.png"):
        assert (run_dir / "report" / name).is_file()
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["config"]["train"]["steps"] == 6

    csv = tmp_path / "table.csv"
    rows = ["id,colour,size,label"] + [
        f"{i},{'red' if i % 3 else 'blue'},{(i * 7) % 11},{'yes' if (i * 7) % 11 > 5 else 'no'}" for i in range(60)
    ]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "csv_report"
    code = main([
        "evaluate", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out),
        "--csv", str(csv), "--target", "label", "--drop", "id", *_sets("eval.datasets=[]"),
    ])
    assert code == 0
    assert "table" in (out / "report.md").read_text()


def test_invalid_override_exits_with_message(capsys):
    assert main(["train", "--set", "train.steps=0"]) == 2
    assert "train.steps=0" in capsys.readouterr().err


def test_unknown_key_exits_with_message(capsys):
    assert main(["config", "--set", "train.stepz=3"]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err


def test_missing_checkpoint_exits_with_message(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_csv_options_without_csv_rejected(tmp_path, capsys):
    from jobs.local import run_local
    from tests.helpers import tiny_config

    run_local(tiny_config("train.steps=1"), tmp_path)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--target", "y"]) == 2
    assert "--csv FILE" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 11\ninner:\n  lr: 0.2\n")
    assert main(["config", "--config", str(path), "--set", "inner.lr=0.3"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 11" in printed
    assert "lr: 0.3" in printed


def test_config_file_not_mapping(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    assert main(["config", "--config", str(path)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_describe_lists_every_section(capsys):
    assert main(["config", "--describe"]) == 0
    printed = capsys.readouterr().out
    for key in ("tasks.family", "inner.steps", "estimator.es.population", "train.seed", "eval.lr_grid"):
        assert key in printed
