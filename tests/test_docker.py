"""Docker Compose cluster form: the Compose files, the Dockerfile and docker/entrypoint.sh.

No Docker engine runs here, so the Compose files are validated against the
vendored Compose Specification schema and checked against what the entrypoint
does with each service's command and environment (its MLN_DRY_RUN mode prints
the `ray start` command without running it). The tests marked `ray` start the
same three roles outside containers on 127.0.0.1 and check their listeners.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
ENTRYPOINT = DOCKER_DIR / "entrypoint.sh"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
CPU_OVERRIDE_FILE = DOCKER_DIR / "compose.cpu.yaml"
SCHEMA_FILE = DOCKER_DIR / "compose-spec.json"

ROLES = ("head", "cpu-worker", "gpu-worker")
HEAD_SERVICE = "ray-head"
TOKEN_SECRET = "ray_token"
TOKEN_PATH_IN_CONTAINER = "/run/secrets/ray_token"
DATA_MOUNT = "/data"
DASHBOARD_PORT = 8265
ENTRYPOINT_IN_IMAGE = "/app/docker/entrypoint.sh"
ROLE_LABELS = {"cpu-worker": "role=gen", "gpu-worker": "role=train"}

# An address from the documentation range (RFC 5737): dry runs only print it.
CONTAINER_ADDRESS = "192.0.2.10"
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------
# Compose files: loading, the !reset tag and the override merge
# ---------------------------------------------------------------------------

RESET = object()


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that reads Compose's `!reset` tag as the RESET marker."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)

# Compose replaces these sequences on merge instead of appending to them.
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge_compose(base: dict[str, Any], override: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge an override file into a Compose model by the specification's rules.

    Mappings merge key by key, `!reset` removes the key, and scalars and the
    sequences in REPLACED_SEQUENCES replace the base value. Appending or
    unique-key merges of other sequences are not implemented and raise.
    """
    merged = dict(base)
    for key, value in override.items():
        if value is RESET:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_compose(merged[key], value, (*path, key))
        elif isinstance(value, list) and key in merged and key not in REPLACED_SEQUENCES:
            dotted = ".".join((*path, key))
            raise NotImplementedError(f"merging the sequence {dotted} is not implemented: extend merge_compose")
        else:
            merged[key] = value
    return merged


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


@functools.cache
def compose_models() -> dict[str, dict[str, Any]]:
    """Return the base model and the base merged with the CPU-only override."""
    base = load_compose(COMPOSE_FILE)
    cpu = merge_compose(base, load_compose(CPU_OVERRIDE_FILE))
    return {"base": base, "cpu": cpu}


MODEL_NAMES = ("base", "cpu")


def services_of(model_name: str) -> dict[str, dict[str, Any]]:
    return compose_models()[model_name]["services"]


def service_role(service: dict[str, Any]) -> str:
    command = service["command"]
    assert isinstance(command, list), f"command {command!r} should be a list such as ['head']"
    assert len(command) == 1, f"command {command!r} should be only the role"
    return command[0]


def parse_byte_size(value: str | int) -> int:
    """Parse a Compose byte value such as 2gb or 512m (binary units, as Docker reads them)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", value.strip().lower())
    if match is None:
        raise ValueError(f"invalid byte value {value!r}: expected a number with an optional b, k, m or g unit")
    number, unit = match.groups()
    return int(float(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit])


def published_ports(service: dict[str, Any]) -> list[dict[str, str]]:
    """Return each port of a service as host_ip, published and target strings."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            result.append(
                {
                    "host_ip": str(entry.get("host_ip", "")),
                    "published": str(entry.get("published", "")),
                    "target": str(entry["target"]),
                }
            )
            continue
        parts = str(entry).split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        published = parts[-2] if len(parts) >= 2 else ""
        result.append({"host_ip": host_ip, "published": published, "target": parts[-1]})
    return result


# ---------------------------------------------------------------------------
# Entrypoint: dry runs
# ---------------------------------------------------------------------------


def make_fake_host_tools(directory: Path, host_name: str, address: str) -> Path:
    """Create `hostname` and `getent` stand-ins that resolve host_name to address."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hostname").write_text(f"#!/bin/sh\necho {host_name}\n")
    (directory / "getent").write_text(
        f'#!/bin/sh\n[ "$1" = ahostsv4 ] && [ "$2" = {host_name} ] && echo "{address}  STREAM {host_name}"\n'
    )
    for tool in ("hostname", "getent"):
        (directory / tool).chmod(0o755)
    return directory


def write_token(path: Path) -> Path:
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def clean_env(home: Path, extra_path: Path | None = None) -> dict[str, str]:
    """Return an environment without the caller's Ray settings, with this venv's ray on PATH."""
    search_path = [str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"]
    if extra_path is not None:
        search_path.insert(0, str(extra_path))
    return {"PATH": os.pathsep.join(search_path), "HOME": str(home), "LANG": "C.UTF-8"}


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1 from the ephemeral range, outside Ray's worker ports 10002-19999."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_entrypoint(args: list[str], env: dict[str, str], timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


@dataclass(frozen=True)
class DryRun:
    """Command that the entrypoint would run: its environment and argv."""

    env: dict[str, str]
    argv: list[str]

    @property
    def flags(self) -> dict[str, str]:
        """Map each `--name=value` argument to its value, and each bare `--name` to ''."""
        result = {}
        for arg in self.argv:
            if arg.startswith("--"):
                name, _, value = arg.partition("=")
                result[name] = value
        return result


def parse_dry_run(stdout: str) -> DryRun:
    lines = stdout.splitlines()
    assert lines and lines[0] == "env", f"dry run output should start with env, got {stdout!r}"
    env = {}
    index = 1
    while index < len(lines) and re.match(r"^[A-Z_][A-Z0-9_]*=", lines[index]):
        name, _, value = lines[index].partition("=")
        env[name] = value
        index += 1
    return DryRun(env=env, argv=lines[index:])


@pytest.fixture
def dry_run_env(tmp_path: Path) -> dict[str, str]:
    """Environment for MLN_DRY_RUN with a valid token and a fake container host name."""
    fake_bin = make_fake_host_tools(tmp_path / "bin", "ray-node", CONTAINER_ADDRESS)
    env = clean_env(tmp_path, extra_path=fake_bin)
    env["RAY_AUTH_TOKEN_PATH"] = str(write_token(tmp_path / "token"))
    env["MLN_DRY_RUN"] = "1"
    return env


def dry_run_service(service: dict[str, Any], dry_run_env: dict[str, str]) -> DryRun:
    """Run the entrypoint in dry-run mode with a service's command and environment."""
    env = dict(dry_run_env)
    env.update({name: str(value) for name, value in service.get("environment", {}).items()})
    # The secret exists only inside a container, so the test token takes its place.
    env["RAY_AUTH_TOKEN_PATH"] = dry_run_env["RAY_AUTH_TOKEN_PATH"]
    result = run_entrypoint(service["command"], env)
    assert result.returncode == 0, f"entrypoint {service['command']} failed: {result.stderr}"
    return parse_dry_run(result.stdout)


# ---------------------------------------------------------------------------
# Compose files against the specification
# ---------------------------------------------------------------------------


@functools.cache
def compose_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    # The schema names draft 2019-09 with an unregistered URI, so pick the class directly.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_compose_model_matches_schema(model_name: str) -> None:
    errors = [
        f"{'/'.join(map(str, error.path))}: {error.message}"
        for error in compose_validator().iter_errors(compose_models()[model_name])
    ]
    assert errors == []


def test_schema_rejects_unknown_service_field() -> None:
    model = load_compose(COMPOSE_FILE)
    model["services"][HEAD_SERVICE]["shm_sizes"] = "2gb"
    errors = list(compose_validator().iter_errors(model))
    assert any("shm_sizes" in error.message for error in errors)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) is not installed")
def test_docker_compose_config_accepts_base_file() -> None:
    # docker-compose 1.29 validates and resolves the file without an engine;
    # it cannot read the override's !reset tag, which Compose 2.24 added.
    result = subprocess.run(
        ["docker-compose", "--file", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=DOCKER_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# Compose files against the entrypoint
# ---------------------------------------------------------------------------


def test_entrypoint_roles_match_tests() -> None:
    match = re.search(r'^readonly ROLES="([^"]*)"', ENTRYPOINT.read_text(), flags=re.MULTILINE)
    assert match is not None, 'entrypoint.sh should define readonly ROLES="..."'
    assert tuple(match.group(1).split()) == ROLES


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_services_cover_every_role_once(model_name: str) -> None:
    roles = sorted(service_role(service) for service in services_of(model_name).values())
    assert roles == sorted(ROLES)
    assert service_role(services_of(model_name)[HEAD_SERVICE]) == "head"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_only_dashboard_published_on_loopback(model_name: str) -> None:
    services = services_of(model_name)
    ports = {name: published_ports(service) for name, service in services.items()}
    assert ports.pop(HEAD_SERVICE) == [
        {"host_ip": "127.0.0.1", "published": str(DASHBOARD_PORT), "target": str(DASHBOARD_PORT)}
    ]
    assert all(entries == [] for entries in ports.values()), ports

    for name, service in services.items():
        assert "expose" not in service, f"{name} exposes ports"
        assert service.get("network_mode") is None, f"{name} sets network_mode"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_service_uses_token_secret(model_name: str) -> None:
    model = compose_models()[model_name]
    for name, service in model["services"].items():
        assert TOKEN_SECRET in service.get("secrets", []), f"{name} lacks the {TOKEN_SECRET} secret"
        environment = service.get("environment", {})
        assert environment.get("RAY_AUTH_MODE") == "token", name
        assert environment.get("RAY_AUTH_TOKEN_PATH") == TOKEN_PATH_IN_CONTAINER, name
        assert "RAY_AUTH_TOKEN" not in environment, f"{name} puts the token in its environment"

    secret_file = (DOCKER_DIR / model["secrets"][TOKEN_SECRET]["file"]).resolve()
    assert secret_file == DOCKER_DIR / "secrets" / "ray_token"


def test_token_file_kept_out_of_git_and_image() -> None:
    token_path = "docker/secrets/ray_token"
    ignored = subprocess.run(["git", "check-ignore", "--quiet", token_path], cwd=REPO_ROOT, check=False)
    assert ignored.returncode == 0, f"{token_path} should be ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", token_path], cwd=REPO_ROOT, capture_output=True, check=False
    )
    assert tracked.returncode != 0, f"{token_path} is tracked by git"

    dockerignore = (REPO_ROOT / ".dockerignore").read_text().split()
    for excluded in ("docker/secrets", ".git", ".venv", "runs"):
        assert excluded in dockerignore, f".dockerignore should exclude {excluded}"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_head_flags_match_compose(model_name: str, dry_run_env: dict[str, str]) -> None:
    head = services_of(model_name)[HEAD_SERVICE]
    command = dry_run_service(head, dry_run_env)
    flags = command.flags

    assert command.argv[:2] == ["ray", "start"]
    assert "--head" in flags
    assert "--block" in flags
    assert flags["--num-cpus"] == "0"
    assert flags["--num-gpus"] == "0"
    assert flags["--port"] == head["environment"]["MLN_GCS_PORT"]
    assert flags["--dashboard-port"] == published_ports(head)[0]["target"]
    assert flags["--dashboard-host"] == CONTAINER_ADDRESS
    assert flags["--node-ip-address"] == CONTAINER_ADDRESS
    assert command.env["RAY_AUTH_MODE"] == "token"
    assert command.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("role", ["cpu-worker", "gpu-worker"])
def test_worker_flags_match_compose(model_name: str, role: str, dry_run_env: dict[str, str]) -> None:
    services = services_of(model_name)
    worker = services[role]
    command = dry_run_service(worker, dry_run_env)
    flags = command.flags

    head_host, _, head_port = flags["--address"].partition(":")
    assert head_host == HEAD_SERVICE
    assert head_port == services[HEAD_SERVICE]["environment"]["MLN_GCS_PORT"]
    assert flags["--labels"] == ROLE_LABELS[role]
    assert flags["--node-ip-address"] == CONTAINER_ADDRESS
    assert "--head" not in flags
    assert worker["depends_on"][HEAD_SERVICE]["condition"] == "service_healthy"

    # Without --num-gpus, Ray counts the GPUs that the device reservation makes visible.
    expected_gpus = "0" if role == "cpu-worker" or model_name == "cpu" else None
    assert flags.get("--num-gpus") == expected_gpus


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_shm_exceeds_object_store(model_name: str, dry_run_env: dict[str, str]) -> None:
    for name, service in services_of(model_name).items():
        object_store_bytes = dry_run_service(service, dry_run_env).flags["--object-store-memory"]
        assert int(object_store_bytes) < parse_byte_size(service["shm_size"]), name


def test_gpu_worker_reserves_gpus() -> None:
    services = services_of("base")
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert services["gpu-worker"]["build"]["args"]["VARIANT"] == "cuda"

    for name in (HEAD_SERVICE, "cpu-worker"):
        assert "deploy" not in services[name], f"{name} should reserve no devices"


def test_cpu_override_drops_gpus() -> None:
    for name, service in services_of("cpu").items():
        assert "deploy" not in service, f"{name} still reserves devices"
        assert service["build"]["args"]["VARIANT"] == "cpu", name
        assert service["image"].endswith(":cpu"), name
    assert services_of("cpu")["gpu-worker"]["environment"]["MLN_NUM_GPUS"] == "0"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_services_share_data_volume(model_name: str) -> None:
    model = compose_models()[model_name]
    volume_names = set()
    for name, service in model["services"].items():
        mounts = [entry for entry in service.get("volumes", []) if str(entry).endswith(f":{DATA_MOUNT}")]
        assert len(mounts) == 1, f"{name} should mount one volume at {DATA_MOUNT}"
        volume_names.add(mounts[0].split(":")[0])
    assert len(volume_names) == 1
    assert volume_names <= set(model["volumes"])


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_services_have_healthcheck_and_restart(model_name: str, dry_run_env: dict[str, str]) -> None:
    for name, service in services_of(model_name).items():
        role = service_role(service)
        assert service["healthcheck"]["test"] == ["CMD", ENTRYPOINT_IN_IMAGE, "healthcheck", role], name
        assert service["restart"] in {"always", "unless-stopped", "on-failure"}, name
        assert service["init"] is True, name

        env = dict(dry_run_env)
        env.update({key: str(value) for key, value in service["environment"].items()})
        result = run_entrypoint(["healthcheck", role], env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[0].startswith(f"http://{CONTAINER_ADDRESS}:"), result.stdout


def test_cpu_worker_can_scale() -> None:
    worker = services_of("base")["cpu-worker"]
    for fixed in ("container_name", "hostname", "ports"):
        assert fixed not in worker, f"cpu-worker sets {fixed}, so --scale cpu-worker=N would collide"


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert match is not None, f"Dockerfile should declare ARG {name}=..."
    return match.group(1)


def test_dockerfile_pins_versions() -> None:
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", dockerfile_arg("PYTHON_IMAGE"))
    assert dockerfile_arg("RAY_VERSION") == importlib.metadata.version("ray")
    torch_version = importlib.metadata.version("torch").split("+")[0]
    assert dockerfile_arg("TORCH_VERSION") == torch_version

    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^\s+cpu\)", text, flags=re.MULTILINE)
    assert re.search(r"^\s+cuda\)", text, flags=re.MULTILINE)


def test_dockerfile_runs_as_non_root() -> None:
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users, "Dockerfile should switch to a non-root USER"
    assert users[-1] not in {"root", "0"}


def test_dockerfile_installs_dependencies_before_source() -> None:
    lines = DOCKERFILE.read_text().splitlines()

    def first_line(pattern: str) -> int:
        for number, line in enumerate(lines):
            if re.search(pattern, line):
                return number
        raise AssertionError(f"no Dockerfile line matches {pattern!r}")

    copy_metadata = first_line(r"^COPY pyproject\.toml ")
    install_dependencies = first_line(r"pip install .*--requirement")
    copy_source = first_line(r"^COPY \. ")
    assert copy_metadata < install_dependencies < copy_source
    assert first_line(r'ENTRYPOINT \["/app/docker/entrypoint\.sh"\]') > copy_source


# ---------------------------------------------------------------------------
# Entrypoint behaviour without Ray
# ---------------------------------------------------------------------------


def test_entrypoint_rejects_unknown_role(dry_run_env: dict[str, str]) -> None:
    result = run_entrypoint(["gpu_worker"], dry_run_env)

    assert result.returncode == 2
    assert "unknown role or command 'gpu_worker'" in result.stderr
    for role in ROLES:
        assert role in result.stderr


INVALID_SETTINGS = {
    "token path unset": (["head"], {"RAY_AUTH_TOKEN_PATH": None}, "RAY_AUTH_TOKEN_PATH is not set"),
    "token file missing": (
        ["head"],
        {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"},
        "token file RAY_AUTH_TOKEN_PATH=/nonexistent/token not found",
    ),
    "auth disabled": (["head"], {"RAY_AUTH_MODE": "disabled"}, "always uses token authentication"),
    "token in environment": (["head"], {"RAY_AUTH_TOKEN": "x" * 64}, "Unset RAY_AUTH_TOKEN"),
    "head address unset": (["cpu-worker"], {}, "MLN_HEAD_ADDRESS is not set"),
    "head address without port": (["gpu-worker"], {"MLN_HEAD_ADDRESS": "ray-head"}, "expected HOST:PORT"),
    "gpu count not a number": (
        ["gpu-worker"],
        {"MLN_HEAD_ADDRESS": "127.0.0.1:6379", "MLN_NUM_GPUS": "all"},
        "MLN_NUM_GPUS=all is invalid",
    ),
    "gpus on cpu worker": (
        ["cpu-worker"],
        {"MLN_HEAD_ADDRESS": "127.0.0.1:6379", "MLN_NUM_GPUS": "1"},
        "never advertises GPUs",
    ),
    "cpus on head": (["head"], {"MLN_NUM_CPUS": "4"}, "always advertises 0 CPUs"),
    "port out of range": (["head"], {"MLN_GCS_PORT": "70000"}, "expected a port in 1-65535"),
    "other loopback address": (["head"], {"MLN_BIND_ADDRESS": "127.0.0.2"}, "Use 127.0.0.1"),
    "bind address not an ip": (["head"], {"MLN_BIND_ADDRESS": "ray-head"}, "expected an IP address"),
    "healthcheck without role": (["healthcheck"], {}, "healthcheck needs the node's role"),
}


@pytest.mark.parametrize("case", INVALID_SETTINGS)
def test_entrypoint_rejects_invalid_settings(case: str, dry_run_env: dict[str, str]) -> None:
    args, changes, message = INVALID_SETTINGS[case]
    env = dict(dry_run_env)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value

    result = run_entrypoint(args, env)

    assert result.returncode == 2, result.stdout
    assert message in result.stderr


def test_entrypoint_rejects_short_token(dry_run_env: dict[str, str], tmp_path: Path) -> None:
    short_token = tmp_path / "short_token"
    short_token.write_text("0123456789\n")
    env = {**dry_run_env, "RAY_AUTH_TOKEN_PATH": str(short_token)}

    result = run_entrypoint(["head"], env)

    assert result.returncode == 2
    assert "contains 10 characters, expected at least 32" in result.stderr


def test_entrypoint_rejects_auto_resolving_to_loopback(dry_run_env: dict[str, str], tmp_path: Path) -> None:
    loopback_bin = make_fake_host_tools(tmp_path / "loopback_bin", "laptop", "127.0.1.1")
    env = {**dry_run_env, "MLN_BIND_ADDRESS": "auto"}
    env["PATH"] = f"{loopback_bin}{os.pathsep}{env['PATH']}"

    result = run_entrypoint(["head"], env)

    assert result.returncode == 2
    assert "resolved host name laptop to loopback address 127.0.1.1" in result.stderr


def test_entrypoint_defaults_to_loopback(dry_run_env: dict[str, str]) -> None:
    env = {**dry_run_env, "MLN_HEAD_ADDRESS": "127.0.0.1:26379", "MLN_NUM_GPUS": "0"}

    head = parse_dry_run(run_entrypoint(["head"], env).stdout)
    worker = parse_dry_run(run_entrypoint(["gpu-worker"], env).stdout)

    assert head.flags["--node-ip-address"] == "127.0.0.1"
    assert head.flags["--dashboard-host"] == "127.0.0.1"
    assert head.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert head.argv[:2] == ["ray", "start"]
    # Loopback workers go through the launcher that lifts Ray's multi-node check.
    assert worker.argv[1:4] == ["-c", "LOOPBACK_WORKER_LAUNCHER", "start"]
    assert worker.flags["--node-ip-address"] == "127.0.0.1"
    assert worker.flags["--num-gpus"] == "0"
    assert worker.env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_entrypoint_passes_extra_flags_to_ray(dry_run_env: dict[str, str]) -> None:
    result = run_entrypoint(["head", "--ray-client-server-port=26001"], dry_run_env)

    assert result.returncode == 0, result.stderr
    assert parse_dry_run(result.stdout).argv[-1] == "--ray-client-server-port=26001"


def test_healthcheck_fails_without_node(dry_run_env: dict[str, str]) -> None:
    env = {key: value for key, value in dry_run_env.items() if key != "MLN_DRY_RUN"}
    env["MLN_DASHBOARD_AGENT_PORT"] = str(free_port())

    result = run_entrypoint(["healthcheck", "cpu-worker"], env)

    assert result.returncode == 1
    assert "health check failed: http://127.0.0.1:" in result.stderr


def test_entrypoint_runs_other_commands(dry_run_env: dict[str, str]) -> None:
    result = run_entrypoint(["echo", "passed", "through"], dry_run_env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "passed through\n"


# ---------------------------------------------------------------------------
# A real cluster outside containers on 127.0.0.1
# ---------------------------------------------------------------------------

# `ray start` took 5-10 s per node on a 2-core machine, and a node drains for up to 30 s on SIGTERM.
NODE_START_TIMEOUT_S = 60
NODE_STOP_TIMEOUT_S = 45


@dataclass(frozen=True)
class LoopbackCluster:
    """Head, cpu-worker and gpu-worker started by docker/entrypoint.sh on 127.0.0.1."""

    root: Path  # working directory of every node, so also of job drivers
    gcs_address: str
    dashboard_url: str
    token_path: Path
    client_env: dict[str, str]  # environment for `ray` CLI clients of this cluster
    processes: dict[str, subprocess.Popen[bytes]]  # role -> `ray start --block` process
    logs: dict[str, Path]

    def log_tail(self, role: str, lines: int = 40) -> str:
        return "\n".join(self.logs[role].read_text(errors="replace").splitlines()[-lines:])


def start_node(
    root: Path, role: str, env: dict[str, str], extra_flags: list[str]
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = root / f"{role}.log"
    with log_path.open("wb") as log_file:
        # A new session per node, so teardown can end exactly this node's processes.
        process = subprocess.Popen(
            [str(ENTRYPOINT), role, *extra_flags],
            env=env,
            cwd=root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log_path


class NodeStartError(AssertionError):
    """A node's `ray start` exited, or its health check did not pass in time."""


def wait_until_healthy(role: str, env: dict[str, str], process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise NodeStartError(f"{role} exited with code {process.returncode} before it was healthy:\n{tail}")
        if run_entrypoint(["healthcheck", role], env).returncode == 0:
            return
        time.sleep(1)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise NodeStartError(f"{role} was not healthy after {NODE_START_TIMEOUT_S} s:\n{tail}")


def start_healthy_node(
    root: Path, role: str, env: dict[str, str], extra_flags: list[str], attempts: int = 2
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a node and wait for its health check, retrying a failed start.

    Ray 2.60 gives a starting node a fixed 30 s to register with the GCS, and a
    loaded 2-core machine can exceed that. In Compose the restart policy retries.
    """
    for attempt in range(1, attempts + 1):
        process, log_path = start_node(root, role, env, extra_flags)
        try:
            wait_until_healthy(role, env, process, log_path)
            return process, log_path
        except NodeStartError as error:
            stop_node(process)
            if attempt == attempts:
                raise
            print(f"{role} start attempt {attempt} of {attempts} failed, retrying: {str(error).splitlines()[0]}")
    raise AssertionError("unreachable: attempts must be at least 1")


def stop_node(process: subprocess.Popen[bytes]) -> None:
    """Stop a node the way `docker stop` does: SIGTERM, then SIGKILL for its session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=NODE_STOP_TIMEOUT_S)
    # The process group id is the pid of the session leader started in start_node.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def start_loopback_cluster(root: Path, cpus_per_worker: int = 1) -> LoopbackCluster:
    """Start head, cpu-worker and gpu-worker (0 GPUs) through the entrypoint on 127.0.0.1.

    Every node runs with `root` as its working directory and keeps Ray's
    sessions in root/ray-temp. Stop the cluster with stop_loopback_cluster.
    """
    token_path = write_token(root / "ray_token")
    home = root / "home"
    home.mkdir()
    node_env = clean_env(home)
    node_env.update({"RAY_AUTH_TOKEN_PATH": str(token_path), "MLN_TEMP_DIR": str(root / "ray-temp")})

    gcs_port, dashboard_port = free_port(), free_port()
    gcs_address = f"127.0.0.1:{gcs_port}"
    role_env = {
        "head": {"MLN_GCS_PORT": str(gcs_port), "MLN_DASHBOARD_PORT": str(dashboard_port)},
        "cpu-worker": {"MLN_HEAD_ADDRESS": gcs_address, "MLN_NUM_CPUS": str(cpus_per_worker)},
        "gpu-worker": {"MLN_HEAD_ADDRESS": gcs_address, "MLN_NUM_CPUS": str(cpus_per_worker), "MLN_NUM_GPUS": "0"},
    }
    for env in role_env.values():
        env["MLN_DASHBOARD_AGENT_PORT"] = str(free_port())
    # The head's client server defaults to port 10001, which another cluster on this host may hold.
    extra_flags = {"head": [f"--ray-client-server-port={free_port()}"], "cpu-worker": [], "gpu-worker": []}

    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    cluster = LoopbackCluster(
        root=root,
        gcs_address=gcs_address,
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        token_path=token_path,
        client_env={**node_env, "RAY_AUTH_MODE": "token"},
        processes=processes,
        logs=logs,
    )
    try:
        # One node at a time, so that no start competes with another for the CPUs.
        for role in ROLES:
            processes[role], logs[role] = start_healthy_node(
                root, role, {**node_env, **role_env[role]}, extra_flags[role]
            )
    except BaseException:
        stop_loopback_cluster(cluster)
        raise
    return cluster


def stop_loopback_cluster(cluster: LoopbackCluster) -> None:
    for role in ("gpu-worker", "cpu-worker", "head"):
        if role in cluster.processes:
            stop_node(cluster.processes[role])


def submit_job(
    cluster: LoopbackCluster, entrypoint: list[str], working_dir: Path | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `ray job submit` against the cluster's job API and wait for the job to finish.

    The driver runs on the head with the head's environment. With working_dir,
    Ray uploads that directory without the files that its .gitignore excludes
    and runs the entrypoint inside it.
    """
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url]
    if working_dir is not None:
        command += ["--working-dir", str(working_dir)]
    command += ["--", *entrypoint]
    return subprocess.run(
        command,
        env=cluster.client_env,
        cwd=cluster.root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture(scope="module")
def loopback_cluster() -> Iterator[LoopbackCluster]:
    # A short path under /tmp: Ray's Unix socket paths inside it must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="mln-", dir="/tmp"))
    try:
        cluster = start_loopback_cluster(root)
        try:
            yield cluster
        finally:
            stop_loopback_cluster(cluster)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[3])


def listening_sockets(sessions: set[int]) -> list[tuple[str, str]]:
    """Return (local address, process) for every TCP and UDP listener of processes in `sessions`."""
    output = subprocess.run(
        ["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True, check=True
    ).stdout
    result = []
    for line in output.splitlines():
        columns = line.split()
        if len(columns) < 7:
            continue
        local_address, process = columns[4], " ".join(columns[6:])
        pids = {int(pid) for pid in re.findall(r"pid=(\d+)", process)}
        if any(session_of(pid) in sessions for pid in pids):
            result.append((local_address, process))
    return result


def session_of_process(process_column: str) -> int | None:
    """Return the session of the first pid in an ss process column."""
    match = re.search(r"pid=(\d+)", process_column)
    return session_of(int(match.group(1))) if match else None


LOOPBACK_HOSTS = {"127.0.0.1", "[::ffff:127.0.0.1]"}

NODE_REPORT_SCRIPT = """
import json
import ray

ray.init()
nodes = [
    {"labels": node["Labels"], "resources": node["Resources"], "address": node["NodeManagerAddress"]}
    for node in ray.nodes()
    if node["Alive"]
]
print("NODES " + json.dumps(nodes))
"""


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_loopback_cluster_listens_only_on_loopback(loopback_cluster: LoopbackCluster) -> None:
    sessions = {process.pid for process in loopback_cluster.processes.values()}
    sockets = listening_sockets(sessions)
    local_addresses = [address for address, _ in sockets]

    non_loopback = [
        (address, process) for address, process in sockets if address.rpartition(":")[0] not in LOOPBACK_HOSTS
    ]
    assert non_loopback == []
    # The check saw the real listeners: GCS, dashboard and one raylet per node.
    gcs_port = loopback_cluster.gcs_address.rpartition(":")[2]
    dashboard_port = loopback_cluster.dashboard_url.rpartition(":")[2]
    assert any(address.endswith(f":{gcs_port}") for address in local_addresses), local_addresses
    assert any(address.endswith(f":{dashboard_port}") for address in local_addresses), local_addresses
    for role, process in loopback_cluster.processes.items():
        raylets = [
            address for address, name in sockets if '"raylet"' in name and session_of_process(name) == process.pid
        ]
        assert raylets, f"no raylet listener found for {role}"


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_loopback_cluster_nodes_have_role_labels(loopback_cluster: LoopbackCluster) -> None:
    result = submit_job(loopback_cluster, [sys.executable, "-c", NODE_REPORT_SCRIPT], timeout_s=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = next(line for line in result.stdout.splitlines() if line.startswith("NODES "))
    nodes = json.loads(report.removeprefix("NODES "))
    roles = sorted(node["labels"].get("role", "") for node in nodes)
    assert roles == ["", "gen", "train"]
    for node in nodes:
        assert node["address"] == "127.0.0.1"
        assert "GPU" not in node["resources"], node
        if node["labels"].get("role") in {"gen", "train"}:
            assert node["resources"]["CPU"] == 1.0, node
        else:
            assert "CPU" not in node["resources"], node


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_loopback_cluster_rejects_wrong_token(loopback_cluster: LoopbackCluster, tmp_path: Path) -> None:
    wrong_token = write_token(tmp_path / "wrong_token")
    env = {**loopback_cluster.client_env, "RAY_AUTH_TOKEN_PATH": str(wrong_token)}
    command = [str(VENV_BIN / "ray"), "job", "list", "--address", loopback_cluster.dashboard_url]

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode != 0
    assert "token is invalid" in result.stdout + result.stderr


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_meta_training_job_runs_on_entrypoint_topology(loopback_cluster: LoopbackCluster) -> None:
    """The Compose topology, started by the entrypoint outside containers, runs a short job to the end."""
    run_dir = loopback_cluster.root / "runs" / "topology"
    storage = loopback_cluster.root / "ray-storage"
    tiny = [
        "loss_net.hidden_width=8", "tasks.num_features=[2,4]", "tasks.num_classes=[2,3]", "tasks.train_size=16",
        "tasks.val_size=16", "tasks.test_size=16", "inner.steps=3", "train.tasks_per_step=4", "train.steps=3",
        "train.checkpoint_every=3", "cluster.generator_label=gen", f"cluster.storage_path={storage}",
    ]
    entrypoint = [sys.executable, "-m", "jobs.train", "--run-dir", str(run_dir), "--trainer-label", "train"]
    entrypoint += [arg for item in tiny for arg in ("--set", item)]

    result = submit_job(loopback_cluster, entrypoint, working_dir=REPO_ROOT, timeout_s=540)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / "checkpoint.pt").is_file()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3
    placements = list(storage.rglob("placement.json"))
    assert placements, f"no placement.json under {storage}"
    placement = json.loads(placements[0].read_text())
    assert {w["labels"].get("role") for w in placement["trainers"]} == {"train"}
    assert {g["labels"].get("role") for g in placement["generators"]} == {"gen"}
