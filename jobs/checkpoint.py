"""Checkpoint files: one ``torch.save`` archive, written atomically, read without unpickling objects.

The archive holds only tensors, numbers, strings, lists and dicts, so
``torch.load(weights_only=True)`` reads it; the configuration and the metrics
are stored as JSON strings and validated on load.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from jobs.config_io import ConfigError, config_from_dict
from mln_core.config import Config
from mln_core.loss_net import MetaLoss, MetaLossNet, ParamLayout
from mln_core.meta_train import MetaTrainer, init_loss_net

FORMAT = "mln-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, truncated or incompatible."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def checkpoint_payload(trainer: MetaTrainer, metrics: list[dict]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config_json": trainer.config.model_dump_json(),
        "trainer": trainer.state_dict(),
        "rng": {"seed": trainer.config.train.seed, "step": trainer.step, "torch_cpu": torch.get_rng_state()},
        "metrics_json": json.dumps(metrics),
    }


def save_checkpoint(path: str | Path, trainer: MetaTrainer, metrics: list[dict]) -> None:
    """Write the trainer's state, its config and ``metrics`` to ``path`` atomically."""
    path = Path(path)
    with tempfile.SpooledTemporaryFile() as buffer:
        torch.save(checkpoint_payload(trainer, metrics), buffer)
        buffer.seek(0)
        atomic_write_bytes(path, buffer.read())


def load_checkpoint(path: str | Path) -> tuple[Config, dict, list[dict]]:
    """Read and validate a checkpoint; return (config, trainer state, metrics history)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass the checkpoint.pt written by 'mln train')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupted, truncated or not a checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); use another checkpoint or train again"
        ) from None

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an MLN checkpoint (missing format marker {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this release reads version {VERSION}"
        )
    try:
        config = config_from_dict(json.loads(payload["config_json"]))
        metrics = json.loads(payload["metrics_json"])
        state = payload["trainer"]
        flat = state["meta_params"]
        step = int(state["step"])
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {path} is incompatible or damaged: {error}") from None

    expected = sum(p.numel() for p in init_loss_net(config).parameters())
    if not isinstance(flat, torch.Tensor) or flat.shape != (expected,) or not torch.isfinite(flat).all():
        raise CheckpointError(
            f"checkpoint {path} holds MLN weights of shape {getattr(flat, 'shape', None)}, "
            f"expected ({expected},) finite values for its loss_net config"
        )
    if step < 0 or not isinstance(metrics, list):
        raise CheckpointError(f"checkpoint {path} has an invalid step {step} or metrics history")
    return config, state, metrics


def restore_trainer(trainer: MetaTrainer, path: str | Path) -> list[dict]:
    """Load ``path`` into ``trainer``; the run's config must match the checkpoint's. Return the metrics history."""
    config, state, metrics = load_checkpoint(path)
    if config.model_dump(exclude={"eval"}) != trainer.config.model_dump(exclude={"eval"}):
        raise CheckpointError(
            f"checkpoint {path} was written with a different configuration; resume with the same config "
            "or start a new run directory"
        )
    trainer.load_state_dict(state)
    return metrics


def loss_net_from_state(config: Config, state: dict) -> MetaLossNet:
    net = init_loss_net(config)
    ParamLayout(net).load_into(net, state["meta_params"])
    return net.eval()


def load_meta_loss(path: str | Path, reduction: str = "mean") -> MetaLoss:
    """Load a trained MLN as a drop-in loss: ``loss_fn(logits, target)`` like ``nn.CrossEntropyLoss``."""
    config, state, _ = load_checkpoint(path)
    return MetaLoss(loss_net_from_state(config, state), reduction=reduction)
