"""Distributed meta-training with Ray Train: the driver side.

``mln train --ray`` calls ``run_on_ray``. It connects to Ray (or starts a
single-node cluster on 127.0.0.1), starts the generator pool and runs a
``TorchTrainer`` whose workers execute ``cluster.train_loop``. At the end it
copies the final checkpoint, the metrics and the training curves into the run
folder in the in-process driver's layout, so ``mln evaluate`` reads either.

Ray Train keeps the run under ``<cluster.storage_path>/<run name>``: the
checkpoints it reported (listed in ``checkpoint_manager_snapshot.json``), the
live ``metrics.jsonl`` and ``placement.json``. Running again with the same run
name and storage path resumes from the latest checkpoint in that snapshot.

This module imports ``ray`` only inside functions, so that
``cluster.local_cluster`` can put Ray in loopback-only mode before the import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cluster import GENERATOR_NUM_CPUS
from jobs.checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint
from jobs.local import CHECKPOINT_NAME, CURVES_NAME, METRICS_NAME
from jobs.run_log import plot_training_curves
from mln_core.config import Config

if TYPE_CHECKING:
    import ray.train

logger = logging.getLogger(__name__)

POOL_NAME = "generator_pool.json"

# Restarts of the worker group after a worker or node failure, per fit.
MAX_FAILURES = 3
# Checkpoints kept in storage; older ones are deleted after each new one.
NUM_CHECKPOINTS_KEPT = 3


def default_run_name(run_dir: str | Path) -> str:
    """Run name for Ray Train storage: the folder name plus a hash of its absolute path.

    The hash keeps two run folders with the same name apart in one storage
    path, and the same folder maps to the same name, so running again resumes.
    """
    path = Path(run_dir).expanduser().resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{path.name or 'run'}-{digest}"


def storage_root(config: Config) -> Path:
    """``cluster.storage_path`` as an absolute path; relative paths are taken from the current directory."""
    return Path(config.cluster.storage_path).expanduser().resolve()


def required_cpus(config: Config) -> int:
    """Logical CPUs that the training workers and generators reserve together."""
    return math.ceil(config.cluster.num_workers + config.cluster.generators * GENERATOR_NUM_CPUS)


def fit_meta_training(
    config: Config, run_name: str, trainer_label: str | None = None, max_failures: int = MAX_FAILURES
) -> ray.train.Result:
    """Run distributed meta-training on the connected Ray cluster and return Ray Train's result.

    ``trainer_label`` places the training workers on nodes labelled
    ``role=<trainer_label>``; None places them anywhere.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.generators import start_pool
    from cluster.process_group import StoreBoundTorchConfig
    from cluster.train_loop import train_loop_per_worker

    root = storage_root(config)
    run_dir = root / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = config.cluster
    logger.info(
        "meta-training %d steps on %d Ray Train workers (%s) with %d generators; storage %s",
        config.train.steps, cluster.num_workers, "GPU, NCCL" if cluster.use_gpu else "CPU, gloo",
        cluster.generators, run_dir,
    )

    pool = start_pool(config.tasks, cluster.generators, cluster.generator_label)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "pool": pool, "run_dir": str(run_dir)},
            torch_config=StoreBoundTorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cluster.num_workers,
                use_gpu=cluster.use_gpu,
                label_selector=None if trainer_label is None else {"role": trainer_label},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(root),
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=NUM_CHECKPOINTS_KEPT),
            ),
        )
        result = trainer.fit()
        stats = {**ray.get(pool.stats.remote()), "placements": ray.get(pool.placements.remote())}
        atomic_write_text(run_dir / POOL_NAME, json.dumps(stats, indent=1))
        logger.info("generator pool: %d generators, %d replaced during the run",
                    stats["generators"], stats["replacements"])
    finally:
        ray.kill(pool)
    return result


def export_run(result: ray.train.Result, run_dir: str | Path) -> list[dict]:
    """Copy the final checkpoint into ``run_dir`` with its metrics and curves; return the metrics history."""
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run at {result.path} reported no checkpoint; see its logs")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        source = Path(directory) / CHECKPOINT_NAME
        _, _, history = load_checkpoint(source)
        atomic_write_bytes(run_dir / CHECKPOINT_NAME, source.read_bytes())
    # The checkpoint's history is the run's record without the steps of failed attempts.
    atomic_write_text(run_dir / METRICS_NAME, "".join(json.dumps(record) + "\n" for record in history))
    if history:
        plot_training_curves(history, run_dir / CURVES_NAME)
    return history


def run_on_ray(
    config: Config,
    run_dir: str | Path,
    address: str | None = None,
    run_name: str | None = None,
    trainer_label: str | None = None,
) -> dict:
    """Meta-train on Ray and write ``checkpoint.pt``, ``metrics.jsonl`` and curves to ``run_dir``.

    ``address`` None or "local" starts a single-node cluster on 127.0.0.1 for
    this call; "auto" or "HOST:PORT" joins a running cluster. ``run_name``
    defaults to ``default_run_name(run_dir)``, so the same run folder resumes.
    ``trainer_label`` overrides ``cluster.trainer_label``. Returns the metrics
    of the last meta-step.
    """
    from cluster.local_cluster import is_local_address, ray_session

    run_name = run_name or default_run_name(run_dir)
    num_cpus = max(required_cpus(config), os.cpu_count() or 1) if is_local_address(address) else None
    with ray_session(address, num_cpus=num_cpus):
        label = trainer_label if trainer_label is not None else config.cluster.trainer_label
        result = fit_meta_training(config, run_name, trainer_label=label)
    history = export_run(result, run_dir)
    logger.info("Ray Train run %s finished; checkpoint copied to %s", run_name, Path(run_dir) / CHECKPOINT_NAME)
    return history[-1] if history else {}
