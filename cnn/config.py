"""A training run's settings and their one set of checks.

:class:`TrainConfig` is what :func:`cnn.train.fit` takes. :data:`CHECKS` holds one checker
per knob; :func:`problems` applies them (plus the checks that involve two knobs) and
returns every problem found, so that ``TrainConfig.validate`` and the pipeline's
``params.yaml`` validation (which adds the run's name to each message) say the same thing.
The checkers themselves are in ``cnn.checks``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cnn.backend import BACKENDS, DEVICES
from cnn.checks import Checker, boolean, choice, integer, is_int, is_number, number, show
from cnn.errors import ConfigError
from cnn.models import MODELS
from cnn.optim import OPTIMIZERS, SCHEDULES


def _milestones(v):
    if not isinstance(v, list) or not all(is_int(m) and m > 0 for m in v):
        return f"must be a list of positive epoch numbers; got {show(v)}"
    if any(b <= a for a, b in zip(v, v[1:])):
        return f"must be strictly increasing; got {show(v)}"
    return None


def _betas(v):
    if not isinstance(v, list) or len(v) != 2 or not all(is_number(b) and 0 <= b < 1 for b in v):
        return f"must be a list of two numbers in [0, 1); got {show(v)}"
    return None


def _device(v):
    if v in DEVICES or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return f"must be one of {', '.join(DEVICES)} (or cuda:N); got {show(v)}"


#: One checker per training knob, in TrainConfig's order.
CHECKS: dict[str, Checker] = {
    "model": choice(tuple(MODELS)),
    "epochs": integer(1),
    "augment": boolean,
    "schedule": choice(SCHEDULES),
    "milestones": _milestones,
    "gamma": number(0, low_open=True, high=1, high_open=False),
    "early_stop": integer(0),
    "optimizer": choice(OPTIMIZERS),
    "lr": number(0, low_open=True),
    "momentum": number(0, low_open=False, high=1),
    "nesterov": boolean,
    "weight_decay": number(0, low_open=False),
    "betas": _betas,
    "batch_size": integer(1),
    "seed": integer(0),
    "backend": choice(BACKENDS),
    "device": _device,
}


def problems(settings: dict) -> list[str]:
    """Every problem with the knobs in ``settings`` ("'lr' must be a positive number; got
    -1"), those between two knobs included; keys not in :data:`CHECKS` are ignored."""
    return [f"'{key}' {msg}" for key, value in settings.items()
            if key in CHECKS and (msg := CHECKS[key](value))] + combination_problems(settings)


def combination_problems(settings: dict) -> list[str]:
    """Problems between two knobs that are each valid on their own."""
    found = []
    backend, device = settings.get("backend"), settings.get("device")
    if _device(device) is not None:
        device = None  # already reported as a device no backend has
    if backend == "numpy" and device not in (None, "auto", "cpu"):
        found.append(f"'device' must be auto or cpu with backend numpy; got {show(device)}")
    if backend == "cupy" and device not in (None, "auto", "cuda"):  # CuPy runs on the current GPU
        found.append(f"'device' must be auto or cuda with backend cupy (CUDA_VISIBLE_DEVICES picks "
                     f"the GPU); got {show(device)}")
    if settings.get("nesterov") is True and settings.get("optimizer") == "sgd" \
            and settings.get("momentum") == 0:
        found.append("'nesterov' needs a momentum > 0")
    return found


def inert_schedule(settings: dict) -> str | None:
    """Why a valid step schedule would never change the learning rate (every milestone at or
    past the last epoch, as the defaults 30 and 40 are for a short run), or None. A note,
    not an error: a short trial of a long recipe (`dvc exp run -S epochs=1`) is one."""
    milestones, epochs = settings.get("milestones") or [], settings.get("epochs", 0)
    if settings.get("schedule") == "step" and all(m >= epochs for m in milestones):
        return (f"every milestone ({', '.join(map(str, milestones))}) is at or past the last epoch "
                f"({epochs}): the step schedule never lowers the learning rate")
    return None


#: Knobs that a resumed run may change: how long it goes on, not what each epoch computes.
# device: a run may go on on another device (only the rounding differs; the pipeline
# records the device of each epoch).
RESUMABLE_CHANGES = ("epochs", "early_stop", "device")


def unused_knobs(settings: dict) -> set[str]:
    """The knobs that ``settings`` leave without effect: the step schedule's milestones and
    gamma under another schedule, Adam's betas for SGD, SGD's momentum and nesterov for Adam."""
    unused = set()
    if settings.get("schedule") != "step":
        unused |= {"milestones", "gamma"}
    if settings.get("optimizer") != "adam":
        unused.add("betas")
    if settings.get("optimizer") != "sgd":
        unused |= {"momentum", "nesterov"}
    return unused


def resume_conflicts(saved: dict, settings: dict, epochs_done: int = 0) -> list[str]:
    """The knobs of ``settings`` that differ from ``saved`` (the settings a checkpoint was
    written with, after ``epochs_done`` epochs) so that resuming would not continue the same
    run: any knob but ``RESUMABLE_CHANGES`` and those without effect in both; ``epochs`` too
    under the cosine schedule, whose learning rates depend on the total; and fewer ``epochs``
    than are done, which no run of that length has. Each as "lr 0.01 -> 0.1"; knobs
    ``saved`` lacks pass."""
    free = set(RESUMABLE_CHANGES) | (unused_knobs(saved) & unused_knobs(settings))
    if "cosine" in (saved.get("schedule"), settings.get("schedule")):
        free.discard("epochs")
    why = {"epochs": ": the cosine schedule's learning rates depend on the number of epochs"}  # not free otherwise
    changed = [f"{key} {show(saved[key])} -> {show(settings.get(key))}{why.get(key, '')}" for key in CHECKS
               if key not in free and key in saved and saved[key] != settings.get(key)]
    if "epochs" in free and settings.get("epochs", epochs_done) < epochs_done:
        changed.append(f"epochs {show(saved.get('epochs'))} -> {show(settings['epochs'])}, "
                       f"fewer than the {epochs_done} already trained")
    return changed


def data_conflicts(meta: dict, mean, std) -> list[str]:
    """A checkpoint's normalisation statistics (``meta``'s mean and std) against ``mean``
    and ``std`` of the data at hand: other values mean other training images (the official
    archive and a mirror of it, say), which resuming would mix into one run. Checkpoints
    without them pass."""
    if "mean" not in meta or "std" not in meta:
        return []
    if [float(v) for v in mean] == meta["mean"] and [float(v) for v in std] == meta["std"]:
        return []
    return ["the data: its per-channel mean/std are not those the checkpoint was trained on"]


@dataclass
class TrainConfig:
    """Everything one training run depends on, plus where it reads and writes."""

    model: str = "simple"
    epochs: int = 5
    augment: bool = False
    schedule: str = "none"
    milestones: list[int] = field(default_factory=lambda: [30, 40])
    gamma: float = 0.1
    early_stop: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 64
    seed: int = 0
    backend: str = "numpy"
    device: str = "auto"
    data: str = "data/raw/cifar-10-python.tar.gz"
    out: str = "checkpoints/run"
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        # A tuple, as torch.optim's betas=(0.9, 0.999), is kept as the list that JSON and
        # params.yaml give back, so a resumed run's saved settings compare equal.
        for knob in ("milestones", "betas"):
            if isinstance(getattr(self, knob), tuple):
                setattr(self, knob, list(getattr(self, knob)))

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) listing every bad knob and what it accepts."""
        found = problems(asdict(self))
        # Path("") is the working directory: an empty --out would write the checkpoints there
        found += [f"'{path}' must name a path; got {show(getattr(self, path))}"
                  for path in ("data", "out") if not str(getattr(self, path)).strip()]
        if found:
            raise ConfigError("invalid training settings: " + "; ".join(found))
