"""Meta-training submitted with ``ray job submit`` to a three-node cluster on 127.0.0.1.

The nodes are separate ``ray start`` processes started by the project's node
entrypoint: a head with 0 CPUs, a generator node labelled role=gen and a
training node labelled role=train. One short job checks the run folder, the
job log and where generators and trainers ran. A longer job is stopped and
submitted again, which must resume from storage. A job costs about a
minute on 2 cores.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from jobs.checkpoint import load_checkpoint
from tests.cluster_helpers import (
    REPO_ROOT,
    NodeCluster,
    latest_checkpointed_step,
    latest_step,
    listening_sockets,
    non_loopback,
    ray_cli,
    read_jsonl,
    session_members,
)
from tests.helpers import TINY

pytestmark = pytest.mark.ray

SHORT_STEPS = 6
LONG = ("inner.steps=20", "tasks.train_size=64", "train.steps=300", "train.checkpoint_every=20", "train.log_every=20")
STOP_AFTER = 45  # steps seen in metrics.jsonl before the long job is stopped


def job_command(run_dir: Path, storage: Path, run_name: str, *overrides: str) -> list[str]:
    settings = [
        *TINY,
        f"train.steps={SHORT_STEPS}",
        f"cluster.storage_path={storage}",
        "cluster.num_workers=2",
        "cluster.generators=2",
        "cluster.generator_label=gen",
        *overrides,
    ]
    command = ["python", "-m", "jobs.train", "--run-dir", str(run_dir), "--run-name", run_name, "--trainer-label", "train"]
    for setting in settings:
        command += ["--set", setting]
    return command


def submit(cluster: NodeCluster, submission_id: str, command: list[str], wait: bool = True):
    flags = ["job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
             "--working-dir", str(REPO_ROOT)]
    if not wait:
        flags.append("--no-wait")
    return ray_cli(cluster, *flags, "--", *command, timeout_s=400)


def job_logs(cluster: NodeCluster, submission_id: str) -> str:
    return ray_cli(cluster, "job", "logs", "--address", cluster.dashboard_url, submission_id).stdout


def job_status(cluster: NodeCluster, submission_id: str) -> str:
    return ray_cli(cluster, "job", "status", "--address", cluster.dashboard_url, submission_id).stdout


@pytest.fixture(scope="module")
def short_job(node_cluster: NodeCluster) -> dict:
    run_dir, storage = node_cluster.root / "runs" / "short", node_cluster.root / "storage"
    submitted = submit(node_cluster, "short", job_command(run_dir, storage, "short"))
    return {
        "submitted": submitted,
        "logs": job_logs(node_cluster, "short"),
        "run_dir": run_dir,
        "storage_run": storage / "short",
    }


@pytest.mark.timeout(600)
def test_job_succeeds(short_job: dict) -> None:
    submitted = short_job["submitted"]

    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout.lower()


@pytest.mark.timeout(600)
def test_job_writes_run_folder(short_job: dict) -> None:
    run_dir = short_job["run_dir"]

    config, state, history = load_checkpoint(run_dir / "checkpoint.pt")

    assert state["step"] == SHORT_STEPS
    assert config.cluster.num_workers == 2
    assert [r["meta/step"] for r in history] == [float(step) for step in range(SHORT_STEPS)]
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == SHORT_STEPS
    assert (run_dir / "training_curves.png").stat().st_size > 0


@pytest.mark.timeout(600)
def test_job_log_has_step_lines(short_job: dict) -> None:
    logs = short_job["logs"]

    assert f"step {SHORT_STEPS}/{SHORT_STEPS}" in logs
    assert "allreduce_s=" in logs
    assert "task_wait_s=" in logs


@pytest.mark.timeout(600)
def test_generators_run_on_gen_node(short_job: dict) -> None:
    placement = json.loads((short_job["storage_run"] / "placement.json").read_text())

    assert len(placement["generators"]) == 2
    for generator in placement["generators"]:
        assert generator["labels"].get("role") == "gen", generator


@pytest.mark.timeout(600)
def test_trainers_run_on_train_node(short_job: dict) -> None:
    placement = json.loads((short_job["storage_run"] / "placement.json").read_text())
    generator_nodes = {g["node_id"] for g in placement["generators"]}

    assert [t["rank"] for t in placement["trainers"]] == [0, 1]
    for trainer in placement["trainers"]:
        assert trainer["labels"].get("role") == "train", trainer
        assert trainer["node_id"] not in generator_nodes


@pytest.fixture(scope="module")
def resumed_job(node_cluster: NodeCluster, short_job: dict) -> dict:
    """A long job stopped after STOP_AFTER steps, then submitted again under the same run name."""
    run_dir, storage = node_cluster.root / "runs" / "long", node_cluster.root / "storage"
    storage_run = storage / "long"
    command = job_command(run_dir, storage, "long", *LONG)
    first = submit(node_cluster, "long-1", command, wait=False)
    assert first.returncode == 0, first.stdout + first.stderr

    deadline = time.monotonic() + 300
    while latest_step(storage_run / "metrics.jsonl") < STOP_AFTER:
        assert time.monotonic() < deadline, job_logs(node_cluster, "long-1")[-3000:]
        time.sleep(0.2)
    # Every process of the three nodes, generators and training workers included, while the job runs.
    sockets = listening_sockets(session_members(node_cluster.session_ids()))
    stopped = ray_cli(node_cluster, "job", "stop", "--address", node_cluster.dashboard_url, "long-1")
    steps_before_resume = latest_step(storage_run / "metrics.jsonl")
    resume_step = latest_checkpointed_step(storage_run)

    second = submit(node_cluster, "long-2", command)
    return {
        "sockets": sockets,
        "stopped": stopped,
        "first_status": job_status(node_cluster, "long-1"),
        "steps_before_resume": steps_before_resume,
        "resume_step": resume_step,
        "second": second,
        "second_logs": job_logs(node_cluster, "long-2"),
        "run_dir": run_dir,
        "storage_run": storage_run,
    }


@pytest.mark.timeout(600)
def test_stopped_job_was_stopped_mid_run(resumed_job: dict) -> None:
    assert resumed_job["stopped"].returncode == 0, resumed_job["stopped"].stderr
    assert "was stopped" in resumed_job["first_status"]
    assert STOP_AFTER <= resumed_job["steps_before_resume"] < 299


@pytest.mark.timeout(600)
def test_resubmitted_job_resumes_from_storage(resumed_job: dict) -> None:
    attempts = read_jsonl(resumed_job["storage_run"] / "attempts.jsonl")

    assert resumed_job["second"].returncode == 0, resumed_job["second_logs"][-3000:]
    assert [a["start_step"] for a in attempts] == [0, resumed_job["resume_step"]]
    # Ray Train registers a reported checkpoint a few seconds late, so the latest one can lag the metrics.
    assert 20 <= resumed_job["resume_step"] <= resumed_job["steps_before_resume"] + 1
    assert resumed_job["resume_step"] % 20 == 0
    assert "resumed from" in resumed_job["second_logs"]
    assert f"at step {resumed_job['resume_step']}" in resumed_job["second_logs"]


@pytest.mark.timeout(600)
def test_resumed_job_finishes_whole_run(resumed_job: dict) -> None:
    _, state, history = load_checkpoint(resumed_job["run_dir"] / "checkpoint.pt")

    assert state["step"] == 300
    assert [r["meta/step"] for r in history] == [float(step) for step in range(300)]


@pytest.mark.timeout(600)
def test_node_cluster_listens_only_on_loopback(resumed_job: dict) -> None:
    sockets = resumed_job["sockets"]
    raylet_pids = {re.search(r"pid=(\d+)", process).group(1) for _, process in sockets if '"raylet"' in process}

    assert non_loopback(sockets) == []
    assert any('"gcs_server"' in process for _, process in sockets)
    assert len(raylet_pids) == 3  # one raylet per node
