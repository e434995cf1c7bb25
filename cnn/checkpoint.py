"""Checkpoints: one ``.npz`` that PyTorch can read, written atomically.

Layout: the model's ``state_dict`` under PyTorch's own key names (``0.weight``,
``3.bn1.running_var``, ...), the optimizer state under ``optimizer/<key>``, and a JSON
document under ``meta`` (model name, epoch, normalisation statistics, config, history).
Loading the weights into the ``torch.nn`` twin::

    ck = cnn.checkpoint.load_checkpoint("runs/x/best.npz")
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in ck.model_state.items()})
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnn.atomic import atomic_path
from cnn.errors import UserError

FORMAT_VERSION = 1
_OPTIM = "optimizer/"
_META = "meta"
_RETRAIN = "re-create it by training again"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def save_checkpoint(path, model_state: dict, meta: dict, optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint so that a reader never sees a half-written file: the data goes
    to a temporary file in the same folder, is flushed to disk, and is renamed over
    ``path`` in one step (a kill at any moment leaves the previous checkpoint intact)."""
    path = Path(path)
    arrays = dict(model_state)
    for key, value in (optimizer_state or {}).items():
        arrays[_OPTIM + key] = value
    arrays[_META] = np.array(json.dumps({"format_version": FORMAT_VERSION, **meta}))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: check the path, or train one first "
                                "(python -m cnn.train, or dvc repro)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: pass the .npz file itself")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint: not a complete .npz archive (truncated, "
                              f"or another kind of file); {_RETRAIN}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({err}); {_RETRAIN}") from err
    if _META not in arrays:
        raise CheckpointError(f"{path} has no '{_META}' entry: not a checkpoint written by cnn")
    try:
        meta = json.loads(str(arrays.pop(_META)))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its '{_META}' entry is not valid JSON ({err}); {_RETRAIN}") from err
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is in checkpoint format {meta['format_version']}, newer than this "
                              f"code reads ({FORMAT_VERSION}): update cnn to load it")
    optimizer = {k[len(_OPTIM):]: arrays.pop(k) for k in list(arrays) if k.startswith(_OPTIM)}
    return Checkpoint(model_state=arrays, optimizer_state=optimizer, meta=meta)


def read_meta(path) -> dict:
    """The checkpoint's metadata (model name, epoch, test accuracy, config, history)."""
    return load_checkpoint(path).meta
