"""Stage ``normalize``: validate the archive and write the prepared dataset.

Reads ``data/raw/cifar-10-python.tar.gz`` with ``cnn.data.load_cifar10`` (which checks
shapes, dtypes and labels), checks class names and counts, computes the per-channel mean
and standard deviation of the training images (on the [0, 1] scale) and writes

* ``data/prepared/cifar10.npz`` -- images (uint8), labels, class names, mean, std
  (``cnn.data.save_prepared``; the file every training run reads);
* ``data/prepared/stats.json``  -- mean, std, image counts per split and class,
  and the size of the prepared file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline._util import PipelineError, remove, summary, write_json
from pipeline.params import load


def check_dataset(ds, source: str) -> dict:
    """Per-split image counts (per class) of a loaded CIFAR10, after the checks that
    ``load_cifar10`` leaves to a training set: unique class names, no empty split, and
    images of every class to learn from. (Shapes, dtypes and label ranges are its own.)"""
    problems = []
    classes = list(ds.classes)
    if len(set(classes)) != len(classes):
        problems.append(f"class names are not unique: {classes!r}")
    counts = {}
    for split in ("train", "test"):
        y = getattr(ds, f"{split}_y")
        if len(y) == 0:
            problems.append(f"{split} split is empty")
            continue
        per_class = np.bincount(y, minlength=len(classes))
        counts[split] = {"images": int(len(y)), "per_class": dict(zip(classes, map(int, per_class)))}
    if "train" in counts:
        empty = [c for c, n in counts["train"]["per_class"].items() if n == 0]
        if empty:
            problems.append(f"the training set has no images of class(es) {', '.join(empty)}")
    if problems:
        raise PipelineError(f"{source} failed validation:\n  " + "\n  ".join(problems))
    return counts


def normalize(archive: Path = paths.RAW_ARCHIVE, out: Path = paths.PREPARED, stats_path: Path = paths.STATS) -> dict:
    from cnn.data import channel_stats, load_cifar10, save_prepared

    remove([out, stats_path])  # never leave a stale pair behind
    if not Path(archive).is_file():
        raise PipelineError(f"{archive} not found; run the download stage first (dvc repro download)")
    print(f"reading {archive}", file=sys.stderr)
    ds = load_cifar10(archive)
    counts = check_dataset(ds, str(archive))
    mean, std = channel_stats(ds.train_x)
    if not np.all(std > 0):  # normalising would divide by zero
        raise PipelineError(f"{archive}: a channel of the training images is constant (std {std})")
    try:
        save_prepared(out, ds, mean, std)
        stats = {
            "classes": list(ds.classes),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "train": counts["train"],
            "test": counts["test"],
            "prepared": {"path": Path(out).as_posix(), "bytes": Path(out).stat().st_size},
        }
        write_json(stats_path, stats)
    except BaseException:
        remove([out, stats_path])
        raise
    print(
        f"wrote {out} ({stats['prepared']['bytes'] / 2**20:.1f} MiB; "
        f"{counts['train']['images']} train / {counts['test']['images']} test images); "
        f"mean={np.round(mean, 4).tolist()} std={np.round(std, 4).tolist()}",
        file=sys.stderr,
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.normalize", description=summary(__doc__))
    ap.add_argument("--params", default=str(paths.PARAMS), help="the pipeline's params file")
    args = ap.parse_args(argv)
    load(args.params)  # validate before any work
    normalize()
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)
