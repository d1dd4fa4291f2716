"""Problems a new user hits, each of which must end in a clear message rather than a traceback."""

import os
import stat

import pytest
import torch

from jobs.checkpoint import CheckpointError, load_checkpoint, restore_trainer
from jobs.cli import main
from jobs.local import CHECKPOINT_NAME, run_local
from mln_core.config import LossNetConfig
from mln_core.estimators import MetaGradient
from mln_core.loss_net import MetaLoss, MetaLossNet
from mln_core.meta_train import MetaTrainer, NonFiniteMetaGradientError
from tests.helpers import tiny_config


def test_adam_inner_optimizer_trains_on_padded_tasks():
    trainer = MetaTrainer(tiny_config("inner.optimizer=adam", "inner.lr=0.05"))
    before = trainer.meta_params.detach().clone()
    metrics = trainer.train_step(trainer.generate_my_tasks())
    assert metrics["meta/skipped_nonfinite"] == 0.0
    assert not torch.equal(trainer.meta_params.detach(), before)


def test_repeated_nonfinite_steps_end_run():
    trainer = MetaTrainer(tiny_config())
    nan_gradient = MetaGradient(torch.full_like(trainer.meta_params, float("nan")), 0.5, {})
    trainer.estimator.estimate = lambda *args, **kwargs: nan_gradient
    with pytest.raises(NonFiniteMetaGradientError, match="non-finite for 10 steps"):
        for _ in range(10):
            trainer.train_step(trainer.generate_my_tasks())


def test_resume_may_extend_steps(tmp_path):
    run_local(tiny_config("train.steps=2"), tmp_path)
    extended = run_local(tiny_config("train.steps=4", "train.log_every=1"), tmp_path)
    straight = run_local(tiny_config("train.steps=4"), tmp_path / "straight")
    assert extended.step == 4
    assert torch.equal(extended.meta_params, straight.meta_params)


def test_resume_error_names_differing_key(tmp_path):
    run_local(tiny_config("train.steps=2"), tmp_path)
    with pytest.raises(CheckpointError, match=r"inner.lr: 0.5 in the checkpoint, 0.9 now"):
        restore_trainer(MetaTrainer(tiny_config("train.steps=2", "inner.lr=0.9")), tmp_path / CHECKPOINT_NAME)


def test_checkpoint_folder_named(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_nan_weights_named(tmp_path):
    run_local(tiny_config("train.steps=1"), tmp_path)
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    payload["trainer"]["meta_params"][0] = float("nan")
    torch.save(payload, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(tmp_path / CHECKPOINT_NAME)


def test_text_file_as_checkpoint(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  steps: 3\n")
    with pytest.raises(CheckpointError, match="corrupted, truncated or not a checkpoint") as caught:
        load_checkpoint(tmp_path / "c.yaml")
    assert "weights_only" not in str(caught.value)


def test_written_files_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        run_local(tiny_config("train.steps=1"), tmp_path)
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / CHECKPOINT_NAME).stat().st_mode)
    assert mode == 0o644


def test_meta_loss_rejects_out_of_range_targets():
    loss_fn = MetaLoss(MetaLossNet(LossNetConfig()))
    with pytest.raises(ValueError, match="outside"):
        loss_fn(torch.randn(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="at least 2"):
        loss_fn(torch.randn(3, 1), torch.tensor([0, 0, 0]))


def test_meta_loss_keeps_logits_dtype():
    loss_fn = MetaLoss(MetaLossNet(LossNetConfig()))
    loss = loss_fn(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 3, 1]))
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("override,message", [
    ("eval.lr_grid=[-1]", "positive learning rates"),
    ("eval.classifiers=[]", "eval.classifiers"),
    ("eval.val_fraction=0.6", "no training rows"),
    ("train.grad_clip=.inf", "finite"),
    ("inner.lr=.nan", "finite"),
])
def test_invalid_eval_and_float_settings(override, message, capsys):
    extra = ["--set", "eval.test_fraction=0.5"] if "val_fraction" in override else []
    assert main(["config", "--set", override, *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_csv_fails_before_training(tmp_path, capsys):
    code = main([
        "train", "--run-dir", str(tmp_path / "run"), "--set", "train.steps=1",
        "--set", f"eval.csv=[{{path: {tmp_path / 'absent.csv'}, target: y}}]",
    ])
    assert code == 2
    assert "absent.csv" in capsys.readouterr().err
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_run_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", "--run-dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_bad_csv_is_message_not_traceback(tmp_path, capsys):
    run_local(tiny_config("train.steps=1"), tmp_path)
    (tmp_path / "one.csv").write_text("a,label\n1,x\n2,x\n3,x\n4,x\n")
    code = main(["evaluate", "--checkpoint", str(tmp_path / CHECKPOINT_NAME), "--csv", str(tmp_path / "one.csv"),
                 "--target", "label", "--set", "eval.datasets=[]"])
    assert code == 2
    assert capsys.readouterr().err.startswith("mln: error:")


def test_config_from_checkpoint(tmp_path, capsys):
    run_local(tiny_config("train.steps=1"), tmp_path)
    assert main(["config", "--checkpoint", str(tmp_path / CHECKPOINT_NAME)]) == 0
    assert "hidden_width: 8" in capsys.readouterr().out


def test_verbose_after_command_accepted(capsys):
    assert main(["config", "-v", "--set", "train.steps=3"]) == 0
