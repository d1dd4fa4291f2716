"""Distributed meta-training on a single-node Ray cluster: same results as in-process, and fault tolerance.

Each ``TorchTrainer.fit()`` costs 20-40 s on 2 cores, so the module runs four
fits in all and shares them through module fixtures, with several checks on
each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.trainer import POOL_NAME, run_on_ray, storage_root
from jobs.checkpoint import load_checkpoint
from jobs.local import run_local
from mln_core.config import Config
from tests.cluster_helpers import (
    KillWhen,
    data_parallel_in_threads,
    generator_pid,
    listening_sockets,
    non_loopback,
    read_jsonl,
    trainer_pid,
)
from tests.helpers import tiny_config

pytestmark = pytest.mark.ray

# A 2-worker run sums each rank's share of the meta-gradient, so it adds in
# another order than one process. After the 4 SHORT steps its MLN differed
# from the in-process one by at most 2.9e-6 (absolute) and 1.3e-4 (relative,
# on a weight near zero). A 1-worker run was bit-identical. Adam amplifies
# such differences (2.7e-3 absolute after 120 steps of LONG), so long runs
# are compared with ranks emulated as threads, which add in Ray's order and
# match bit for bit.
RTOL, ATOL = 1e-4, 1e-5

SHORT = ("train.steps=4", "train.checkpoint_every=2", "train.log_every=2")
# Long enough (6-8 s of stepping on 2 cores) that a process killed at step
# KILL_AT, or once Ray Train has registered the first checkpoint (its
# controller polls every 2 s), dies mid-run.
LONG_STEPS = 200
LONG = (
    "inner.steps=20",
    "tasks.train_size=64",
    f"train.steps={LONG_STEPS}",
    "train.checkpoint_every=20",
    "train.log_every=20",
    "cluster.num_workers=2",
    "cluster.generators=2",
)
KILL_AT = 25


def ray_config(storage: Path, *overrides: str) -> Config:
    return tiny_config(f"cluster.storage_path={storage}", *overrides)


def final_weights(run_dir: Path) -> torch.Tensor:
    _, state, _ = load_checkpoint(run_dir / "checkpoint.pt")
    return state["meta_params"]


def history(run_dir: Path) -> list[dict]:
    _, _, records = load_checkpoint(run_dir / "checkpoint.pt")
    return records


@pytest.fixture(scope="module")
def short_runs(local_ray, tmp_path_factory) -> dict[str, Path]:
    """The short config in process, and on Ray with 1 and with 2 workers."""
    root = tmp_path_factory.mktemp("short")
    runs = {"local": root / "local"}
    run_local(ray_config(root / "storage", *SHORT), runs["local"])
    for workers in (1, 2):
        name = f"ray{workers}"
        config = ray_config(root / "storage", *SHORT, f"cluster.num_workers={workers}")
        runs[name] = root / name
        run_on_ray(config, runs[name], run_name=name)
    return runs


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_run_matches_in_process(short_runs: dict[str, Path], workers: int) -> None:
    ray_weights = final_weights(short_runs[f"ray{workers}"])
    local_weights = final_weights(short_runs["local"])

    torch.testing.assert_close(ray_weights, local_weights, rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(240)
def test_two_workers_match_thread_ranks(short_runs: dict[str, Path]) -> None:
    config = ray_config(short_runs["local"].parent / "storage", *SHORT, "cluster.num_workers=2")

    assert torch.equal(final_weights(short_runs["ray2"]), data_parallel_in_threads(config, world_size=2))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_run_uses_same_tasks(short_runs: dict[str, Path], workers: int) -> None:
    ray_records = history(short_runs[f"ray{workers}"])
    local_records = history(short_runs["local"])

    assert [r["meta/step"] for r in ray_records] == [0.0, 1.0, 2.0, 3.0]
    for ray_record, local_record in zip(ray_records, local_records):
        assert ray_record["tasks/first_index"] == local_record["tasks/first_index"]
        assert ray_record["tasks/last_index"] == local_record["tasks/last_index"]
        assert ray_record["meta/objective"] == pytest.approx(local_record["meta/objective"], rel=1e-4)


@pytest.mark.timeout(240)
def test_ray_run_writes_run_folder(short_runs: dict[str, Path]) -> None:
    run_dir = short_runs["ray2"]
    metrics = read_jsonl(run_dir / "metrics.jsonl")

    assert (run_dir / "training_curves.png").stat().st_size > 0
    assert [m["meta/step"] for m in metrics] == [0.0, 1.0, 2.0, 3.0]
    for key in ("perf/task_wait_s", "perf/allreduce_s", "gen/buffer_depth", "perf/tasks_per_s", "perf/task_bytes"):
        assert all(key in m for m in metrics), key
    assert all(m["cluster/world_size"] == 2.0 for m in metrics)


@pytest.mark.timeout(240)
def test_storage_holds_live_metrics(short_runs: dict[str, Path]) -> None:
    storage = short_runs["ray2"].parent / "storage" / "ray2"

    live = read_jsonl(storage / "metrics.jsonl")
    snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())

    assert [m["meta/step"] for m in live] == [0.0, 1.0, 2.0, 3.0]
    assert snapshot, "Ray Train wrote an empty checkpoint snapshot"


@pytest.fixture(scope="module")
def long_runs(local_ray, tmp_path_factory) -> dict[str, object]:
    """The long config as thread ranks, on Ray with a generator killed, and on Ray with a training worker killed."""
    root = tmp_path_factory.mktemp("long")
    config = ray_config(root / "storage", *LONG)
    results: dict[str, object] = {"threads": data_parallel_in_threads(config, world_size=2)}

    # The generator dies at step KILL_AT; the training worker once a checkpoint is registered to restart from.
    for name, choose_pid, checkpointed in (
        ("generator_killed", generator_pid, 0),
        ("worker_killed", lambda run_dir: trainer_pid(run_dir, rank=1), 20),
    ):
        # The listeners of every process of the cluster, taken while training workers and generators run.
        snapshot = lambda: listening_sockets(local_ray.ray_pids())  # noqa: E731
        killer = KillWhen(storage_root(config) / name, KILL_AT, choose_pid, checkpointed, before_kill=snapshot)
        killer.start()
        run_on_ray(config, root / name, run_name=name)
        killer.kill.done.wait(timeout=10)
        results[name] = root / name
        results[f"{name}/kill"] = killer.kill
        results[f"{name}/storage"] = storage_root(config) / name
    return results


@pytest.mark.timeout(420)
def test_generator_kill_landed_mid_run(long_runs: dict) -> None:
    kill = long_runs["generator_killed/kill"]

    assert kill.error is None
    assert KILL_AT <= kill.seen_step < LONG_STEPS - 20


@pytest.mark.timeout(420)
def test_killed_generator_is_replaced(long_runs: dict) -> None:
    pool = json.loads((long_runs["generator_killed/storage"] / POOL_NAME).read_text())
    records = history(long_runs["generator_killed"])

    assert pool["replacements"] >= 1
    assert long_runs["generator_killed/kill"].pid not in [p["pid"] for p in pool["placements"]]
    assert any(r["gen/attempts"] > 1 for r in records)
    assert [r["meta/step"] for r in records] == [float(step) for step in range(LONG_STEPS)]


@pytest.mark.timeout(420)
def test_generator_kill_keeps_result(long_runs: dict) -> None:
    assert torch.equal(final_weights(long_runs["generator_killed"]), long_runs["threads"])


@pytest.mark.timeout(420)
def test_worker_kill_restarts_from_checkpoint(long_runs: dict) -> None:
    kill = long_runs["worker_killed/kill"]
    attempts = read_jsonl(long_runs["worker_killed/storage"] / "attempts.jsonl")

    assert kill.error is None
    assert KILL_AT <= kill.seen_step < LONG_STEPS - 20
    assert len(attempts) == 2
    assert attempts[0]["start_step"] == 0
    # The restart begins at the latest registered checkpoint: the one seen before the kill, or a later
    # one that was registered while the group was being torn down.
    assert attempts[1]["start_step"] >= kill.checkpointed_step >= 20
    assert attempts[1]["start_step"] % 20 == 0
    assert attempts[1]["start_step"] <= kill.seen_step + 2
    assert kill.pid not in attempts[1]["pids"]


@pytest.mark.timeout(420)
def test_worker_kill_matches_uninterrupted(long_runs: dict) -> None:
    interrupted = final_weights(long_runs["worker_killed"])
    records = history(long_runs["worker_killed"])

    # Same world size and summation order as the thread ranks, so the restarted run is bit-identical.
    assert torch.equal(interrupted, long_runs["threads"])
    assert [r["meta/step"] for r in records] == [float(step) for step in range(LONG_STEPS)]


@pytest.mark.timeout(420)
def test_local_ray_listens_only_on_loopback(long_runs: dict) -> None:
    sockets = long_runs["generator_killed/kill"].snapshot
    owners = [process for _, process in sockets]

    assert non_loopback(sockets) == []
    assert any('"gcs_server"' in owner for owner in owners)
    assert any('"raylet"' in owner for owner in owners)
    # Training workers (gloo and the rendezvous store) and generators were alive when this was taken.
    assert any("RayTrainWo" in owner for owner in owners)
