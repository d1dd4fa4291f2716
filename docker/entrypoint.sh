#!/usr/bin/env bash
# Start one Ray node of the meta-training cluster, inside a container or on a
# plain host. `entrypoint.sh help` lists the roles and settings.
set -euo pipefail

# A port nothing listens on: requests sent through this proxy fail at once, on this host.
LOOPBACK_PROXY=http://127.0.0.1:9

readonly ROLES="head cpu-worker gpu-worker"

# Ray 2.60 keeps a node's gRPC listeners on loopback only when the node IP is
# exactly 127.0.0.1, and it swaps 127.0.0.1 for the host's routable address
# unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. That switch also makes
# `ray start --address` abort with "Multi-node Ray clusters are not supported
# on Windows and OSX", so loopback workers run the same CLI in-process with
# only that abort lifted. The child processes inherit the switch and keep
# resolving the node IP to 127.0.0.1.
# NOTE: this reaches into Ray internals (ray_constants.ENABLE_RAY_CLUSTER,
# services.get_node_ip_address); tests/test_docker.py checks the listeners
# with ss, so a Ray upgrade that breaks it fails there.
readonly LOOPBACK_WORKER_LAUNCHER='
import sys

import ray
from ray._private import ray_constants, services
from ray.scripts.scripts import main

for module, name in ((ray_constants, "ENABLE_RAY_CLUSTER"), (services, "get_node_ip_address")):
    if not hasattr(module, name):
        sys.exit(
            f"entrypoint: {module.__name__}.{name} not found in ray {ray.__version__}. "
            "Update the loopback worker launcher in docker/entrypoint.sh for this Ray version"
        )
ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"
sys.argv = ["ray", *sys.argv[1:]]
sys.exit(main())
'

usage() {
    cat <<'EOF'
Usage:
  entrypoint.sh ROLE [RAY_START_FLAGS...]   start a Ray node and block until it stops
  entrypoint.sh healthcheck ROLE            exit 0 when the node started with ROLE is healthy
  entrypoint.sh help                        print this text
  entrypoint.sh COMMAND [ARGS...]           run any command found on PATH as is

Roles:
  head        GCS, dashboard and job API. Advertises 0 CPUs and 0 GPUs, so only
              the job driver and the Ray Train controller run there.
  cpu-worker  task-generator node: label role=gen, 0 GPUs.
  gpu-worker  training node: label role=train, GPUs detected by Ray unless
              MLN_NUM_GPUS is set (MLN_NUM_GPUS=0 trains on CPU).
Flags after the role are appended to `ray start`, e.g. --node-manager-port=6380.

Settings (environment variables):
  RAY_AUTH_TOKEN_PATH       required: file that contains the cluster token
                            (at least 32 characters). Token authentication
                            (RAY_AUTH_MODE=token) is always on.
  MLN_BIND_ADDRESS          node IP address (default 127.0.0.1). With 127.0.0.1
                            every Ray listener binds to loopback only. "auto"
                            takes the address that this host name resolves to:
                            the container's address on the Compose network.
                            Any address other than 127.0.0.1 makes Ray listen
                            on all interfaces.
  MLN_HEAD_ADDRESS          workers, required: GCS address of the head as
                            HOST:PORT, e.g. ray-head:6379.
  MLN_GCS_PORT              head: GCS port (default 6379).
  MLN_DASHBOARD_PORT        head: dashboard and job API port (default 8265).
  MLN_DASHBOARD_AGENT_PORT  HTTP port of this node's dashboard agent, which
                            serves the health check (default 52365).
  MLN_NUM_CPUS              CPUs that Ray schedules on this node (default: detected).
  MLN_NUM_GPUS              gpu-worker: GPUs (default: detected).
  MLN_OBJECT_STORE_BYTES    object store size in bytes (default: Ray's, 30% of
                            memory capped by the size of /dev/shm).
  MLN_TEMP_DIR              Ray's directory for sessions, logs and sockets
                            (default: Ray's, /tmp/ray).
  MLN_DRY_RUN=1             print the command, one argument per line, instead
                            of running it.
EOF
}

log() {
    printf '%s entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

die() {
    printf 'entrypoint: error: %s\n' "$*" >&2
    exit 2
}

is_role() {
    local candidate=$1 role
    for role in $ROLES; do
        [[ $candidate == "$role" ]] && return 0
    done
    return 1
}

require_uint() {
    local name=$1 value=$2
    [[ $value =~ ^[0-9]+$ ]] || die "$name=$value is invalid: expected a non-negative integer"
}

require_port() {
    local name=$1 value=$2
    require_uint "$name" "$value"
    ((value >= 1 && value <= 65535)) || die "$name=$value is invalid: expected a port in 1-65535"
}

# The python that runs `ray`, so the launcher and the health check import the
# same Ray installation as the CLI.
ray_python() {
    local ray_bin
    ray_bin=$(command -v ray) || die "ray not found on PATH: install ray[default] or activate its environment"
    if [[ -x "$(dirname "$ray_bin")/python" ]]; then
        printf '%s\n' "$(dirname "$ray_bin")/python"
    else
        printf '%s\n' python3
    fi
}

resolve_bind_address() {
    local address=${MLN_BIND_ADDRESS:-127.0.0.1}

    if [[ $address == auto ]]; then
        address=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 { print $1 }')
        [[ -n $address ]] || die "MLN_BIND_ADDRESS=auto: host name $(hostname) does not resolve to an IPv4 address. Set MLN_BIND_ADDRESS to this node's address"
        [[ $address != 127.* ]] || die "MLN_BIND_ADDRESS=auto resolved host name $(hostname) to loopback address $address. Set MLN_BIND_ADDRESS=127.0.0.1 for a single-host cluster, or to this host's address on the cluster network"
    fi

    if [[ $address == 127.* && $address != 127.0.0.1 ]]; then
        die "MLN_BIND_ADDRESS=$address: Ray keeps its listeners on loopback only for 127.0.0.1 and listens on all interfaces for any other address. Use 127.0.0.1"
    fi
    [[ $address =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || $address == *:* ]] \
        || die "MLN_BIND_ADDRESS=$address is invalid: expected an IP address, 127.0.0.1 or auto"

    printf '%s\n' "$address"
}

# Token authentication is never optional here: anyone who reaches the GCS,
# dashboard or job API of an unauthenticated cluster can run code on it.
check_token() {
    local mode=${RAY_AUTH_MODE:-token}
    [[ $mode == token ]] || die "RAY_AUTH_MODE=$mode: this cluster always uses token authentication. Unset RAY_AUTH_MODE or set it to token"
    [[ -z ${RAY_AUTH_TOKEN:-} ]] || die "RAY_AUTH_TOKEN is set: pass the token only as a file through RAY_AUTH_TOKEN_PATH, because environment variables show up in process listings and docker inspect. Unset RAY_AUTH_TOKEN"

    local path=${RAY_AUTH_TOKEN_PATH:-}
    [[ -n $path ]] || die "RAY_AUTH_TOKEN_PATH is not set: point it at the cluster token file, e.g. /run/secrets/ray_token (create one with: python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE)"
    [[ -f $path ]] || die "token file RAY_AUTH_TOKEN_PATH=$path not found: create it with: python3 -c 'import secrets; print(secrets.token_hex(32))' > $path"
    [[ -r $path ]] || die "token file RAY_AUTH_TOKEN_PATH=$path is not readable by uid $(id -u): give this user read access (in Compose, build the image with MLN_UID set to the uid that owns the file)"

    local token
    token=$(tr -d '[:space:]' <"$path")
    ((${#token} >= 32)) || die "token file RAY_AUTH_TOKEN_PATH=$path contains ${#token} characters, expected at least 32: regenerate it with: python3 -c 'import secrets; print(secrets.token_hex(32))' > $path"

    export RAY_AUTH_MODE=token
}

# The next three functions append to this array, in this order.
ray_start_flags=()

append_common_flags() {
    local bind_address=$1

    local agent_port=${MLN_DASHBOARD_AGENT_PORT:-52365}
    require_port MLN_DASHBOARD_AGENT_PORT "$agent_port"
    ray_start_flags+=(--block --disable-usage-stats "--node-ip-address=$bind_address" "--dashboard-agent-listen-port=$agent_port")

    if [[ -n ${MLN_NUM_CPUS:-} ]]; then
        require_uint MLN_NUM_CPUS "$MLN_NUM_CPUS"
        ray_start_flags+=("--num-cpus=$MLN_NUM_CPUS")
    fi
    if [[ -n ${MLN_OBJECT_STORE_BYTES:-} ]]; then
        require_uint MLN_OBJECT_STORE_BYTES "$MLN_OBJECT_STORE_BYTES"
        ray_start_flags+=("--object-store-memory=$MLN_OBJECT_STORE_BYTES")
    fi
    if [[ -n ${MLN_TEMP_DIR:-} ]]; then
        ray_start_flags+=("--temp-dir=$MLN_TEMP_DIR")
    fi
}

append_head_flags() {
    local bind_address=$1

    local gcs_port=${MLN_GCS_PORT:-6379}
    local dashboard_port=${MLN_DASHBOARD_PORT:-8265}
    require_port MLN_GCS_PORT "$gcs_port"
    require_port MLN_DASHBOARD_PORT "$dashboard_port"
    [[ -z ${MLN_NUM_CPUS:-} ]] || die "MLN_NUM_CPUS=$MLN_NUM_CPUS is set for the head, which always advertises 0 CPUs so that no task or actor lands on it. Unset it"

    # The head advertises no CPUs or GPUs, so every task and actor goes to a worker.
    ray_start_flags+=(--head "--port=$gcs_port" --num-cpus=0 --num-gpus=0
        --include-dashboard=true "--dashboard-host=$bind_address" "--dashboard-port=$dashboard_port")
}

append_worker_flags() {
    local role=$1

    local head_address=${MLN_HEAD_ADDRESS:-}
    [[ -n $head_address ]] || die "MLN_HEAD_ADDRESS is not set: a $role needs the head's GCS address as HOST:PORT, e.g. ray-head:6379 or 127.0.0.1:6379"
    [[ $head_address =~ ^[^:]+:[0-9]+$ ]] || die "MLN_HEAD_ADDRESS=$head_address is invalid: expected HOST:PORT, e.g. ray-head:6379"
    ray_start_flags+=("--address=$head_address")

    case $role in
        cpu-worker)
            [[ -z ${MLN_NUM_GPUS:-} || ${MLN_NUM_GPUS} == 0 ]] \
                || die "MLN_NUM_GPUS=$MLN_NUM_GPUS is set for a cpu-worker, which never advertises GPUs. Use the gpu-worker role for GPU nodes"
            ray_start_flags+=(--labels=role=gen --num-gpus=0)
            ;;
        gpu-worker)
            ray_start_flags+=(--labels=role=train)
            if [[ -n ${MLN_NUM_GPUS:-} ]]; then
                require_uint MLN_NUM_GPUS "$MLN_NUM_GPUS"
                ray_start_flags+=("--num-gpus=$MLN_NUM_GPUS")
            fi
            ;;
    esac
}

run_or_print() {
    if [[ ${MLN_DRY_RUN:-0} == 1 ]]; then
        printf '%s\n' "$@"
        exit 0
    fi
    exec "$@"
}

start_node() {
    local role=$1
    shift
    check_token

    local bind_address
    bind_address=$(resolve_bind_address)

    append_common_flags "$bind_address"
    if [[ $role == head ]]; then
        append_head_flags "$bind_address"
    else
        append_worker_flags "$role"
    fi
    ray_start_flags+=("$@")

    local loopback=0
    if [[ $bind_address == 127.0.0.1 ]]; then
        loopback=1
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
        # Ray 2.60's dashboard probes cloud metadata (169.254.169.254, metadata.google.internal)
        # when a head starts, even with usage stats off. A proxy on a closed loopback port keeps
        # those requests on this host; no_proxy leaves Ray's own 127.0.0.1 traffic direct.
        export RAY_USAGE_STATS_ENABLED=0 http_proxy=$LOOPBACK_PROXY https_proxy=$LOOPBACK_PROXY
        export no_proxy=127.0.0.1,localhost,::1
    else
        export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
        log "node IP $bind_address is not 127.0.0.1, so Ray listens on every interface of this host or container. Keep its ports reachable only from hosts that may run code on this cluster"
    fi

    log "starting $role: ray start ${ray_start_flags[*]}"
    local env_prefix=(env RAY_AUTH_MODE=token "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=$RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    if [[ $role != head && $loopback == 1 ]]; then
        local python
        python=$(ray_python)
        if [[ ${MLN_DRY_RUN:-0} == 1 ]]; then
            run_or_print "${env_prefix[@]}" "$python" -c LOOPBACK_WORKER_LAUNCHER start "${ray_start_flags[@]}"
        fi
        run_or_print "${env_prefix[@]}" "$python" -c "$LOOPBACK_WORKER_LAUNCHER" start "${ray_start_flags[@]}"
    fi
    run_or_print "${env_prefix[@]}" ray start "${ray_start_flags[@]}"
}

# Ray's health endpoints need no token: the dashboard agent on every node
# serves /api/local_raylet_healthz, and the head's dashboard serves
# /api/gcs_healthz.
healthcheck() {
    local role=${1:-}
    is_role "$role" || die "healthcheck needs the node's role as its argument, one of: $ROLES"

    local bind_address host
    bind_address=$(resolve_bind_address)
    host=$bind_address
    [[ $host != *:* ]] || host="[$host]"

    local agent_port=${MLN_DASHBOARD_AGENT_PORT:-52365}
    require_port MLN_DASHBOARD_AGENT_PORT "$agent_port"
    local -a urls=("http://$host:$agent_port/api/local_raylet_healthz")
    if [[ $role == head ]]; then
        local dashboard_port=${MLN_DASHBOARD_PORT:-8265}
        require_port MLN_DASHBOARD_PORT "$dashboard_port"
        urls+=("http://$host:$dashboard_port/api/gcs_healthz")
    fi

    if [[ ${MLN_DRY_RUN:-0} == 1 ]]; then
        printf '%s\n' "${urls[@]}"
        exit 0
    fi
    local python
    python=$(ray_python)
    "$python" - "${urls[@]}" <<'EOF'
import sys
import urllib.request

# No proxy: the node's own address must never go through http_proxy.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for url in sys.argv[1:]:
    try:
        with opener.open(url, timeout=5) as response:
            response.read()
    except OSError as error:
        sys.exit(f"entrypoint: health check failed: {url}: {error}")
EOF
}

main() {
    local command=${1:-help}
    [[ $# -eq 0 ]] || shift

    if is_role "$command"; then
        start_node "$command" "$@"
    fi
    case $command in
        healthcheck)
            healthcheck "$@"
            ;;
        help | -h | --help)
            usage
            ;;
        *)
            command -v -- "$command" >/dev/null \
                || die "unknown role or command '$command': expected one of $ROLES, healthcheck, help, or a command on PATH"
            exec "$command" "$@"
            ;;
    esac
}

main "$@"
