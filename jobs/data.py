"""Real tables for evaluation: scikit-learn's bundled datasets and users' CSV files.

A ``Table`` is a whole table after encoding (labels as 0..C-1, string features
one-hot) but before standardization. ``table_tasks`` draws T random stratified
train/validation/test splits of it and stacks them into one ``TaskBatch``, so
real data runs through the same batched inner loop as generated tasks.
Standardization happens per split with the training rows' statistics, so no
validation or test row influences the scaling of its own split.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn import datasets as sklearn_datasets

from mln_core.config import CsvConfig
from mln_core.tasks import TaskBatch

logger = logging.getLogger(__name__)

SKLEARN_DATASETS = ("iris", "wine", "breast_cancer", "digits")

# Cells that count as missing values, compared after stripping whitespace.
# "?" is the missing-value marker of many UCI repository files.
MISSING_MARKERS = ("", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "?")

# Every class needs one row in each of the training, validation and test splits.
MIN_ROWS_PER_CLASS = 3

# A string column with more distinct values than this share of its rows is
# probably an identifier or free text, and one-hot encoding it adds a column
# per row, so load_csv logs a warning.
_HIGH_CARDINALITY_SHARE = 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
    """A classification table of N rows, D encoded features and C classes.

    ``x`` is not standardized. ``table_tasks`` standardizes only the columns
    listed in ``numeric_features``, so one-hot and boolean columns stay 0/1.
    """

    name: str
    x: np.ndarray  # [N, D] float32
    y: np.ndarray  # [N] int64 in 0..C-1
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    numeric_features: tuple[int, ...]  # column indices into x

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.dtype != np.float32:
            raise ValueError(f"table {self.name!r}: x must be a 2-D float32 array, got {self.x.dtype} {self.x.shape}")
        if self.y.shape != (self.x.shape[0],) or self.y.dtype != np.int64:
            raise ValueError(
                f"table {self.name!r}: y must be an int64 array of shape ({self.x.shape[0]},), "
                f"got {self.y.dtype} {self.y.shape}"
            )
        if len(self.feature_names) != self.x.shape[1]:
            raise ValueError(
                f"table {self.name!r}: {len(self.feature_names)} feature names for {self.x.shape[1]} columns"
            )
        if self.y.size and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(
                f"table {self.name!r}: labels must lie in 0..{len(self.class_names) - 1}, "
                f"got {self.y.min()}..{self.y.max()}"
            )
        if any(i < 0 or i >= self.x.shape[1] for i in self.numeric_features):
            raise ValueError(f"table {self.name!r}: numeric_features {self.numeric_features} out of range")

    @property
    def num_rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_sklearn_dataset(name: str) -> Table:
    """Load one of scikit-learn's bundled datasets, which need no download and have only numeric features."""
    loaders = {
        "iris": sklearn_datasets.load_iris,
        "wine": sklearn_datasets.load_wine,
        "breast_cancer": sklearn_datasets.load_breast_cancer,
        "digits": sklearn_datasets.load_digits,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(SKLEARN_DATASETS)}")
    bunch = loaders[name]()

    x = np.asarray(bunch.data, dtype=np.float32)
    feature_names = bunch.get("feature_names")
    if feature_names is None:
        feature_names = [f"x{i}" for i in range(x.shape[1])]
    return Table(
        name=name,
        x=x,
        y=np.asarray(bunch.target, dtype=np.int64),
        class_names=tuple(str(c) for c in bunch.target_names),
        feature_names=tuple(str(f) for f in feature_names),
        numeric_features=tuple(range(x.shape[1])),
    )


def load_csv(config: CsvConfig) -> Table:
    """Read a CSV file with a header row and encode it as a ``Table``.

    Labels become 0..C-1 in the sorted order of their distinct values, numeric
    if the whole target column parses as numbers. A feature column whose
    non-missing cells all parse as numbers is numeric. "True"/"False" columns
    become one 0/1 column. Any other column is one-hot encoded into columns
    named ``column=value``.

    A cell is missing when it is empty or one of ``MISSING_MARKERS``. Missing
    feature values raise ValueError unless ``config.impute`` is set. Then numeric
    columns are filled with that statistic, and string columns always with their
    most frequent value because a mean or median of strings does not exist.
    Rows with a missing target always raise ValueError, because guessing or
    silently dropping labels would change the task.

    Raises FileNotFoundError for a missing path and ValueError for a file
    that cannot be parsed or whose contents cannot form a classification task.
    Other OSErrors from opening the file, such as PermissionError, propagate.
    """
    path = Path(config.path)
    frame = _read_frame(path)
    frame = _drop_columns(frame, config, path)

    labels, class_names = _encode_target(frame.pop(config.target), config.target, path)
    _check_class_counts(labels, class_names, config.target, path)
    if frame.shape[1] == 0:
        raise ValueError(
            f"{path}: no feature columns left after removing the target {config.target!r} "
            f"and the dropped columns {list(config.drop)}"
        )

    frame = _fill_missing(frame, config.impute, path)
    x, feature_names, numeric_features = _encode_features(frame, path)
    table = Table(
        name=path.stem,
        x=x,
        y=labels,
        class_names=class_names,
        feature_names=feature_names,
        numeric_features=numeric_features,
    )
    logger.info(
        "loaded %s: %d rows, %d features (%d numeric), %d classes",
        path, table.num_rows, table.num_features, len(numeric_features), table.num_classes,
    )
    return table


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"CSV file {path} not found: check the path (relative paths start at {Path.cwd()})")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file: expected a CSV file")

    # utf-8-sig strips the byte-order mark that spreadsheet programs write.
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
        if header is None:
            raise ValueError(f"CSV file {path} is empty: expected a header row and data rows")
        frame = pd.read_csv(
            path,
            encoding="utf-8-sig",
            skipinitialspace=True,
            keep_default_na=False,
            na_values=list(MISSING_MARKERS),
        )
    except UnicodeDecodeError as error:
        raise ValueError(f"cannot parse CSV file {path} as UTF-8 text ({error}): save it as UTF-8") from error
    except (csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"cannot parse CSV file {path}: {str(error).strip()}") from error

    # pandas renames a repeated header to "name.1", which would hide the clash.
    names = [name.strip() for name in header]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: repeated column names {repeated} in the header row: rename them")
    if len(frame) == 0:
        raise ValueError(f"CSV file {path} has a header row but no data rows")

    frame.columns = [str(name).strip() for name in frame.columns]
    return frame.apply(_normalize_column)


def _normalize_column(column: pd.Series) -> pd.Series:
    """Strip string cells, turn missing markers into NA and parse all-numeric string columns as numbers."""
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column
    stripped = column.astype("string").str.strip()
    stripped = stripped.mask(stripped.isin(MISSING_MARKERS))
    try:
        return pd.to_numeric(stripped)
    except (ValueError, TypeError):
        return stripped


def _count_rows(count: int) -> str:
    return "1 row" if count == 1 else f"{count} rows"


def _drop_columns(frame: pd.DataFrame, config: CsvConfig, path: Path) -> pd.DataFrame:
    available = list(frame.columns)
    if config.target not in available:
        hint = ""
        if len(available) == 1 and any(sep in available[0] for sep in ";\t|"):
            hint = " The header looks like a single column: only comma-separated files are supported."
        raise ValueError(f"{path}: target column {config.target!r} not found. Available columns: {available}.{hint}")

    unknown = [name for name in config.drop if name not in available]
    if unknown:
        raise ValueError(f"{path}: cannot drop columns {unknown} because they do not exist. Available: {available}")
    if config.target in config.drop:
        raise ValueError(f"{path}: the target column {config.target!r} is also listed in drop: remove it from drop")
    return frame.drop(columns=list(config.drop))


def _encode_target(column: pd.Series, target: str, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    missing = np.flatnonzero(column.isna().to_numpy())
    if missing.size:
        # Data rows are numbered from 1, the first row after the header.
        listed_rows = ", ".join(str(row + 1) for row in missing[:10])
        more = f" and {missing.size - 10} more" if missing.size > 10 else ""
        raise ValueError(
            f"{path}: target column {target!r} has missing values in {_count_rows(missing.size)} "
            f"(data rows {listed_rows}{more}). Fill in or remove those rows; impute never applies to the target"
        )

    values = column.to_numpy()
    if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
        values = values.astype(str)
    classes, labels = np.unique(values, return_inverse=True)
    return labels.astype(np.int64).reshape(-1), tuple(str(c) for c in classes)


def _check_class_counts(labels: np.ndarray, class_names: tuple[str, ...], target: str, path: Path) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    if len(class_names) < 2:
        raise ValueError(
            f"{path}: target column {target!r} has a single class {class_names[0]!r} ({_count_rows(counts[0])}): "
            "classification needs at least two classes"
        )
    small = [
        f"{name!r} ({_count_rows(count)})"
        for name, count in zip(class_names, counts)
        if count < MIN_ROWS_PER_CLASS
    ]
    if small:
        raise ValueError(
            f"{path}: classes {', '.join(small)} of target column {target!r} have fewer than "
            f"{MIN_ROWS_PER_CLASS} rows, the minimum for one row each in the training, validation and test "
            "splits. Add rows of those classes or remove them"
        )


def _fill_missing(frame: pd.DataFrame, impute: str | None, path: Path) -> pd.DataFrame:
    missing_counts = frame.isna().sum()
    missing_counts = missing_counts[missing_counts > 0]
    if missing_counts.empty:
        return frame
    described = ", ".join(f"{name!r} ({_count_rows(count)})" for name, count in missing_counts.items())
    if impute is None:
        raise ValueError(
            f"{path}: missing values in columns {described}. Pass --impute mean, median or most_frequent "
            "(impute in an eval.csv entry) to fill them, or drop those columns with --drop"
        )

    filled = frame.copy()
    for name in missing_counts.index:
        column = frame[name]
        if column.isna().all():
            raise ValueError(f"{path}: column {name!r} has no values at all, so it cannot be imputed: drop it")
        fill_value = _impute_value(column, impute)
        filled[name] = column.fillna(fill_value)
        logger.info("%s: filled %d missing values of column %r with %r", path, missing_counts[name], name, fill_value)
    # NOTE: the statistics come from all rows, validation and test rows included,
    # because imputation happens before table_tasks splits the table.
    return filled


def _impute_value(column: pd.Series, impute: str) -> object:
    is_number = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    if is_number and impute == "mean":
        return float(column.mean())
    if is_number and impute == "median":
        return float(column.median())
    # Series.mode() returns every tied value in sorted order (pandas 3.1 docstring), so the first is deterministic.
    return column.mode().iloc[0]


def _encode_features(frame: pd.DataFrame, path: Path) -> tuple[np.ndarray, tuple[str, ...], tuple[int, ...]]:
    blocks: list[np.ndarray] = []
    feature_names: list[str] = []
    numeric_features: list[int] = []

    # Columns keep their file order, and one-hot columns replace their source column in place.
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_bool_dtype(column):
            blocks.append(column.to_numpy(dtype=np.float32)[:, None])
            feature_names.append(name)
        elif pd.api.types.is_numeric_dtype(column):
            values = column.to_numpy(dtype=np.float32)
            if not np.isfinite(values).all():
                raise ValueError(
                    f"{path}: column {name!r} has infinite values or values beyond the float32 range: "
                    "clean or drop it"
                )
            numeric_features.append(len(feature_names))
            blocks.append(values[:, None])
            feature_names.append(name)
        else:
            one_hot, categories = _one_hot(column, name, path)
            blocks.append(one_hot)
            feature_names.extend(f"{name}={category}" for category in categories)

    x = np.concatenate(blocks, axis=1).astype(np.float32, copy=False)  # [N, D]
    return x, tuple(feature_names), tuple(numeric_features)


def _one_hot(column: pd.Series, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    values = column.to_numpy().astype(str)
    categories, codes = np.unique(values, return_inverse=True)
    if len(categories) > 2 and len(categories) > _HIGH_CARDINALITY_SHARE * len(values):
        logger.warning(
            "%s: string column %r has %d distinct values in %d rows and becomes %d one-hot columns. "
            "Drop it if it is an identifier or free text",
            path, name, len(categories), len(values), len(categories),
        )
    one_hot = np.zeros((len(values), len(categories)), dtype=np.float32)  # [N, categories]
    one_hot[np.arange(len(values)), codes.reshape(-1)] = 1.0
    return one_hot, categories


def table_tasks(table: Table, splits: int, seed: int, val_fraction: float, test_fraction: float) -> TaskBatch:
    """Draw ``splits`` random stratified train/validation/test splits of ``table`` as one ``TaskBatch``.

    Every split has the same number of rows of each class in each part, so the
    splits stack into ``[T, N, D]`` tensors. Split k depends only on
    ``(seed, k)``. Numeric features are standardized with the mean and
    standard deviation of that split's training rows. A feature that is
    constant on the training rows is only centred, not scaled.
    """
    if splits < 1:
        raise ValueError(f"splits={splits} is invalid: expected at least 1")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name}={fraction} is invalid: expected a value in (0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction={val_fraction} plus test_fraction={test_fraction} is at least 1 "
            "and leaves no training rows: lower them"
        )

    class_counts = np.bincount(table.y, minlength=table.num_classes)  # [C]
    train_counts, val_counts, test_counts = _stratified_counts(class_counts, val_fraction, test_fraction)
    _check_split_counts(table, class_counts, train_counts, val_counts, test_counts, val_fraction, test_fraction)

    # Each split is drawn and standardized on its own, then the splits are stacked.
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for split in range(splits):
        generator = np.random.default_rng([seed, split])
        rows = _split_rows(table.y, train_counts, val_counts, test_counts, generator)
        scaled = _standardize(table, rows)
        for part in parts:
            parts[part].append((scaled[part], table.y[rows[part]]))

    stacked = {
        part: (
            torch.from_numpy(np.stack([x for x, _ in pairs])),  # [T, N_part, D] float32
            torch.from_numpy(np.stack([y for _, y in pairs])),  # [T, N_part] int64
        )
        for part, pairs in parts.items()
    }
    return TaskBatch(
        seed=seed,
        task_index=torch.arange(splits, dtype=torch.int64),
        num_features=torch.full((splits,), table.num_features, dtype=torch.int64),
        num_classes=torch.full((splits,), table.num_classes, dtype=torch.int64),
        class_mask=torch.ones(splits, table.num_classes, dtype=torch.bool),
        train_x=stacked["train"][0],
        train_y=stacked["train"][1],
        val_x=stacked["val"][0],
        val_y=stacked["val"][1],
        test_x=stacked["test"][0],
        test_y=stacked["test"][1],
        teacher=None,
    )


def _stratified_counts(
    class_counts: np.ndarray, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the training, validation and test rows per class ``[C]`` each.

    The test total is N * test_fraction and the validation total
    N * val_fraction, both rounded half up. Each total is shared out in
    proportion to the rows a class has left, by the largest-remainder method.
    """
    total = int(class_counts.sum())
    test_counts = _largest_remainder(int(total * test_fraction + 0.5), class_counts)
    remaining = class_counts - test_counts
    val_counts = _largest_remainder(int(total * val_fraction + 0.5), remaining)
    return remaining - val_counts, val_counts, test_counts


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Share ``total`` out in proportion to ``weights``, rounding so that the shares sum to ``total``."""
    exact = total * weights / weights.sum()
    shares = np.floor(exact).astype(np.int64)
    # A stable sort breaks ties by class index, which keeps the result deterministic.
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - int(shares.sum())]] += 1
    return shares


def _check_split_counts(
    table: Table,
    class_counts: np.ndarray,
    train_counts: np.ndarray,
    val_counts: np.ndarray,
    test_counts: np.ndarray,
    val_fraction: float,
    test_fraction: float,
) -> None:
    empty = [
        f"{table.class_names[c]!r} ({_count_rows(class_counts[c])}: "
        f"{train_counts[c]} train, {val_counts[c]} validation, {test_counts[c]} test)"
        for c in range(table.num_classes)
        if min(train_counts[c], val_counts[c], test_counts[c]) < 1
    ]
    if empty:
        raise ValueError(
            f"table {table.name!r}: eval.val_fraction={val_fraction} and eval.test_fraction={test_fraction} leave "
            f"classes {', '.join(empty)} without a row in some split. Every class needs at least one row "
            "in each split: change the fractions or add rows of those classes"
        )


def _split_rows(
    y: np.ndarray,
    train_counts: np.ndarray,
    val_counts: np.ndarray,
    test_counts: np.ndarray,
    generator: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Return shuffled row indices of each part, with exactly the given rows per class."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(len(train_counts)):
        rows = generator.permutation(np.flatnonzero(y == c))
        val_end = val_counts[c]
        test_end = val_end + test_counts[c]
        parts["val"].append(rows[:val_end])
        parts["test"].append(rows[val_end:test_end])
        parts["train"].append(rows[test_end:])

    # Shuffle across classes so that no part is sorted by label.
    return {part: generator.permutation(np.concatenate(chunks)) for part, chunks in parts.items()}


def _standardize(table: Table, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return each part's features with numeric columns scaled by the training rows' mean and std."""
    numeric = list(table.numeric_features)
    train = table.x[rows["train"]][:, numeric].astype(np.float64)  # [N_train, numeric]
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    # A column that is constant on the training rows has std 0 (or a rounding
    # residue of it), so it is only centred.
    constant = train.max(axis=0) == train.min(axis=0)
    std[constant] = 1.0

    scaled = {}
    for part, part_rows in rows.items():
        x = table.x[part_rows].astype(np.float64)  # [N_part, D]
        x[:, numeric] = (x[:, numeric] - mean) / std
        scaled[part] = x.astype(np.float32)
    return scaled
