"""Entry point of a ``ray job submit`` meta-training job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.train --run-dir /shared/runs/exp1 --set train.steps=1000

The job joins the cluster it runs in (``ray.init(address="auto")``), runs
distributed meta-training and writes ``checkpoint.pt``, ``metrics.jsonl`` and
``training_curves.png`` to ``--run-dir``. Submitting again with the same run
name (by default derived from ``--run-dir``) resumes from the latest
checkpoint in ``cluster.storage_path``. Pass absolute paths: a job's current
directory is a copy of its working directory that Ray deletes later.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.trainer import default_run_name, run_on_ray
from jobs.config_io import ConfigError, load_config

logger = logging.getLogger("mln.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description="Meta-train on the Ray cluster this job runs in.")
    parser.add_argument("--run-dir", required=True, help="Folder for checkpoint.pt, metrics.jsonl and the curves.")
    parser.add_argument("--run-name", help="Ray Train run name; the same name resumes (default: from --run-dir).")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override one key, for example --set train.steps=100 (repeatable).")
    parser.add_argument("--trainer-label", metavar="ROLE",
                        help="Place training workers on nodes labelled role=ROLE (default: anywhere).")
    parser.add_argument("--address", default="auto",
                        help="Ray cluster to join (default: auto, the cluster that runs this job).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"jobs.train: error: {error}", file=sys.stderr)
        return 2

    run_dir = Path(args.run_dir).expanduser().resolve()
    run_name = args.run_name or default_run_name(run_dir)
    for name, path in (("--run-dir", args.run_dir), ("cluster.storage_path", config.cluster.storage_path)):
        if not Path(path).expanduser().is_absolute():
            logger.warning("%s=%s is relative, so it resolves inside this job's working directory; "
                           "pass an absolute path to keep the run after the job ends", name, path)
    logger.info("run %s: output in %s", run_name, run_dir)

    final = run_on_ray(config, run_dir, address=args.address, run_name=run_name, trainer_label=args.trainer_label)
    logger.info("finished at step %d with meta-objective %.4g",
                int(final.get("meta/step", -1)) + 1, final.get("meta/objective", float("nan")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
