"""Inner-loop throughput: the vmap-batched loop against a Python loop over tasks.

Prints task-steps per second (tasks x inner steps / wall time) of both at each
task count and their ratio, plus task-generation throughput, measured in this
run on this machine. Run: python -m benchmarks.inner_loop
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import best_time, machine
from mln_core import losses
from jobs.config_io import load_config
from mln_core.inner import unroll
from mln_core.meta_train import init_loss_net
from mln_core.tasks import generate_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 16, 64, 256], help="Task counts T.")
    parser.add_argument("--steps", type=int, default=None, help="Inner steps K (default: the config's).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Configuration override, as in 'mln train --set'.")
    args = parser.parse_args()

    config = load_config(None, args.overrides)
    steps = args.steps or config.inner.steps
    net = init_loss_net(config)
    meta = {k: v.detach() for k, v in net.named_parameters()}
    loss_fn = losses.meta_loss(net)
    print(f"machine: {machine()}")
    print(f"config overrides {args.overrides or 'none'}, inner loop of {steps} SGD steps with the MLN as loss, no autograd graph")
    print(f"{'tasks':>6} {'batched task-steps/s':>22} {'per-task task-steps/s':>22} {'ratio':>7}")

    for count in args.tasks:
        tasks = generate_tasks(config.tasks, 0, range(count))
        singles = [tasks.select(slice(t, t + 1)) for t in range(count)]

        def batched():
            with torch.no_grad():
                unroll(tasks, config.inner, loss_fn, meta, steps=steps)

        def per_task():
            with torch.no_grad():
                for single in singles:
                    unroll(single, config.inner, loss_fn, meta, steps=steps)

        batched_rate = count * steps / best_time(batched)
        per_task_rate = count * steps / best_time(per_task, repeats=1 if count > 16 else 3)
        print(f"{count:>6} {batched_rate:>22.0f} {per_task_rate:>22.0f} {batched_rate / per_task_rate:>7.1f}")

    print()
    print(f"{'tasks':>6} {'generated tasks/s':>18} {'one-at-a-time tasks/s':>22} {'ratio':>7}")
    for count in args.tasks:
        batched_rate = count / best_time(lambda: generate_tasks(config.tasks, 0, range(count)))
        one_rate = count / best_time(lambda: [generate_tasks(config.tasks, 0, [i]) for i in range(count)], repeats=1)
        print(f"{count:>6} {batched_rate:>18.0f} {one_rate:>22.0f} {batched_rate / one_rate:>7.1f}")


if __name__ == "__main__":
    main()
