"""Log a finished run to MLflow afterwards, from its stage outputs.

A run trained where MLflow was not installed or its store could not be reached (a GPU
machine without MLflow, a tracking server that was down) has no MLflow run: ``run_id`` is
null in ``runs/<run>/mlflow.json``. ``python -m pipeline.log_run <run> ...`` makes it one,
from the files its train and evaluate stages wrote, with what those stages log: the
parameters, each epoch's metrics (``history.csv``), the final metrics, the tags, the
checkpoint and the plots, and the evaluation. It is tagged ``logged_from_outputs``. Unlike
a stage's run it has no git commit (the outputs do not say which one trained them), and
its start time, its metrics' times and its user are those of the logging.

Its id then goes into ``runs/<run>/mlflow.json``, an output of the train stage, so the run
has to be recorded again: ``dvc commit -f train@<run> evaluate@<run>``, then ``dvc repro -s
report`` (the report names each run's MLflow run); the command prints what to run. A run
already logged to this store is refused. One logged to another store (the committed runs
of a fresh clone, say) is logged here as a copy, once, tagged with its ``source_run_id``,
and its ``mlflow.json`` is left as it is.
"""

from __future__ import annotations

import argparse
import sys

from cnn.checkpoint import read_meta

from pipeline import paths, tracking
from pipeline._util import PipelineError, read_json, summary, write_json
from pipeline.evaluate import ARTIFACTS as EVALUATION_ARTIFACTS
from pipeline.evaluate import log_evaluation
from pipeline.params import load
from pipeline.train import ARTIFACTS as TRAINING_ARTIFACTS
from pipeline.train import HISTORY_FIELDS, log_epoch, log_outputs, read_history, training_params, training_tags

# config.json is the run's settings plus these (pipeline.train writes it)
_NOT_SETTINGS = ("run", "model_name", "device_used", "resumed")


def _read_outputs(d) -> dict:
    """Everything that is logged, read before MLflow is asked for anything: a bad file is
    then an error, not a half-logged run."""
    evaluated = (d / paths.EVAL_METRICS).is_file()
    needed = [d / name for name in (*TRAINING_ARTIFACTS, *(EVALUATION_ARTIFACTS if evaluated else ()))]
    missing = [p.as_posix() for p in needed if not p.is_file()]
    if missing:
        raise PipelineError(f"{', '.join(missing)} not found: reproduce the run's stages first "
                            f"(dvc repro evaluate@{d.name})")
    try:
        history = read_history(d / paths.HISTORY)
    except (ValueError, TypeError) as e:  # a cell that is no number, or missing
        raise PipelineError(f"{d / paths.HISTORY} is not a training history ({e})") from None
    try:
        meta = read_meta(d / paths.BEST_CHECKPOINT)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint
        raise PipelineError(f"{d / paths.BEST_CHECKPOINT} cannot be read ({e})") from None
    outputs = {"config": read_json(d / paths.CONFIG), "metrics": read_json(d / paths.METRICS), "history": history,
               "stats": (meta["mean"], meta["std"]) if "mean" in meta and "std" in meta else None,
               "evaluation": read_json(d / paths.EVAL_METRICS) if evaluated else None}
    checks = [(paths.CONFIG, [outputs["config"]], ("model",)), (paths.HISTORY, history, HISTORY_FIELDS),
              (paths.METRICS, [outputs["metrics"]], ("device", "stopped_early"))]
    if evaluated:
        checks.append((paths.EVAL_METRICS, [outputs["evaluation"]], ("test_acc", "per_class_acc")))
    for name, records, keys in checks:
        if not records or not all(isinstance(r, dict) and set(keys) <= set(r) for r in records):
            raise PipelineError(f"{d / name} is not what the pipeline writes (it has {', '.join(keys)})")
    return outputs


def _recorded_run(d) -> dict:
    """runs/<run>/mlflow.json; one that cannot be read names no run, and is rewritten."""
    try:
        info = read_json(d / paths.MLFLOW_RUN)
    except PipelineError:
        return {}
    return info if isinstance(info, dict) else {}


def log_run(run: str, params) -> str:
    """Log ``run``'s outputs as a new MLflow run; returns what happened, for the message."""
    d = paths.run_dir(run)
    outputs = _read_outputs(d)
    info = _recorded_run(d)
    uri = tracking.resolve_tracking_uri(tracking.main_repo_root())
    where = tracking.display_uri(uri)
    reason = tracking.probe(uri)
    if reason:
        raise PipelineError(f"MLflow at {where} cannot be used ({reason}): nothing logged")
    source = info.get("run_id")
    copy = bool(source) and info.get("tracking_uri") != where  # logged to another store: that record stays
    if source and not copy and tracking.has_run(uri, source):
        raise PipelineError(f"it is already MLflow run {source} in {where}")
    if copy:
        copies = tracking.runs_tagged(uri, params.experiment, "source_run_id", source)
        if copies:
            raise PipelineError(f"its MLflow run {source} of {info.get('tracking_uri')} is already "
                                f"copied to {where}, as run {copies[0]}")

    config = outputs["config"]
    cfg = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    ctx = tracking.dvc_context(f"train@{run}")
    # No git tags: the outputs do not say which commit trained them.
    tags = {**training_tags(run, config.get("model_name", cfg.get("model", run)), ctx),
            "logged_from_outputs": d.as_posix(),
            **({"source_run_id": source, "source_tracking_uri": info.get("tracking_uri")} if copy else {})}
    tracker = tracking.start_run(params.experiment, tracking.run_name_for(ctx), tags)
    if not tracker.enabled:
        raise PipelineError(f"MLflow at {where} cannot be used ({tracker.reason}): nothing logged")
    try:
        tracker.log_params(training_params(run, cfg, bool(config.get("resumed")), outputs["stats"]))
        for m in outputs["history"]:
            log_epoch(tracker, m)
        log_outputs(tracker, d, outputs["metrics"])
        if outputs["evaluation"] is not None:
            log_evaluation(tracker, d, outputs["evaluation"])
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    if not tracker.enabled:  # a call failed midway (the Tracker warned)
        tracker.finish("FAILED")
        raise PipelineError(f"logging stopped midway: {tracker.reason}")
    tracker.finish("FINISHED")
    done = f"{run}: MLflow run {tracker.run_id} in {where}"
    if copy:
        return done + f", a copy of run {source} of {info.get('tracking_uri')}"
    write_json(d / paths.MLFLOW_RUN, tracker.info())
    record = (f"`dvc commit -f train@{run} evaluate@{run}`, then `dvc repro -s report`"
              if outputs["evaluation"] is not None else
              f"`dvc commit -f train@{run}`, then `dvc repro evaluate@{run}` (which adds the "
              "evaluation to the MLflow run) and `dvc repro -s report`")
    return done + f"; {d / paths.MLFLOW_RUN} now names it: record that with {record}"


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
        except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
            print(f"error: {run}: {e if isinstance(e, PipelineError) else f'{type(e).__name__}: {e}'}",
                  file=sys.stderr)
            failed.append(run)
    if failed:
        raise PipelineError(f"not logged: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)
