"""Image datasets on disk: pinned downloads, safe extraction, MNIST / Fashion-MNIST / CIFAR-10, batches.

- ``IMAGE_DATASETS`` pins every file by size and SHA-256, with its official URL and mirrors.
- ``download`` writes a file atomically, and only if its checksum matches; ``extract_tar`` unpacks
  an archive into a new folder atomically, refusing any member that could land outside it.
- ``load_image_dataset(name, split)`` returns ``(images, labels)``: uint8 (N, C, H, W) and int64 (N,).
  ``load_mnist``, ``load_fashion_mnist`` and ``load_cifar10`` return float32 images in [-1, 1].
- ``pad_images``, ``random_hflip`` and ``image_loader`` turn them into training batches on any device.

Where files are looked for: in ``root`` if the caller names one (the folder that holds the dataset's
files); otherwise in system folders (Debian's ``dataset-fashion-mnist``), then in the download cache
``$DMLIB_DATA/<folder>`` or ``data/cache/<folder>``. Cached files are checked against their pinned
SHA-256 before use; files in a system folder or a named ``root`` are read as they are (the readers
still check headers, lengths and shapes). Nothing here touches the network unless ``download=True``.

All public names are re-exported by :mod:`dmlib.data`.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import math
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset, default_collate
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_root() -> Path:
    """The download cache: ``$DMLIB_DATA`` if set, else ``data/cache`` in the repository (git-ignored)."""
    env = os.environ.get("DMLIB_DATA")
    return Path(env).expanduser() if env else DATA_DIR / "cache"


# ----------------------------------------------------------------------------- the pinned files


@dataclass(frozen=True)
class RemoteFile:
    """One file exactly as its publishers distribute it."""

    name: str
    size: int  # bytes: a file of another size is a partial download, which deserves its own message
    sha256: str


@dataclass(frozen=True)
class ImageDatasetSpec:
    """Where a dataset's files come from and which files each split needs."""

    title: str
    kind: str  # "idx" (MNIST's format) or "cifar" (pickled batches in a tar.gz)
    folder: str  # its folder in the download cache
    mirrors: tuple[str, ...]  # base URLs, tried in order; base + file name is the file's URL
    files: tuple[RemoteFile, ...]
    # split -> (images file, labels file) for "idx"; (archive,) for "cifar"
    splits: dict[str, tuple[str, ...]]
    classes: tuple[str, ...]
    system_dirs: tuple[Path, ...] = field(default=())  # installed by the OS package manager; read as is

    def file(self, name: str) -> RemoteFile:
        return next(f for f in self.files if f.name == name)


_MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Sizes and SHA-256 sums of the official files. They could not be recomputed here (no internet); each
# was read from two independent published sources that agree:
# - MNIST: TensorFlow Datasets' url_checksums/mnist.txt (its storage.googleapis.com mirror of the
#   original files) and other projects' download scripts. torchvision pins the same files by MD5:
#   f68b3c2dcbeaaa9fbdd348bbdeb94873, d53e105ee54ea40749a09fcbcd1e9432, 9fb629c4189551a2d022fa330f9573f3,
#   ec29112dd5afa0611ce80d1b7f02629c (train images, train labels, test images, test labels).
# - Fashion-MNIST: TensorFlow Datasets' url_checksums/fashion_mnist.txt (the official S3 bucket) and
#   torchvision's prototype datasets. torchvision's MD5s: 8d4fb7e6c68d591d4c3dfef9ec88bf0d,
#   25c81989df183df01b3e8a0aad5dffbe, bef4ecab320f06d8554ea6380940ec79, bb300cfdad3c16e7a12a480ee83cd310.
# - CIFAR-10, python version: Keras' cifar10.load_data (its file_hash) and torchvision's prototype
#   datasets; torchvision's MD5 is c58f30108f718f92721af3b95e74349a. Size as served by cs.toronto.edu.
IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
    "mnist": ImageDatasetSpec(
        title="MNIST",
        kind="idx",
        folder="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror (torchvision)
            "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
            "http://yann.lecun.com/exdb/mnist/",  # the original; often refuses scripted downloads
        ),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                9_912_422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                28_881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                1_648_877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                4_542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
        splits=_MNIST_SPLITS,
        classes=tuple("0123456789"),
    ),
    "fashion_mnist": ImageDatasetSpec(
        title="Fashion-MNIST",
        kind="idx",
        folder="fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # the official bucket
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                26_421_880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                29_515,
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                4_422_102,
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                5_148,
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        ),
        splits=_MNIST_SPLITS,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
        + ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),  # Debian's dataset-fashion-mnist
    ),
    "cifar10": ImageDatasetSpec(
        title="CIFAR-10",
        kind="cifar",
        folder="cifar-10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),  # no mirror found with a verifiable checksum
        files=(
            RemoteFile(
                "cifar-10-python.tar.gz",
                170_498_071,
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            ),
        ),
        splits={"train": ("cifar-10-python.tar.gz",), "test": ("cifar-10-python.tar.gz",)},
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
}


def _spec(name: str) -> ImageDatasetSpec:
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)}.")
    return IMAGE_DATASETS[name]


def _split(split: str) -> str:
    if split not in ("train", "test", "t10k"):
        raise ValueError(f"split must be 'train' or 'test' ('t10k' is accepted for 'test'); got {split!r}.")
    return "test" if split == "t10k" else split


# ----------------------------------------------------------------------------- files: checksums, downloads


def sha256(path: Path) -> str:
    """The SHA-256 of a file, as hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, sha256_hex: str, size: int | None = None) -> Path:
    """Return ``path`` if its size (when given) and SHA-256 match; otherwise say which file and what to do."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ValueError(
            f"{path} has {actual:,} bytes, expected {size:,}: a partial or corrupt download; "
            "delete it and download it again (dmlib's loaders do so with download=True)."
        )
    got = sha256(path)
    if got != sha256_hex:
        raise ValueError(
            f"{path} exists but its SHA-256 is {got}, expected {sha256_hex}: it is corrupt or not the "
            "official file; delete it and download it again (dmlib's loaders do so with download=True)."
        )
    return path


def download(
    url: str | Sequence[str], dest: Path, sha256_hex: str, *, size: int | None = None, progress: bool = True
) -> Path:
    """Download ``url`` to ``dest`` once, verify its SHA-256 (and size), and write it atomically.

    ``url`` may be a list of mirrors, tried in order until one serves the right bytes. A file already
    at ``dest`` is verified, never trusted: the right one is reused, a wrong or partial one is an
    error, never silently used or overwritten. A download that fails its check is not saved, and no
    ``.part`` file is left behind.
    """
    dest = Path(dest)
    if dest.exists():
        return verify_file(dest, sha256_hex, size)
    urls = [url] if isinstance(url, str) else list(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[Exception] = []
    for u in urls:
        try:
            return _fetch(u, dest, sha256_hex, size, progress)
        except (OSError, ValueError) as e:  # urllib's URLError and HTTPError are OSErrors
            failures.append(e)
    if len(failures) == 1:
        raise failures[0]
    # A mirror serving wrong bytes is worth more attention than a network failure: report it as such.
    kind = ValueError if any(isinstance(e, ValueError) for e in failures) else OSError
    reasons = "\n".join(f"  {u}: {e}" for u, e in zip(urls, failures))
    raise kind(
        f"could not download {dest.name} from any of its {len(urls)} mirrors:\n{reasons}\n"
        f"Check the internet connection, or fetch the file by hand and put it at {dest}."
    )


def _fetch(url: str, dest: Path, sha256_hex: str, size: int | None, progress: bool) -> Path:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            disable=not progress or (size or 0) < 1 << 20,
        )
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp, bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))
        got_size = os.path.getsize(tmp)
        if size is not None and got_size != size:
            raise ValueError(f"download of {url} has {got_size:,} bytes, expected {size:,}; not saved.")
        got = sha256(Path(tmp))
        if got != sha256_hex:
            raise ValueError(f"download of {url} has SHA-256 {got}, expected {sha256_hex}; not saved.")
        os.chmod(tmp, 0o644)  # mkstemp's files are private; a shared cache must be readable by all
        os.replace(tmp, dest)  # atomic: dest is either absent or the whole, verified file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def extract_tar(archive: Path, dest: Path) -> Path:
    """Unpack a tar archive (any compression) into the new folder ``dest``, safely and atomically.

    Every member must be a plain file or folder whose relative name stays inside ``dest``. Absolute
    names, ``..`` components, links and special files are refused, naming the member, before
    anything is written. Links are refused even when they point inside: none of the pinned archives
    has one, and chains of links are how escapes slip past checks on names. Where Python has it,
    tarfile's own ``filter="data"`` checks again. The archive is unpacked into a temporary sibling
    folder that is renamed to ``dest`` only when complete, so ``dest`` is either absent or whole.
    An existing ``dest`` is returned as it is.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part"))
    try:
        tmp.chmod(0o755)  # mkdtemp's folders are private; a shared cache must be readable by all
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                for m in members:
                    _refuse_unsafe(m, archive)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    tar.extractall(tmp, members=members, filter="data")
                else:
                    tar.extractall(tmp, members=members)
        except (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{archive} could not be read ({e}); delete it and download it again.") from e
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp)  # another process (a second DDP rank) finished first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _refuse_unsafe(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        why = "an absolute path"
    elif ".." in re.split(r"[/\\]", name):
        why = "a path with '..' that climbs out of the target folder"
    elif member.issym() or member.islnk():
        why = f"a link to {member.linkname!r} (dataset archives hold only files and folders)"
    elif not (member.isfile() or member.isdir()):
        why = "a device, FIFO or other special file"
    else:
        return
    raise ValueError(f"refusing to extract {archive}: member {name!r} is {why}. Nothing was extracted.")


# ----------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format, optionally gzipped) into a numpy array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no IDX file at {path}.")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise ValueError(
                    f"{path} is not an unsigned-byte IDX file (header {zero:#x} {dtype_code:#x})."
                )
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(bytearray(f.read()), dtype=np.uint8)  # bytearray: writable, for torch
    except (EOFError, struct.error, zlib.error, gzip.BadGzipFile) as e:  # a cut-short or damaged file
        raise ValueError(f"{path} is truncated or corrupt ({e}); delete it and download it again.") from e
    if data.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: header says shape {shape}, found {data.size} values.")
    return data.reshape(shape)


# CIFAR-10's batches are Python pickles, and loading a pickle can run any code. The archive's SHA-256
# is pinned, but the extracted files sit in a writable folder, so only what the batches contain may
# be built: numpy arrays (and the codec call Python 3 pickles use for their bytes).
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never needs")
        return _PICKLE_GLOBALS[module, name]


_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


def _read_cifar(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) from an extracted ``cifar-10-batches-py`` folder."""
    xs, ys = [], []
    for name in _CIFAR_BATCHES[split]:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(
                f"{folder} has no {name}: delete {folder} and load again (it is re-extracted)."
            )
        try:
            with open(path, "rb") as f:
                # latin1: the batches were pickled by Python 2, and numpy needs their bytes unchanged
                batch = _BatchUnpickler(f, encoding="latin1").load()
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a CIFAR-10 batch ({e!r}); delete {folder} and load again."
            ) from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
            raise ValueError(
                f"{path} holds data {data.shape} and labels {labels.shape}, not (N, 3072), (N,)."
            )
        xs.append(data.reshape(-1, 3, 32, 32))  # each row is the red plane, then green, then blue
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- loaders


def _cifar_batches_dir(folder: Path) -> Path | None:
    # ours: <folder>/cifar-10-python/cifar-10-batches-py; also torchvision's <folder>/cifar-10-batches-py
    for d in (folder / "cifar-10-python" / "cifar-10-batches-py", folder / "cifar-10-batches-py"):
        if d.is_dir():
            return d
    return None


def _present(spec: ImageDatasetSpec, folder: Path, needed: Sequence[str]) -> bool:
    if spec.kind == "cifar" and _cifar_batches_dir(folder) is not None:
        return True
    # IDX files may also lie there uncompressed (as torchvision and some packages leave them)
    return all((folder / n).exists() or (folder / n.removesuffix(".gz")).exists() for n in needed)


def _load(
    name: str, split: str, root: Path | None, download_missing: bool, labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Find (or fetch) the files for ``split`` and read them; see the module docstring for where."""
    spec, split = _spec(name), _split(split)
    needed = spec.splits[split] if labels or spec.kind == "cifar" else spec.splits[split][:1]
    cache = data_root() / spec.folder
    # (folder, whether its files are checked against the pinned SHA-256 before use)
    if root is not None:
        places = [(Path(root), False)]
    else:
        places = [(d, False) for d in spec.system_dirs] + [(cache, True)]
    found = next(((d, check) for d, check in places if _present(spec, d, needed)), None)
    if found is None and download_missing:
        target = Path(root) if root is not None else cache
        for n in needed:  # download() verifies what it fetches and any file already there
            f = spec.file(n)
            download([m + n for m in spec.mirrors], target / n, f.sha256, size=f.size)
        found = (target, False)
    if found is None:
        where = ", ".join(str(d) for d, _ in places)
        ways = [f"pass download=True (needs the internet; fetches {', '.join(needed)} into {root or cache})"]
        if spec.system_dirs:  # only Fashion-MNIST has a Debian package
            ways.insert(
                0, "install Debian's 'dataset-fashion-mnist' package (apt-get install dataset-fashion-mnist)"
            )
        raise FileNotFoundError(
            f"{spec.title} ({split}) not found in {where}. To get it, {', or '.join(ways)}; "
            f"or put those files there yourself (from {spec.mirrors[0]})."
        )
    folder, check = found

    def path(n: str) -> Path:
        p = folder / n
        if p.exists():
            return verify_file(p, spec.file(n).sha256, spec.file(n).size) if check else p
        return folder / n.removesuffix(".gz")

    if spec.kind == "cifar":
        batches = _cifar_batches_dir(folder)
        if batches is None:  # only the archive is there: unpack it next to itself
            extract_tar(path(needed[0]), folder / "cifar-10-python")
            batches = folder / "cifar-10-python" / "cifar-10-batches-py"
        x, y = _read_cifar(batches, split)
        return x, y if labels else None
    x = read_idx(path(needed[0]))
    if x.ndim != 3:
        raise ValueError(f"{path(needed[0])} holds an array of shape {x.shape}; images must be (N, H, W).")
    y = read_idx(path(needed[1])).astype(np.int64) if labels else None
    if y is not None and y.shape != (len(x),):
        raise ValueError(f"{folder}: {len(x)} images but labels of shape {y.shape}; the files do not match.")
    return x[:, None], y


def load_image_dataset(
    name: str, split: str = "train", *, root: Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of ``name`` (a key of ``IMAGE_DATASETS``): uint8 (N, C, H, W) and int64 (N,).

    Kept as uint8 (CIFAR-10's training set is 150 MB so, 600 MB as float32): move batches to the
    GPU and scale them there with ``normalize_images``. ``root`` is the folder holding this dataset's
    files (default: system folders, then the download cache); ``download=True`` fetches missing
    files, verified, into it. ``split`` is 'train' or 'test'.
    """
    x, y = _load(name, split, root, download, labels=True)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 to float32 in [-1, 1], the range every network in the book sees."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 pixels (0..255); got {x.dtype}.")
    return x.float() / 127.5 - 1


def load_mnist(split: str = "train", *, root: Path | None = None, download: bool = False) -> torch.Tensor:
    """MNIST digits, float32 (N, 1, 28, 28) in [-1, 1]. Labels: ``load_image_dataset("mnist", split)``."""
    return normalize_images(torch.from_numpy(_load("mnist", split, root, download, labels=False)[0]))


def load_fashion_mnist(
    split: str = "train", root: Path | None = None, *, download: bool = False
) -> torch.Tensor:
    """Fashion-MNIST images, shape (N, 1, 28, 28) in [-1, 1], from IDX files on disk.

    Looks in ``root``, or in Debian's ``dataset-fashion-mnist`` location and then the download cache.
    ``download=True`` fetches missing files (verified). Labels: ``load_image_dataset("fashion_mnist")``.
    """
    return normalize_images(torch.from_numpy(_load("fashion_mnist", split, root, download, labels=False)[0]))


def load_cifar10(split: str = "train", *, root: Path | None = None, download: bool = False) -> torch.Tensor:
    """CIFAR-10 images, float32 (N, 3, 32, 32) in [-1, 1]. Labels: ``load_image_dataset("cifar10", split)``."""
    return normalize_images(torch.from_numpy(_load("cifar10", split, root, download, labels=False)[0]))


# ----------------------------------------------------------------------------- transforms and batches


def pad_images(x: torch.Tensor, size: int = 32, value: float = -1.0) -> torch.Tensor:
    """Pad images (..., H, W) to (..., size, size), centred, with ``value``: -1 is the background in [-1, 1].

    28x28 digits become 32x32, which a U-Net halves cleanly three times. Scale first: integer pixels
    padded with -1 would be nonsense, so they are refused.
    """
    if not x.is_floating_point():
        raise TypeError(f"pad_images pads scaled images; got {x.dtype} (call normalize_images first).")
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images are {h}x{w}, larger than the target {size}x{size}.")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=value)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of a batch (N, C, H, W) left-right, independently, with probability ``p``.

    The coins are drawn on the generator's device (without one, on ``x``'s device) and the result stays
    on ``x``'s device, so the same call serves CPU, CUDA and meta tensors, and a seeded generator
    gives the same flips every time.
    """
    device = generator.device if generator is not None else x.device
    flip = torch.rand(x.shape[0], device=device, generator=generator) < p
    flip = flip.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(flip, x.flip(-1), x)


def _images_only(batch):
    return default_collate(batch)[0]


def image_loader(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over in-memory images (and labels): batches of ``x``, or ``(x, y)`` pairs if ``y`` is given.

    The order is a pure function of ``seed``: each epoch draws a new permutation from one seeded
    generator. A ``sampler`` replaces that order; for DDP pass
    ``DistributedSampler(x, num_replicas=world_size, rank=rank, seed=seed)`` and call its
    ``set_epoch(epoch)`` every epoch (``shuffle`` is then ignored). For GPU training keep ``x`` uint8
    on the CPU with ``pin_memory=True``, move each batch with ``.to(device, non_blocking=True)`` and
    scale it there. ``num_workers=0`` suits tensors already in memory: workers would only copy them.
    """
    if y is not None and len(y) != len(x):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels.")
    return DataLoader(
        TensorDataset(x) if y is None else TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,  # DataLoader refuses both; the sampler decides the order
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        collate_fn=_images_only if y is None else None,
        pin_memory=pin_memory,
    )
