import collections
import dataclasses
import gzip
import hashlib
import io
import json
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlib import data
from dmlib.data import (
    IMAGE_DATASETS,
    TOY_DATASETS,
    RemoteFile,
    download,
    extract_tar,
    image_loader,
    load_fashion_mnist,
    load_image_dataset,
    make_toy,
    pad_images,
    random_hflip,
    read_idx,
    toy_mixture,
)

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
    same, y = data.load_digits(with_labels=True)
    assert torch.equal(same, x) and y.dtype == torch.long and y.tolist()[:3] == [0, 1, 2] and y.max() == 9


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


# ----------------------------------------------------------------------------- image data
# Everything below runs offline: small fake files stand in for the real ones, are pinned by their own
# SHA-256 in place of the official sums, and are "downloaded" through the real code from file:// URLs.


def _idx_gz(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_idx(path, array, compress=True)


def _cifar_row(img):
    """One row of a CIFAR batch as its documentation describes it: the red plane, then green, then blue."""
    return np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()])


def _cifar_batch(images, labels):
    rows = np.stack([_cifar_row(i) for i in images])
    return pickle.dumps({"data": rows, "labels": [int(v) for v in labels]}, protocol=2)  # labels: ints


def _add(tar, name, payload=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(payload))


def _pin(monkeypatch, name, folder, file_names):
    """Point IMAGE_DATASETS[name] at the files in ``folder``, pinned by their own size and SHA-256."""
    files = tuple(RemoteFile(n, (folder / n).stat().st_size, data.sha256(folder / n)) for n in file_names)
    # a system folder that does not exist, so a Debian-installed Fashion-MNIST cannot answer
    none = tuple(folder / "not-installed" for _ in IMAGE_DATASETS[name].system_dirs)
    spec = dataclasses.replace(
        IMAGE_DATASETS[name], mirrors=(folder.as_uri() + "/",), files=files, system_dirs=none
    )
    monkeypatch.setitem(IMAGE_DATASETS, name, spec)
    return spec


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A small MNIST, Fashion-MNIST and CIFAR-10 on a file:// "server"; the download cache in tmp_path/cache."""
    rng = np.random.default_rng(0)
    truth = {}
    for name in ("mnist", "fashion_mnist"):
        server = tmp_path / "server" / name
        for split, n in (("train", 6), ("t10k", 4)):
            x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
            _idx_gz(server / f"{split}-images-idx3-ubyte.gz", x)
            _idx_gz(server / f"{split}-labels-idx1-ubyte.gz", y)
            truth[name, "test" if split == "t10k" else split] = (x[:, None], y)
        _pin(monkeypatch, name, server, [n for s in IMAGE_DATASETS[name].splits.values() for n in s])
    server = tmp_path / "server" / "cifar10"
    server.mkdir(parents=True)
    with tarfile.open(server / "cifar-10-python.tar.gz", "w:gz") as tar:
        _add(tar, "cifar-10-batches-py", type=tarfile.DIRTYPE, mode=0o755)
        parts = {"train": [], "test": []}
        for batch, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
            x, y = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 2)
            _add(tar, f"cifar-10-batches-py/{batch}", _cifar_batch(x, y))
            parts[split].append((x, y))
        for split, p in parts.items():
            truth["cifar10", split] = (np.concatenate([x for x, _ in p]), np.concatenate([y for _, y in p]))
    _pin(monkeypatch, "cifar10", server, ["cifar-10-python.tar.gz"])
    monkeypatch.setenv("DMLIB_DATA", str(tmp_path / "cache"))
    return truth


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DMLIB_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    monkeypatch.delenv("DMLIB_DATA")
    assert data.data_root() == DATA / "cache"


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_datasets_download_once_then_load_offline(fake, tmp_path, name):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_image_dataset(name, "train")
    for split in ("train", "test"):
        x, y = load_image_dataset(name, split, download=True)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), fake[name, split][0])
        np.testing.assert_array_equal(y.numpy(), fake[name, split][1])
    shutil.rmtree(tmp_path / "server")  # from now on only the cache can answer
    folder = tmp_path / "cache" / IMAGE_DATASETS[name].folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in IMAGE_DATASETS[name].files)
    x = (data.load_mnist if name == "mnist" else load_fashion_mnist)("t10k")
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(fake[name, "test"][0]).float() / 127.5 - 1)


def test_missing_data_says_how_to_get_it(fake, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*download=True"):
        load_fashion_mnist("train")
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR-10 \(test\) not found in .*cache.*download=True"
    ) as e:
        data.load_cifar10("test")
    assert "dataset-fashion-mnist" not in str(e.value)
    assert not (tmp_path / "cache").exists(), "nothing may be fetched without download=True"
    with pytest.raises(ValueError, match="'cifar100'.*mnist, fashion_mnist, cifar10"):
        load_image_dataset("cifar100")
    with pytest.raises(ValueError, match="'valid'"):
        load_image_dataset("mnist", "valid")


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_cache_files_are_refused_with_advice(fake, tmp_path, damage):
    load_image_dataset("mnist", "train", download=True)
    cached = tmp_path / "cache" / "mnist" / "train-images-idx3-ubyte.gz"
    raw = bytearray(cached.read_bytes())
    if damage == "corrupt":
        raw[len(raw) // 2] ^= 0xFF  # same size, one byte off: only the checksum can tell
        expected = r"SHA-256 is [0-9a-f]{64}, expected"
    else:
        raw = raw[: len(raw) // 2]  # an interrupted copy
        expected = "bytes, expected .*partial"
    cached.write_bytes(bytes(raw))
    for fetch in (False, True):  # download=True must not paper over it either
        with pytest.raises(ValueError, match=f"{re.escape(str(cached))}.*{expected}.*delete it"):
            load_image_dataset("mnist", "train", download=fetch)
    assert cached.read_bytes() == raw, "a damaged file is reported, never silently replaced"


def test_download_with_wrong_checksum_is_not_saved(fake, tmp_path, monkeypatch):
    spec = IMAGE_DATASETS["mnist"]
    bad = tuple(dataclasses.replace(f, sha256="0" * 64) for f in spec.files)
    monkeypatch.setitem(IMAGE_DATASETS, "mnist", dataclasses.replace(spec, files=bad))
    with pytest.raises(ValueError, match="expected 0{64}; not saved"):
        load_image_dataset("mnist", "train", download=True)
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []


def test_download_tries_mirrors_in_order(tmp_path):
    src = tmp_path / "b" / "f.bin"
    src.parent.mkdir()
    src.write_bytes(b"x" * 100)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    mirrors = [(tmp_path / "a").as_uri() + "/f.bin", src.as_uri()]  # the first one has no such file
    assert download(mirrors, tmp_path / "c" / "f.bin", good, size=100).read_bytes() == src.read_bytes()
    with pytest.raises(
        ValueError, match=r"any of its 2 mirrors:\n.*/a/f.bin.*\n.*/b/f.bin.*100 bytes, expected 99"
    ):
        download(mirrors, tmp_path / "d" / "f.bin", good, size=99)
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_cifar10_downloads_extracts_and_loads(fake, tmp_path):
    for split in ("train", "test"):
        x, y = load_image_dataset("cifar10", split, download=True)
        assert x.shape == (10 if split == "train" else 2, 3, 32, 32) and x.dtype == torch.uint8
        np.testing.assert_array_equal(x.numpy(), fake["cifar10", split][0])  # planes and rows in place
        np.testing.assert_array_equal(y.numpy(), fake["cifar10", split][1])
    cache = tmp_path / "cache" / "cifar-10"
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-python", "cifar-10-python.tar.gz"]
    x = data.load_cifar10("train")
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.shape == (10, 3, 32, 32)


def test_cifar_batches_may_only_hold_arrays(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # harmless, but not something a CIFAR batch needs: the restricted unpickler must refuse it
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": collections.OrderedDict()}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR-10 batch.*collections.OrderedDict"):
        load_image_dataset("cifar10", "train", root=tmp_path)


def test_cifar_reader_reads_python2_pickles(tmp_path):
    """The real batches were pickled by Python 2: numpy.core paths, and pixels as byte strings that only
    the latin1 decoding passes through unchanged. Written here opcode by opcode, as cPickle wrote them."""

    def s(b):  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b

    pixels = bytes([0, 127, 128, 200, 255, 1]) * 512  # 1 x 3072, with bytes >= 128
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R("
        b"K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\n"
        + s(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00"
        + pixels
        + b"tb"
    )
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"]K\x07au.")
    x, y = load_image_dataset("cifar10", "test", root=tmp_path)
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [7]
    assert x.flatten().tolist() == list(pixels)


EVIL_MEMBERS = {
    "dotdot": dict(name="../evil"),
    "absolute": dict(name="{tmp}/evil"),
    "symlink": dict(name="link", type=tarfile.SYMTYPE, linkname="../.."),
    "hardlink": dict(name="hard", type=tarfile.LNKTYPE, linkname="{tmp}/secret"),
}


@pytest.mark.parametrize("kind", EVIL_MEMBERS)
def test_extract_tar_refuses_members_that_escape(tmp_path, kind):
    (tmp_path / "secret").write_text("keep out")
    spec = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in EVIL_MEMBERS[kind].items()}
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "ok.txt", b"fine")
        _add(tar, **({"payload": b"pwned"} if kind in ("dotdot", "absolute") else {}), **spec)
        if kind == "symlink":
            _add(tar, "link/evil", b"pwned")  # would land two folders above the target, through the link
    before = set(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=f"refusing to extract .*member '{re.escape(spec['name'])}'"):
        extract_tar(archive, tmp_path / "out" / "x")
    assert set(tmp_path.rglob("*")) == before | {tmp_path / "out"}, "nothing may be written, anywhere"
    assert (tmp_path / "secret").read_text() == "keep out"


def test_extract_tar_is_atomic(tmp_path):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        _add(tar, "d", b"a file")
        _add(tar, "d/e", b"cannot go inside a file")  # passes every check, fails half-way through
    with pytest.raises(OSError):
        extract_tar(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"], "no half-extracted folder, no .part"


def test_pad_images_to_32_with_background_border():
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = pad_images(x)
    assert y.shape == (2, 1, 32, 32)
    torch.testing.assert_close(y[..., 2:30, 2:30], x, rtol=0, atol=0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (y[..., border] == -1).all()
    with pytest.raises(TypeError, match="normalize_images"):
        pad_images(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_random_hflip_is_seeded_per_image_and_device_correct():
    x = torch.arange(1000 * 2 * 3, dtype=torch.float32).view(1000, 1, 2, 3)  # no image is symmetric
    a = random_hflip(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, random_hflip(x, torch.Generator().manual_seed(0)), rtol=0, atol=0)
    assert not torch.equal(a, random_hflip(x, torch.Generator().manual_seed(1)))
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    assert ((a == x).flatten(1).all(1) | flipped).all(), "each image is itself or its left-right mirror"
    assert 400 < flipped.sum() < 600
    assert torch.equal(random_hflip(x, p=0.0), x) and torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    # the coins must meet x on x's device: a meta tensor stands in for CUDA without a GPU
    meta = torch.empty(4, 1, 2, 2, device="meta")
    assert random_hflip(meta).device.type == "meta"
    assert random_hflip(meta, torch.Generator().manual_seed(0)).device.type == "meta"


def _batches(loader, epochs=2):
    return [[b if torch.is_tensor(b) else tuple(b) for b in loader] for _ in range(epochs)]


def test_image_loader_is_reproducible():
    x, y = torch.arange(20).view(20, 1, 1, 1).float(), torch.arange(20) + 100
    one, same = (
        _batches(image_loader(x, batch_size=6, seed=0)),
        _batches(image_loader(x, batch_size=6, seed=0)),
    )
    assert all(torch.equal(a, b) for ea, eb in zip(one, same) for a, b in zip(ea, eb))
    assert [b.shape[0] for b in one[0]] == [6, 6, 6], "drop_last: only full batches"
    assert len(set(torch.cat(one[0]).flatten().tolist())) == 18, "an epoch draws without replacement"
    assert not torch.equal(torch.cat(one[0]), torch.cat(one[1])), "each epoch is a new permutation"
    other = _batches(image_loader(x, batch_size=6, seed=1))
    assert not torch.equal(torch.cat(one[0]), torch.cat(other[0]))
    for xb, yb in image_loader(x, y, batch_size=6, seed=0):
        assert torch.equal(xb.flatten().long() + 100, yb), "images and labels stay paired"
    with pytest.raises(ValueError, match="20 images but y has 3"):
        image_loader(x, y[:3], batch_size=2)


def test_image_loader_accepts_a_distributed_sampler():
    from torch.utils.data import DistributedSampler

    x = torch.arange(20).view(20, 1, 1, 1).float()
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(x, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = image_loader(x, batch_size=5, sampler=sampler)  # shuffle=True by default: must not clash
        seen.append(torch.cat(list(loader)).flatten().tolist())
    assert len(seen[0]) == len(seen[1]) == 10 and sorted(seen[0] + seen[1]) == list(range(20))
