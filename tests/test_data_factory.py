"""Tests for the dataset registry, general ArrayDatasets, padding, and ``data.name: custom``.

Factories are small Python files written into tmp_path; nothing touches the network.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch

import dni.config
from dni.config import ConfigError, DataConfig
from dni.data import (
    DATASET_NAMES,
    ArrayDataset,
    DataError,
    load_dataset,
    load_splits,
    padded_batches,
    split_validation,
)
from dni.data.dataset import IGNORE_LABEL
from dni.data.registry import DATASETS
from dni.data.spec import DataSpec

# A factory module header: every factory file below starts with these imports.
HEADER = """\
import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
"""


def write_factory(tmp_path: Path, body: str, name: str = "make") -> str:
    """Write ``body`` (after :data:`HEADER`) to a file and return its ``data.factory`` spec."""
    path = tmp_path / "factory.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return f"{path}:{name}"


def load_custom_splits(spec: str, tmp_path: Path, val_size: int = 0) -> object:
    """``load_dataset("custom", ...)`` with the given factory."""
    return load_dataset("custom", tmp_path, val_size=val_size, seed=0, factory=spec)


# -------------------------------------------------------------------- registry


def test_dataset_names_are_the_registry_keys_and_the_config_choices() -> None:
    # The folder loaders of the registry, and the two that take their own settings (text, copy).
    assert DATASET_NAMES == (*DATASETS, "text", "copy") == dni.config.DATASETS
    assert tuple(DATASETS) == ("mnist", "cifar10", "idx", "custom")


def test_dataset_module_imports_no_loader() -> None:
    import dni.data.dataset as dataset

    tree = ast.parse(Path(dataset.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    # dni.data.vocabulary only for a type annotation (Splits.vocabulary), under TYPE_CHECKING.
    assert {m for m in imported if m and m.startswith("dni")} == {"dni.data.spec", "dni.data.vocabulary"}


def test_load_splits_reads_the_config_section(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        def make(path):
            x = torch.arange(10, dtype=torch.float32).view(10, 1)
            return TensorDataset(x, torch.arange(10) % 4), TensorDataset(x[:3], torch.tensor([0, 1, 2]))
    """)
    cfg = DataConfig(name="custom", path=str(tmp_path), factory=spec, val_size=3)
    splits = load_splits(cfg, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 3, 3)
    assert splits.train.num_classes == 4
    # the same seed gives the same split as load_dataset
    again = load_dataset("custom", tmp_path, val_size=3, seed=0, factory=spec)
    assert torch.equal(splits.val.images, again.val.images)


def test_load_splits_download_argument_overrides_the_config(tmp_path: Path) -> None:
    cfg = DataConfig(name="mnist", path=str(tmp_path / "mnist"), download=True)
    with pytest.raises(DataError, match=r"MNIST not found in .*run `dni data mnist`"):
        load_splits(cfg, seed=0, download=False)  # download=True would reach for the network


def test_custom_without_factory_and_factory_without_custom_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.factory: data.name=custom needs a factory"):
        load_dataset("custom", tmp_path, val_size=0, seed=0)
    with pytest.raises(ConfigError, match=r"data.factory: only for data.name=custom \(got 'idx'\)"):
        load_dataset("idx", tmp_path, val_size=0, seed=0, factory="x.py:make")


# ------------------------------------------------------- general ArrayDataset


def test_token_ids_with_one_label_per_token() -> None:
    tokens = torch.tensor([[3, 1, 4], [1, 5, 9]])
    labels = torch.tensor([[1, 4, -1], [5, 9, 2]])
    ds = ArrayDataset(tokens, labels, 10)
    assert len(ds) == 2 and ds.input_shape == (3,)
    assert ds.spec == DataSpec((3,), 10, torch.int64, (3,), torch.int64)
    assert ds.spec.context_size == 30


def test_int64_inputs_may_have_no_per_example_dimension() -> None:
    ds = ArrayDataset(torch.tensor([7, 8]), torch.tensor([0, 1]), 2)
    assert ds.input_shape == () and ds.spec.in_shape == ()


def test_image_dataset_spec_keeps_the_defaults() -> None:
    ds = ArrayDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]), 3)
    assert ds.input_shape == (1, 2, 2)
    assert ds.spec == DataSpec((1, 2, 2), 3)


def test_float_targets_count_their_features_as_num_classes() -> None:
    ds = ArrayDataset(torch.zeros(4, 5), torch.zeros(4, 2, 3), 6)
    assert ds.spec == DataSpec((5,), 6, torch.float32, (2, 3), torch.float32)
    assert ArrayDataset(torch.zeros(4, 5), torch.zeros(4), 1).num_classes == 1
    with pytest.raises(DataError, match=r"6 features per example \(shape \(2, 3\)\) but num_classes "
                                        r"is 2: set num_classes to 6"):
        ArrayDataset(torch.zeros(4, 5), torch.zeros(4, 2, 3), 2)


def test_minus_one_labels_are_allowed_and_lower_ones_are_not() -> None:
    images = torch.zeros(3, 2)
    assert len(ArrayDataset(images, torch.tensor([-1, 0, 1]), 2)) == 3
    with pytest.raises(DataError, match=r"labels range over \[-2, 1\] .* lie in \[0, 1\] \(or be -1"):
        ArrayDataset(images, torch.tensor([-2, 0, 1]), 2)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.int64), r"images must be a float32 tensor .* "
                                                             r"at least one per-example dimension"),
        (torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, dtype=torch.int64), r"got torch.int32 tensor"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.int32), r"labels must be an int64 tensor.*or a "
                                                              r"float32 tensor.*got torch.int32"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.float64), r"got torch.float64 tensor of shape \(3,\)"),
        (torch.zeros(3, 2), torch.tensor(1), r"labels must be .*got torch.int64 tensor of shape \(\)"),
    ],
)
def test_array_dataset_rejects_bad_types(images: torch.Tensor, labels: torch.Tensor, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ArrayDataset(images, labels, 1)


def test_split_validation_keeps_per_token_shapes() -> None:
    ds = ArrayDataset(torch.arange(20).view(10, 2), torch.arange(20).view(10, 2) % 3, 3)
    train, val = split_validation(ds, 4, seed=0)
    assert train.images.shape == (6, 2) and val.labels.shape == (4, 2)
    assert sorted(torch.cat([train.images[:, 0], val.images[:, 0]]).tolist()) == list(range(0, 20, 2))


# ----------------------------------------------------------------- padding


def test_padded_batches_pad_per_token_integer_labels_with_minus_one() -> None:
    ds = ArrayDataset(torch.arange(15).view(5, 3), torch.arange(15).view(5, 3) % 4, 4)
    batches = list(padded_batches(ds, 2))
    assert [(tuple(x.shape), tuple(y.shape)) for x, y in batches] == [((2, 3), (2, 3))] * 3
    x, y = batches[-1]
    assert x.dtype == torch.int64 and x.tolist() == [[12, 13, 14], [0, 0, 0]]
    assert y.tolist() == [[0, 1, 2], [-1, -1, -1]]
    from dni.losses import IGNORE

    assert IGNORE_LABEL == IGNORE == -1  # what the losses and evaluation leave out


def test_padded_batches_pad_float_targets_with_nan() -> None:
    ds = ArrayDataset(torch.ones(3, 2), torch.full((3, 2), 0.5), 2)
    batches = list(padded_batches(ds, 2))
    assert [tuple(y.shape) for _, y in batches] == [(2, 2), (2, 2)]
    x, y = batches[-1]
    assert x.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert y[0].tolist() == [0.5, 0.5] and torch.isnan(y[1]).all()


def test_padded_batches_do_not_pad_an_exact_fit_and_reject_zero() -> None:
    ds = ArrayDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.int64), 1)
    assert [y.tolist() for _, y in padded_batches(ds, 2)] == [[0, 0], [0, 0]]
    with pytest.raises(DataError, match=r"batch_size must be >= 1, got 0"):
        padded_batches(ds, 0)


# ------------------------------------------------------------- custom factory


def test_tensor_dataset_factory_is_split_and_counts_classes_over_all_splits(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        def make():
            g = torch.Generator().manual_seed(0)
            train = TensorDataset(torch.rand(12, 3, 2, generator=g), torch.arange(12) % 3)
            test = TensorDataset(torch.rand(4, 3, 2, generator=g), torch.tensor([0, 1, 2, 5]))
            return train, test
    """)
    splits = load_custom_splits(spec, tmp_path, val_size=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 5, 4)
    assert splits.train.num_classes == splits.test.num_classes == 6  # max label 5 (in test) + 1
    assert splits.train.images.shape == (7, 3, 2) and splits.train.images.dtype == torch.float32
    assert splits.test.labels.tolist() == [0, 1, 2, 5] and splits.test.labels.dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    train_x = torch.rand(12, 3, 2, generator=g)
    want_train, want_val = split_validation(ArrayDataset(train_x, torch.arange(12) % 3, 6), 5, seed=0)
    assert torch.equal(splits.train.images, want_train.images)  # the inputs as given, split as always
    assert torch.equal(splits.val.labels, want_val.labels)


def test_factory_with_a_path_parameter_gets_data_path(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        SEEN = []
        def make(path, size=3):
            SEEN.append(path)
            ds = TensorDataset(torch.zeros(size, 2), torch.zeros(size, dtype=torch.long))
            return ds, ds
    """)
    load_dataset("custom", tmp_path / "here", val_size=0, seed=0, factory=spec)
    from dni.imports import import_object

    assert import_object(spec.replace(":make", ":SEEN"), "test") == [str(tmp_path / "here")]


def test_custom_dataset_class_with_its_own_validation_split(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        class Squares(Dataset):
            def __init__(self, n):
                self.n = n
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                return np.full((2, 2), i, dtype=np.float64), i % 2

        def make():
            return [Squares(6), Squares(2), Squares(3)]
    """)
    splits = load_custom_splits(spec, tmp_path, val_size=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 3)
    assert splits.train.images.dtype == torch.float32 and splits.train.images.shape == (6, 2, 2)
    assert splits.train.images[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert splits.val.labels.tolist() == [0, 1] and splits.val.labels.dtype == torch.int64
    assert splits.train.num_classes == 2
    with pytest.raises(DataError, match=r"data.factory returned its own validation split \(2 examples\) "
                                        r"but data.val_size is 1: set data.val_size=0"):
        load_custom_splits(spec, tmp_path, val_size=1)


def test_float_targets_become_float32_and_count_features(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        def make():
            x = torch.zeros(4, 3, dtype=torch.float64)
            return TensorDataset(x, torch.ones(4, 2, dtype=torch.float64)), TensorDataset(x, torch.ones(4, 2))
    """)
    splits = load_custom_splits(spec, tmp_path)
    assert splits.train.images.dtype == splits.train.labels.dtype == torch.float32
    assert splits.train.num_classes == 2 and splits.train.spec.label_shape == (2,)
    assert len(splits.val) == 0 and splits.val.labels.shape == (0, 2)


def test_scalar_float_labels_give_one_feature(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        class Points(Dataset):
            def __len__(self):
                return 3
            def __getitem__(self, i):
                return torch.tensor([float(i)]), 0.5 * i

        def make():
            return Points(), Points()
    """)
    splits = load_custom_splits(spec, tmp_path)
    assert splits.train.labels.tolist() == [0.0, 0.5, 1.0] and splits.train.labels.dtype == torch.float32
    assert splits.train.num_classes == 1


def test_int32_token_ids_become_int64(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        def make():
            ds = TensorDataset(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32), torch.tensor([0, 1]))
            return ds, ds
    """)
    train = load_custom_splits(spec, tmp_path).train
    assert train.images.dtype == torch.int64 and train.images.tolist() == [[1, 2], [3, 4]]


def test_uint8_images_keep_their_values(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        def make():
            ds = TensorDataset(torch.full((2, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 1]))
            return ds, ds
    """)
    train = load_custom_splits(spec, tmp_path).train
    assert train.images.dtype == torch.float32 and train.images.unique().tolist() == [255.0]


def test_num_classes_attribute_of_train_overrides_the_labels(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        def make():
            ds = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
            ds.num_classes = 10
            return ds, TensorDataset(torch.zeros(1, 2), torch.tensor([2]))
    """)
    splits = load_custom_splits(spec, tmp_path)
    assert splits.train.num_classes == splits.test.num_classes == 10


def test_array_datasets_are_taken_as_they_are(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        from dni.data import ArrayDataset

        def make():
            ds = ArrayDataset(torch.zeros(3, 4), torch.tensor([[0, -1], [1, 1], [0, 0]]), 7)
            return ds, ds
    """)
    splits = load_custom_splits(spec, tmp_path, val_size=1)
    assert (len(splits.train), len(splits.val)) == (2, 1)
    assert splits.train.num_classes == 7 and splits.test.labels[0].tolist() == [0, -1]


def test_empty_test_split_is_shaped_like_train(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, """
        class Empty(Dataset):
            def __len__(self):
                return 0
            def __getitem__(self, i):
                raise IndexError(i)

        def make():
            return TensorDataset(torch.zeros(2, 5), torch.tensor([0, 1])), Empty()
    """)
    test = load_custom_splits(spec, tmp_path).test
    assert len(test) == 0 and test.images.shape == (0, 5) and test.labels.shape == (0,)


# --------------------------------------------------------------- custom errors


FACTORY_ERRORS = {
    "raises": ("def make():\n    raise RuntimeError('no data here')",
               r"^data.factory '.*': the function raised RuntimeError: no data here \(it was called as "
               r"make\(\)\); fix the function$"),
    "one_dataset": ("def make():\n    return TensorDataset(torch.zeros(2, 1), torch.zeros(2).long())",
                    r"returned an object of type TensorDataset: return \(train, test\) or \(train, val, test\)"),
    "four_items": ("def make():\n    return (1, 2, 3, 4)", r"returned a tuple of 4 items: return \(train, test\)"),
    "tensors": ("def make():\n    return torch.zeros(2, 3), torch.zeros(2)",
                r"the train split is a tensor, not a dataset: return torch.utils.data.TensorDataset"),
    "not_a_dataset": ("def make():\n    ds = TensorDataset(torch.zeros(1, 1), torch.zeros(1).long())\n"
                      "    return ds, 3",
                      r"the test split \(int\) is not a map-style dataset: return datasets with __len__"),
    "empty_train": ("def make():\n    ds = TensorDataset(torch.zeros(0, 2), torch.zeros(0).long())\n    return ds, ds",
                    r"the train split is empty: return a train dataset with at least one example"),
    "not_pairs": ("def make():\n    ds = TensorDataset(torch.zeros(2, 2))\n    return ds, ds",
                  r"train item 0 is a tuple of 1 item, not an \(input, label\) pair: make __getitem__ "
                  r"return \(input, label\)"),
    "item_shapes": ("class D(Dataset):\n    def __len__(self):\n        return 2\n"
                    "    def __getitem__(self, i):\n        return torch.zeros(3 + i), 0\n"
                    "def make():\n    return D(), D()",
                    r"train item 1 has input torch.float32 tensor of shape \(4,\) but item 0 has "
                    r"torch.float32 tensor of shape \(3,\): every example needs the same input shape"),
    "label_types": ("class D(Dataset):\n    def __len__(self):\n        return 2\n"
                    "    def __getitem__(self, i):\n        return torch.zeros(3), [0, 0.5][i]\n"
                    "def make():\n    return D(), D()",
                    r"train item 1 has label torch.float32 tensor of shape \(\) but item 0 has "
                    r"torch.int64 tensor of shape \(\)"),
    "split_inputs": ("def make():\n    y = torch.tensor([0, 1])\n"
                     "    return TensorDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), y), "
                     "TensorDataset(torch.zeros(2, 2, dtype=torch.int32), y)",
                     r"test inputs are torch.int64 of shape \(2,\) per example but train inputs are "
                     r"torch.float32 of shape \(1, 2, 2\): all splits must hold the same kind of examples"),
    "split_labels": ("def make():\n    x = torch.zeros(2, 3)\n"
                     "    return TensorDataset(x, torch.zeros(2).long()), TensorDataset(x, torch.zeros(2, 4).long())",
                     r"test labels are torch.int64 of shape \(4,\) per example but train labels are "
                     r"torch.int64 of shape \(\)"),
    "labels_too_low": ("def make():\n    ds = TensorDataset(torch.zeros(2, 1), torch.tensor([-3, 4]))\n    return ds, ds",
                       r"data.factory '.*': train split: labels range over \[-3, 4\] but num_classes is 5"),
    "labels_too_high": ("def make():\n    ds = TensorDataset(torch.zeros(2, 1), torch.tensor([0, 4]))\n"
                        "    ds.num_classes = 2\n    return ds, ds",
                        r"train split: labels range over \[0, 4\] but num_classes is 2: class labels must "
                        r"lie in \[0, 1\]"),
    "all_ignored": ("def make():\n    ds = TensorDataset(torch.zeros(2, 1), torch.tensor([-1, -1]))\n    return ds, ds",
                    r"every label is -1 \(ignored\)"),
    "bad_num_classes": ("def make():\n    ds = TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1]))\n"
                        "    ds.num_classes = 'ten'\n    return ds, ds",
                        r"the train dataset's num_classes attribute is 'ten': make it a positive int"),
    "string_label": ("class D(Dataset):\n    def __len__(self):\n        return 1\n"
                     "    def __getitem__(self, i):\n        return torch.zeros(3), 'cat'\n"
                     "def make():\n    return D(), D()",
                     r"cannot convert the label of train item 0 \(str\) to a tensor"),
    "getitem_raises": ("class D(Dataset):\n    def __len__(self):\n        return 1\n"
                       "    def __getitem__(self, i):\n        raise KeyError('gone')\n"
                       "def make():\n    return D(), D()",
                       r"reading train item 0 raised KeyError: 'gone'; fix the dataset's __getitem__"),
    "scalar_inputs": ("def make():\n    ds = TensorDataset(torch.zeros(2), torch.tensor([0, 1]))\n    return ds, ds",
                      r"train split: ArrayDataset.images must be a float32 tensor of shape \(N, ...\) with at "
                      r"least one per-example dimension"),
}


@pytest.mark.parametrize("case", sorted(FACTORY_ERRORS))
def test_factory_errors_name_the_key_and_the_fix(tmp_path: Path, case: str) -> None:
    body, message = FACTORY_ERRORS[case]
    spec = write_factory(tmp_path, body)
    with pytest.raises(DataError, match=message) as info:
        load_custom_splits(spec, tmp_path)
    text = str(info.value)
    assert text.startswith(f"data.factory {spec!r}: ")
    assert "\n" not in text


def test_factory_that_is_not_a_function_or_not_found_is_a_config_error(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, "make = 3\n")
    with pytest.raises(ConfigError, match=r"^data.factory: '.*:make' names an object of type int, not a function"):
        load_custom_splits(spec, tmp_path)
    with pytest.raises(ConfigError, match=r"^data.factory: no such file"):
        load_custom_splits(f"{tmp_path}/absent.py:make", tmp_path)
    with pytest.raises(ConfigError, match=r"^data.factory: .* has no 'other'"):
        load_custom_splits(spec.replace(":make", ":other"), tmp_path)


def test_factory_exception_is_chained_for_the_traceback(tmp_path: Path) -> None:
    spec = write_factory(tmp_path, "def make(path):\n    raise ValueError(path)\n")
    with pytest.raises(DataError, match=r"raised ValueError: .*called as make\(path='.*'\)") as info:
        load_custom_splits(spec, tmp_path)
    assert isinstance(info.value.__cause__, ValueError)

