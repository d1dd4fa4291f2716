"""Helpers for the Ray tests: process trees, listening sockets, run files and fault injection."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

LOOPBACK_HOSTS = {"127.0.0.1", "[::ffff:127.0.0.1]"}


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The fields after the command name, which is in parentheses and may contain spaces.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(roots: set[int]) -> set[int]:
    """Return ``roots`` and every live process below them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def session_members(session_ids: set[int]) -> set[int]:
    """Return the live processes whose session id is in ``session_ids``."""
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[3]) in session_ids:
            members.add(int(entry))
    return members


def listening_sockets(pids: set[int]) -> list[tuple[str, str]]:
    """Return (local address, process column) of every TCP and UDP listener that belongs to ``pids``."""
    output = subprocess.run(
        ["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True, check=True
    ).stdout
    sockets = []
    for line in output.splitlines():
        columns = line.split()
        if len(columns) < 7:
            continue
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", " ".join(columns[6:]))}
        if owners & pids:
            sockets.append((columns[4], " ".join(columns[6:])))
    return sockets


def non_loopback(sockets: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(address, process) for address, process in sockets if address.rpartition(":")[0] not in LOOPBACK_HOSTS]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line still being written
    return records


def latest_step(metrics_path: Path) -> int:
    """Highest ``meta/step`` in a metrics file, -1 when it has none."""
    return max((int(r["meta/step"]) for r in read_jsonl(metrics_path)), default=-1)


def latest_checkpointed_step(storage_run: Path) -> int:
    """Steps done at the latest checkpoint that Ray Train registered for a run, 0 when none."""
    try:
        snapshot = json.loads((storage_run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0  # not written yet, or being written
    return max((int(r["metrics"]["meta/steps_done"]) for r in snapshot["checkpoint_results"]), default=0)


@dataclass
class Kill:
    """What a ``KillWhen`` thread did: the pid it killed and the run's progress just before."""

    pid: int | None = None
    seen_step: int | None = None  # latest meta/step in metrics.jsonl
    checkpointed_step: int | None = None  # steps done at the latest registered checkpoint
    snapshot: object = None  # what ``before_kill`` returned
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class KillWhen(threading.Thread):
    """Send SIGKILL to ``choose_pid(run_dir)`` once the run has ``step`` steps in metrics.jsonl.

    With ``checkpointed`` set, also wait until Ray Train has registered a
    checkpoint of at least that many steps. A run must be long enough that it
    is still going when the kill lands; tests check ``kill.seen_step``.
    """

    def __init__(
        self,
        run_dir: Path,
        step: int,
        choose_pid: Callable[[Path], int],
        checkpointed: int = 0,
        before_kill: Callable[[], object] | None = None,
        timeout_s: float = 240,
    ) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.step, self.choose_pid, self.timeout_s = run_dir, step, choose_pid, timeout_s
        self.checkpointed = checkpointed
        self.before_kill = before_kill
        self.kill = Kill()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                seen = latest_step(self.run_dir / "metrics.jsonl")
                checkpointed = latest_checkpointed_step(self.run_dir)
                if seen >= self.step and checkpointed >= self.checkpointed:
                    if self.before_kill is not None:
                        self.kill.snapshot = self.before_kill()
                    pid = self.choose_pid(self.run_dir)
                    os.kill(pid, signal.SIGKILL)
                    self.kill.pid, self.kill.seen_step, self.kill.checkpointed_step = pid, seen, checkpointed
                    return
                time.sleep(0.02)
            self.kill.error = (
                f"run never reached step {self.step} with a checkpoint of {self.checkpointed} steps "
                f"within {self.timeout_s} s"
            )
        except Exception as error:  # reported by the test, which runs in another thread
            self.kill.error = f"{type(error).__name__}: {error}"
        finally:
            self.kill.done.set()


def placement(run_dir: Path) -> dict:
    return json.loads((run_dir / "placement.json").read_text())


def generator_pid(run_dir: Path, slot: int = 0) -> int:
    return next(g["pid"] for g in placement(run_dir)["generators"] if g["slot"] == slot)


def trainer_pid(run_dir: Path, rank: int) -> int:
    return next(t["pid"] for t in placement(run_dir)["trainers"] if t["rank"] == rank)


def data_parallel_in_threads(config, world_size: int) -> torch.Tensor:
    """Final MLN weights of ``world_size`` ranks run as threads of this process, summed as an all-reduce.

    Each rank is a ``MetaTrainer`` on its own task share. ``reduce`` adds the
    ranks' tensors in rank order, as gloo does, and each rank uses one
    intra-op thread, as a 1-CPU Ray worker does. This reproduces a Ray run of the same world
    size bit for bit, which a single-process run cannot: it sums in another order.
    """
    from mln_core.meta_train import MetaTrainer

    trainers = [MetaTrainer(config, rank, world_size) for rank in range(world_size)]
    barrier = threading.Barrier(world_size)
    shares: list[torch.Tensor | None] = [None] * world_size
    errors: list[BaseException] = []

    def reduce_for(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(values: torch.Tensor) -> torch.Tensor:
            shares[rank] = values.detach().clone()
            barrier.wait()
            total = shares[0].clone()
            for share in shares[1:]:
                total += share
            barrier.wait()  # no rank overwrites its share before every rank has summed
            return total

        return reduce

    def work(rank: int) -> None:
        trainer = trainers[rank]
        try:
            while trainer.step < config.train.steps:
                trainer.train_step(trainer.generate_my_tasks(), reduce_for(rank))
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workers = [threading.Thread(target=work, args=(rank,)) for rank in range(world_size)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]
    return trainers[0].state_dict()["meta_params"]


# ---------------------------------------------------------------------------
# A three-node cluster on 127.0.0.1, started by the project's node entrypoint
# ---------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
NODE_START_TIMEOUT_S = 90


def free_port() -> int:
    """A free TCP port on 127.0.0.1 from the kernel's ephemeral range, which is above Ray's worker ports 10002-19999."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class NodeCluster:
    """Head (0 CPUs), a generator node (label role=gen) and a training node (label role=train)."""

    root: Path
    gcs_address: str
    dashboard_url: str
    client_env: dict[str, str]  # environment for `ray` CLI clients of this cluster
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # role -> `ray start --block`

    def session_ids(self) -> set[int]:
        # Each node runs in its own session, whose id is the pid of its `ray start` process.
        return {process.pid for process in self.processes.values()}

    def log_tail(self, role: str, characters: int = 3000) -> str:
        return (self.root / f"{role}.log").read_text(errors="replace")[-characters:]


def _start_node(cluster: NodeCluster, role: str, env: dict[str, str], flags: list[str]) -> None:
    with (cluster.root / f"{role}.log").open("wb") as log:
        cluster.processes[role] = subprocess.Popen(
            [str(ENTRYPOINT), role, *flags], env=env, cwd=cluster.root, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if cluster.processes[role].poll() is not None:
            raise RuntimeError(f"{role} node exited before it was healthy:\n{cluster.log_tail(role)}")
        check = subprocess.run([str(ENTRYPOINT), "healthcheck", role], env=env, capture_output=True, timeout=30)
        if check.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"{role} node was not healthy after {NODE_START_TIMEOUT_S} s:\n{cluster.log_tail(role)}")


def stop_node(process: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop one node: SIGTERM to `ray start --block`, then SIGKILL to every process of its session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    for pid in session_members({process.pid}):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def start_node_cluster(root: Path, token_path: Path, gen_cpus: int = 1, train_cpus: int = 2) -> NodeCluster:
    """Start head, generator node and training node with ``docker/entrypoint.sh``, one after the other."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    base_env = {
        "PATH": os.pathsep.join([str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "MLN_TEMP_DIR": str(root / "ray"),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    }

    gcs_port, dashboard_port = free_port(), free_port()
    gcs_address = f"127.0.0.1:{gcs_port}"
    cluster = NodeCluster(
        root=root,
        gcs_address=gcs_address,
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        client_env={**base_env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )

    role_env = {
        "head": {"MLN_GCS_PORT": str(gcs_port), "MLN_DASHBOARD_PORT": str(dashboard_port)},
        "cpu-worker": {"MLN_HEAD_ADDRESS": gcs_address, "MLN_NUM_CPUS": str(gen_cpus)},
        "gpu-worker": {"MLN_HEAD_ADDRESS": gcs_address, "MLN_NUM_CPUS": str(train_cpus), "MLN_NUM_GPUS": "0"},
    }
    # Ray's client server defaults to port 10001, which another cluster on this host may hold.
    flags = {"head": [f"--ray-client-server-port={free_port()}"], "cpu-worker": [], "gpu-worker": []}

    # One node at a time, so that no start competes with another for the CPUs.
    try:
        for role, env in role_env.items():
            _start_node(cluster, role, {**base_env, **env, "MLN_DASHBOARD_AGENT_PORT": str(free_port())}, flags[role])
    except BaseException:
        stop_node_cluster(cluster)
        raise
    return cluster


def stop_node_cluster(cluster: NodeCluster) -> None:
    for role in ("gpu-worker", "cpu-worker", "head"):
        if role in cluster.processes:
            stop_node(cluster.processes[role])


def ray_cli(cluster: NodeCluster, *arguments: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``ray ARGUMENTS`` against the cluster's job API from the repository root."""
    return subprocess.run(
        [str(VENV_BIN / "ray"), *arguments], env=cluster.client_env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
