"""The Ray Train worker loop: one ``MetaTrainer`` per rank, tasks from the generator pool, a hand-made all-reduce.

Every rank runs ``train_loop_per_worker``. The model is not wrapped in DDP
(``prepare_model``), because ``torch.func`` transforms do not compose with
DDP's hooks. The estimators already sum their gradient, objective and counts
in one flat tensor, so one ``torch.distributed.all_reduce`` per step is all
the synchronisation there is. ``ray.train.report`` is a barrier, so every
rank calls it at the same steps; only rank 0 passes a checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from cluster.generators import TaskFeeder, batch_nbytes, placement_info
from jobs.checkpoint import atomic_write_text, restore_trainer, save_checkpoint
from jobs.config_io import config_from_dict
from jobs.local import CHECKPOINT_NAME, METRICS_NAME
from jobs.run_log import MetricsLog, format_step
from mln_core.config import Config
from mln_core.meta_train import MetaTrainer, task_share

logger = logging.getLogger(__name__)

PLACEMENT_NAME = "placement.json"
ATTEMPTS_NAME = "attempts.jsonl"


class TimedAllReduce:
    """The ``reduce`` of a distributed meta-step: a sum over all ranks, with the time it took."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        # NCCL runs asynchronously to the host, so time it between synchronisations.
        # NOTE: the GPU path has not been run; no GPU was available during development.
        if values.is_cuda:
            torch.cuda.synchronize(values.device)
        started = time.perf_counter()
        summed = values.detach().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        if values.is_cuda:
            torch.cuda.synchronize(values.device)
        self.seconds += time.perf_counter() - started
        return summed


def _restore(trainer: MetaTrainer) -> list[dict]:
    """Load the latest reported checkpoint, if any, into ``trainer``; return its metrics history."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as directory:
        history = restore_trainer(trainer, Path(directory) / CHECKPOINT_NAME)
    logger.info("rank %d resumed from %s at step %d", trainer.rank, checkpoint.path, trainer.step)
    return history


def _record_attempt(run_dir: Path, pool: ray.actor.ActorHandle, trainer: MetaTrainer) -> None:
    """Record where every rank and generator runs and the step this attempt starts at.

    Rank 0 rewrites ``placement.json`` and appends one line to
    ``attempts.jsonl``, so a restart after a failure shows up as a second line.
    """
    mine = {"rank": trainer.rank, **placement_info()}
    gathered: list[dict | None] = [None] * trainer.world_size
    dist.all_gather_object(gathered, mine)
    if trainer.rank != 0:
        return
    placement = {"trainers": gathered, "generators": ray.get(pool.placements.remote())}
    atomic_write_text(run_dir / PLACEMENT_NAME, json.dumps(placement, indent=1))
    attempt = {"start_step": trainer.step, "world_size": trainer.world_size, "pids": [w["pid"] for w in gathered]}
    with (run_dir / ATTEMPTS_NAME).open("a") as handle:
        handle.write(json.dumps(attempt) + "\n")
    for worker in gathered:
        logger.info("rank %d runs on node %s (labels %s, pid %d)",
                    worker["rank"], worker["node_id"], worker["labels"], worker["pid"])


def _step_record(
    metrics: dict, config: Config, step: int, fed_wait_s: float, allreduce_s: float, step_s: float,
    ready_in_window: int, attempts: int, nbytes: int, world_size: int,
) -> dict:
    # The feeder checked that each rank's batch contains exactly its share, so
    # the step used the whole range [step T, (step + 1) T) of the task stream.
    used = task_share(config, step)
    return {
        **metrics,
        "perf/step_s": step_s,
        "perf/tasks_per_s": config.train.tasks_per_step / step_s,
        "perf/task_wait_s": fed_wait_s,
        "perf/allreduce_s": allreduce_s,
        "perf/task_bytes": float(nbytes),
        "gen/buffer_depth": float(ready_in_window),
        "gen/attempts": float(attempts),
        "tasks/first_index": used.start,
        "tasks/last_index": used.stop - 1,
        "cluster/world_size": float(world_size),
    }


def _report(trainer: MetaTrainer, record: dict, history: list[dict]) -> None:
    """Report to Ray Train at a checkpoint step: a barrier on every rank, a checkpoint from rank 0."""
    summary = {key: value for key, value in record.items() if isinstance(value, (int, float))}
    summary["meta/steps_done"] = trainer.step
    if trainer.rank != 0:
        ray.train.report(summary)
        return
    with tempfile.TemporaryDirectory(prefix="mln-checkpoint-") as directory:
        save_checkpoint(Path(directory) / CHECKPOINT_NAME, trainer, history)
        ray.train.report(summary, checkpoint=Checkpoint.from_directory(directory))


def train_loop_per_worker(loop_config: dict) -> None:
    """Meta-train on this rank until ``train.steps``, resuming from the latest checkpoint."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_dict(loop_config["config"])
    pool = loop_config["pool"]
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.cluster.use_gpu else torch.device("cpu")
    total = config.train.steps

    trainer = MetaTrainer(config, rank, world_size, device)
    history = _restore(trainer)
    metrics_log = MetricsLog(run_dir / METRICS_NAME) if rank == 0 else None
    if metrics_log is not None:
        # Records of steps after the checkpoint were written by an attempt that
        # failed; those steps run again.
        metrics_log.keep_before(trainer.step)
    _record_attempt(run_dir, pool, trainer)

    feeder = TaskFeeder(pool, config.train.seed, trainer.my_task_indices, trainer.step, total,
                        config.cluster.window, rank)
    reduce = TimedAllReduce()
    started, first_step = time.perf_counter(), trainer.step
    while trainer.step < total:
        step = trainer.step
        step_start = time.perf_counter()

        # Fetch this rank's tasks; the window of requests behind them is refilled at once.
        fed = feeder.next(step)
        tasks = fed.tasks.to(device)

        # Inner loops, meta-gradient, one all-reduce, Adam update: identical weights on every rank after it.
        reduce.seconds = 0.0
        metrics = trainer.train_step(tasks, reduce)
        step_s = time.perf_counter() - step_start

        record = _step_record(metrics, config, step, fed.wait_s, reduce.seconds, step_s,
                              fed.ready_in_window, fed.attempts, batch_nbytes(fed.tasks), world_size)
        if metrics_log is not None:
            history.append(record)
            metrics_log.append(record)
            if trainer.step % config.train.log_every == 0 or trainer.step == total:
                rate = (trainer.step - first_step) / (time.perf_counter() - started)
                logger.info("%s eta=%.0fs", format_step(record, total), (total - trainer.step) / rate)
        if record["meta/skipped_nonfinite"] and rank == 0:
            logger.warning("step %d: non-finite meta-gradient, update skipped", step + 1)
        if trainer.step % config.train.checkpoint_every == 0 or trainer.step == total:
            _report(trainer, record, history)
