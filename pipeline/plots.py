"""Matplotlib figures shared by the stages (headless: Agg backend)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from pipeline._util import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)


def training_curves(histories: dict[str, list[dict]], path: str | os.PathLike, title: str | None = None,
                    groups: dict[str, list[str]] | None = None) -> None:
    """Loss and train/test accuracy per epoch, one colour per run.

    ``groups`` (title -> run names) puts each group on its own row of panels,
    e.g. one row per model; default: all runs on one row.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    groups = groups or {"": list(histories)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (group, runs), (ax_loss, ax_acc) in zip(groups.items(), axes):
        for i, name in enumerate(runs):
            rows = histories.get(name) or []
            if not rows:
                continue
            c = colors[i % len(colors)]
            ep = [r["epoch"] for r in rows]
            mark = "." if len(ep) < 30 else None
            ax_loss.plot(ep, [r["loss"] for r in rows], color=c, label=name, marker=mark)
            ax_acc.plot(ep, [100 * r["test_acc"] for r in rows], color=c, label=name, marker=mark)
            ax_acc.plot(ep, [100 * r["train_acc"] for r in rows], color=c, linestyle="--", alpha=0.6)
        prefix = f"{group}: " if group else ""
        ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{prefix}loss")
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{prefix}accuracy (solid: test, dashed: train)")
        last = max((len(histories.get(n) or []) for n in runs), default=0)
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if last <= 10:  # a few epochs: one tick per epoch
                ax.set_xlim(0.5, max(last, 1) + 0.5)
                ax.set_xticks(range(1, max(last, 1) + 1))
        ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Row-normalised confusion matrix with counts, class names on both axes."""
    plt = _plt()
    m = np.asarray(matrix)
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * n, 0.8 + 0.55 * n))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    _save(fig, path)
