"""CIFAR-10 loading, statistics, normalization, augmentation and batching.

Everything here works on NumPy arrays in NCHW layout (the :class:`DataLoader` and
:func:`crop_flip` also on a GPU backend's arrays):

* images ``x: (N, 3, 32, 32) uint8`` (raw pixels, 0..255),
* labels ``y: (N,) int64`` in 0..9.

Images stay uint8 until a batch is handed out; only the batch being produced is
converted to float32, so the float copy of the whole training set (600 MB) is
never made.

Sources accepted by :func:`load_cifar10`:

* the official ``cifar-10-python.tar.gz`` (read from the tar stream, nothing is
  extracted to disk),
* an extracted ``cifar-10-batches-py/`` folder, or a folder that contains it,
* a prepared ``.npz`` written by :func:`save_prepared` (fast to load, no pickle).

Every problem with the data raises :class:`DatasetError`, whose message names
the file or member at fault and says what to do about it.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import posixpath
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn.atomic import atomic_path
from cnn.backend import Backend, backend_of, get_backend
from cnn.errors import UserError

__all__ = [
    "CIFAR10",
    "CIFAR10_CLASSES",
    "DataLoader",
    "DatasetError",
    "channel_stats",
    "crop_flip",
    "load_cifar10",
    "load_prepared_stats",
    "normalization_stats",
    "normalize",
    "save_prepared",
]

#: The official class names, in label order (as in ``batches.meta``).
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]

BATCH_DIR = "cifar-10-batches-py"
TRAIN_MEMBERS = [f"data_batch_{i}" for i in range(1, 6)]
TEST_MEMBER = "test_batch"
META_MEMBER = "batches.meta"
MEMBERS = [*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER]

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
ROW_SIZE = 3 * 32 * 32  # 3072: one image as R, G, B planes, each 32x32 row-major

_FETCH_HINT = "re-download cifar-10-python.tar.gz (official md5 c58f30108f718f92721af3b95e74349a)"


class DatasetError(UserError, ValueError):
    """A data file or array is missing, corrupt or malformed.

    The message says which file/member is at fault and what to do.
    """


@dataclass(repr=False)
class CIFAR10:
    """The data set, images as uint8 NCHW.

    train_x: (N_train, 3, 32, 32) uint8    train_y: (N_train,) int64 in 0..9
    test_x:  (N_test, 3, 32, 32) uint8     test_y:  (N_test,) int64 in 0..9
    classes: the 10 class names in label order.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]

    def __repr__(self) -> str:  # the default repr would print the arrays
        return (f"CIFAR10(train_x={self.train_x.shape}, test_x={self.test_x.shape}, "
                f"classes={self.classes})")


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def load_cifar10(path: str | os.PathLike) -> CIFAR10:
    """Load CIFAR-10 from an archive, an extracted folder or a prepared ``.npz``.

    path: ``cifar-10-python.tar.gz``; ``cifar-10-batches-py/`` or a folder
    containing it; or a ``.npz`` written by :func:`save_prepared`.
    Returns a validated :class:`CIFAR10`.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"{path} does not exist: pass the path of cifar-10-python.tar.gz, of the "
            f"extracted {BATCH_DIR}/ folder, or of a prepared .npz")
    if path.is_dir():
        ds = _load_folder(path)
    else:
        _check_readable(path)
        ds = _load_npz(path) if path.suffix == ".npz" else _load_archive(path)
    _validate(ds, str(path))
    return ds


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that can only build the objects a CIFAR-10 batch contains.

    The official format is pickle, so pickle is used, but only on the named
    member files of the data set and with this allow-list: a tampered file
    cannot make unpickling call anything but these constructors.
    """

    _ALLOWED = {
        ("_codecs", "encode"),                       # bytes, under pickle protocol 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),   # pickles written by NumPy 1.x
        ("numpy._core.multiarray", "_reconstruct"),  # pickles written by NumPy 2.x
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    """Unpickle one batch/meta member (``encoding='bytes'``: Python 2 strings stay bytes)."""
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on garbage (EOFError, KeyError, ...)
        raise DatasetError(f"{where} is not a readable CIFAR-10 pickle ({e!r}): the file "
                           f"is corrupt; {_FETCH_HINT}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{where} holds a {type(obj).__name__}, expected a dict: "
                           f"not a CIFAR-10 batch file; {_FETCH_HINT}")
    return obj


def _load_archive(path: Path) -> CIFAR10:
    """Read the batches straight from the tar.gz stream (no extraction to disk)."""
    wanted = {f"{BATCH_DIR}/{m}": m for m in MEMBERS}
    found: dict[str, dict] = {}
    is_gzip = None
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            # gzip.GzipFile rather than tarfile's own "r|gz": tarfile's stream
            # reader never checks the gzip CRC-32, GzipFile does once read to EOF.
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
            # "r|": a forward-only stream; members are unpickled in archive
            # order, so the data is decompressed once and never seeked.
            with tarfile.open(fileobj=stream, mode="r|" if is_gzip else "r|*",
                              bufsize=1 << 20) as tar:
                for info in tar:
                    name = posixpath.normpath(info.name)
                    if name in wanted and info.isfile():
                        data = tar.extractfile(info).read()
                        found[wanted[name]] = _unpickle(data, f"{path}: member {name}")
            if is_gzip:
                # The tar reader stops at its end-of-archive block; drain the rest
                # (padding) so GzipFile reaches EOF and verifies CRC and length.
                while stream.read(1 << 20):
                    pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        # gzip.BadGzipFile is an OSError; truncation shows up as EOFError/ReadError.
        if is_gzip is False and not found and path.suffix not in (".gz", ".tgz", ".tar"):
            # no archive at all, by its name and its bytes: a JSON file, a PNG, ...
            raise DatasetError(f"{path} is not a .tar.gz archive nor a prepared .npz: pass "
                               f"cifar-10-python.tar.gz, its extracted {BATCH_DIR}/ folder, or "
                               "the .npz that `dvc repro normalize` writes") from e
        raise DatasetError(f"{path}: archive is truncated or corrupt ({e}): re-download "
                           f"it or check its md5 (official: "
                           f"c58f30108f718f92721af3b95e74349a)") from e
    missing = [f"{BATCH_DIR}/{m}" for m in MEMBERS if m not in found]
    if missing:
        raise DatasetError(f"{path}: member(s) {', '.join(missing)} missing from the "
                           f"archive: it is incomplete; {_FETCH_HINT}")
    return _assemble(found, str(path))


def _check_readable(path: Path) -> None:
    """A file that cannot be opened is not a corrupt one: say so (the readers would
    report a permission error as a truncated archive)."""
    try:
        open(path, "rb").close()
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e.strerror}): check its permissions") from e


def _load_folder(path: Path) -> CIFAR10:
    """Read an extracted ``cifar-10-batches-py/`` (given itself or its parent)."""
    # The folder itself if it holds batch files, else its cifar-10-batches-py/ child.
    is_batch_dir = path.name == BATCH_DIR or any((path / m).exists() for m in MEMBERS)
    folder = path if is_batch_dir else path / BATCH_DIR
    if not folder.is_dir():
        raise DatasetError(f"{path} is a folder without {BATCH_DIR}/ or its batch files: "
                           f"pass the extracted {BATCH_DIR}/ folder or the folder holding it")
    found = {}
    for m in MEMBERS:
        f = folder / m
        if not f.is_file():
            raise DatasetError(f"{f}: member {BATCH_DIR}/{m} missing: the extracted "
                               f"folder is incomplete; extract the archive again")
        _check_readable(f)
        found[m] = _unpickle(f.read_bytes(), str(f))
    return _assemble(found, str(folder))


def _batch_arrays(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch; return ``x: (n, 3, 32, 32) uint8``, ``y: (n,) int64``."""
    for key in (b"data", b"labels"):
        if key not in batch:
            raise DatasetError(f"{where} has no {key!r} entry: not a CIFAR-10 batch; "
                               f"{_FETCH_HINT}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != ROW_SIZE:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{where}: data is {desc}, expected uint8 (n, {ROW_SIZE}) "
                           f"(32x32 RGB rows): not CIFAR-10 data; {_FETCH_HINT}")
    labels = _labels(batch[b"labels"], where)
    if len(labels) != len(data):
        raise DatasetError(f"{where}: {len(labels)} labels for {len(data)} images: "
                           f"the batch is inconsistent; {_FETCH_HINT}")
    # Rows are R, G, B planes of 32x32 row-major pixels, so this reshape is NCHW (a view).
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _labels(labels, where: str) -> np.ndarray:
    """Labels as ``(n,) int64``, checked to lie in 0..9."""
    y = np.asarray(labels)
    if y.ndim != 1 or not (y.size == 0 or np.issubdtype(y.dtype, np.integer)):
        raise DatasetError(f"{where}: labels must be a flat list of integers, got "
                           f"{y.dtype} {y.shape}; {_FETCH_HINT}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DatasetError(f"{where}: labels out of range 0..{NUM_CLASSES - 1} "
                           f"(found {y.min()}..{y.max()}): not CIFAR-10 labels; {_FETCH_HINT}")
    return y


def _assemble(found: dict[str, dict], where: str) -> CIFAR10:
    """Join the 5 training batches; decode the class names."""
    parts = [_batch_arrays(found[m], f"{where}: member {BATCH_DIR}/{m}") for m in TRAIN_MEMBERS]
    test_x, test_y = _batch_arrays(found[TEST_MEMBER], f"{where}: member {BATCH_DIR}/{TEST_MEMBER}")
    names = found[META_MEMBER].get(b"label_names")
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{where}: member {BATCH_DIR}/{META_MEMBER} has no list of "
                           f"label_names; {_FETCH_HINT}")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    return CIFAR10(
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        classes=classes,
    )


def _validate(ds: CIFAR10, where: str) -> None:
    """Check shapes, dtypes, label ranges and class names of a loaded set."""
    for split in ("train", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise DatasetError(f"{where}: {split}_x is {x.dtype} {x.shape}, expected uint8 "
                               f"(N, 3, 32, 32); rebuild the file from the official archive")
        if y.shape != (len(x),):
            raise DatasetError(f"{where}: {split}_y has shape {y.shape} for {len(x)} images; "
                               f"rebuild the file from the official archive")
        if len(x) == 0:  # training needs a batch, and the accuracies divide by the count
            raise DatasetError(f"{where}: the {split} set has no images; rebuild the file from the "
                               "official archive")
        _labels(y, f"{where}: {split}_y")
    if len(ds.classes) != NUM_CLASSES:
        raise DatasetError(f"{where}: {len(ds.classes)} class names, expected "
                           f"{NUM_CLASSES}; {_FETCH_HINT}")


# ----------------------------------------------------------------------------
# Prepared .npz
# ----------------------------------------------------------------------------

_NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y", "classes")


def save_prepared(path: str | os.PathLike, ds: CIFAR10, mean, std) -> None:
    """Write ``ds`` plus its channel ``mean``/``std`` (each (3,)) as an uncompressed ``.npz``.

    Atomic: the file is written under a temporary name in the same directory and
    then renamed over ``path``, so a crash leaves either the old file or the new
    one, never half of one. Class names are stored as a unicode array, so
    loading needs no pickle.
    """
    path = Path(path)
    mean, std = _stats_array(mean, "mean"), _stats_array(std, "std")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x,
                 test_y=ds.test_y, classes=np.array(ds.classes, dtype=str),
                 mean=mean, std=std)


def _open_npz(path: Path):
    if not zipfile.is_zipfile(path):  # NumPy would guess a pickle and suggest allow_pickle
        raise DatasetError(f"{path}: not a .npz archive (truncated, or another kind of file): "
                           "delete it and prepare it again from the archive")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npz ({e}): delete it and prepare "
                           f"it again from the archive") from e


def _load_npz(path: Path) -> CIFAR10:
    with _open_npz(path) as z:
        missing = [k for k in _NPZ_KEYS if k not in z.files]
        if missing:
            what = ("a checkpoint (written by training), not a data set" if "meta" in z.files else
                    f"not a prepared data set (it lacks {', '.join(missing)})")
            raise DatasetError(f"{path} is {what}: pass cifar-10-python.tar.gz, its extracted "
                               f"{BATCH_DIR}/ folder, or the .npz that `dvc repro normalize` "
                               "(python -m pipeline.normalize) writes")
        try:
            arrays = {k: z[k] for k in _NPZ_KEYS}  # reads each array fully into memory
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise DatasetError(f"{path}: prepared file is truncated or corrupt ({e}): "
                               f"delete it and prepare it again") from e
    return CIFAR10(
        train_x=arrays["train_x"], train_y=_labels(arrays["train_y"], f"{path}: train_y"),
        test_x=arrays["test_x"], test_y=_labels(arrays["test_y"], f"{path}: test_y"),
        classes=[str(c) for c in arrays["classes"]],
    )


def load_prepared_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Return ``(mean, std)`` (each (3,) float64) stored in a prepared ``.npz``.

    Returns None when ``path`` is not a prepared file (an archive or a folder)
    or holds no stats: compute them with :func:`channel_stats` instead.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist: pass the path of a prepared .npz")
    if path.is_dir() or path.suffix != ".npz":
        return None
    with _open_npz(path) as z:
        if "mean" not in z.files or "std" not in z.files:
            return None
        mean, std = z["mean"], z["std"]
    return _stats_array(mean, f"{path}: mean"), _stats_array(std, f"{path}: std")


def normalization_stats(path: str | os.PathLike, ds: CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` for data loaded from ``path``: those stored in a prepared ``.npz``,
    else computed from ``ds.train_x`` with :func:`channel_stats`."""
    stats = load_prepared_stats(path)
    return stats if stats is not None else channel_stats(ds.train_x)


def _stats_array(v, what: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise DatasetError(f"{what} must be 3 finite per-channel values, got {a!r}")
    return a


# ----------------------------------------------------------------------------
# Statistics and normalization
# ----------------------------------------------------------------------------

def _check_images(x, what: str = "x") -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{what} must be uint8 images (N, 3, H, W), got {desc}: pass the "
                           f"raw images (e.g. CIFAR10.train_x), not normalized floats")


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (ddof=0) of ``x / 255``.

    x: (N, 3, H, W) uint8. Returns (mean (3,), std (3,)) float64.
    Exact: pixel sums and sums of squares are accumulated as integers
    (chunk by chunk, so only a (chunk, 3, H, W) uint32 temporary is ever made)
    and the variance is formed from them with Python's unbounded ints.
    """
    _check_images(x)
    if len(x) == 0:
        raise DatasetError("channel_stats needs at least one image, got an empty array")
    s = np.zeros(3, dtype=np.int64)
    sq = np.zeros(3, dtype=np.int64)
    for i in range(0, len(x), chunk):  # loop over chunks, not images
        c = x[i:i + chunk].astype(np.uint32)  # 255**2 fits; int64 sums below can't overflow
        s += c.sum(axis=(0, 2, 3), dtype=np.int64)
        sq += (c * c).sum(axis=(0, 2, 3), dtype=np.int64)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    # n*sq can exceed int64 for the full set, so finish in Python ints (exact).
    mean = np.array([int(si) / (n * 255) for si in s])
    var = np.array([(n * int(qi) - int(si) ** 2) / (n * n) for si, qi in zip(s, sq)])
    return mean, np.sqrt(var) / 255


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """Return ``(x / 255 - mean) / std`` per channel as float32.

    x: (N, 3, H, W) or (3, H, W) uint8; mean, std: (3,). Returns float32 of x's shape.
    Computed as ``x * scale + shift`` with float32 (3, 1, 1) scale/shift: one
    multiply into a fresh float32 array, then an in-place add.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim not in (3, 4) \
            or x.shape[-3] != 3:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"normalize expects uint8 images (N, 3, H, W), got {desc}")
    scale, shift = _scale_shift(mean, std)
    out = np.multiply(x, scale, dtype=np.float32)
    out += shift
    return out


def _scale_shift(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """``(x / 255 - mean) / std`` as ``x * scale + shift``: float32 (3, 1, 1) each.

    mean, std: (3,) channel stats; every std must be positive.
    """
    mean, std = _stats_array(mean, "mean"), _stats_array(std, "std")
    if np.any(std <= 0):
        raise DatasetError(f"std must be positive per channel, got {std}")
    return ((1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1),
            (-mean / std).astype(np.float32).reshape(3, 1, 1))


# ----------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------

PAD = 4


def _draw_crops(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets and flips of ``n`` images, drawn in this order: dy, dx, flip (each (n,))."""
    return (rng.integers(0, 2 * PAD + 1, size=n), rng.integers(0, 2 * PAD + 1, size=n),
            rng.random(n) < 0.5)


def crop_flip(x, dy, dx, flip):
    """Random-crop-and-flip augmentation for given offsets, on whatever backend owns ``x``.

    x: (N, C, H, W); dy, dx: (N,) integer offsets in 0..2*PAD into the zero-padded image;
    flip: (N,) bool or 0/1. All on x's backend. Returns (N, C, H, W) of x's dtype.
    Vectorized: one padded copy, then one gather with per-image row/column indices.
    """
    B = backend_of(x)
    n, c, h, w = x.shape
    padded = B.zeros((n, c, h + 2 * PAD, w + 2 * PAD), dtype=B.dtype_name(x))  # zeros = black
    padded[:, :, PAD:PAD + h, PAD:PAD + w] = x
    i, j = B.arange(h), B.arange(w)
    rows = dy[:, None] + i                                  # (N, H) rows of each crop
    # A flipped crop reads its columns right to left: dx + (w-1-j) instead of dx + j
    # (arithmetic rather than a reversed slice, which torch tensors do not support).
    cols = dx[:, None] + j + B.astype(flip, "int64")[:, None] * (w - 1 - 2 * j)  # (N, W)
    # Broadcast (N,1,1,1), (1,C,1,1), (N,1,H,1), (N,1,1,W) -> (N, C, H, W).
    return padded[B.arange(n)[:, None, None, None], B.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------

class DataLoader:
    """Iterate ``(xb, yb)`` batches: xb (B, 3, H, W) float32 normalized, yb (B,) int64.

    x: (N, 3, H, W) uint8; y: (N,) integer labels; mean, std: (3,) channel stats.
    The last partial batch is kept unless ``drop_last``.

    ``backend`` (default NumPy) owns the batches: the uint8 images and the labels are
    copied to its device once, and every batch is gathered, augmented and normalized
    there, so a GPU run moves no image data between host and device after the start
    (CIFAR-10's training set is 150 MB as uint8). On the CPU backends this copies
    nothing.

    Order and augmentation of an epoch are a pure function of (seed, epoch), whatever
    the backend: the permutation and the crop offsets and flips of the whole epoch are
    drawn on the host from ``np.random.default_rng([seed, epoch])`` and sent to the device
    in one transfer. Call :meth:`set_epoch` before each epoch; iterating again without it
    repeats the same epoch exactly. This is what lets a run resumed from a checkpoint at
    epoch k reproduce an uninterrupted run.

    Memory: only one batch is gathered, augmented and converted to float at a time.
    """

    def __init__(self, x: np.ndarray, y, batch_size: int, *, shuffle: bool = False,
                 augment: bool = False, mean, std, seed: int = 0,
                 drop_last: bool = False, backend: Backend | None = None):
        _check_images(x)
        y = np.asarray(y)
        if y.shape != (len(x),):
            raise DatasetError(f"y has shape {y.shape} but x has {len(x)} images: pass "
                               f"one label per image")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.backend = B = backend or get_backend("numpy")
        self.x = B.asarray(x)
        self.y = B.asarray(_labels(y, "y"))  # int64, so every batch already is
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.mean = _stats_array(mean, "mean")
        self.std = _stats_array(std, "std")
        # normalize()'s x * scale + shift, with scale and shift kept on the device.
        self._scale, self._shift = map(B.asarray, _scale_shift(self.mean, self.std))
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Number of samples in the data set (N, including any dropped last batch)."""
        return len(self.x)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order/augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def _plan(self):
        """This epoch's (order, dy, dx, flip) rows, (4, N) int64 on the device (or (1, N))."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.num_samples
        rows = [rng.permutation(n) if self.shuffle else np.arange(n)]
        if self.augment:
            rows += _draw_crops(rng, n)
        return self.backend.asarray(np.stack(rows).astype(np.int64))

    def __iter__(self):
        B, plan, size = self.backend, self._plan(), self.batch_size
        for b in range(len(self)):
            part = plan[:, b * size:(b + 1) * size]
            idx = part[0]
            xb = self.x[idx]  # uint8 gather of this batch only
            if self.augment:
                xb = crop_flip(xb, part[1], part[2], part[3])
            out = B.astype(xb, "float32")  # a fresh float32 copy of the batch
            B.multiply(out, self._scale, out=out)
            out += self._shift
            yield out, self.y[idx]
