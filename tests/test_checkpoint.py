import json
import pathlib

import pytest
import torch

from jobs.checkpoint import CheckpointError, load_checkpoint, load_meta_loss, save_checkpoint
from jobs.local import CHECKPOINT_NAME, METRICS_NAME, run_local
from jobs.run_log import MetricsLog
from mln_core.meta_train import MetaTrainer
from tests.helpers import tiny_config


def test_round_trip(tmp_path):
    trainer = MetaTrainer(tiny_config())
    trainer.train_step(trainer.generate_my_tasks())
    save_checkpoint(tmp_path / "c.pt", trainer, [{"meta/step": 0.0}])
    config, state, metrics = load_checkpoint(tmp_path / "c.pt")
    assert config == trainer.config
    assert state["step"] == 1
    assert torch.equal(state["meta_params"], trainer.meta_params.detach())
    assert metrics == [{"meta/step": 0.0}]


def test_save_leaves_no_temporary_files(tmp_path):
    trainer = MetaTrainer(tiny_config())
    save_checkpoint(tmp_path / "c.pt", trainer, [])
    save_checkpoint(tmp_path / "c.pt", trainer, [])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_truncated_checkpoint(tmp_path):
    trainer = MetaTrainer(tiny_config())
    save_checkpoint(tmp_path / "c.pt", trainer, [])
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted, truncated"):
        load_checkpoint(tmp_path / "c.pt")


def test_garbage_file(tmp_path):
    (tmp_path / "c.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupted, truncated"):
        load_checkpoint(tmp_path / "c.pt")


class _TouchOnLoad:
    """Unpickling this would create a file: a stand-in for code smuggled into a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_not_run(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"format": "mln-checkpoint", "obj": _TouchOnLoad(marker)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="corrupted, truncated"):
        load_checkpoint(tmp_path / "c.pt")
    assert not marker.exists()


def test_foreign_tensor_file(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not an MLN checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def _payload(tmp_path):
    trainer = MetaTrainer(tiny_config())
    save_checkpoint(tmp_path / "c.pt", trainer, [])
    return torch.load(tmp_path / "c.pt", weights_only=True)


def test_future_version(tmp_path):
    payload = _payload(tmp_path)
    payload["version"] = 99
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "c.pt")


def test_weights_not_matching_config(tmp_path):
    payload = _payload(tmp_path)
    payload["trainer"]["meta_params"] = torch.zeros(5)
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "c.pt")


def test_invalid_stored_config(tmp_path):
    payload = _payload(tmp_path)
    config = json.loads(payload["config_json"])
    config["train"]["steps"] = -1
    payload["config_json"] = json.dumps(config)
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="train.steps"):
        load_checkpoint(tmp_path / "c.pt")


def test_resume_equals_uninterrupted(tmp_path):
    config = tiny_config("train.steps=7", "train.checkpoint_every=3")
    straight = run_local(config, tmp_path / "straight")

    # Crash after 5 steps: the checkpoint is from step 3, so steps 4-5 are redone.
    interrupted = run_local(config, tmp_path / "resumed", stop_after=5)
    assert interrupted.step == 5
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)[1]["step"] == 3
    resumed = run_local(config, tmp_path / "resumed")

    assert torch.equal(resumed.meta_params, straight.meta_params)
    steps = [r["meta/step"] for r in MetricsLog(tmp_path / "resumed" / METRICS_NAME).read()]
    assert steps == list(range(7))


def test_resume_with_other_config_rejected(tmp_path):
    run_local(tiny_config("train.steps=2"), tmp_path)
    with pytest.raises(CheckpointError, match="settings differ"):
        run_local(tiny_config("train.steps=2", "inner.lr=0.9"), tmp_path)


def test_meta_loss_from_checkpoint_trains_classifier(tmp_path):
    trainer = run_local(tiny_config("train.steps=3"), tmp_path)
    loss_fn = load_meta_loss(tmp_path / CHECKPOINT_NAME)
    logits = torch.randn(8, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = loss_fn(logits, target)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert not any(p.requires_grad for p in loss_fn.parameters())
    expected = trainer.loss_net()(torch.softmax(logits, -1), torch.nn.functional.one_hot(target, 3).float())
    torch.testing.assert_close(loss, expected.mean())
    assert load_meta_loss(tmp_path / CHECKPOINT_NAME, reduction="none")(logits, target).shape == (8,)
    torch.testing.assert_close(load_meta_loss(tmp_path / CHECKPOINT_NAME, reduction="sum")(logits, target), expected.sum())


def test_meta_loss_rejects_bad_input(tmp_path):
    run_local(tiny_config("train.steps=1"), tmp_path)
    loss_fn = load_meta_loss(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="logits"):
        loss_fn(torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="class indices"):
        loss_fn(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        load_meta_loss(tmp_path / CHECKPOINT_NAME, reduction="avg")
