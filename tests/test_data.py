import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlib import data
from dmlib.data import TOY_DATASETS, download, load_fashion_mnist, make_toy, read_idx, toy_mixture

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_sets_are_seeded_and_scaled(name):
    a = make_toy(name, 2000, torch.Generator().manual_seed(0))
    b = make_toy(name, 2000, torch.Generator().manual_seed(0))
    assert a.shape == (2000, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0.5 < a.std() < 2.0 and a.abs().max() < 5


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="'moons'.*two_moons"):
        make_toy("moons", 10)
    with pytest.raises(ValueError, match="no closed-form density"):
        toy_mixture("swiss_roll")


def test_digits_offline_and_in_range():
    x = data.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1


def _write_idx(path, array, compress=False):
    payload = (
        struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_and_fashion_loader(tmp_path, compress):
    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    _write_idx(tmp_path / name, imgs, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / name), imgs)
    x = load_fashion_mnist("train", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.min() == -1


def test_truncated_idx_and_missing_dataset(tmp_path):
    _write_idx(tmp_path / "t", np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")


def test_download_verifies_checksum_and_is_atomic(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"diffusion" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(ValueError, match="expected 0000"):
        download(src.as_uri(), dest, "0" * 64)
    assert not dest.exists() and not list(dest.parent.glob("*.part")), "a failed download must leave nothing"
    assert download(src.as_uri(), dest, good).read_bytes() == src.read_bytes()
    dest.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="delete it"):
        download(src.as_uri(), dest, good)


def test_shipped_artifacts_match_the_registry():
    registry = json.loads((DATA / "registry.json").read_text())
    for name, spec in registry.items():
        path = DATA / spec["file"]
        assert path.exists(), f"{name}: {path} is listed in data/registry.json but missing"
        assert data.sha256(path) == spec["sha256"], f"{name}: checksum differs from data/registry.json"
