"""Per-step metrics: one log line every few steps, a JSONL file and PNG training curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from jobs.checkpoint import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

# Metrics shown in the one-line step log, in this order.
_LOG_KEYS = (
    "meta/objective",
    "inner/val_accuracy",
    "meta/grad_norm",
    "perf/tasks_per_s",
    "perf/task_wait_s",
    "perf/allreduce_s",
    "gen/buffer_depth",
)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per meta-step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A crash can leave a partial last line; everything before it is intact.
                logger.warning("ignoring unreadable line %d of %s", number, self.path)
        return records

    def keep_before(self, step: int) -> list[dict]:
        """Drop records of steps >= ``step`` (written after the checkpoint a run resumes from)."""
        earlier = [r for r in self.read() if r.get("meta/step", -1) < step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in earlier))
        return earlier

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def format_step(record: dict, total_steps: int) -> str:
    step = int(record["meta/step"]) + 1
    parts = [f"step {step}/{total_steps}"]
    for key in _LOG_KEYS:
        if key in record and record[key] is not None and math.isfinite(record[key]):
            parts.append(f"{key.split('/')[-1]}={record[key]:.4g}")
    if record.get("meta/skipped_nonfinite"):
        parts.append("SKIPPED non-finite meta-gradient")
    return " ".join(parts)


def plot_training_curves(records: list[dict], path: str | Path) -> None:
    """Write a PNG of meta-objective, inner accuracy, gradient norm and throughput against the meta-step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("meta/objective", "meta-objective"),
        ("inner/val_accuracy", "inner validation accuracy"),
        ("meta/grad_norm", "meta-gradient norm"),
        ("perf/tasks_per_s", "tasks per second"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    steps = [r["meta/step"] for r in records]
    for axis, (key, title) in zip(axes, panels):
        values = [r.get(key, math.nan) for r in records]
        axis.plot(steps, values, linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("meta-step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())
