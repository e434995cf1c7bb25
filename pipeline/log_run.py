"""Log a finished run to MLflow afterwards, from its stage outputs.

A run trained where MLflow was not installed or its store could not be reached (a GPU
machine without MLflow, a tracking server that was down) has no MLflow run: ``run_id`` is
null in ``runs/<run>/mlflow.json``. ``python -m pipeline.log_run <run> ...`` makes it one,
from the files its train and evaluate stages wrote, with what those stages log: the
parameters, each epoch's metrics (``history.csv``), the final metrics, the tags, the
checkpoint and the plots, and the evaluation. It is tagged ``logged_from_outputs``, and
its start time is when it was logged, not when it trained.

Its id then goes into ``runs/<run>/mlflow.json``, an output of the train stage, so the run
has to be recorded again: ``dvc commit -f train@<run> evaluate@<run>``, then ``dvc repro -s
report`` (the report names each run's MLflow run). A run already logged to this store is
refused. One logged to another store (the committed runs of a fresh clone, say) is logged
here as a copy, tagged with its ``source_run_id``, and its ``mlflow.json`` is left as it is.
"""

from __future__ import annotations

import argparse
import sys

from cnn.checkpoint import read_meta

from pipeline import paths, tracking
from pipeline._util import PipelineError, read_json, summary, write_json
from pipeline.evaluate import log_evaluation
from pipeline.params import load
from pipeline.train import log_epoch, log_outputs, read_history, training_params, training_tags

# config.json is the run's settings plus these (pipeline.train writes it)
_NOT_SETTINGS = ("run", "model_name", "device_used", "resumed")


def log_run(run: str, params) -> str:
    """Log ``run``'s outputs as a new MLflow run; returns what happened, for the message."""
    d = paths.run_dir(run)
    needed = [d / name for name in (paths.MLFLOW_RUN, paths.CONFIG, paths.METRICS, paths.HISTORY,
                                    paths.BEST_CHECKPOINT, paths.CURVES)]
    missing = [p.as_posix() for p in needed if not p.is_file()]
    if missing:
        raise PipelineError(f"run {run!r} has no {', '.join(missing)}: train it first (dvc repro train@{run})")
    info = read_json(d / paths.MLFLOW_RUN)
    uri = tracking.resolve_tracking_uri(tracking.main_repo_root())
    here = info.get("tracking_uri") == tracking.display_uri(uri)
    if info.get("run_id") and here and tracking.has_run(uri, info["run_id"]):
        raise PipelineError(f"run {run!r} is already MLflow run {info['run_id']} in {tracking.display_uri(uri)}")
    copy = bool(info.get("run_id")) and not here  # logged to another store: that record stays

    config = read_json(d / paths.CONFIG)
    cfg = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    meta = read_meta(d / paths.BEST_CHECKPOINT)
    stats = (meta["mean"], meta["std"]) if "mean" in meta and "std" in meta else None
    ctx = tracking.dvc_context(f"train@{run}")
    tags = {**training_tags(run, config.get("model_name", cfg.get("model", run)), ctx),
            "logged_from_outputs": d.as_posix(),
            **({"source_run_id": info["run_id"], "source_tracking_uri": info.get("tracking_uri")} if copy else {})}
    tracker = tracking.start_run(params.experiment, tracking.run_name_for(ctx), tags)
    if not tracker.enabled:
        raise PipelineError(f"MLflow at {tracking.display_uri(uri)} cannot be used ({tracker.reason}): nothing logged")
    evaluation = d / paths.EVAL_METRICS
    try:
        tracker.log_params(training_params(run, cfg, bool(config.get("resumed")), stats))
        for m in read_history(d / paths.HISTORY):
            log_epoch(tracker, m)
        log_outputs(tracker, d, read_json(d / paths.METRICS))
        if evaluation.is_file():
            log_evaluation(tracker, d, read_json(evaluation))
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if not tracker.enabled:  # a call failed midway (the Tracker warned)
        tracker.finish("FAILED")
        raise PipelineError(f"logging run {run!r} to MLflow stopped midway: {tracker.reason}")
    tracker.finish("FINISHED")
    done = f"{run}: MLflow run {tracker.run_id} in {tracking.display_uri(uri)}"
    if copy:
        return done + f", a copy of run {info['run_id']} in {info.get('tracking_uri')}"
    write_json(d / paths.MLFLOW_RUN, tracker.info())
    if not evaluation.is_file():
        done += f" (not evaluated yet: dvc repro evaluate@{run} adds the evaluation to it)"
    return done + (f"; {d / paths.MLFLOW_RUN} now names it: record that with "
                   f"`dvc commit -f train@{run} evaluate@{run}`, then `dvc repro -s report`")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.log_run", description=summary(__doc__))
    ap.add_argument("runs", nargs="+", metavar="run", help="an entry under runs in params.yaml")
    ap.add_argument("--params", default=str(paths.PARAMS), help="the pipeline's params file")
    args = ap.parse_args(argv)
    params = load(args.params)
    for run in args.runs:
        params.run(run)  # unknown run -> clear error before any work
    failed = []
    for run in args.runs:  # one run's error does not keep the others out
        try:
            print(log_run(run, params), file=sys.stderr)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(run)
    if failed:
        raise PipelineError(f"not logged: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)
