"""Ray fixtures shared by the tests marked ``ray``.

Every Ray process that the tests start binds to 127.0.0.1: Ray reads the
loopback switch when ``ray`` is first imported, so it is set here, before any
test module can import ``ray``. Token authentication is on, with a token file
made for the session (never ``~/.ray/auth_token``), and Ray's temporary files
go under a short folder in /tmp, because Ray's Unix socket paths must stay
under 108 bytes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.local_cluster import LOOPBACK_ONLY_ENV

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Every Ray process the tests start inherits this, so no traffic leaves 127.0.0.1.
os.environ.update(LOOPBACK_ONLY_ENV)

# Starting a Train worker group took 10-25 s on a loaded 2-core machine; Ray's default limit is 60 s.
WORKER_GROUP_START_TIMEOUT_S = "300"


def write_token(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def ray_root() -> Iterator[Path]:
    """Short folder under /tmp for Ray sessions, tokens and run storage of the whole test session."""
    root = Path(tempfile.mkdtemp(prefix="mlnray-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class LocalRay:
    """The single-node cluster that this pytest process started and is connected to."""

    root: Path
    token_path: Path

    def ray_pids(self) -> set[int]:
        """This process and every process below it: the driver and all Ray processes it started."""
        from tests.cluster_helpers import descendants

        return descendants({os.getpid()})


@pytest.fixture(scope="session")
def local_ray(ray_root: Path) -> Iterator[LocalRay]:
    """A single-node Ray cluster on 127.0.0.1 with 3 logical CPUs, started through ``cluster.local_cluster``."""
    from cluster.local_cluster import ray_session

    token_path = write_token(ray_root / "local_token")
    saved = {name: os.environ.get(name) for name in (
        "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_USAGE_STATS_ENABLED",
    )}
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = WORKER_GROUP_START_TIMEOUT_S
    try:
        # 3 CPUs: two training workers and two generators of half a CPU each.
        with ray_session(None, num_cpus=3, temp_dir=str(ray_root / "local")):
            yield LocalRay(ray_root, token_path)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def node_cluster(ray_root: Path) -> Iterator:
    """Head, generator node (role=gen, 1 CPU) and training node (role=train, 2 CPUs) as separate processes."""
    from tests.cluster_helpers import start_node_cluster, stop_node_cluster

    root = Path(tempfile.mkdtemp(prefix="nodes-", dir=ray_root))
    cluster = start_node_cluster(root, write_token(root / "token"))
    try:
        yield cluster
    finally:
        stop_node_cluster(cluster)
