"""Which meta-gradient estimator reaches the better held-out result in equal time?

Meta-trains once with each estimator for the same wall-clock budget, then
trains linear classifiers on held-out generated linear tasks with each
learned loss (every loss at inner.lr for inner.steps, the protocol of Hai et al., arXiv 2111.10583) and prints their
test accuracy beside cross-entropy's, with the ratio of steps per second.
Run: python -m benchmarks.estimators --seconds 240
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine
from jobs.config_io import load_config
from mln_core import evaluation
from mln_core.meta_train import MetaTrainer
from mln_core.stats import mean_ci
from mln_core.tasks import generate_tasks

ESTIMATORS = {"backprop": ["estimator.kind=backprop"], "es": ["estimator.kind=es"]}


def train_for(config, seconds: float) -> tuple[MetaTrainer, float]:
    trainer = MetaTrainer(config)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and trainer.step < config.train.steps:
        trainer.train_step(trainer.generate_my_tasks())
    return trainer, time.perf_counter() - start


def held_out_accuracy(config, trainer: MetaTrainer | None, tasks) -> torch.Tensor:
    loss = "ce" if trainer is None else "mln"
    result = evaluation.evaluate_chunk(
        tasks, config.inner, loss, [config.inner.lr], steps=config.inner.steps, curve_points=1,
        net=None if trainer is None else trainer.loss_net(),
    )
    return result.test_accuracy[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="Meta-training wall time per estimator.")
    parser.add_argument("--tasks", type=int, default=256, help="Held-out linear tasks.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Configuration override applied to both runs, as in 'mln train --set'.")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"budget: {args.seconds:.0f} s of meta-training per estimator; overrides: {args.overrides or 'none'}")
    base = load_config(None, [*args.overrides, "train.steps=10000000"])
    tasks = generate_tasks(base.tasks, base.eval.seed, range(args.tasks))
    ce_mean, ce_half = mean_ci(held_out_accuracy(base, None, tasks))
    print(f"{'estimator':>10} {'meta-steps':>10} {'steps/s':>8} {'tasks/s':>8} {'held-out acc (95% CI)':>24}")
    print(f"{'CE':>10} {'-':>10} {'-':>8} {'-':>8} {100 * ce_mean:>15.2f} ± {100 * ce_half:.2f}")

    results = {}
    for name, overrides in ESTIMATORS.items():
        config = load_config(None, [*args.overrides, "train.steps=10000000", *overrides])
        trainer, elapsed = train_for(config, args.seconds)
        mean, half = mean_ci(held_out_accuracy(config, trainer, tasks))
        rate = trainer.step / elapsed
        results[name] = (mean, rate)
        print(f"{name:>10} {trainer.step:>10} {rate:>8.2f} {rate * config.train.tasks_per_step:>8.1f} "
              f"{100 * mean:>15.2f} ± {100 * half:.2f}")

    (bp_acc, bp_rate), (es_acc, es_rate) = results["backprop"], results["es"]
    print(f"backprop/es: meta-steps per second x{bp_rate / es_rate:.1f}, "
          f"held-out accuracy difference {100 * (bp_acc - es_acc):+.2f} points")


if __name__ == "__main__":
    main()
