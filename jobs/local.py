"""The in-process driver: meta-train on this machine without Ray."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from jobs.checkpoint import restore_trainer, save_checkpoint
from jobs.run_log import MetricsLog, format_step, plot_training_curves
from mln_core.config import Config
from mln_core.meta_train import MetaTrainer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"


def run_local(config: Config, run_dir: str | Path, stop_after: int | None = None) -> MetaTrainer:
    """Meta-train in this process, resuming from ``run_dir/checkpoint.pt`` when it exists.

    Writes the checkpoint every ``train.checkpoint_every`` steps and at the end,
    one metrics record per step to ``metrics.jsonl`` and the training curves.
    ``stop_after`` ends the call after that many steps without a final
    checkpoint, as a crash would (tests use it to interrupt and resume).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    metrics_log = MetricsLog(run_dir / METRICS_NAME)
    trainer = MetaTrainer(config)

    history: list[dict] = []
    if checkpoint_path.exists():
        restore_trainer(trainer, checkpoint_path)
        history = metrics_log.keep_before(trainer.step)
        logger.info("resumed from %s at step %d", checkpoint_path, trainer.step)
    else:
        metrics_log.keep_before(0)
    total = config.train.steps
    if trainer.step >= total:
        logger.info("run in %s already finished %d of %d steps; raise train.steps to continue", run_dir, trainer.step, total)
        return trainer
    logger.info(
        "meta-training %d steps of %d tasks with the %s estimator (MLN of %d weights) in %s",
        total, config.train.tasks_per_step, config.estimator.kind, trainer.layout.numel, run_dir,
    )

    started, steps_this_call = time.perf_counter(), 0
    while trainer.step < total:
        step_start = time.perf_counter()
        indices = trainer.my_task_indices()
        tasks = trainer.generate_my_tasks()
        generated = time.perf_counter()
        metrics = trainer.train_step(tasks)
        elapsed = time.perf_counter() - step_start
        record = {
            **metrics,
            "perf/step_s": elapsed,
            "perf/generate_s": generated - step_start,
            "perf/tasks_per_s": tasks.size / elapsed,
            "tasks/first_index": indices.start,
            "tasks/last_index": indices.stop - 1,
        }
        history.append(record)
        metrics_log.append(record)
        steps_this_call += 1

        if record["meta/skipped_nonfinite"]:
            logger.warning("step %d: non-finite meta-gradient, update skipped", trainer.step)
        if trainer.step % config.train.log_every == 0 or trainer.step == total:
            rate = steps_this_call / (time.perf_counter() - started)
            logger.info("%s eta=%.0fs", format_step(record, total), (total - trainer.step) / rate)
        if trainer.step % config.train.checkpoint_every == 0 or trainer.step == total:
            save_checkpoint(checkpoint_path, trainer, history)
        if stop_after is not None and steps_this_call >= stop_after:
            break  # like a crash: steps since the last checkpoint are redone on resume

    if history:
        plot_training_curves(history, run_dir / CURVES_NAME)
    return trainer
