"""Stage ``train@<run>``: train one entry of ``params.yaml`` ``runs``.

``python -m pipeline.train <run>`` merges the run over ``defaults``, calls
``cnn.train.fit`` on the prepared dataset and writes, under ``runs/<run>/``:

* ``best.npz``     -- best checkpoint (highest test accuracy), from ``fit``
* ``history.csv``  -- epoch, loss, train_acc, test_acc, lr, seconds (``dvc plots``)
* ``metrics.json`` -- best/final accuracies, s/epoch, epochs run, device (``dvc metrics``)
* ``config.json``  -- the resolved settings of the run and the device it ran on
* ``curves.png``   -- loss and accuracy per epoch
* ``mlflow.json``  -- the MLflow run id (``evaluate`` logs into the same run)

The run is also an MLflow run (see :mod:`pipeline.tracking`): parameters, git
commit and DVC stage as tags, per-epoch metrics with ``step=epoch``, and the
checkpoint and curves as artifacts. If MLflow is unavailable training still
completes, with one warning.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import hashlib
import io
import itertools
import json
import os
import socket
import sys
from pathlib import Path

import cnn
from cnn.checkpoint import read_meta
from cnn.checks import counted
from cnn.config import data_conflicts, resume_conflicts
from cnn.data import load_prepared_stats

from pipeline import paths, plots
from pipeline._util import PipelineError, remove, summary, write_json, write_text
from pipeline.params import MODEL_TITLES, load
from pipeline import tracking

HISTORY_FIELDS = ("epoch", "loss", "train_acc", "test_acc", "lr", "seconds")


def history_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in HISTORY_FIELDS})
    return buf.getvalue()


def read_history(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in rows]


def mean_seconds(rows: list[dict]) -> float | None:
    """Mean of the rows' recorded epoch times (None if none is recorded)."""
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    return float(sum(seconds) / len(seconds)) if seconds else None


def device_segments(history: list[dict], devices: list[str]) -> list[dict]:
    """Consecutive epochs on one device, in order: {device, epochs: [first, last],
    seconds_per_epoch}. devices: the device of each entry of ``history``."""
    segments = []
    for device, rows in itertools.groupby(zip(history, devices), key=lambda rd: rd[1]):
        rows = [r for r, _ in rows]
        segments.append({"device": device, "epochs": [rows[0]["epoch"], rows[-1]["epoch"]],
                         "seconds_per_epoch": mean_seconds(rows)})
    return segments


def summarize(result, history: list[dict], devices: list[str]) -> dict:
    """metrics.json. devices: the device of each epoch of ``history``; a run resumed on
    another device (a GPU run finished on the CPU, say) gets its parts listed in
    ``devices``, since one device and one s/epoch would misdescribe it."""
    last = history[-1] if history else {}
    segments = device_segments(history, devices)
    metrics = {
        "best_test_acc": float(result.best_test_acc),
        "best_epoch": int(result.best_epoch),
        "final_train_acc": float(last.get("train_acc", float("nan"))),
        "final_test_acc": float(last.get("test_acc", float("nan"))),
        "final_loss": float(last.get("loss", float("nan"))),
        "seconds_per_epoch": mean_seconds(history),
        "epochs_run": len(history),
        "stopped_early": bool(result.stopped_early),
        # the device the epochs ran on: not this process's when a resumed run had none left
        "device": segments[0]["device"] if len(segments) == 1 else str(result.device),
    }
    if len(segments) > 1:
        metrics["device"] = " + ".join(f"{s['device']} (epochs {s['epochs'][0]}-{s['epochs'][1]})"
                                       for s in segments)
        metrics["devices"] = segments
    return metrics


def earlier_devices(out: Path, meta: dict) -> list[str]:
    """The device of each epoch in the history of ``last.npz`` (``meta``): from the log
    written beside it each epoch; epochs the log lacks (the last one, after a kill between
    the two writes) ran on the device that wrote ``last.npz``."""
    n = len(meta["history"])
    logged = _read_json_or_none(out / paths.EPOCH_DEVICES)
    if not isinstance(logged, list) or len(logged) > n:
        logged = []
    return [str(d) for d in logged] + [meta.get("device", "?")] * (n - len(logged))


def engine_fingerprint() -> str:
    """sha256 of the engine's source (every cnn/*.py but the benchmark, which .dvcignore
    also leaves out): a run resumed on other code would mix two engines in one result, so
    resuming needs the same fingerprint."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(cnn.__file__).parent.glob("*.py") if p.name != "bench.py"):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def resumable_meta(last: Path, cfg: dict, stats) -> dict | None:
    """``last``'s metadata if it was written by a run with the same settings (see
    ``cnn.config.resume_conflicts``), on the same data (``stats``: the prepared data's
    (mean, std), or None to skip that check) and by the same engine code, else None (after
    saying why)."""
    stamp = last.with_name(paths.ENGINE_STAMP)
    if not stamp.is_file():
        print(f"not resuming from {last}: no {stamp.name} beside it says which engine code "
              "wrote it", file=sys.stderr)
        return None
    if stamp.read_text().strip() != engine_fingerprint():
        print(f"not resuming from {last}: the engine code (cnn/) changed since it was written",
              file=sys.stderr)
        return None
    try:
        meta = read_meta(last)
    except Exception as e:  # noqa: BLE001 - unreadable: start over
        print(f"not resuming: cannot read {last} ({e})", file=sys.stderr)
        return None
    changed = resume_conflicts(meta.get("config") or {}, cfg, meta.get("epoch", 0))
    if stats is not None:
        changed += data_conflicts(meta, *stats)
    if changed:
        print(f"not resuming from {last}: settings changed ({'; '.join(changed)})", file=sys.stderr)
        return None
    return meta


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return "unknown"


def _read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _rounded(values) -> str:
    return ", ".join(f"{float(v):.4f}" for v in values)


# What a training run logs to MLflow, in four parts; pipeline.log_run logs the same from a
# finished run's outputs.
def training_tags(run: str, title: str, ctx: dict[str, str]) -> dict:
    """Tags of a training run but the git commit's. ctx: tracking.dvc_context of its stage."""
    return {**ctx, "pipeline_run": run, "model_name": title, "mlflow.user": _user(),
            "mlflow.source.name": "pipeline/train.py", "mlflow.source.type": "LOCAL"}


def training_params(run: str, cfg: dict, resume: bool, stats) -> dict:
    """Parameters of a training run. stats: (mean, std) of the data it trained on, or None."""
    return {"run": run, **cfg, "data": paths.PREPARED.as_posix(), "resume": resume,
            # which images: the official archive and an offline copy differ here
            **({"data_mean": _rounded(stats[0]), "data_std": _rounded(stats[1])} if stats else {})}


def log_epoch(tracker, m: dict) -> None:
    """One epoch's metrics (a row of history.csv), at step = epoch."""
    tracker.log_metrics({"loss": m["loss"], "train_acc": m["train_acc"], "test_acc": m["test_acc"],
                         "lr": m["lr"], "epoch_seconds": m["seconds"]}, step=int(m["epoch"]))


#: The outputs that log_outputs logs as artifacts, and the artifact folder of each.
ARTIFACTS = {paths.BEST_CHECKPOINT: "checkpoints", paths.CURVES: None, paths.HISTORY: None,
             paths.METRICS: None, paths.CONFIG: None}


def log_outputs(tracker, out: Path, metrics: dict) -> None:
    """The summary metrics (metrics.json), the device tags and the outputs as artifacts."""
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.set_tags({"device": metrics["device"], "stopped_early": metrics["stopped_early"]})
    for name, folder in ARTIFACTS.items():
        tracker.log_artifact(out / name, folder)


def _still_running(record) -> int | None:
    """The pid of the process that wrote a live-run record if it is alive on this machine
    (its MLflow run is then not abandoned). On another machine it cannot be told: taken as
    dead; so is this process's own pid (a container restarted with the same pid)."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    try:
        pid = int(record["pid"])
        if pid <= 0 or pid == os.getpid():
            return None
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


def check_settings(run: str, params) -> None:
    """DVC records ``runs/<run>/settings.json`` as the settings a train stage used: refuse
    to train on others (params.yaml edited, then the train stage run alone)."""
    path = paths.settings_output(run)
    if _read_json_or_none(path) != params.effective(run):
        state = f"is not what {params.source} resolves to" if path.exists() else "is missing"
        raise PipelineError(f"{path} {state}: resolve the run's settings first, with "
                            f"`dvc repro settings@{run}` (-f if DVC finds it up to date)")


def train(run: str, params) -> dict:
    from cnn.train import TrainConfig, fit

    cfg = params.run(run)
    check_settings(run, params)
    out = paths.run_dir(run)
    live = out / paths.LIVE_MLFLOW_RUN
    earlier = _read_json_or_none(live)
    running = _still_running(earlier)
    if running:  # two trainings would write into one folder
        raise PipelineError(f"train@{run} is already running here (pid {running}, recorded in {live}): "
                            f"wait for it or stop it; if that pid is not a training, delete {live}")
    outputs = paths.train_outputs(run)
    best_path = out / paths.BEST_CHECKPOINT
    if not paths.PREPARED.is_file():
        raise PipelineError(f"{paths.PREPARED} not found; run the normalize stage first (dvc repro normalize)")
    stats = load_prepared_stats(paths.PREPARED)  # for the resume check, and MLflow's params
    last = out / paths.LAST_CHECKPOINT
    # Resuming needs last.npz *and* the best.npz written alongside it (best.npz is a
    # persisted DVC out, so DVC leaves it in place); otherwise start from scratch.
    meta = (resumable_meta(last, cfg, stats)
            if params.resume and last.is_file() and best_path.is_file() else None)
    resume = meta is not None
    if params.resume and not last.is_file():
        print(f"train@{run}: resume: true, but there is no {last} (with its best.npz) to continue "
              "here (the copies of `dvc exp run --temp` and `--queue` have none): training from "
              "epoch 1", file=sys.stderr)
    elif params.resume and not best_path.is_file():
        print(f"train@{run}: resume: true, but {best_path}, written with {last}, is missing: "
              "training from epoch 1", file=sys.stderr)
    remove([p for p in outputs if not (resume and p == best_path)])
    if not resume:
        remove([last, out / paths.EPOCH_DEVICES])
        write_text(out / paths.ENGINE_STAMP, engine_fingerprint() + "\n")

    def remove_all_but_the_resume_pair() -> None:
        """A failed run's outputs go, but the pair that `resume` continues from stays:
        last.npz and the best.npz written with it."""
        remove([p for p in outputs if not (p == best_path and last.is_file())])

    title = MODEL_TITLES.get(cfg["model"], cfg["model"])  # a new model's own name, until it has a title
    ctx = tracking.dvc_context(f"train@{run}")
    tags = {**tracking.git_info(outputs=paths.PIPELINE_OUTPUTS), **training_tags(run, title, ctx)}
    tracker = tracking.start_run(params.experiment, tracking.run_name_for(ctx), tags)
    # A training process that died (kill -9, a lost machine) left its MLflow run RUNNING.
    abandoned = tracker.end_abandoned(earlier)
    if abandoned:
        print(f"train@{run}: MLflow run {abandoned}, left RUNNING by a training process that "
              "died, is now marked KILLED", file=sys.stderr)
    # Without MLflow the record stays as it was, for when the store is back.
    owns_live = tracker.enabled

    history: list[dict] = []
    devices: list[str] = []  # the device of each epoch: one run may move between machines

    def on_epoch_end(m: dict) -> None:
        history.append({k: v for k, v in m.items() if k != "device"})
        devices.append(m["device"])
        write_json(out / paths.EPOCH_DEVICES, devices)
        log_epoch(tracker, m)
        # Rewritten every epoch so a long run can be watched (dvc plots show).
        write_text(out / paths.HISTORY, history_csv(history))

    try:  # from here on, a failure closes the MLflow run
        if owns_live:
            write_json(live, {**tracker.info(), "pid": os.getpid(), "host": socket.gethostname()})
        tracker.log_params(training_params(run, cfg, resume, stats))
        if resume:
            # The epochs before the interruption go into this MLflow run too, so that it
            # shows the whole run.
            for m, device in zip(meta["history"], earlier_devices(out, meta)):
                on_epoch_end({**m, "device": device})

        # Bars only on a terminal: piped output (CI, dvc queue logs) gets the per-epoch lines only.
        progress = bool(params.progress) and sys.stderr.isatty()
        config = TrainConfig(**cfg, data=str(paths.PREPARED), out=str(out), resume=resume, progress=progress)
        print(f"train@{run}: {title}, {counted(cfg['epochs'], 'epoch')}, backend {cfg['backend']}",
              file=sys.stderr)
        result = fit(config, on_epoch_end=on_epoch_end)
    except BaseException as e:
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
        tracker.finish("KILLED" if stopped else "FAILED")
        if owns_live:
            remove([live])
        remove_all_but_the_resume_pair()
        if stopped:
            print(f"train@{run}: interrupted; " + (
                f"with `resume: true` in params.yaml, dvc repro continues from {last}" if last.is_file()
                else "no epoch had finished, so there is nothing to resume"), file=sys.stderr)
        raise

    try:  # a failure from here on keeps the resume pair too: the training itself is done
        hist = result.history
        if len(devices) != len(hist):
            raise PipelineError(f"fit reported {len(devices)} epochs but returned {len(hist)}")
        metrics = summarize(result, hist, devices)
        write_text(out / paths.HISTORY, history_csv(hist))
        write_json(out / paths.METRICS, metrics)
        write_json(out / paths.CONFIG, {"run": run, "model_name": title, **cfg,
                                        "device_used": metrics["device"], "resumed": resume})
        plots.training_curves({run: hist}, out / paths.CURVES, title=f"{run} ({metrics['device']})")

        log_outputs(tracker, out, metrics)
        tracker.finish("FINISHED")
        write_json(out / paths.MLFLOW_RUN, tracker.info())
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        remove_all_but_the_resume_pair()
        raise
    finally:
        if owns_live:
            remove([live])
    print(
        f"train@{run}: best test acc {metrics['best_test_acc']:.4f} at epoch {metrics['best_epoch']}, "
        f"{counted(metrics['epochs_run'], 'epoch')}, {metrics['seconds_per_epoch'] or 0:.1f} s/epoch on {metrics['device']}",
        file=sys.stderr,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=summary(__doc__))
    ap.add_argument("run", help="name of an entry under runs in params.yaml")
    ap.add_argument("--params", default=str(paths.PARAMS), help="the pipeline's params file")
    args = ap.parse_args(argv)
    params = load(args.params)
    params.run(args.run)  # unknown run -> clear error before any work
    train(args.run, params)
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)
