"""Task-generator actors and the per-rank feeder that keeps a bounded window of requests in flight.

Tasks are a pure function of (TaskConfig, seed, task index), so any generator
can produce any request and a request lost with a dead actor is simply sent
again. A ``GeneratorPool`` actor owns the generators and replaces dead ones.
Each training rank has a ``TaskFeeder``, which sends one request per meta-step
(that rank's task indices) round-robin over the generators and keeps at most
``cluster.window`` requests outstanding. The window is the backpressure:
generators never run more than ``window`` steps ahead of the trainer that
consumes their output.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable

import ray
import torch
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from cluster import GENERATOR_NUM_CPUS
from mln_core.config import TaskConfig
from mln_core.tasks import TaskBatch, generate_tasks

logger = logging.getLogger(__name__)

# Requests of one batch to dead generators before the feeder raises.
MAX_REQUEST_ATTEMPTS = 5


def placement_info() -> dict:
    """Node id, node labels and process id of the calling Ray worker."""
    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    labels = {}
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            labels = dict(node.get("Labels", {}))
            break
    return {"node_id": node_id, "labels": labels, "pid": os.getpid()}


def batch_nbytes(tasks: TaskBatch) -> int:
    """Bytes of tensor data in ``tasks``, the payload moved from a generator to a trainer."""
    total = 0
    for field in dataclasses.fields(tasks):
        value = getattr(tasks, field.name)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def compact_for_training(tasks: TaskBatch) -> TaskBatch:
    """Copy ``tasks`` without the test split, in tensors that own exactly their data.

    Meta-training never reads the test split, which is most of a task's
    samples (1024 of 1312 by default). The splits are views of one tensor,
    and pickling a view pickles its whole storage, so sending the batch as
    generated would move every sample three times.
    """
    compact = {}
    for field in dataclasses.fields(tasks):
        value = getattr(tasks, field.name)
        if field.name in ("test_x", "test_y"):
            value = value[:, :0]
        compact[field.name] = value.clone() if isinstance(value, torch.Tensor) else value
    return TaskBatch(**compact)


@ray.remote(num_cpus=GENERATOR_NUM_CPUS, max_restarts=0)
class TaskGenerator:
    """One generator: returns the tasks at the requested indices of a seed's stream, ready to send."""

    def __init__(self, task_config: TaskConfig, slot: int) -> None:
        self.task_config = task_config
        self.slot = slot
        # Ray sets OMP_NUM_THREADS from the reserved CPUs; fix torch's pool to match it.
        torch.set_num_threads(1)

    def generate(self, seed: int, indices: list[int]) -> TaskBatch:
        return compact_for_training(generate_tasks(self.task_config, seed, indices))

    def describe(self) -> dict:
        return {"slot": self.slot, **placement_info()}


@ray.remote(num_cpus=0, max_restarts=0)
class GeneratorPool:
    """Owns ``size`` generators, places them on nodes labelled ``role=<label>``, replaces dead ones."""

    def __init__(self, task_config: TaskConfig, size: int, label: str | None) -> None:
        self.task_config = task_config
        self.label = label
        self.replacements = 0
        self.generators = [self._start(slot) for slot in range(size)]
        # Generation number of each slot's actor, so that ranks which see the
        # same death ask for one replacement, not one each.
        self.generations = [0] * size

    def _start(self, slot: int) -> ActorHandle:
        options = {} if self.label is None else {"label_selector": {"role": self.label}}
        return TaskGenerator.options(**options).remote(self.task_config, slot)

    def handles(self) -> list[tuple[int, ActorHandle]]:
        """(generation, handle) of every slot."""
        return list(zip(self.generations, self.generators))

    def replace(self, slot: int, dead_generation: int) -> tuple[int, ActorHandle]:
        """Start a new generator in ``slot`` unless another rank already replaced ``dead_generation``."""
        if self.generations[slot] == dead_generation:
            self.generators[slot] = self._start(slot)
            self.generations[slot] += 1
            self.replacements += 1
            logger.warning(
                "generator %d (generation %d) died; started generation %d in its place (%d replacements so far)",
                slot, dead_generation, self.generations[slot], self.replacements,
            )
        return self.generations[slot], self.generators[slot]

    def stats(self) -> dict:
        return {"generators": len(self.generators), "replacements": self.replacements}

    def placements(self) -> list[dict]:
        """Where each live generator runs (node id, labels, process id)."""
        return ray.get([generator.describe.remote() for generator in self.generators])


def start_pool(task_config: TaskConfig, size: int, label: str | None) -> ActorHandle:
    """Start a generator pool and wait until every generator is placed and running."""
    pool = GeneratorPool.remote(task_config, size, label)
    placements = ray.get(pool.placements.remote())
    for placement in placements:
        logger.info(
            "generator %d runs on node %s (labels %s, pid %d)",
            placement["slot"], placement["node_id"], placement["labels"], placement["pid"],
        )
    return pool


@dataclasses.dataclass(frozen=True)
class FedBatch:
    """One meta-step's tasks for one rank, with how long the rank waited for them."""

    step: int
    tasks: TaskBatch
    wait_s: float  # time blocked in ray.get for this batch
    ready_in_window: int  # requests already finished when this batch was asked for, this one included
    attempts: int  # times this batch was requested: more than 1 when its generator died


@dataclasses.dataclass
class _Request:
    step: int
    indices: list[int]
    slot: int
    generation: int  # of the slot's actor that the request went to
    ref: ray.ObjectRef | None
    attempts: int = 1


class TaskFeeder:
    """Per-rank stream of task batches for steps ``start_step .. end_step - 1``, in order.

    ``indices_for_step(step)`` gives the global task indices this rank needs at
    a step. At most ``window`` requests are in flight; requests whose
    generator died are sent again to that slot's replacement.
    """

    def __init__(
        self,
        pool: ActorHandle,
        seed: int,
        indices_for_step: Callable[[int], range],
        start_step: int,
        end_step: int,
        window: int,
        rank: int = 0,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} is invalid: at least one request must be in flight")
        self.pool = pool
        self.seed = seed
        self.indices_for_step = indices_for_step
        self.end_step = end_step
        self.window = window
        self.generators: list[tuple[int, ActorHandle]] = ray.get(pool.handles.remote())
        # Ranks start at different slots so that, with several ranks, each step's
        # requests spread over the generators instead of queueing on one.
        self.slot_offset = rank
        self.next_step = start_step
        self.pending: collections.deque[_Request] = collections.deque()
        self._fill()

    def _send(self, request: _Request) -> None:
        request.generation, generator = self.generators[request.slot]
        request.ref = generator.generate.remote(self.seed, request.indices)

    def _fill(self) -> None:
        while len(self.pending) < self.window and self.next_step < self.end_step:
            step = self.next_step
            slot = (step + self.slot_offset) % len(self.generators)
            request = _Request(step, list(self.indices_for_step(step)), slot, generation=-1, ref=None)
            self._send(request)
            self.pending.append(request)
            self.next_step += 1

    def _replace(self, failed: _Request, error: Exception) -> None:
        """Swap in the pool's replacement for a dead generator and resend every request it held."""
        dead_generation = failed.generation
        self.generators[failed.slot] = ray.get(self.pool.replace.remote(failed.slot, dead_generation))
        resent = 0
        for request in self.pending:
            if request.slot == failed.slot and request.generation == dead_generation:
                if request.attempts >= MAX_REQUEST_ATTEMPTS:
                    raise RuntimeError(
                        f"step {request.step}: generator slot {request.slot} failed {request.attempts} times; "
                        "check the generator nodes' logs"
                    ) from error
                self._send(request)
                request.attempts += 1
                resent += 1
        logger.warning(
            "step %d: generator %d (generation %d) failed with %s; resent %d requests to its replacement",
            failed.step, failed.slot, dead_generation, type(error).__name__, resent,
        )

    def next(self, step: int) -> FedBatch:
        """Return the tasks of ``step``, blocking until its request has finished."""
        if not self.pending:
            raise RuntimeError(f"no request in flight for step {step}: the feeder ends at step {self.end_step}")
        request = self.pending[0]
        if request.step != step:
            raise RuntimeError(f"feeder expected step {request.step} but step {step} was asked for")

        # How many of the in-flight requests are already done: 0 means this rank will wait.
        refs = [r.ref for r in self.pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        ready_in_window = len(ready)

        started = time.perf_counter()
        while True:
            try:
                tasks = ray.get(request.ref)
                break
            except RayActorError as error:  # includes ActorDiedError and ActorUnavailableError
                self._replace(request, error)
        wait_s = time.perf_counter() - started

        self.pending.popleft()
        self._fill()
        if tasks.task_index.tolist() != request.indices:
            raise RuntimeError(f"step {step}: generator returned tasks {tasks.task_index.tolist()[:4]}..., "
                               f"expected {request.indices[:4]}...")
        return FedBatch(step, tasks, wait_s, ready_in_window, request.attempts)
