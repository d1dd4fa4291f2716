"""What does distributing meta-training with Ray cost on one machine?

Runs the same configuration in this process and on a single-node Ray
cluster (127.0.0.1) with the same number of cores, and prints:

1. meta-steps per second of each, measured over the steps only, plus the
   fixed start-up cost of a Ray Train fit;
2. task-generator throughput (one generator actor, requests kept in flight
   with ``ray.wait``) against what the trainers consume, and the same stream
   through ``ray.util.queue.Queue`` for comparison;
3. bytes moved per meta-step: task batches from generators to trainers and
   the all-reduce of the flat meta-gradient.

Run: python -m benchmarks.ray_overhead --steps 40 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import tempfile
import time

from benchmarks.common import machine
from jobs.config_io import load_config
from mln_core.config import Config
from mln_core.meta_train import MetaTrainer, task_share

STREAM_BATCHES = 200


def in_process_rate(config: Config) -> float:
    """Meta-steps per second of the in-process loop (generation included), after one warm-up step."""
    trainer = MetaTrainer(config)
    trainer.train_step(trainer.generate_my_tasks())
    started = time.perf_counter()
    while trainer.step < config.train.steps:
        trainer.train_step(trainer.generate_my_tasks())
    return (config.train.steps - 1) / (time.perf_counter() - started)


def ray_rate(config: Config) -> tuple[float, float, list[dict]]:
    """(meta-steps per second over the steps after the first, wall time of the whole fit, rank 0's records)."""
    from cluster.trainer import fit_meta_training
    from jobs.checkpoint import load_checkpoint

    started = time.perf_counter()
    result = fit_meta_training(config, run_name=f"bench-{os.getpid()}-{config.cluster.num_workers}")
    fit_s = time.perf_counter() - started
    with result.checkpoint.as_directory() as directory:
        _, _, records = load_checkpoint(os.path.join(directory, "checkpoint.pt"))
    stepping_s = sum(r["perf/step_s"] for r in records[1:])
    return (len(records) - 1) / stepping_s, fit_s, records


def window_stream(config: Config, window: int) -> tuple[float, float, int]:
    """(seconds to the first batch, to all STREAM_BATCHES, pickled bytes per batch) through one generator."""
    import ray

    from cluster.generators import TaskGenerator

    generator = TaskGenerator.remote(config.tasks, 0)
    ray.get(generator.describe.remote())
    indices = lambda step: list(task_share(config, step))  # noqa: E731
    started = time.perf_counter()
    pending = [generator.generate.remote(config.train.seed, indices(step)) for step in range(window)]
    first_s, sent, nbytes = None, window, 0
    for _ in range(STREAM_BATCHES):
        (ready,), pending = ray.wait(pending, num_returns=1)
        batch = ray.get(ready)
        if first_s is None:
            first_s = time.perf_counter() - started
            nbytes = len(pickle.dumps(batch))
        if sent < STREAM_BATCHES:
            pending.append(generator.generate.remote(config.train.seed, indices(sent)))
            sent += 1
    total_s = time.perf_counter() - started
    ray.kill(generator)
    return first_s, total_s, nbytes


def queue_stream(config: Config, window: int) -> tuple[float, float]:
    """(seconds to the first batch, to all STREAM_BATCHES) with a producer actor filling a bounded Queue.

    The queue's actor and the producer are running before the clock starts, like the generator
    of ``window_stream``.
    """
    import ray
    from ray.util.queue import Queue

    from cluster import GENERATOR_NUM_CPUS
    from cluster.generators import compact_for_training
    from mln_core.tasks import generate_tasks

    @ray.remote(num_cpus=GENERATOR_NUM_CPUS)
    class Producer:
        def ready(self) -> bool:
            return True

        def produce(self, queue: Queue, task_config, seed: int, per_step: int) -> None:
            for step in range(STREAM_BATCHES):
                indices = range(step * per_step, (step + 1) * per_step)
                queue.put(compact_for_training(generate_tasks(task_config, seed, indices)))

    queue = Queue(maxsize=window)
    producer = Producer.remote()
    ray.get(producer.ready.remote())
    queue.qsize()
    started = time.perf_counter()
    done = producer.produce.remote(queue, config.tasks, config.train.seed, config.train.tasks_per_step)
    first_s = None
    for _ in range(STREAM_BATCHES):
        queue.get()
        if first_s is None:
            first_s = time.perf_counter() - started
    total_s = time.perf_counter() - started
    ray.get(done)
    queue.shutdown()
    ray.kill(producer)
    return first_s, total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="Meta-steps per run.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray Train workers (1 CPU each).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Configuration override applied to every run, as in 'mln train --set'.")
    args = parser.parse_args()

    storage = tempfile.mkdtemp(prefix="mln-bench-")
    config = load_config(None, [
        *args.overrides, f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
        f"train.log_every={args.steps}", f"cluster.num_workers={args.workers}", f"cluster.storage_path={storage}",
    ])
    print(f"machine: {machine()}")
    print(f"config: {args.steps} meta-steps of {config.train.tasks_per_step} tasks, {config.inner.steps} inner steps, "
          f"{args.workers} Ray workers, {config.cluster.generators} generators; overrides: {args.overrides or 'none'}")

    # The in-process rate is taken before and after the Ray runs, and the better one kept,
    # so that a burst of load from other jobs on a shared machine does not decide the ratio.
    local_before = in_process_rate(config)

    from cluster.local_cluster import ray_session
    from cluster.trainer import required_cpus

    try:
        with ray_session(None, num_cpus=max(required_cpus(config), os.cpu_count() or 1)):
            remote, fit_s, records = ray_rate(config)
            first_s, window_s, batch_bytes = window_stream(config, config.cluster.window)
            queue_first_s, queue_s = queue_stream(config, config.cluster.window)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    local_after = in_process_rate(config)
    local = max(local_before, local_after)

    # 1. Meta-steps per second.
    print(f"\n{'path':>22} {'meta-steps/s':>12} {'tasks/s':>8}")
    per_step = config.train.tasks_per_step
    print(f"{'in-process':>22} {local:>12.2f} {local * per_step:>8.1f}   "
          f"(best of {local_before:.2f} before and {local_after:.2f} after the Ray runs)")
    print(f"{f'Ray, {args.workers} workers':>22} {remote:>12.2f} {remote * per_step:>8.1f}")
    print(f"Ray/in-process meta-steps per second: x{remote / local:.2f}; "
          f"one Ray Train fit took {fit_s:.1f} s in all, {fit_s - args.steps / remote:.1f} s of it outside the steps")
    wait = statistics.median(r["perf/task_wait_s"] for r in records[1:])
    reduce = statistics.median(r["perf/allreduce_s"] for r in records[1:])
    step = statistics.median(r["perf/step_s"] for r in records[1:])
    print(f"median per step on rank 0: {step * 1e3:.1f} ms, of which waiting for tasks {wait * 1e3:.2f} ms "
          f"and all-reduce {reduce * 1e3:.2f} ms")

    # 2. Generator throughput against consumption, and the queue alternative.
    generated = STREAM_BATCHES * per_step / window_s
    print(f"\none generator, window of {config.cluster.window}: first batch {first_s * 1e3:.0f} ms, "
          f"{STREAM_BATCHES} batches in {window_s:.2f} s = {generated:.0f} tasks/s; "
          f"the trainers consumed {remote * per_step:.0f} tasks/s (x{generated / (remote * per_step):.1f} headroom)")
    print(f"ray.util.queue.Queue of {config.cluster.window}: first batch {queue_first_s * 1e3:.0f} ms, "
          f"{STREAM_BATCHES} batches in {queue_s:.2f} s (x{queue_s / window_s:.1f} the window's time)")

    # 3. Bytes per meta-step.
    numel = MetaTrainer(config).layout.numel
    reduce_bytes = (numel + 3) * 4
    workers = args.workers
    ring_bytes = 2 * (workers - 1) / workers * reduce_bytes
    print(f"\nbytes per meta-step: task batches {batch_bytes * 1e-3:.0f} kB in all (pickled, test split dropped); "
          f"all-reduce of {numel + 3} float32 = {reduce_bytes} B, ring traffic {ring_bytes:.0f} B sent per rank")


if __name__ == "__main__":
    main()
