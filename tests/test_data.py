"""Tests for loading real tables and splitting them into task batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.data import SKLEARN_DATASETS, Table, load_csv, load_sklearn_dataset, table_tasks
from mln_core.config import CsvConfig


def write_csv(tmp_path: Path, text: str, name: str = "table.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def numeric_table(rows_per_class: tuple[int, ...], num_features: int = 3, seed: int = 0) -> Table:
    """A table of normal features shifted by class, with the given rows per class."""
    generator = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(rows_per_class)), rows_per_class).astype(np.int64)
    x = generator.normal(size=(len(y), num_features)) * 3.0 + 5.0 + y[:, None]
    return Table(
        name="synthetic",
        x=x.astype(np.float32),
        y=y,
        class_names=tuple(f"class{c}" for c in range(len(rows_per_class))),
        feature_names=tuple(f"f{i}" for i in range(num_features)),
        numeric_features=tuple(range(num_features)),
    )


# A small mixed table: an id column, a string feature, a numeric feature and string labels.
MIXED_CSV = """id,colour,size,label
1,red,1.0,cat
2,blue,2.0,dog
3,red,3.0,cat
4,green,4.0,dog
5,blue,5.0,cat
6,red,6.0,dog
"""


@pytest.mark.parametrize(
    ("name", "rows", "features", "classes"),
    [("iris", 150, 4, 3), ("wine", 178, 13, 3), ("breast_cancer", 569, 30, 2), ("digits", 1797, 64, 10)],
)
def test_sklearn_dataset_shapes(name: str, rows: int, features: int, classes: int) -> None:
    table = load_sklearn_dataset(name)
    assert table.x.shape == (rows, features)
    assert table.x.dtype == np.float32
    assert table.y.shape == (rows,)
    assert table.y.dtype == np.int64
    assert table.num_classes == classes
    assert set(np.unique(table.y)) == set(range(classes))
    assert len(table.feature_names) == features
    assert table.numeric_features == tuple(range(features))


def test_sklearn_dataset_names_match_config() -> None:
    assert SKLEARN_DATASETS == ("iris", "wine", "breast_cancer", "digits")


def test_sklearn_unknown_name_rejected() -> None:
    with pytest.raises(ValueError, match="'mnist'.*iris, wine, breast_cancer, digits"):
        load_sklearn_dataset("mnist")


def test_csv_string_labels_encoded_sorted(tmp_path: Path) -> None:
    table = load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="label", drop=("id",)))
    assert table.class_names == ("cat", "dog")
    assert table.y.tolist() == [0, 1, 0, 1, 0, 1]
    assert table.name == "table"


def test_csv_string_feature_one_hot(tmp_path: Path) -> None:
    table = load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="label", drop=("id",)))
    assert table.feature_names == ("colour=blue", "colour=green", "colour=red", "size")
    assert table.numeric_features == (3,)
    assert table.x[:, :3].tolist() == [
        [0, 0, 1],
        [1, 0, 0],
        [0, 0, 1],
        [0, 1, 0],
        [1, 0, 0],
        [0, 0, 1],
    ]
    assert table.x[:, 3].tolist() == [1, 2, 3, 4, 5, 6]


def test_csv_id_column_dropped(tmp_path: Path) -> None:
    with_id = load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="label"))
    dropped = load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="label", drop=("id",)))
    assert "id" in with_id.feature_names
    assert "id" not in dropped.feature_names
    assert dropped.num_features == with_id.num_features - 1


def test_csv_unknown_drop_column_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'row_id'.*do not exist.*'colour'"):
        load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="label", drop=("row_id",)))


def test_csv_target_in_drop_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'label' is also listed in drop"):
        load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="label", drop=("label",)))


def test_csv_numeric_labels_sorted_numerically(tmp_path: Path) -> None:
    text = "a,y\n" + "".join(f"{i},{label}\n" for i, label in enumerate([10, 2, 10, 2, 10, 2, 1, 1, 1]))
    table = load_csv(CsvConfig(path=write_csv(tmp_path, text), target="y"))
    assert table.class_names == ("1", "2", "10")
    assert table.y.tolist() == [2, 1, 2, 1, 2, 1, 0, 0, 0]


def test_csv_whitespace_and_bool_columns(tmp_path: Path) -> None:
    text = "flag, size ,label\nTrue, 1.5 ,a \nFalse,2.5,b\nTrue,3.5 , a\nFalse,4.5,b\nTrue,5.5,a\nFalse,6.5,b\n"
    table = load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))
    assert table.class_names == ("a", "b")
    assert table.feature_names == ("flag", "size")
    assert table.numeric_features == (1,)
    assert table.x[:, 0].tolist() == [1, 0, 1, 0, 1, 0]
    assert table.x[:, 1].tolist() == [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]


def test_csv_missing_values_rejected_naming_columns(tmp_path: Path) -> None:
    text = "a,b,c,label\n1,,x,p\n2,5,NA,q\n3,6,y,p\n4,NaN,?,q\n5,8,y,p\n6,9,x,q\n"
    with pytest.raises(ValueError) as caught:
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))
    message = str(caught.value)
    assert "'b' (2 rows)" in message
    assert "'c' (2 rows)" in message
    assert "'a'" not in message
    assert "impute" in message


@pytest.mark.parametrize(("impute", "expected"), [("mean", 6.75), ("median", 6.5), ("most_frequent", 5.0)])
def test_csv_numeric_imputation(tmp_path: Path, impute: str, expected: float) -> None:
    text = "a,b,label\n1,5,p\n2,,q\n3,5,p\n4,9,q\n5,,p\n6,8,q\n"
    table = load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label", impute=impute))
    assert table.x[:, 1].tolist() == [5, expected, 5, 9, expected, 8]
    assert np.isfinite(table.x).all()


def test_csv_string_imputation_uses_mode(tmp_path: Path) -> None:
    text = "colour,label\nred,p\n,q\nblue,p\nred,q\nNA,p\nblue,q\nred,p\n"
    table = load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label", impute="mean"))
    assert table.feature_names == ("colour=blue", "colour=red")
    assert table.x[:, 1].tolist() == [1, 1, 0, 1, 1, 0, 1]


def test_csv_all_missing_column_rejected(tmp_path: Path) -> None:
    text = "a,b,label\n1,,p\n2,,q\n3,,p\n4,,q\n5,,p\n6,,q\n"
    with pytest.raises(ValueError, match="column 'b' has no values"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label", impute="mean"))


def test_csv_missing_target_rejected(tmp_path: Path) -> None:
    text = "a,label\n1,p\n2,\n3,p\n4,q\n5,NA\n6,q\n7,p\n8,q\n"
    with pytest.raises(ValueError, match=r"missing values in 2 rows \(data rows 2, 5\)"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label", impute="mean"))


def test_csv_single_class_rejected(tmp_path: Path) -> None:
    text = "a,label\n1,p\n2,p\n3,p\n4,p\n"
    with pytest.raises(ValueError, match=r"single class 'p' \(4 rows\)"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))


def test_csv_too_few_rows_per_class(tmp_path: Path) -> None:
    text = "a,label\n1,p\n2,p\n3,p\n4,q\n5,q\n6,r\n7,r\n8,r\n"
    with pytest.raises(ValueError, match=r"classes 'q' \(2 rows\).*fewer than 3 rows") as caught:
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))
    assert "'p'" not in str(caught.value)
    assert "'r'" not in str(caught.value)


def test_csv_missing_target_column(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'species' not found.*\['id', 'colour', 'size', 'label'\]"):
        load_csv(CsvConfig(path=write_csv(tmp_path, MIXED_CSV), target="species"))


def test_csv_semicolon_file_hint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only comma-separated"):
        load_csv(CsvConfig(path=write_csv(tmp_path, "a;label\n1;p\n"), target="label"))


def test_csv_no_feature_columns(tmp_path: Path) -> None:
    text = "id,label\n1,p\n2,q\n3,p\n4,q\n5,p\n6,q\n"
    with pytest.raises(ValueError, match="no feature columns left"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label", drop=("id",)))


def test_csv_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is empty"):
        load_csv(CsvConfig(path=write_csv(tmp_path, ""), target="label"))


def test_csv_header_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no data rows"):
        load_csv(CsvConfig(path=write_csv(tmp_path, "a,label\n"), target="label"))


def test_csv_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.csv not found"):
        load_csv(CsvConfig(path=str(tmp_path / "absent.csv"), target="label"))


def test_csv_directory_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a regular file"):
        load_csv(CsvConfig(path=str(tmp_path), target="label"))


def test_csv_binary_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x81\x90garbage\x00\xc3\x28")
    with pytest.raises(ValueError, match="cannot parse CSV file"):
        load_csv(CsvConfig(path=str(path), target="label"))


def test_csv_ragged_rows_rejected(tmp_path: Path) -> None:
    text = "a,label\n1,p\n2,q,extra,more\n3,p\n"
    with pytest.raises(ValueError, match="cannot parse CSV file"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))


def test_csv_repeated_header_rejected(tmp_path: Path) -> None:
    text = "a,a,label\n1,2,p\n3,4,q\n5,6,p\n"
    with pytest.raises(ValueError, match=r"repeated column names \['a'\]"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))


def test_csv_infinite_value_rejected(tmp_path: Path) -> None:
    text = "a,label\n1,p\ninf,q\n3,p\n4,q\n5,p\n6,q\n"
    with pytest.raises(ValueError, match="column 'a' has infinite values"):
        load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))


def test_csv_identifier_column_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "name,a,label\n" + "".join(f"row{i},{i},{'pq'[i % 2]}\n" for i in range(8))
    with caplog.at_level(logging.WARNING, logger="jobs.data"):
        table = load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label"))
    assert table.num_features == 9
    assert "'name' has 8 distinct values" in caplog.text


def test_csv_table_splits_end_to_end(tmp_path: Path) -> None:
    text = "id,colour,size,label\n" + "".join(
        f"{i},{['red', 'blue', 'green'][i % 3]},{i * 0.5},{'pq'[i % 2]}\n" for i in range(20)
    )
    table = load_csv(CsvConfig(path=write_csv(tmp_path, text), target="label", drop=("id",)))
    batch = table_tasks(table, splits=3, seed=0, val_fraction=0.2, test_fraction=0.3)
    assert batch.train_x.shape == (3, 10, 4)
    # One-hot columns stay exactly 0/1 after standardization.
    one_hot = torch.cat([batch.train_x, batch.val_x, batch.test_x], dim=1)[:, :, :3]
    assert set(one_hot.unique().tolist()) == {0.0, 1.0}


def test_splits_shapes_and_fields() -> None:
    table = load_sklearn_dataset("iris")
    batch = table_tasks(table, splits=4, seed=7, val_fraction=0.2, test_fraction=0.3)
    assert batch.size == 4
    assert batch.seed == 7
    assert batch.train_x.shape == (4, 75, 4)
    assert batch.val_x.shape == (4, 30, 4)
    assert batch.test_x.shape == (4, 45, 4)
    assert batch.train_x.dtype == torch.float32
    assert batch.train_y.dtype == torch.int64
    assert batch.task_index.tolist() == [0, 1, 2, 3]
    assert batch.num_features.tolist() == [4] * 4
    assert batch.num_classes.tolist() == [3] * 4
    assert batch.class_mask.shape == (4, 3)
    assert bool(batch.class_mask.all())
    assert batch.teacher is None


def test_splits_deterministic_for_seed() -> None:
    table = numeric_table((20, 30, 10))
    first = table_tasks(table, splits=3, seed=11, val_fraction=0.2, test_fraction=0.3)
    again = table_tasks(table, splits=3, seed=11, val_fraction=0.2, test_fraction=0.3)
    other = table_tasks(table, splits=3, seed=12, val_fraction=0.2, test_fraction=0.3)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.train_x, other.train_x)
    # Splits of one batch differ from each other.
    assert not torch.equal(first.train_x[0], first.train_x[1])


def test_split_independent_of_split_count() -> None:
    table = numeric_table((20, 30, 10))
    two = table_tasks(table, splits=2, seed=3, val_fraction=0.2, test_fraction=0.3)
    five = table_tasks(table, splits=5, seed=3, val_fraction=0.2, test_fraction=0.3)
    assert torch.equal(two.train_x, five.train_x[:2])
    assert torch.equal(two.test_y, five.test_y[:2])


def test_splits_stratified() -> None:
    table = numeric_table((20, 30, 10))
    batch = table_tasks(table, splits=5, seed=0, val_fraction=0.2, test_fraction=0.3)
    # 60 rows: test round(18) and validation round(12), shared in proportion 2:3:1.
    for split in range(batch.size):
        assert torch.bincount(batch.test_y[split], minlength=3).tolist() == [6, 9, 3]
        assert torch.bincount(batch.val_y[split], minlength=3).tolist() == [4, 6, 2]
        assert torch.bincount(batch.train_y[split], minlength=3).tolist() == [10, 15, 5]


def test_splits_partition_rows() -> None:
    table = numeric_table((20, 30, 10), num_features=1)
    # Give every row a unique value in an extra non-numeric column, so rows can be traced.
    row_ids = np.arange(table.num_rows, dtype=np.float32)[:, None]
    traced = Table(
        name="traced",
        x=np.concatenate([table.x, row_ids], axis=1),
        y=table.y,
        class_names=table.class_names,
        feature_names=("f0", "row"),
        numeric_features=(0,),
    )
    batch = table_tasks(traced, splits=3, seed=0, val_fraction=0.2, test_fraction=0.3)
    for split in range(batch.size):
        ids = torch.cat([batch.train_x[split, :, 1], batch.val_x[split, :, 1], batch.test_x[split, :, 1]])
        assert sorted(ids.long().tolist()) == list(range(table.num_rows))
        labels = torch.from_numpy(table.y)[batch.train_x[split, :, 1].long()]
        assert torch.equal(labels, batch.train_y[split])


def test_splits_not_sorted_by_label() -> None:
    table = numeric_table((20, 30, 10))
    batch = table_tasks(table, splits=1, seed=0, val_fraction=0.2, test_fraction=0.3)
    assert not torch.equal(batch.train_y[0], batch.train_y[0].sort().values)


def test_standardization_uses_train_statistics() -> None:
    table = numeric_table((40, 40), num_features=4)
    batch = table_tasks(table, splits=3, seed=0, val_fraction=0.2, test_fraction=0.3)
    train = batch.train_x.double()
    torch.testing.assert_close(train.mean(dim=1), torch.zeros(3, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        train.std(dim=1, unbiased=False), torch.ones(3, 4, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # Validation and test rows are scaled with the training statistics, so their
    # moments are not exactly 0 and 1.
    assert (batch.test_x.double().mean(dim=1).abs() > 1e-4).any()


def test_standardization_matches_manual_train_statistics() -> None:
    table = numeric_table((40, 40), num_features=2)
    # An extra column of row ids, left unscaled, traces each output row to its raw row.
    row_ids = np.arange(table.num_rows, dtype=np.float32)[:, None]
    traced = Table(
        name="traced",
        x=np.concatenate([table.x, row_ids], axis=1),
        y=table.y,
        class_names=table.class_names,
        feature_names=("f0", "f1", "row"),
        numeric_features=(0, 1),
    )
    batch = table_tasks(traced, splits=1, seed=5, val_fraction=0.25, test_fraction=0.25)

    raw = table.x.astype(np.float64)
    train_raw = raw[batch.train_x[0, :, 2].long().numpy()]
    mean = train_raw.mean(axis=0)
    std = train_raw.std(axis=0)
    for part in ("train_x", "val_x", "test_x"):
        scaled = getattr(batch, part)[0]
        expected = (raw[scaled[:, 2].long().numpy()] - mean) / std
        np.testing.assert_allclose(scaled[:, :2].numpy(), expected, atol=1e-5, err_msg=part)


def test_standardization_skips_one_hot_and_constant_columns() -> None:
    generator = np.random.default_rng(0)
    y = np.repeat([0, 1], 20).astype(np.int64)
    numeric = generator.normal(size=40) * 4 + 2
    constant = np.full(40, 7.0)
    one_hot = (generator.random(40) > 0.5).astype(np.float64)
    table = Table(
        name="mixed",
        x=np.stack([numeric, constant, one_hot], axis=1).astype(np.float32),
        y=y,
        class_names=("a", "b"),
        feature_names=("numeric", "constant", "flag=yes"),
        numeric_features=(0, 1),
    )
    batch = table_tasks(table, splits=2, seed=0, val_fraction=0.2, test_fraction=0.3)
    assert torch.isfinite(batch.train_x).all()
    assert torch.equal(batch.train_x[:, :, 1], torch.zeros(2, 20))
    assert set(batch.train_x[:, :, 2].unique().tolist()) <= {0.0, 1.0}


def test_splits_reject_fractions_leaving_empty_class() -> None:
    table = numeric_table((40, 3))
    with pytest.raises(ValueError, match=r"'class1' \(3 rows: .*0 validation"):
        table_tasks(table, splits=2, seed=0, val_fraction=0.05, test_fraction=0.3)


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "message"),
    [(0.0, 0.3, "val_fraction=0.0"), (0.2, 1.0, "test_fraction=1.0"), (0.5, 0.5, "no training rows")],
)
def test_splits_reject_invalid_fractions(val_fraction: float, test_fraction: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        table_tasks(numeric_table((20, 20)), splits=2, seed=0, val_fraction=val_fraction, test_fraction=test_fraction)


def test_table_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        Table(
            name="bad",
            x=np.zeros((3, 1), dtype=np.float32),
            y=np.array([0, 1, 2], dtype=np.int64),
            class_names=("a", "b"),
            feature_names=("f",),
            numeric_features=(0,),
        )
