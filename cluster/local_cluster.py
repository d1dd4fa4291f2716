"""Connecting to Ray: a single-node cluster on 127.0.0.1, or an existing cluster by address.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first
imported. With it set to 0, Ray 2.60 keeps the node IP at 127.0.0.1 and every
listener of a node it starts binds to loopback. Without it, Ray replaces
127.0.0.1 with the host's routable address and listens there. So this module
imports ``ray`` only inside functions, after setting the switch, and rejects
a process that imported ``ray`` too early.

Token authentication is always on: ``RAY_AUTH_MODE=token``, with the token
from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token`` (which Ray creates for a new local cluster when none of
them exists).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Ray 2.60's dashboard probes cloud metadata (169.254.169.254, metadata.google.internal)
# when a head starts, even with usage stats off (checked with strace). Sending HTTP
# through a proxy on a closed loopback port makes those requests fail on this host;
# no_proxy keeps Ray's own traffic to 127.0.0.1 direct.
LOOPBACK_ONLY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost,::1",
}
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def use_loopback_only() -> None:
    """Make the Ray processes that this process starts or joins use 127.0.0.1 only.

    Must run before ``ray`` is imported, because Ray reads the switch at import.
    """
    if "ray" in sys.modules:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "ray was imported before the loopback-only mode was set, so Ray would listen on the host's "
                f"routable address: set {LOOPBACK_SWITCH}=0 in the environment, or import cluster modules "
                "before anything that imports ray"
            )
    os.environ[LOOPBACK_SWITCH] = "0"
    os.environ.update(LOOPBACK_ONLY_ENV)


def require_token_auth() -> None:
    """Turn on Ray's token authentication for this process and the Ray processes it starts."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode not in (None, "token"):
        raise RuntimeError(
            f"RAY_AUTH_MODE={mode}: this project always runs Ray with token authentication; "
            "unset RAY_AUTH_MODE or set it to token"
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules and mode is None:
        # Ray caches its settings, the authentication mode included, when it is
        # imported; re-read them as Ray's own token set-up does.
        # NOTE: Config.initialize is not public API (checked with Ray 2.60).
        from ray._raylet import Config

        Config.initialize("")


def is_local_address(address: str | None) -> bool:
    """Return whether ``address`` requests a new single-node cluster (None or "local")."""
    return address is None or address == "local"


def _is_loopback_address(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None, temp_dir: str | None = None) -> Iterator[None]:
    """Connect this process to Ray for the duration of the block.

    ``address`` None or "local" starts a single-node cluster bound to
    127.0.0.1 with ``num_cpus`` logical CPUs (default: the machine's) and stops
    it afterwards. Any other address ("auto", "HOST:PORT") joins that cluster
    and leaves it running. If this process is already connected, the block
    reuses that connection and leaves it open.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            yield
            return

    require_token_auth()
    local = is_local_address(address)
    if local or _is_loopback_address(address):
        use_loopback_only()
    import ray

    if local:
        # Usage statistics would be reported to an external server; this mode keeps all traffic local.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
        )
        logger.info("started a single-node Ray cluster on %s with %s CPUs", LOOPBACK, num_cpus or os.cpu_count())
    else:
        ray.init(address=address, logging_level=logging.WARNING)
        logger.info("joined the Ray cluster at %s", address)
    try:
        yield
    finally:
        ray.shutdown()
        if local:
            logger.info("stopped the single-node Ray cluster")
