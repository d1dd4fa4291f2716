"""torch.distributed set-up for the Ray Train workers, with the rendezvous store bound to one address.

Ray Train's default ``TorchConfig`` rendezvous goes through
``init_process_group("env://")``, whose ``TCPStore`` server on rank 0 listens
on every interface of the host (torch 2.13 binds the wildcard address). That
defeats a cluster kept on 127.0.0.1, and elsewhere it exposes an
unauthenticated port on every network of the training node. Here rank 0 binds
the store's socket to its Ray node IP and passes the socket to ``TCPStore``
(``master_listen_fd``). The other ranks connect to that address. On a node
whose IP is 127.0.0.1, gloo is also pinned to the loopback interface.

``StoreBoundTorchConfig`` is a drop-in ``TorchConfig`` for ``TorchTrainer``.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import ray
import torch.distributed as dist
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

logger = logging.getLogger(__name__)

# The rank 0 store server, kept alive in that worker process for the whole run.
_server_store: dist.TCPStore | None = None
_server_socket: socket.socket | None = None


class StoreBoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on rank 0's node IP only."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _StoreBoundTorchBackend


def _start_store_server(timeout_s: float) -> tuple[str, int]:
    """Bind a socket to this node's IP, serve a TCPStore on it; return (address, port). Runs on rank 0."""
    global _server_store, _server_socket
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    _server_socket = socket.socket(family, socket.SOCK_STREAM)
    _server_socket.bind((address, 0))
    _server_socket.listen(128)
    port = _server_socket.getsockname()[1]
    _server_store = dist.TCPStore(
        address, port, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False, master_listen_fd=_server_socket.fileno(),
    )
    return address, port


def _init_process_group(
    backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: float
) -> None:
    timeout = datetime.timedelta(seconds=timeout_s)
    if address == "127.0.0.1" and backend == "gloo":
        # Without GLOO_SOCKET_IFNAME, gloo uses the interface that the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = _server_store if world_rank == 0 else dist.TCPStore(address, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)
    # Same variables as torchrun, for code that reads them.
    os.environ.update({"RANK": str(world_rank), "WORLD_SIZE": str(world_size)})


def _shut_down_process_group() -> None:
    global _server_store, _server_socket
    if dist.is_initialized():
        dist.destroy_process_group()
    _server_store = None
    if _server_socket is not None:
        _server_socket.close()
        _server_socket = None


class _StoreBoundTorchBackend(Backend):
    # As in Ray's torch backend: the workers of a node see each other's GPUs, which NCCL uses for peer access.
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: StoreBoundTorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world_size = len(worker_group)
        address, port = worker_group.execute_single(0, _start_store_server, timeout_s=backend_config.timeout_s)
        logger.info("process group %s of %d ranks meets at %s:%d", backend, world_size, address, port)
        ray.get([
            worker_group.execute_single_async(
                rank, _init_process_group, backend=backend, world_rank=rank, world_size=world_size,
                address=address, port=port, timeout_s=backend_config.timeout_s,
            )
            for rank in range(world_size)
        ])

    def on_shutdown(self, worker_group, backend_config: StoreBoundTorchConfig) -> None:
        worker_group.execute(_shut_down_process_group)
