"""Meta-train with a given configuration, then compare MLN, CE and MSE on held-out generated tasks.

The quick ablation tool behind the choices in docs/defaults.md: every number
there comes from a run of this script with the overrides it names.
Run: python -m benchmarks.heldout --set train.steps=300 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import machine
from jobs.config_io import load_config
from mln_core import evaluation
from mln_core.meta_train import MetaTrainer
from mln_core.tasks import generate_tasks

COLUMNS = ("mln", "ce", "mse", "ce_tuned", "mse_tuned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Configuration override, as in 'mln train --set'.")
    parser.add_argument("--tasks", type=int, default=64, help="Held-out tasks per family.")
    args = parser.parse_args()
    config = load_config(None, args.overrides)

    print(f"machine: {machine()}")
    print(f"overrides: {args.overrides or 'none'}")
    trainer = MetaTrainer(config)
    start = time.perf_counter()
    while trainer.step < config.train.steps:
        metrics = trainer.train_step(trainer.generate_my_tasks())
    elapsed = time.perf_counter() - start
    print(f"meta-trained {trainer.step} steps in {elapsed:.0f} s; last objective {metrics['meta/objective']:.4f}")

    net = trainer.loss_net()
    print(f"{'family':>8} {'classifier':>10} " + " ".join(f"{c:>10}" for c in COLUMNS) + "   (test accuracy %, lr)")
    for family in ("linear", "mlp", "poly"):
        tasks = generate_tasks(config.tasks.model_copy(update={"family": family}), config.eval.seed, range(args.tasks))
        for classifier in config.eval.classifiers:
            inner_config = config.inner.model_copy(update={"classifier": classifier})
            results = {
                loss: evaluation.evaluate_chunk(
                    tasks, inner_config, loss,
                    evaluation.candidate_lrs(loss, inner_config.lr, config.eval.lr_grid),
                    steps=config.eval.steps or inner_config.steps, curve_points=1, net=net,
                )
                for loss in evaluation.TRAINED_LOSSES
            }
            group = evaluation.select_group(results, inner_config.lr)
            cells = [f"{100 * group.losses[c].mean:5.1f}@{group.losses[c].lr:g}" for c in COLUMNS]
            print(f"{family:>8} {classifier:>10} " + " ".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
