"""Typed configuration for tasks, the loss network, the inner and outer loops.

Every model is frozen and rejects unknown keys, so a typo in a YAML file or a
``--set`` override fails loudly instead of being ignored. Defaults are chosen
so that ``mln train`` finishes on a 2-core laptop in minutes; the reasons for
each choice are given in ``docs/defaults.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)


class TaskConfig(FrozenModel):
    """Distribution of generated classification tasks."""

    family: Literal["linear", "mlp", "poly"] = Field(
        "linear", description="Teacher that labels the inputs: linear argmax, random MLP or quadratic polynomial."
    )
    num_features: tuple[int, int] = Field((2, 16), description="Inclusive range of the feature count D.")
    num_classes: tuple[int, int] = Field((2, 10), description="Inclusive range of the class count C.")
    train_size: int = Field(32, ge=2, le=100_000, description="Training samples per task.")
    val_size: int = Field(256, ge=2, le=100_000, description="Validation samples per task.")
    test_size: int = Field(1024, ge=2, le=100_000, description="Test samples per task.")
    label_noise: float = Field(
        0.0, ge=0.0, lt=1.0, description="Probability that a training label is replaced by a uniformly random class."
    )
    imbalance: float = Field(
        0.0, ge=0.0, le=10.0, description="Standard deviation of the teacher's class bias; 0 gives balanced classes."
    )
    teacher_width: int = Field(32, ge=1, le=4096, description="Hidden width of the random MLP teacher.")

    @model_validator(mode="after")
    def _check_ranges(self) -> TaskConfig:
        for name, (low, high), minimum in (
            ("num_features", self.num_features, 1),
            ("num_classes", self.num_classes, 2),
        ):
            if low < minimum or high < low or high > 4096:
                raise ValueError(
                    f"{name}={list((low, high))} is invalid: expected [low, high] with {minimum} <= low <= high <= 4096"
                )
        return self


class LossNetConfig(FrozenModel):
    """Shape of the meta-loss network, applied to each (probability, target) pair."""

    hidden_width: int = Field(16, ge=1, le=1024, description="Width of each hidden layer.")
    depth: int = Field(2, ge=1, le=8, description="Number of hidden layers.")
    activation: Literal["tanh", "relu", "gelu", "softplus", "sigmoid"] = Field(
        "tanh", description="Hidden-layer activation."
    )


class InnerConfig(FrozenModel):
    """Classifier training on one task (the inner loop)."""

    classifier: Literal["linear", "mlp"] = Field("linear", description="Classifier trained on each task.")
    hidden_width: int = Field(32, ge=1, le=4096, description="Hidden width of the MLP classifier.")
    steps: int = Field(20, ge=1, le=10_000, description="Optimizer steps K per task.")
    optimizer: Literal["sgd", "momentum", "adam"] = Field("sgd", description="Functional inner optimizer.")
    lr: float = Field(0.1, gt=0.0, le=100.0, description="Inner learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum coefficient (optimizer=momentum).")
    batch_size: int | None = Field(
        None, ge=1, description="Minibatch size per inner step; null trains full-batch."
    )


class ESConfig(FrozenModel):
    """Antithetic evolution strategy."""

    population: int = Field(32, ge=2, le=65_536, description="Population size P; must be even (antithetic pairs).")
    sigma: float = Field(0.02, gt=0.0, le=10.0, description="Standard deviation of the parameter perturbation.")
    fitness_shaping: Literal["centered_ranks", "none"] = Field(
        "centered_ranks", description="Transform of the population's objectives before weighting the noise."
    )
    split: Literal["tasks", "population"] = Field(
        "tasks", description="What distributed workers divide: the task batch or the antithetic pairs."
    )

    @model_validator(mode="after")
    def _check_even(self) -> ESConfig:
        if self.population % 2:
            raise ValueError(f"es.population={self.population} is invalid: it must be even (antithetic pairs)")
        return self


class BackpropConfig(FrozenModel):
    """Backpropagation through the unrolled inner loop."""

    truncation: int | None = Field(
        None, ge=1, description="Backpropagate through only the last this many inner steps; null means all."
    )


class EstimatorConfig(FrozenModel):
    """Meta-gradient estimator and the meta-objective it minimises."""

    kind: Literal["es", "backprop"] = Field("backprop", description="Meta-gradient estimator.")
    objective: Literal["teacher_cosine", "val_ce", "val_error"] = Field(
        "teacher_cosine", description="Meta-objective on each task, lower is better."
    )
    es: ESConfig = ESConfig()
    backprop: BackpropConfig = BackpropConfig()

    @model_validator(mode="after")
    def _check_differentiable(self) -> EstimatorConfig:
        if self.kind == "backprop" and self.objective == "val_error":
            raise ValueError(
                "estimator.objective=val_error is not differentiable: use estimator.kind=es "
                "or estimator.objective=val_ce"
            )
        return self


class TrainConfig(FrozenModel):
    """Outer loop: Adam on the loss-network parameters."""

    steps: int = Field(1000, ge=1, le=10_000_000, description="Meta-steps.")
    tasks_per_step: int = Field(32, ge=1, le=1_000_000, description="Tasks T in each meta-step (all workers together).")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="Adam learning rate on the loss network.")
    grad_clip: float = Field(1.0, gt=0.0, description="Maximum L2 norm of the meta-gradient.")
    seed: int = Field(0, ge=0, lt=2**31, description="Seed of the run: tasks, initial weights and ES noise.")
    checkpoint_every: int = Field(100, ge=1, description="Write a checkpoint every this many meta-steps.")
    log_every: int = Field(50, ge=1, description="Log one line every this many meta-steps.")


class CsvConfig(FrozenModel):
    """A user's CSV table to evaluate on."""

    path: str = Field(description="Path of the CSV file (header row required).")
    target: str = Field(description="Name of the target column.")
    drop: tuple[str, ...] = Field((), description="Columns to drop by name, such as row ids.")
    impute: Literal["mean", "median", "most_frequent"] | None = Field(
        None, description="Fill missing values with this statistic; null rejects tables with missing values."
    )


class EvalConfig(FrozenModel):
    """Held-out evaluation against cross-entropy and mean squared error."""

    seed: int = Field(
        1_000_003, ge=0, lt=2**31, description="Seed of the held-out tasks; must differ from train.seed."
    )
    linear_tasks: int = Field(64, ge=0, le=1_000_000, description="Held-out linear tasks.")
    nonlinear_tasks: int = Field(64, ge=0, le=1_000_000, description="Held-out tasks per nonlinear family.")
    datasets: tuple[Literal["iris", "wine", "breast_cancer", "digits"], ...] = Field(
        ("iris", "wine", "breast_cancer", "digits"), description="scikit-learn bundled datasets."
    )
    splits: int = Field(10, ge=2, le=1000, description="Random train/validation/test splits per dataset.")
    lr_grid: tuple[float, ...] = Field(
        (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), description="Learning rates tried for the tuned baselines."
    )
    steps: int | None = Field(None, ge=1, description="Inner steps at evaluation; null uses inner.steps.")
    classifiers: tuple[Literal["linear", "mlp"], ...] = Field(
        ("linear", "mlp"), min_length=1, description="Classifiers trained with each loss."
    )
    csv: tuple[CsvConfig, ...] = Field((), description="User CSV tables to evaluate on.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of a real table's rows used for validation.")
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="Share of a real table's rows used for testing.")
    curve_points: int = Field(10, ge=1, le=1000, description="Points on each learning curve.")

    @model_validator(mode="after")
    def _check_eval(self) -> EvalConfig:
        if not self.lr_grid or min(self.lr_grid) <= 0:
            raise ValueError(f"eval.lr_grid={list(self.lr_grid)} is invalid: give one or more positive learning rates")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"eval.val_fraction={self.val_fraction} plus eval.test_fraction={self.test_fraction} is at least 1, "
                "which leaves no training rows: lower one of them"
            )
        return self


class ClusterConfig(FrozenModel):
    """Ray execution of meta-training."""

    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers sharing each meta-step.")
    use_gpu: bool = Field(False, description="Give each training worker one GPU and use NCCL.")
    generators: int = Field(1, ge=1, le=4096, description="Task-generator actors.")
    window: int = Field(4, ge=1, le=1024, description="Task batches in flight per training worker (backpressure).")
    generator_label: str | None = Field(
        None, description="Node label value of role= that generator actors are placed on; null places them anywhere."
    )
    trainer_label: str | None = Field(
        None, description="Node label value of role= that training workers are placed on; null places them anywhere."
    )
    storage_path: str = Field("runs/ray", description="Ray Train storage path; shared storage on multi-node clusters.")


class Config(FrozenModel):
    """Everything one run needs; saved with every checkpoint and report."""

    tasks: TaskConfig = TaskConfig()
    loss_net: LossNetConfig = LossNetConfig()
    inner: InnerConfig = InnerConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        if self.estimator.objective == "teacher_cosine" and self.tasks.family != "linear":
            raise ValueError(
                f"estimator.objective=teacher_cosine needs a linear teacher but tasks.family={self.tasks.family}: "
                "use estimator.objective=val_ce or val_error"
            )
        if self.estimator.objective == "teacher_cosine" and self.inner.classifier != "linear":
            raise ValueError(
                "estimator.objective=teacher_cosine compares a linear classifier with the teacher but "
                f"inner.classifier={self.inner.classifier}: use estimator.objective=val_ce or val_error"
            )
        if self.inner.batch_size is not None and self.inner.batch_size > self.tasks.train_size:
            raise ValueError(
                f"inner.batch_size={self.inner.batch_size} exceeds tasks.train_size={self.tasks.train_size}: "
                "lower it or set it to null for full-batch training"
            )
        if self.eval.seed == self.train.seed:
            raise ValueError(
                f"eval.seed equals train.seed ({self.train.seed}): held-out tasks must use a different seed"
            )
        truncation = self.estimator.backprop.truncation
        if truncation is not None and truncation > self.inner.steps:
            raise ValueError(
                f"estimator.backprop.truncation={truncation} exceeds inner.steps={self.inner.steps}: "
                "lower it or set it to null"
            )
        return self
