"""Checkpoint files: one ``torch.save`` archive, written atomically, read without unpickling objects.

The archive contains only tensors, numbers, strings, lists and dicts, so
``torch.load(weights_only=True)`` reads it. The configuration and the metrics
are stored as JSON strings and validated on load.
"""

from __future__ import annotations

import json
import os
import tempfile
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


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0600; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_process_umask())
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
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint: pass {path / 'checkpoint.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass the checkpoint.pt written by 'mln train')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse an untrusted file means it is unusable
        # torch's own message suggests weights_only=False, which would run code from the file: leave it out.
        raise CheckpointError(
            f"checkpoint {path} is corrupted, truncated or not a checkpoint ({type(error).__name__}); "
            "use another checkpoint or train again"
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
        step = state["step"]
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} is damaged: the entry {error} is missing") from None
    except (TypeError, json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {path} is incompatible or damaged: {error}") from None

    expected = sum(p.numel() for p in init_loss_net(config).parameters())
    if not isinstance(flat, torch.Tensor) or tuple(flat.shape) != (expected,):
        raise CheckpointError(
            f"checkpoint {path} has MLN weights of shape {tuple(getattr(flat, 'shape', ()))}, "
            f"but its loss_net config needs ({expected},)"
        )
    if not torch.isfinite(flat).all():
        raise CheckpointError(f"checkpoint {path} has NaN or infinite MLN weights; use an earlier checkpoint")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid step {step!r}: expected a non-negative integer")
    if not isinstance(metrics, list):
        raise CheckpointError(f"checkpoint {path} has a metrics history of type {type(metrics).__name__}, not a list")
    return config, state, metrics


# Settings that do not change the trajectory of meta-training, so a resumed run may change them.
# train.steps may grow to extend a finished run.
_RESUMABLE_CHANGES = {"eval", "cluster", "train.steps", "train.checkpoint_every", "train.log_every"}


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def trajectory_differences(old: Config, new: Config) -> list[str]:
    """List the settings that differ between two configs and would change meta-training's result."""
    before, after = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return [
        f"{key}: {before[key]!r} in the checkpoint, {after[key]!r} now"
        for key in before
        if before[key] != after[key] and key.split(".")[0] not in _RESUMABLE_CHANGES and key not in _RESUMABLE_CHANGES
    ]


def restore_trainer(trainer: MetaTrainer, path: str | Path) -> list[dict]:
    """Load ``path`` into ``trainer`` and return the metrics history.

    Raises CheckpointError when the run's config differs from the checkpoint's
    in a setting that changes the result (anything but eval, cluster and the
    step counts and intervals of ``train``).
    """
    config, state, metrics = load_checkpoint(path)
    differences = trajectory_differences(config, trainer.config)
    if differences:
        raise CheckpointError(
            f"cannot resume from {path}: these settings differ from the checkpoint's ("
            + "; ".join(differences)
            + "). Use the checkpoint's values (see 'mln config --checkpoint') or a new --run-dir"
        )
    if state["step"] > trainer.config.train.steps:
        raise CheckpointError(
            f"checkpoint {path} is at step {state['step']}, beyond train.steps={trainer.config.train.steps}: "
            "raise train.steps or use a new --run-dir"
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
