"""Held-out evaluation spread over a Ray cluster with Ray Data.

Evaluation is finite, so Ray Data fits it (unlike the endless training
stream). The work is the local evaluation's, cut into independent items:
one per (classifier, group, chunk of tasks, loss). The driver builds the
groups and their chunks exactly as ``jobs.evaluate`` does, puts each chunk in
the object store once, and a Ray Data ``map`` runs ``evaluate_chunk`` on each
item on the cluster's CPUs. The chunk results of each group are joined in
task order and go through the same ``select_group`` step, so the report's
numbers are those of ``jobs.evaluate.evaluate`` on the same inputs.
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import torch

from jobs import evaluate as local_evaluation
from mln_core.config import Config
from mln_core.evaluation import TRAINED_LOSSES, candidate_lrs, concat_chunks, evaluate_chunk, select_group
from mln_core.loss_net import MetaLossNet

logger = logging.getLogger(__name__)

# Logical CPUs per evaluation item: one inner-loop batch keeps one core busy.
ITEM_NUM_CPUS = 1


def evaluate_on_ray(config: Config, net: MetaLossNet, out_dir: str | Path, address: str | None = None) -> dict:
    """Evaluate ``net`` like ``jobs.evaluate.evaluate`` but with the training runs spread over Ray.

    ``address`` None or "local" starts a single-node cluster on 127.0.0.1 for
    this call; "auto" or "HOST:PORT" joins a running cluster. Writes the same
    report files to ``out_dir`` and returns the content of ``report.json``.
    """
    from cluster.local_cluster import ray_session

    with ray_session(address):
        return _evaluate(config, net.cpu(), Path(out_dir))


def _evaluate(config: Config, net: MetaLossNet, out_dir: Path) -> dict:
    import ray
    import ray.data

    steps, groups = local_evaluation.plan_groups(config)

    # Each chunk goes to the object store once and is shared by every classifier and loss.
    # NOTE: the driver generates the held-out tasks; only their training is spread out.
    chunk_refs: list[list[ray.ObjectRef]] = [[ray.put(chunk) for chunk in group.chunks()] for group in groups]
    net_ref = ray.put(net)
    items = [
        {"classifier": classifier, "group": g, "chunk": c, "loss": loss}
        for classifier in config.eval.classifiers
        for g, refs in enumerate(chunk_refs)
        for c in range(len(refs))
        for loss in TRAINED_LOSSES
    ]
    logger.info(
        "evaluating %d groups x %d classifiers as %d Ray Data items, %d inner steps",
        len(groups), len(config.eval.classifiers), len(items), steps,
    )

    def evaluate_item(item: dict) -> dict:

        torch.set_num_threads(ITEM_NUM_CPUS)
        inner_config = config.inner.model_copy(update={"classifier": item["classifier"]})
        tasks = ray.get(chunk_refs[item["group"]][item["chunk"]])
        loss_net = ray.get(net_ref)
        result = evaluate_chunk(
            tasks,
            inner_config,
            item["loss"],
            candidate_lrs(item["loss"], inner_config.lr, config.eval.lr_grid),
            steps=steps,
            curve_points=config.eval.curve_points,
            net=loss_net,
            meta_params={name: value.detach() for name, value in loss_net.named_parameters()},
        )
        return {**item, "result": pickle.dumps(result)}

    started = time.perf_counter()
    rows = ray.data.from_items(items).map(evaluate_item, num_cpus=ITEM_NUM_CPUS).take_all()
    logger.info("evaluated %d items in %.1f s", len(rows), time.perf_counter() - started)

    # Join each group's chunks in task order, then the same selection step as the local evaluation.
    chunks: dict[tuple[str, int, str], dict[int, object]] = {}
    for row in rows:
        key = (row["classifier"], int(row["group"]), row["loss"])
        chunks.setdefault(key, {})[int(row["chunk"])] = pickle.loads(row["result"])
    results = {}
    for classifier in config.eval.classifiers:
        results[classifier] = {}
        for g, group in enumerate(groups):
            joined = {}
            for loss in TRAINED_LOSSES:
                by_index = chunks[(classifier, g, loss)]
                joined[loss] = concat_chunks([by_index[c] for c in sorted(by_index)])
            results[classifier][group.name] = select_group(joined, config.inner.lr, local_evaluation.CONFIDENCE)
    report = local_evaluation.write_report(
        config, net, groups, results, steps, torch.device("cpu"), out_dir, executor="ray"
    )
    logger.info("wrote %s to %s", ", ".join(local_evaluation.REPORT_FILES), out_dir)
    return report
