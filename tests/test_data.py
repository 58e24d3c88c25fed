"""Tests for backbone.data: IDX parsing, Fashion-MNIST splits and image-folder loading."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbone.data import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    SPLITS,
    DataError,
    ImageDataset,
    load_image_folder,
    load_split,
    read_idx,
    resolve_data_dir,
)

HAVE_REAL_DATA = Path(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz").is_file()


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """Encode a uint8 array in IDX format, as the official files are."""
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(directory: Path, n_train: int = 4, n_test: int = 3, compress: bool = False) -> None:
    """Write tiny but valid Fashion-MNIST-style files so split logic can be tested without the real data."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(arr)
            if compress:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / stem).write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([9, 0, 5], dtype=np.uint8)
    for name, arr in (("img", images), ("lbl", labels)):
        data = idx_bytes(arr)
        # Deliberately no .gz suffix: compression must be detected from the content.
        (tmp_path / name).write_bytes(gzip.compress(data) if compress else data)
    np.testing.assert_array_equal(read_idx(tmp_path / "img"), images)
    out = read_idx(tmp_path / "lbl")
    assert out.dtype == np.uint8 and out.shape == (3,)
    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (idx_bytes(np.zeros(4, np.uint8), dtype_code=0x0D), "dtype code"),
        (idx_bytes(np.zeros((2, 2), np.uint8)), "ndim 2"),
        (idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1], "payload has 17 bytes"),
        (idx_bytes(np.zeros(5, np.uint8)) + b"\x00", "payload has 6 bytes"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (b"", "bad magic"),
    ],
)
def test_read_idx_rejects_malformed(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "broken-idx"
    path.write_bytes(data)
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8)))[:-6])
    with pytest.raises(DataError, match=r"corrupt\.gz"):
        read_idx(path)


def test_resolve_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir(None) == Path(DEFAULT_DATA_DIR)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_missing_dir_mentions_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        load_split("test", tmp_path / "nope")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and DATA_DIR_ENV in message and "--data-dir" in message


def test_missing_label_file_named(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_split("test", tmp_path)


def test_unknown_split_lists_valid_names() -> None:
    with pytest.raises(DataError, match="unknown split") as info:
        load_split("validation")
    assert all(name in str(info.value) for name in SPLITS)


@pytest.mark.parametrize("compress", [False, True])
def test_env_var_override_and_plain_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compress: bool) -> None:
    write_fake_mnist(tmp_path, n_test=3, compress=compress)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    ds = load_split("test")
    assert len(ds) == 3 and ds.images.shape == (3, 1, 28, 28)
    assert ds.labels.tolist() == [0, 1, 2]


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match=r"3 images but .* 5 labels"):
        load_split("test", tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 10, 1], np.uint8)))
    with pytest.raises(DataError, match=r"0\.\.9"):
        load_split("test", tmp_path)


def test_image_dataset_api() -> None:
    images = torch.arange(3 * 1 * 2 * 2, dtype=torch.uint8).reshape(3, 1, 2, 2) * 20
    ds = ImageDataset(images, torch.tensor([2, 0, 1]), ["a", "b", "c"], "toy")
    image, label = ds[1]
    assert image.dtype == torch.float32 and image.shape == (1, 2, 2) and label == 0
    assert torch.allclose(image, images[1].float() / 255)
    assert torch.allclose(ds.as_float(), images.float() / 255)
    assert ds.labels.dtype == torch.int64
    sub = ds.subset(2)
    assert len(sub) == 2 and sub.labels.tolist() == [2, 0] and sub.classes == ["a", "b", "c"]
    with pytest.raises(DataError, match="empty"):
        ImageDataset(images[:0], torch.zeros(0, dtype=torch.int64), ["a"], "empty")
    with pytest.raises(DataError, match="labels"):
        ImageDataset(images, torch.tensor([0, 1]), ["a", "b"], "short")
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(images.float(), torch.tensor([0, 1, 1]), ["a", "b"], "float")


@pytest.fixture(scope="module")
def real_splits() -> dict[str, ImageDataset]:
    if not HAVE_REAL_DATA:
        pytest.skip(f"Fashion-MNIST not installed in {DEFAULT_DATA_DIR}")
    return {split: load_split(split, DEFAULT_DATA_DIR) for split in SPLITS}


def test_real_split_sizes_and_format(real_splits: dict[str, ImageDataset]) -> None:
    sizes = {name: len(ds) for name, ds in real_splits.items()}
    assert sizes == {"backbone-train": 50_000, "policy-train": 10_000, "test": 10_000}
    for ds in real_splits.values():
        assert ds.images.shape[1:] == (1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
        assert ds.classes == FASHION_MNIST_CLASSES
        image, label = ds[7]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert torch.equal(image, ds.images[7].float() / 255) and type(label) is int and label == int(ds.labels[7])
    # the splits are the raw IDX files in file order: images and labels stay paired, nothing is shuffled
    test_images = read_idx(Path(DEFAULT_DATA_DIR, "t10k-images-idx3-ubyte.gz"))
    test_labels = read_idx(Path(DEFAULT_DATA_DIR, "t10k-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(real_splits["test"].images[:, 0].numpy(), test_images)
    np.testing.assert_array_equal(real_splits["test"].labels.numpy(), test_labels)
    train_labels = read_idx(Path(DEFAULT_DATA_DIR, "train-labels-idx1-ubyte.gz"))
    np.testing.assert_array_equal(real_splits["backbone-train"].labels.numpy(), train_labels[:50_000])
    np.testing.assert_array_equal(real_splits["policy-train"].labels.numpy(), train_labels[50_000:])


def test_real_train_splits_are_disjoint_halves(real_splits: dict[str, ImageDataset]) -> None:
    train = read_idx(Path(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz"))
    backbone, policy = real_splits["backbone-train"], real_splits["policy-train"]
    np.testing.assert_array_equal(backbone.images[-1, 0].numpy(), train[49_999])
    np.testing.assert_array_equal(policy.images[0, 0].numpy(), train[50_000])
    np.testing.assert_array_equal(policy.images[-1, 0].numpy(), train[-1])
    assert len(backbone) + len(policy) == len(train)
    # Loaded splits must not alias each other (they are copied out of the shared decode cache).
    assert backbone.images.data_ptr() != policy.images.data_ptr()


def write_png(path: Path, size: tuple[int, int], color: int | tuple[int, int, int], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_grayscale(tmp_path: Path) -> None:
    write_png(tmp_path / "cat" / "a.png", (10, 6), 200, "L")
    write_png(tmp_path / "cat" / "b.PNG", (5, 5), 0, "L")
    write_png(tmp_path / "ant" / "x.png", (8, 8), (255, 0, 0), "RGB")
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_image_folder(tmp_path, 12, channels=1)
    assert ds.classes == ["ant", "cat"]
    assert ds.images.shape == (3, 1, 12, 12) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 1, 1]
    assert int(ds.images[1].min()) == 200 and int(ds.images[2].max()) == 0
    assert ds.name == str(tmp_path)


def test_image_folder_rgb_rectangular(tmp_path: Path) -> None:
    write_png(tmp_path / "red" / "r.jpg", (4, 4), (255, 0, 0), "RGB")
    write_png(tmp_path / "gray" / "g.bmp", (4, 4), 128, "L")
    ds = load_image_folder(tmp_path, (6, 9), channels=3)
    assert ds.images.shape == (2, 3, 6, 9)
    red = ds.images[ds.labels.tolist().index(ds.classes.index("red"))]
    assert int(red[0].float().mean()) > 240 and int(red[1].float().mean()) < 15


def test_image_folder_unreadable_file(tmp_path: Path) -> None:
    write_png(tmp_path / "good" / "ok.png", (4, 4), 10, "L")
    bad = tmp_path / "good" / "broken.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"broken\.png") as info:
        load_image_folder(tmp_path, 4, channels=1)
    assert os.fspath(bad) in str(info.value)


def test_image_folder_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class"):
        load_image_folder(tmp_path, 4, channels=1)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path, 4, channels=1)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 4, channels=1)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path, 4, channels=2)
