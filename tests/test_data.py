"""Tests for cnn.data (loading, stats, normalization, augmentation, loader) and cnn.synthetic."""

import dataclasses
import gzip
import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cnn.backend import backend_of
from cnn.data import (CIFAR10, CIFAR10_CLASSES, DataLoader, DatasetError, _draw_crops, channel_stats,
                      crop_flip, load_cifar10, load_prepared_stats, normalization_stats, normalize,
                      save_prepared)
from cnn.synthetic import write_synthetic_cifar10

N_TRAIN, N_TEST = 500, 100


# ----------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("syn") / "cifar-10-python.tar.gz",
                                   n_train=N_TRAIN, n_test=N_TEST, seed=0)


@pytest.fixture(scope="module")
def ds(archive):
    return load_cifar10(archive)


def read_members(path):
    """{member name: unpickled dict} of a (synthetic, trusted) archive."""
    with tarfile.open(path) as tar:
        return {m.name: pickle.loads(tar.extractfile(m).read(), encoding="bytes")
                for m in tar if m.isfile()}


def write_members(path, members):
    """Write {member name: dict} as a tar.gz, pickled like the official files."""
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def member(name):
    return f"cifar-10-batches-py/{name}"


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def test_archive_contents_shapes_and_labels(archive, ds):
    assert ds.train_x.shape == (N_TRAIN, 3, 32, 32) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (N_TEST, 3, 32, 32) and ds.test_x.dtype == np.uint8
    assert ds.train_y.shape == (N_TRAIN,) and ds.train_y.dtype == np.int64
    assert ds.test_y.shape == (N_TEST,) and ds.test_y.dtype == np.int64
    assert ds.classes == CIFAR10_CLASSES
    assert set(np.unique(ds.train_y)) == set(range(10))
    # Train set = batches 1..5 in order; rows reshape straight to NCHW.
    raw = read_members(archive)
    batches = [raw[member(f"data_batch_{i}")] for i in range(1, 6)]
    np.testing.assert_array_equal(ds.train_x.reshape(N_TRAIN, -1),
                                  np.concatenate([b[b"data"] for b in batches]))
    np.testing.assert_array_equal(ds.train_y, sum((b[b"labels"] for b in batches), []))
    np.testing.assert_array_equal(ds.test_y, raw[member("test_batch")][b"labels"])
    # Red plane first: pixel (0, 0) of channel 0 is column 0, of channel 1 column 1024.
    np.testing.assert_array_equal(ds.train_x[:, 1, 0, 0], ds.train_x.reshape(N_TRAIN, -1)[:, 1024])


def test_synthetic_is_reproducible(tmp_path, archive):
    again = write_synthetic_cifar10(tmp_path / "again.tar.gz", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    assert again.read_bytes() == archive.read_bytes()


def test_load_extracted_folder_and_parent(tmp_path, archive, ds):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    for path in (tmp_path / "cifar-10-batches-py", tmp_path):
        got = load_cifar10(path)
        for k in ("train_x", "train_y", "test_x", "test_y"):
            np.testing.assert_array_equal(getattr(got, k), getattr(ds, k))
        assert got.classes == ds.classes


def test_prepared_round_trip(tmp_path, archive, ds):
    mean, std = channel_stats(ds.train_x)
    out = tmp_path / "prepared.npz"
    save_prepared(out, ds, mean, std)
    assert [p.name for p in tmp_path.iterdir()] == ["prepared.npz"]  # no temp file left
    got = load_cifar10(out)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        a, b = getattr(got, k), getattr(ds, k)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert got.classes == ds.classes
    m, s = load_prepared_stats(out)
    np.testing.assert_array_equal(m, mean)
    np.testing.assert_array_equal(s, std)
    assert load_prepared_stats(archive) is None  # not a prepared file: compute stats instead


def test_save_prepared_is_atomic(tmp_path, ds, monkeypatch):
    out = tmp_path / "prepared.npz"
    save_prepared(out, ds, [0.5] * 3, [0.25] * 3)
    before = out.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash while writing")
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_prepared(out, ds, [0.1] * 3, [0.2] * 3)
    assert out.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["prepared.npz"]


def test_written_files_get_the_usual_permissions(tmp_path, ds):
    """Atomic writes go through a private temporary file (mode 0600); the finished file
    gets what a plain open() gives under the process's umask (0644 under 022)."""
    save_prepared(tmp_path / "p.npz", ds, [0.5] * 3, [0.25] * 3)
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "p.npz").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "nope.tar.gz")


def test_truncated_archive(tmp_path, archive):
    data = archive.read_bytes()
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupt.*md5"):
        load_cifar10(bad)


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(100_000))
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_cifar10(bad)


def test_a_file_that_is_no_data_set_says_what_to_pass(tmp_path, ds):
    """A checkpoint, or a JSON file, given as the data once got advice for a damaged archive
    or a name internal to the code."""
    from cnn.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "best.npz", {"0.weight": np.zeros(3, np.float32)}, {"model": "simple"})
    stats = tmp_path / "stats.json"
    stats.write_text('{"mean": [0.5, 0.5, 0.5]}')
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    for path, what in ((checkpoint, "is a checkpoint \\(written by training\\), not a data set"),
                       (stats, "is not a .tar.gz archive nor a prepared .npz"),
                       (other, "is not a prepared data set \\(it lacks train_x, train_y, test_x, test_y, classes\\)")):
        with pytest.raises(DatasetError, match=f"{path.name} {what}: pass cifar-10-python.tar.gz, its extracted "
                                               "cifar-10-batches-py/ folder, or the .npz that `dvc repro normalize`"):
            load_cifar10(path)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_set_without_images_is_refused_before_training(tmp_path, ds, split):
    """An empty test set once trained a whole epoch, then divided by zero."""
    empty = dataclasses.replace(ds, **{f"{split}_x": getattr(ds, f"{split}_x")[:0],
                                       f"{split}_y": getattr(ds, f"{split}_y")[:0]})
    save_prepared(tmp_path / "p.npz", empty, [0.5] * 3, [0.25] * 3)
    with pytest.raises(DatasetError, match=f"p.npz: the {split} set has no images"):
        load_cifar10(tmp_path / "p.npz")


@pytest.mark.parametrize("n_train, n_test", [(60, 0), (4, 10)])
def test_synthetic_data_needs_an_image_in_every_batch(tmp_path, n_train, n_test):
    with pytest.raises(ValueError, match=rf"need n_train >= 5 \(an image for each of the 5 training batches\) "
                                         rf"and n_test >= 1; got {n_train}, {n_test}"):
        write_synthetic_cifar10(tmp_path / "c.tar.gz", n_train=n_train, n_test=n_test)


def test_flipped_bytes_are_detected(tmp_path, archive):
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the deflate data
    bad = tmp_path / "flipped.tar.gz"
    bad.write_bytes(data)
    with pytest.raises(DatasetError, match="corrupt"):
        load_cifar10(bad)
    data = bytearray(archive.read_bytes())
    data[-8] ^= 0x01  # the gzip trailer's CRC-32: members decode fine, only the CRC tells
    bad.write_bytes(data)
    with pytest.raises(DatasetError, match="CRC check failed"):
        load_cifar10(bad)


def test_corrupt_prepared_file(tmp_path, ds):
    out = tmp_path / "prepared.npz"
    save_prepared(out, ds, [0.5] * 3, [0.25] * 3)
    out.write_bytes(out.read_bytes()[:100_000])
    with pytest.raises(DatasetError, match="prepared.npz: not a .npz archive .*prepare it again"):
        load_cifar10(out)
    out.write_text("not an archive")  # NumPy alone would suggest loading it with allow_pickle
    with pytest.raises(DatasetError, match="prepared.npz: not a .npz archive") as err:
        load_cifar10(out)
    assert "pickle" not in str(err.value)


@pytest.mark.parametrize("layout", ["archive", "folder", "prepared"])
def test_an_unreadable_file_is_not_called_corrupt(tmp_path, archive, ds, layout, monkeypatch):
    """A permission error, say. (Tests may run as root, who may read anything, so opening
    the one file is made to fail.)"""
    import builtins

    if layout == "archive":
        path = unreadable = archive
    elif layout == "folder":
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path, filter="data")
        path, unreadable = tmp_path, tmp_path / "cifar-10-batches-py" / "data_batch_2"
    else:
        path = unreadable = tmp_path / "prepared.npz"
        save_prepared(path, ds, [0.5] * 3, [0.25] * 3)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if Path(file) == unreadable:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(DatasetError, match=f"cannot read {re.escape(str(unreadable))} \\(Permission denied\\): "
                                           "check its permissions"):
        load_cifar10(path)


def test_missing_member(tmp_path, archive):
    members = read_members(archive)
    del members[member("data_batch_3")]
    bad = write_members(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DatasetError, match="cifar-10-batches-py/data_batch_3 missing"):
        load_cifar10(bad)


def test_missing_member_in_folder(tmp_path, archive):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch missing"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.update({b"data": b[b"data"][:, :3071]}), r"data_batch_2: data is uint8 \(100, 3071\)"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "expected uint8"),
    (lambda b: b[b"labels"].__setitem__(7, 10), r"data_batch_2: labels out of range 0\.\.9"),
    (lambda b: b[b"labels"].__setitem__(7, -1), "labels out of range"),
    (lambda b: b[b"labels"].pop(), "99 labels for 100 images"),
    (lambda b: b.pop(b"data"), "no b'data' entry"),
])
def test_malformed_batch(tmp_path, archive, edit, message):
    members = read_members(archive)
    edit(members[member("data_batch_2")])
    bad = write_members(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DatasetError, match=message):
        load_cifar10(bad)


def test_wrong_class_names(tmp_path, archive):
    members = read_members(archive)
    members[member("batches.meta")][b"label_names"].pop()
    with pytest.raises(DatasetError, match="9 class names"):
        load_cifar10(write_members(tmp_path / "bad.tar.gz", members))


class _Evil:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


def test_unsafe_pickle_is_refused(tmp_path, archive):
    members = read_members(archive)
    members[member("batches.meta")][b"payload"] = _Evil()
    with pytest.raises(DatasetError, match="refusing to load"):
        load_cifar10(write_members(tmp_path / "bad.tar.gz", members))


# ----------------------------------------------------------------------------
# Statistics and normalization
# ----------------------------------------------------------------------------

def test_channel_stats_matches_float64(ds):
    ref = ds.train_x.astype(np.float64) / 255
    mean, std = channel_stats(ds.train_x, chunk=37)  # odd chunk: exercises the remainder
    assert mean.shape == std.shape == (3,) and mean.dtype == std.dtype == np.float64
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-12)


def test_channel_stats_rejects_floats(ds):
    with pytest.raises(DatasetError, match="uint8"):
        channel_stats(ds.train_x.astype(np.float32))


def test_normalize(ds):
    mean, std = channel_stats(ds.train_x)
    z = normalize(ds.train_x, mean, std)
    assert z.dtype == np.float32 and z.shape == ds.train_x.shape
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3), dtype=np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3), dtype=np.float64), 1, atol=1e-5)
    ref = (ds.train_x[:5] / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(z[:5], ref, atol=1e-5)
    with pytest.raises(DatasetError, match="std must be positive"):
        normalize(ds.train_x, mean, [std[0], -1.0, std[2]])


# ----------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------

def crop_offsets(img, out):
    """All (flip, dy, dx) such that `out` is that crop of the zero-padded (flipped) `img`."""
    hits = []
    for flip in (False, True):
        src = img[:, :, ::-1] if flip else img
        padded = np.pad(src, ((0, 0), (4, 4), (4, 4)))
        win = np.lib.stride_tricks.sliding_window_view(padded, (32, 32), axis=(1, 2))  # (3,9,9,32,32)
        match = (win == out[:, None, None]).all(axis=(0, 3, 4))  # (9, 9) over all 81 offsets
        # A flipped crop at offset dx of the flipped image is the crop at 8 - dx, then flipped.
        hits += [(flip, dy, 8 - dx if flip else dx) for dy, dx in zip(*np.nonzero(match))]
    return hits


def test_crop_offsets_and_flips_are_uniform():
    """Every offset 0..8 on each axis equally often, and half the images flipped, as
    torchvision's RandomCrop(32, padding=4) and RandomHorizontalFlip()."""
    n = 90_000
    dy, dx, flip = _draw_crops(np.random.default_rng(0), n)
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=9)
        assert len(counts) == 9 and np.all(np.abs(counts - n / 9) < 0.05 * n / 9), counts
    assert abs(flip.mean() - 0.5) < 0.01


# ----------------------------------------------------------------------------
# DataLoader
# ----------------------------------------------------------------------------

N_IDS = 103


@pytest.fixture(scope="module")
def id_data():
    """Images whose pixel (0, 0) encodes their index, and labels."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N_IDS, 3, 32, 32), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(N_IDS) % 256
    x[:, 1, 0, 0] = np.arange(N_IDS) // 256
    return x, rng.integers(0, 10, size=N_IDS)


def ids_of(loader):
    """Indices of the samples in iteration order (needs mean 0, std 1/255: identity)."""
    batches = list(loader)
    ids = np.concatenate([np.rint(xb[:, 0, 0, 0]) + 256 * np.rint(xb[:, 1, 0, 0])
                          for xb, _ in batches]).astype(int)
    return ids, batches


def make_loader(id_data, **kw):
    x, y = id_data
    kw.setdefault("batch_size", 10)
    return DataLoader(x, y, mean=[0, 0, 0], std=[1 / 255] * 3, **kw)


def test_loader_batches(id_data):
    loader = make_loader(id_data, shuffle=True)
    assert len(loader) == 11 and loader.num_samples == N_IDS
    _, batches = ids_of(loader)
    assert [len(yb) for _, yb in batches] == [10] * 10 + [3]
    for xb, yb in batches:
        assert xb.dtype == np.float32 and xb.shape[1:] == (3, 32, 32) and yb.dtype == np.int64
    dropped = make_loader(id_data, drop_last=True)
    assert len(dropped) == 10 and [len(yb) for _, yb in dropped] == [10] * 10


def test_loader_every_sample_once_with_its_label(id_data):
    x, y = id_data
    loader = make_loader(id_data, shuffle=True, seed=3)
    ids, batches = ids_of(loader)
    assert sorted(ids) == list(range(N_IDS))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), y[ids])
    np.testing.assert_array_equal(batches[0][0], normalize(x[ids[:10]], [0] * 3, [1 / 255] * 3))


def test_loader_order_is_function_of_seed_and_epoch(id_data):
    a, b = make_loader(id_data, shuffle=True, seed=7), make_loader(id_data, shuffle=True, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    ids3 = ids_of(a)[0]
    np.testing.assert_array_equal(ids3, ids_of(b)[0])
    np.testing.assert_array_equal(ids3, ids_of(a)[0])  # iterating again repeats the epoch
    a.set_epoch(4)
    assert not np.array_equal(ids3, ids_of(a)[0])
    assert not np.array_equal(ids3, ids_of(make_loader(id_data, shuffle=True, seed=8))[0])


def test_loader_orders_differ_for_every_seed_and_epoch(id_data):
    """(seed, epoch) -> order is one-to-one over a grid: no two runs or epochs share a
    shuffle (which seed + epoch, say, would make of seed 0 epoch 1 and seed 1 epoch 0)."""
    orders = set()
    for seed in range(4):
        loader = make_loader(id_data, shuffle=True, seed=seed)
        for epoch in range(4):
            loader.set_epoch(epoch)
            orders.add(tuple(ids_of(loader)[0]))
    assert len(orders) == 16


def test_loader_takes_labels_of_any_integer_type_and_refuses_others(id_data, backend):
    x, y = id_data
    loader = DataLoader(x, y.astype(np.int32), 10, mean=[0, 0, 0], std=[1 / 255] * 3, backend=backend)
    _, yb = next(iter(loader))
    assert backend.dtype_name(yb) == "int64"
    with pytest.raises(DatasetError, match=r"labels out of range 0..9 \(found 0..10\)"):
        DataLoader(x, np.where(y == y.max(), 10, y), 10, mean=[0, 0, 0], std=[1] * 3, backend=backend)


def test_loader_without_shuffle_keeps_order(id_data):
    loader = make_loader(id_data)
    loader.set_epoch(5)
    np.testing.assert_array_equal(ids_of(loader)[0], np.arange(N_IDS))


def test_loader_augmented_resume_reproduces(ds):
    mean, std = channel_stats(ds.train_x)

    def epochs(loader, which):
        out = []
        for e in which:
            loader.set_epoch(e)
            out.append([(xb.copy(), yb.copy()) for xb, yb in loader])
        return out

    kw = dict(batch_size=64, shuffle=True, augment=True, mean=mean, std=std, seed=11)
    full = epochs(DataLoader(ds.train_x, ds.train_y, **kw), [0, 1, 2])
    resumed = epochs(DataLoader(ds.train_x, ds.train_y, **kw), [2])  # "restart" at epoch 2
    for (xa, ya), (xb, yb) in zip(full[2], resumed[0], strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Augmentation really changed the images relative to plain normalization.
    plain = DataLoader(ds.train_x, ds.train_y, **{**kw, "augment": False})
    plain.set_epoch(2)
    xp, yp = next(iter(plain))
    np.testing.assert_array_equal(yp, full[2][0][1])
    assert not np.array_equal(xp, full[2][0][0])


def test_crop_flip_on_every_backend_crops_and_flips_each_image(backend, ds):
    """crop_flip on every backend equals slicing each padded image by hand (uint8 in, uint8 out)."""
    x = ds.train_x[:37]
    rng = np.random.default_rng(3)
    dy, dx = rng.integers(0, 9, 37), rng.integers(0, 9, 37)
    flip = rng.random(37) < 0.5
    assert flip.any() and not flip.all()
    # The oracle: each image sliced out of its padded copy, one at a time.
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    crops = [padded[k, :, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32] for k in range(37)]
    expected = np.stack([c[:, :, ::-1] if f else c for c, f in zip(crops, flip)])
    B = backend
    got = crop_flip(B.asarray(x), B.asarray(dy), B.asarray(dx), B.asarray(flip))
    assert backend_of(got) is B and B.dtype_name(got) == "uint8"
    np.testing.assert_array_equal(B.to_numpy(got), expected)


@pytest.mark.parametrize("augment_", [False, True], ids=["plain", "augment"])
def test_loader_on_every_backend_matches_numpy(backend, ds, augment_):
    """Batches built on the device equal the NumPy loader's (same order, crops, values)."""
    mean, std = channel_stats(ds.train_x)
    kw = dict(batch_size=64, shuffle=True, augment=augment_, mean=mean, std=std, seed=4)
    host, device = DataLoader(ds.train_x, ds.train_y, **kw), \
        DataLoader(ds.train_x, ds.train_y, backend=backend, **kw)
    host.set_epoch(1)
    device.set_epoch(1)
    assert backend_of(device.x) is backend and device.num_samples == host.num_samples
    n = 0
    for (xh, yh), (xd, yd) in zip(host, device, strict=True):
        assert backend_of(xd) is backend and backend.dtype_name(xd) == "float32"
        np.testing.assert_array_equal(backend.to_numpy(xd), xh)
        np.testing.assert_array_equal(backend.to_numpy(yd), yh)
        n += len(yh)
    assert n == N_TRAIN


def test_normalization_stats_prefers_prepared_file(tmp_path, archive, ds):
    computed = channel_stats(ds.train_x)
    np.testing.assert_array_equal(normalization_stats(archive, ds), computed)
    stored = (np.array([0.1, 0.2, 0.3]), np.array([0.4, 0.5, 0.6]))
    save_prepared(tmp_path / "p.npz", ds, *stored)
    np.testing.assert_array_equal(normalization_stats(tmp_path / "p.npz", ds), stored)


def test_loader_rejects_bad_input(id_data):
    x, y = id_data
    with pytest.raises(DatasetError, match="one label per image"):
        DataLoader(x, y[:-1], 10, mean=[0] * 3, std=[1] * 3)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(x, y, 0, mean=[0] * 3, std=[1] * 3)
    with pytest.raises(DatasetError, match="uint8"):
        DataLoader(x.astype(np.float32), y, 10, mean=[0] * 3, std=[1] * 3)
    # A zero std would divide by zero: NaN batches instead of an error.
    with pytest.raises(DatasetError, match="std must be positive"):
        DataLoader(x, y, 10, mean=[0] * 3, std=[0, 1, 1])


def test_loader_crops_draw_row_and_column_offsets_independently(ds):
    """The loader's crops are real 2-D shifts: dy and dx are drawn separately (not one offset
    used for both axes)."""
    x = ds.train_x[:120]
    loader = DataLoader(x, ds.train_y[:120], 40, augment=True, mean=[0] * 3, std=[1 / 255] * 3, seed=2)
    out = np.concatenate([np.rint(xb) for xb, _ in loader]).astype(np.uint8)  # identity normalisation
    found = [crop_offsets(x[i], out[i]) for i in range(len(x))]
    assert all(found), "every loader image must be a crop of the padded, possibly flipped input"
    pairs = {h[0][1:] for h in found}
    assert any(dy != dx for dy, dx in pairs) and len(pairs) > 30, pairs
    assert {h[0][0] for h in found} == {False, True}  # some flipped, some not


def test_gzip_crc_is_checked_even_with_a_long_tail_after_the_tar_end(tmp_path, archive):
    """The tar reader stops at its end-of-archive block; with more than its 1 MiB read size of
    data after that block, only draining the stream makes GzipFile verify the CRC."""
    padded = gzip.decompress(archive.read_bytes()) + bytes(3 << 20)
    good = tmp_path / "tail.tar.gz"
    good.write_bytes(gzip.compress(padded, mtime=0))
    assert len(load_cifar10(good).train_y) == 500
    data = bytearray(good.read_bytes())
    data[-8] ^= 0x01  # the gzip trailer's CRC-32
    bad = tmp_path / "tail_bad.tar.gz"
    bad.write_bytes(data)
    with pytest.raises(DatasetError, match="CRC check failed"):
        load_cifar10(bad)


def test_a_prepared_file_with_a_label_per_image_missing_is_refused(tmp_path, ds):
    bad = CIFAR10(train_x=ds.train_x, train_y=ds.train_y[:-1], test_x=ds.test_x, test_y=ds.test_y,
                  classes=ds.classes)
    save_prepared(tmp_path / "p.npz", bad, [0.5] * 3, [0.25] * 3)
    with pytest.raises(DatasetError, match=r"train_y has shape \(499,\) for 500 images"):
        load_cifar10(tmp_path / "p.npz")


def test_channel_stats_of_non_square_images():
    x = np.random.default_rng(0).integers(0, 256, (7, 3, 8, 20), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=3)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-12)


def test_a_renamed_extracted_folder_with_a_member_missing_names_the_member(tmp_path, archive):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = (tmp_path / "cifar-10-batches-py").rename(tmp_path / "cifar10")
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="test_batch missing"):
        load_cifar10(folder)


def test_synthetic_labels_are_balanced(ds):
    assert np.bincount(ds.train_y, minlength=10).tolist() == [50] * 10
    assert np.bincount(ds.test_y, minlength=10).tolist() == [10] * 10
