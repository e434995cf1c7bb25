"""Training loop and command line.

    python -m cnn.train --model simple --epochs 5 --backend numpy

Each epoch prints one line (``Epoch   3/5 | Loss: ... | Time: 59.2s``) after a tqdm bar,
writes ``last.npz`` (for ``--resume``) and, when the test accuracy improves, ``best.npz``.
Everything random in an epoch (shuffle, augmentation, dropout) is a function of
(seed, epoch), so a run resumed from ``last.npz`` ends with exactly the weights of an
uninterrupted run.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from cnn.backend import BACKENDS, Backend, backend_of, get_backend, manual_seed
from cnn.checks import counted
from cnn.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from cnn.config import TrainConfig, data_conflicts, inert_schedule, resume_conflicts, unused_knobs
from cnn.data import DataLoader, load_cifar10, normalization_stats
from cnn.errors import ConfigError, UserError
from cnn.functional import softmax_cross_entropy
from cnn.models import MODELS, build_model
from cnn.module import Module
from cnn.optim import OPTIMIZERS, SCHEDULES, SGD, Adam, Optimizer, lr_at
from cnn.replay import StepReplay

EVAL_BATCH_SIZE = 500


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    history: list[dict]
    best_test_acc: float
    best_epoch: int
    best_checkpoint: Path
    last_checkpoint: Path
    stopped_early: bool
    device: str


def make_optimizer(config: TrainConfig, model: Module) -> Optimizer:
    if config.optimizer == "adam":
        return Adam(model.parameters(), config.lr, betas=config.betas,
                    weight_decay=config.weight_decay)
    return SGD(model.parameters(), config.lr, momentum=config.momentum,
               nesterov=config.nesterov, weight_decay=config.weight_decay)


def predict(model: Module, x: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """Class predictions (N,) int64 for normalised images x: (N, 3, 32, 32) float32, on
    the model's own backend, in eval mode (the model's own mode is put back after)."""
    if str(getattr(x, "dtype", "")).removeprefix("torch.") == "uint8":
        raise ValueError("predict takes normalised float images, got uint8 pixels: "
                         "cnn.data.normalize(x, mean, std) first, with the checkpoint's "
                         "meta['mean'] and meta['std']")
    B = model_backend(model)
    was_training = model.training
    model.eval()
    try:
        preds = [B.to_numpy(B.argmax(model(B.asarray(x[i:i + batch_size])), axis=1))
                 for i in range(0, len(x), batch_size)]
    finally:
        model.clear_caches()
        model.train(was_training)
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)


def evaluate(model: Module, loader: DataLoader, B: Backend) -> float:
    """Accuracy over a loader, counted on the device and read back once."""
    model.eval()
    correct = 0
    for xb, yb in loader:
        correct = correct + B.sum(B.argmax(model(B.asarray(xb)), axis=1) == B.asarray(yb))
    model.clear_caches()
    return B.item(correct) / loader.num_samples


def load_model(checkpoint_path, backend: str = "numpy", device: str = "auto") -> Module:
    """The model stored in a checkpoint, on the given backend, in eval mode."""
    ck = load_checkpoint(checkpoint_path)
    B = get_backend(backend, device)
    try:
        model = build_model(ck.meta["model"]).to(B)
        model.load_state_dict(ck.model_state)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{checkpoint_path} does not hold a model this engine builds "
                              f"({err}); re-create it by training again") from err
    return model.eval()


def model_backend(model: Module) -> Backend:
    """The backend (and device) that holds the model's parameters."""
    return backend_of(model.parameters()[0].data)


def fit(config: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``config.model`` on CIFAR-10 at ``config.data``; see the module docstring.
    ``on_epoch_end(metrics)`` after each epoch: its history entry and ``device``."""
    config.validate()
    _pending_stop.clear()  # one a finished run left
    out = Path(config.out)
    _check_writable(out)
    B = get_backend(config.backend, config.device)
    ds = load_cifar10(config.data)
    mean, std = normalization_stats(config.data, ds)

    manual_seed(config.seed)
    model = build_model(config.model).to(B)
    optimizer = make_optimizer(config, model)
    last_path, best_path = out / "last.npz", out / "best.npz"

    history: list[dict] = []
    best_acc, best_epoch, bad_epochs, start = -1.0, 0, 0, 0
    resumed_patience = 0  # the early_stop that the resumed run had
    if config.resume and last_path.exists():
        ck = load_checkpoint(last_path)
        changed = (resume_conflicts(ck.meta.get("config", {}), asdict(config), ck.meta.get("epoch", 0))
                   + data_conflicts(ck.meta, mean, std))
        if changed:
            raise CheckpointError(f"{last_path} was written by a run with other settings "
                                  f"({'; '.join(changed)}), so resuming would not continue it: "
                                  "use its settings, another --out, or drop --resume")
        try:
            model.load_state_dict(ck.model_state)
            optimizer.load_state_dict(ck.optimizer_state)
            history = ck.meta["history"]
            start, bad_epochs = ck.meta["epoch"], ck.meta["bad_epochs"]
            best_acc, best_epoch = ck.meta["best_test_acc"], ck.meta["best_epoch"]
            resumed_patience = ck.meta.get("config", {}).get("early_stop", 0)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"cannot resume from {last_path}: {err}. Use another --out "
                                  "or drop --resume") from err
        tqdm.write(f"Resuming {config.model} from {last_path} after epoch {start}")
    elif config.resume:
        tqdm.write(f"Nothing to resume: no {last_path}; training {config.model} from epoch 1")

    # Both sets live on the backend's device; batches are made there (see DataLoader).
    train_loader = DataLoader(ds.train_x, ds.train_y, config.batch_size, shuffle=True,
                              augment=config.augment, mean=mean, std=std, seed=config.seed,
                              backend=B)
    test_loader = DataLoader(ds.test_x, ds.test_y, EVAL_BATCH_SIZE, mean=mean, std=std, backend=B)
    meta = {"model": config.model, "classes": ds.classes, "mean": list(map(float, mean)),
            "std": list(map(float, std)), "config": asdict(config), "device": repr(B)}

    def patience_spent() -> bool:
        return bool(config.early_stop) and bad_epochs >= config.early_stop

    # A resumed run that had stopped early stays stopped (unless early_stop grew), and so
    # does one whose epochs without a better test accuracy spend a new, smaller early_stop.
    stopped_early = patience_spent()
    if stopped_early:
        why = ("had stopped early" if 0 < resumed_patience <= bad_epochs
               else f"has already spent the patience of early_stop {config.early_stop}")
        tqdm.write(f"{last_path} {why} (no better test accuracy for {counted(bad_epochs, 'epoch')}): "
                   "nothing to train")
    try:
        for epoch in range(start, start if stopped_early else config.epochs):
            optimizer.lr = lr_at(epoch, config.lr, config.schedule, config.epochs,
                                 config.milestones, config.gamma)
            train_loader.set_epoch(epoch)
            B.seed([config.seed, epoch])  # dropout masks of this epoch
            started = time.perf_counter()
            loss, train_acc = _train_epoch(model, optimizer, train_loader, B, epoch, config, last_path)
            # The losses were finite, each computed before its step: the last steps may still
            # have sent the weights to inf or NaN, which no checkpoint may keep. (Host copies,
            # saved below: evaluation changes none of them.)
            model_state = model.state_dict()
            if not all(np.isfinite(v).all() for v in model_state.values() if v.dtype.kind == "f"):
                _diverged("the weights became inf or NaN", epoch, last_path)
            test_acc = evaluate(model, test_loader, B)
            seconds = time.perf_counter() - started
            metrics = {"epoch": epoch + 1, "loss": loss, "train_acc": train_acc, "test_acc": test_acc,
                       "lr": optimizer.lr, "seconds": seconds}
            history.append(metrics)
            if test_acc > best_acc:
                best_acc, best_epoch, bad_epochs = test_acc, epoch + 1, 0
            else:
                bad_epochs += 1
            state = {**meta, "epoch": epoch + 1, "test_acc": test_acc, "best_test_acc": best_acc,
                     "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history}
            if best_epoch == epoch + 1:
                save_checkpoint(best_path, model_state, state)
            save_checkpoint(last_path, model_state, state, optimizer.state_dict())
            tqdm.write(f"Epoch {epoch + 1:3d}/{config.epochs} | Loss: {loss:.4f} | Train: {train_acc:.4f} | "
                       f"Test: {test_acc:.4f} | LR: {optimizer.lr:.6f} | Time: {seconds:.1f}s")
            if on_epoch_end is not None:  # with the device, which the history leaves out
                on_epoch_end({**metrics, "device": repr(B)})
            if patience_spent():
                tqdm.write(f"Early stop: no better test accuracy for {counted(bad_epochs, 'epoch')} "
                           f"(best {best_acc:.4f} at epoch {best_epoch})")
                stopped_early = True
                break
    except KeyboardInterrupt as err:
        err.data_stats = (mean, std)  # for main's message: whether --resume can go on
        raise
    return TrainResult(history, best_acc, best_epoch, best_path, last_path, stopped_early, repr(B))


def _check_writable(out: Path) -> None:
    """Fail now, not when the first epoch's checkpoint is due, if ``out`` cannot be written.

    Creates nothing: the checkpoint writer makes the folder, so a run that stops before its
    first checkpoint (diverged, interrupted, bad data) leaves no empty folder behind.
    """
    folder = out
    while not os.path.lexists(folder):
        folder = folder.parent  # ends at an existing folder: "." or "/" at the latest
    if not folder.is_dir():
        what = (f"a link to {os.readlink(folder)}, which does not exist" if folder.is_symlink()
                else "a file")
        if folder == out:
            raise ConfigError(f"the output folder {out} is {what}: choose another --out")
        raise ConfigError(f"cannot write to the output folder {out} ({folder} is {what}): "
                          "choose another --out")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write to the output folder {out} ({err.strerror}): "
                          "choose another --out") from err


def _train_epoch(model, optimizer, loader, B, epoch, config, last_path) -> tuple[float, float]:
    """One pass over the training set; returns (mean loss, accuracy).

    Loss and accuracy are summed on the device and read once at the end, so a GPU step
    never waits for the host. On the CPU, where reading a value costs nothing, the bar
    shows the loss every 50 steps and a NaN seen there stops the run; on a GPU that read
    would stall the queue of launched kernels, so the check waits for the epoch's end.
    On CUDA the step is recorded once and replayed (cnn.replay), with the same result.
    """
    model.train()
    live = B.device == "cpu"
    totals = {}

    def train_step(xb, yb):  # device work only: a replay repeats it without this Python
        logits = model(xb)
        loss, grad = softmax_cross_entropy(logits, yb)
        model.backward(grad)
        optimizer.update()
        batch_loss, batch_correct = loss * len(yb), B.sum(B.argmax(logits, axis=1) == yb)
        if totals:
            totals["loss"] += batch_loss
            totals["correct"] += batch_correct
        else:
            totals.update(loss=batch_loss, correct=batch_correct)
        totals["last"] = loss

    run_step = StepReplay(train_step, B) if optimizer.replayable else train_step
    bar = tqdm(loader, desc=f"Epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not config.progress, unit="batch", dynamic_ncols=True)
    # A diverging run overflows to inf, then NaN: NumPy's warnings about it would only come
    # before the one clear error that the check below raises.
    with np.errstate(over="ignore", invalid="ignore"):
        for step, (xb, yb) in enumerate(bar):
            if _pending_stop:
                raise _pending_stop.pop()
            run_step(B.asarray(xb), B.asarray(yb))
            optimizer.steps += 1  # the host-side half of optimizer.step()
            if live and step % 50 == 0:
                value = B.item(totals["last"])
                if not math.isfinite(value):
                    _diverged(f"the training loss became {value}", epoch, last_path)
                bar.set_postfix(loss=f"{value:.4f}")
    mean_loss = B.item(totals["loss"]) / loader.num_samples
    if not math.isfinite(mean_loss):
        _diverged(f"the training loss became {mean_loss}", epoch, last_path)
    return mean_loss, B.item(totals["correct"]) / loader.num_samples


def _diverged(what: str, epoch: int, last_path: Path):
    kept = (f"the last good checkpoint ({last_path}) is kept" if last_path.exists()
            else "no epoch finished, so there is no checkpoint")
    raise TrainingError(f"{what} in epoch {epoch + 1}: the run diverged. "
                        f"Lower the learning rate (--lr, or lr in params.yaml), or add a schedule; {kept}.")


def build_parser(prog: str = "python -m cnn.train", description: str = "Train a hand-written CNN on CIFAR-10.",
                 engine: bool = True) -> argparse.ArgumentParser:
    """The command line's flags; ``engine=False`` leaves out those of the engine's own
    runs (backend, checkpoints, resume, progress bars), for benchmarks/native_reference.py."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default=d.model, help="SimpleCNN or SmallResNet")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train")
    p.add_argument("--augment", action="store_true", help="random crop (4-pixel padding) and horizontal flip")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule, stepped per epoch")
    p.add_argument("--milestones", type=int, nargs="+", default=d.milestones, help="epochs of the step schedule")
    p.add_argument("--gamma", type=float, default=d.gamma, help="LR factor at each milestone")
    p.add_argument("--early-stop", type=int, default=d.early_stop, metavar="N",
                   help="stop after N epochs without a better test accuracy (0 = off)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--betas", type=float, nargs=2, default=d.betas, metavar=("BETA1", "BETA2"),
                   help="Adam's averaging coefficients")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, shuffling, augmentation and dropout follow from it")
    if engine:
        p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="array library that runs the layers")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--data", default=d.data,
                   help="cifar-10-python.tar.gz, its extracted folder, or a prepared .npz")
    if engine:
        p.add_argument("--out", default="checkpoints/<model>", help="checkpoint folder (<model>: the model's name)")
        p.add_argument("--resume", action="store_true", help="continue from <out>/last.npz")
        p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings that ``build_parser()``'s flags give (defaults for those left out)."""
    d = TrainConfig()
    return TrainConfig(
        model=args.model, epochs=args.epochs, augment=args.augment, schedule=args.schedule,
        milestones=args.milestones, gamma=args.gamma, early_stop=args.early_stop,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, betas=args.betas, nesterov=args.nesterov,
        weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed,
        backend=getattr(args, "backend", d.backend), device=args.device, data=args.data,
        out=getattr(args, "out", d.out).replace("<model>", args.model), resume=getattr(args, "resume", d.resume),
        progress=not getattr(args, "no_progress", not d.progress))


def check_settings(config: TrainConfig) -> None:
    """Raise ConfigError for bad settings; then print a note for each flag given that has
    no effect with them (``--milestones`` under cosine, ``--betas`` with SGD)."""
    config.validate()  # first: a bad value is an error whether it has an effect or not
    defaults, settings = asdict(TrainConfig()), asdict(config)
    for knob in sorted(k for k in unused_knobs(settings) if settings[k] != defaults[k]):
        print(f"note: --{knob.replace('_', '-')} has no effect with --schedule {config.schedule} "
              f"--optimizer {config.optimizer}", file=sys.stderr)
    if inert := inert_schedule(settings):
        print(f"note: {inert}", file=sys.stderr)


#: The stop that a signal asked for, until training raises it. A signal handler's exception
#: can be lost: raised while a __del__ or weakref callback runs (SQLAlchemy's, under MLflow),
#: Python only prints "Exception ignored" and goes on. So the loop also raises it between
#: batches.
_pending_stop: list[BaseException] = []


def request_stop(exc: BaseException):
    """For signal handlers: stop training with ``exc``, now and, should that exception be
    lost, at the next batch."""
    _pending_stop[:] = [exc]
    raise exc


def stop_as_interrupted(signum, frame):
    """A signal handler: stop training as Ctrl-C does (checkpoint writes clean up, and the
    message says how to go on)."""
    request_stop(KeyboardInterrupt())


def _interrupted_message(config: TrainConfig, data_stats: tuple | None = None) -> str:
    """What Ctrl-C leaves for --resume. ``data_stats``: the (mean, std) of the images the
    run was training on, once it had them."""
    last = Path(config.out) / "last.npz"
    if not last.is_file():
        return "interrupted; no epoch had finished, so there is nothing to resume"
    try:
        meta = read_meta(last)
    except (CheckpointError, OSError, ValueError):
        return f"interrupted; {last} cannot be read, so --resume would start from epoch 1"
    if resume_conflicts(meta.get("config", {}), asdict(config), meta.get("epoch", 0)):
        return (f"interrupted before the first epoch ended; {last} is another run's (other "
                "settings), which --resume would refuse")
    if data_stats is not None and data_conflicts(meta, *data_stats):
        return (f"interrupted before the first epoch ended; {last} is another run's (other "
                "images), which --resume would refuse")
    return f"interrupted; --resume continues from {last}"


def main(argv=None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    try:
        check_settings(config)
        result = fit(config)
    except (UserError, FileNotFoundError) as err:  # not every ValueError: an engine bug must show
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(_interrupted_message(config, getattr(err, "data_stats", None)), file=sys.stderr)
        return 130
    print(f"Best test accuracy {result.best_test_acc:.4f} at epoch {result.best_epoch} "
          f"on {result.device}; checkpoint {result.best_checkpoint}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_as_interrupted)
    signal.signal(signal.SIGINT, stop_as_interrupted)
    sys.exit(main())
