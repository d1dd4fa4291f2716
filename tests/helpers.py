"""Small configurations shared by the tests."""

from __future__ import annotations

from jobs.config_io import load_config
from mln_core.config import Config

TINY = (
    "loss_net.hidden_width=8",
    "tasks.num_features=[2,6]",
    "tasks.num_classes=[2,4]",
    "tasks.train_size=16",
    "tasks.val_size=16",
    "tasks.test_size=32",
    "inner.steps=4",
    "inner.lr=0.5",
    "train.tasks_per_step=4",
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.log_every=2",
)


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])
