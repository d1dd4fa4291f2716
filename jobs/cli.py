"""The ``mln`` command: train, evaluate and inspect configurations."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.checkpoint import load_checkpoint, loss_net_from_state
from jobs.config_io import (
    ConfigError,
    config_from_dict,
    describe_fields,
    dump_config,
    load_config,
    load_config_tree,
)
from jobs.local import CHECKPOINT_NAME
from mln_core.config import Config
from mln_core.meta_train import NonFiniteMetaGradientError

logger = logging.getLogger("mln")

DEFAULT_RUN_DIR = "runs/default"


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    # Accept -v after the command too; SUPPRESS keeps a subcommand from resetting a -v given before it.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="Log debug messages and show tracebacks of errors.")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file (sections as in 'mln config').")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override one key, for example --set train.steps=100 (repeatable, applied after --config).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mln", description="Meta-learn a classification loss network.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Meta-train the loss network, then evaluate it.")
    _add_config_options(train)
    train.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"Output folder (default {DEFAULT_RUN_DIR}); "
                       "an existing checkpoint there is resumed.")
    train.add_argument("--no-eval", action="store_true", help="Skip the evaluation report after training.")
    train.add_argument(
        "--ray", metavar="local|ADDRESS",
        help="Run on Ray: 'local' starts a single-node cluster on 127.0.0.1 and stops it afterwards; "
        "an address (host:port or 'auto') joins an existing cluster. Omit to train in this process.",
    )

    evaluate = commands.add_parser("evaluate", help="Compare a trained loss network with CE and MSE.")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pt written by 'mln train'.")
    _add_config_options(evaluate)
    evaluate.add_argument("--out", help="Report folder (default: report/ beside the checkpoint).")
    evaluate.add_argument("--csv", metavar="FILE", help="Also evaluate on this CSV table.")
    evaluate.add_argument("--target", help="Target column of --csv.")
    evaluate.add_argument("--drop", action="append", default=[], metavar="COLUMN",
                          help="Column of --csv to drop, such as a row id (repeatable).")
    evaluate.add_argument("--impute", choices=["mean", "median", "most_frequent"],
                          help="Fill missing values in --csv with this statistic (default: reject them).")
    evaluate.add_argument("--ray", metavar="local|ADDRESS", help="Spread the evaluation over a Ray cluster.")

    config = commands.add_parser("config", help="Print the resolved configuration as YAML.")
    _add_config_options(config)
    config.add_argument("--describe", action="store_true", help="List every key with its type, default and meaning.")
    config.add_argument("--checkpoint", help="Print the configuration saved in this checkpoint instead.")
    return parser


def _evaluate_and_report(config: Config, net, out_dir: Path, ray_address: str | None) -> None:
    if ray_address is not None:
        from cluster.ray_eval import evaluate_on_ray

        evaluate_on_ray(config, net, out_dir, address=ray_address)
    else:
        from jobs.evaluate import evaluate

        evaluate(config, net, out_dir)
    logger.info("report written to %s", out_dir / "report.md")


def _check_csv_tables(config: Config) -> None:
    """Load every configured CSV table once, so a bad table fails before minutes of training."""
    from jobs.data import load_csv

    for table in config.eval.csv:
        load_csv(table)


def command_train(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file: pass a folder")
    if not args.no_eval:
        _check_csv_tables(config)
    if args.ray is not None:
        from cluster.trainer import run_on_ray

        run_on_ray(config, run_dir, address=None if args.ray == "local" else args.ray)
    else:
        from jobs.local import run_local

        run_local(config, run_dir)
    logger.info("checkpoint written to %s", run_dir / CHECKPOINT_NAME)
    if not args.no_eval:
        trained_config, state, _ = load_checkpoint(run_dir / CHECKPOINT_NAME)
        _evaluate_and_report(trained_config, loss_net_from_state(trained_config, state), run_dir / "report", None)


def command_evaluate(args: argparse.Namespace) -> None:
    checkpoint_config, state, _ = load_checkpoint(args.checkpoint)
    # The checkpoint's config is the base, so the MLN is built as it was trained.
    tree = load_config_tree(args.config, args.overrides, base=checkpoint_config.model_dump(mode="json"))
    if args.csv:
        if not args.target:
            raise ConfigError("--target is missing: --csv needs the name of the column that contains the class labels")
        csv = {"path": args.csv, "target": args.target, "drop": args.drop, "impute": args.impute}
        tree.setdefault("eval", {})
        tree["eval"]["csv"] = [*tree["eval"].get("csv", []), csv]
    elif args.target or args.drop or args.impute:
        raise ConfigError("--target, --drop and --impute describe a CSV table: pass it with --csv FILE")
    config = config_from_dict(tree)
    if config.loss_net != checkpoint_config.loss_net:
        raise ConfigError("loss_net settings cannot change at evaluation: they must match the checkpoint's")
    net = loss_net_from_state(checkpoint_config, state)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "report"
    _evaluate_and_report(config, net, out_dir, args.ray)


def command_config(args: argparse.Namespace) -> None:
    if args.checkpoint:
        print(dump_config(load_checkpoint(args.checkpoint)[0]), end="")
        return
    if args.describe:
        print("\n".join(describe_fields()))
        return
    print(dump_config(load_config(args.config, args.overrides)), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handlers = {"train": command_train, "evaluate": command_evaluate, "config": command_config}
    try:
        handlers[args.command](args)
    except (ValueError, OSError, NonFiniteMetaGradientError) as error:
        # ConfigError, CheckpointError and the data loaders' errors are ValueErrors with a full message.
        if args.verbose:
            raise
        print(f"mln: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun the same command to resume from the last checkpoint" if args.command == "train" else ""
        print(f"mln: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
