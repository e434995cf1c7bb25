"""A small synthetic CIFAR-10 in the official ``cifar-10-python.tar.gz`` format.

For tests and smoke runs without the real download. The layout is exactly the
official one (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta``; pickle protocol 2 dicts with bytes keys), so it exercises the
same loading code as the real archive.

The images are learnable: each class has its own mean colour plus a coarse
8x8-pixel-block pattern, and every image adds Gaussian noise to its class
prototype, so a small CNN beats chance (10%) within one epoch.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .data import BATCH_DIR, CIFAR10_CLASSES, IMAGE_SHAPE, META_MEMBER, TEST_MEMBER

__all__ = ["write_synthetic_cifar10"]


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    """Class prototypes, (10, 3, 32, 32) float32 in roughly 40..215."""
    colour = rng.uniform(70, 185, size=(10, 3, 1, 1))
    # A 4x4 grid per channel, blown up to 32x32 blocks: structure a conv net can see.
    pattern = rng.uniform(-30, 30, size=(10, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)
    return (colour + pattern).astype(np.float32)


def _images(protos: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy samples of the prototypes: (n, 3072) uint8 rows, R, G, B planes."""
    noise = rng.normal(0, 30, size=(len(labels), *IMAGE_SHAPE)).astype(np.float32)
    x = np.clip(protos[labels] + noise, 0, 255).round().astype(np.uint8)
    return x.reshape(len(labels), -1)


def _add(tar: tarfile.TarFile, name: str, obj) -> None:
    # Protocol 2, as the official files (written by Python 2) use.
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(f"{BATCH_DIR}/{name}")
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_synthetic_cifar10(path: str | os.PathLike, *, n_train: int = 500,
                            n_test: int = 100, seed: int = 0) -> Path:
    """Write a synthetic CIFAR-10 ``.tar.gz`` at ``path`` and return ``Path(path)``.

    n_train images are split as evenly as possible over data_batch_1..5, the official
    layout; n_test go to test_batch. Labels are balanced (each class within one of n/10)
    and shuffled. Same arguments give byte-identical files (fixed mtimes).
    """
    if n_train < 5 or n_test < 1:  # the loader reads no empty set, nor pickles an empty batch
        raise ValueError(f"need n_train >= 5 (an image for each of the 5 training batches) and "
                         f"n_test >= 1; got {n_train}, {n_test}")
    n_batches = 5
    rng = np.random.default_rng(seed)
    protos = _prototypes(rng)
    path = Path(path)
    # GzipFile(mtime=0, filename="") keeps the timestamp and name out of the
    # gzip header, so the archive bytes depend on the arguments only.
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        splits = [(f"data_batch_{i + 1}", part, f"training batch {i + 1} of {n_batches}")
                  for i, part in enumerate(np.array_split(np.arange(n_train), n_batches))]
        splits.append((TEST_MEMBER, np.arange(n_test), "testing batch 1 of 1"))
        for name, ids, batch_label in splits:
            labels = rng.permutation(np.arange(len(ids)) % 10)
            _add(tar, name, {
                b"batch_label": batch_label.encode(),
                b"labels": labels.tolist(),  # official: a list of Python ints
                b"data": _images(protos, labels, rng),
                b"filenames": [f"synthetic_{name}_{i:05d}.png".encode() for i in range(len(ids))],
            })
        _add(tar, META_MEMBER, {
            b"num_cases_per_batch": -(-n_train // n_batches),
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072,
        })
    return path
