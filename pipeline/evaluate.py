"""Stage ``evaluate@<run>``: reload the best checkpoint and measure it on the test set.

``python -m pipeline.evaluate <run>`` loads ``runs/<run>/best.npz`` with
``cnn.train.load_model`` (on the run's backend and device), predicts the test
images of the prepared dataset and writes, under ``runs/<run>/``:

* ``eval.json``       -- test accuracy, per-class accuracy, and the seconds that predicting
                        the test set took on ``device`` (``dvc metrics``)
* ``confusion.json``  -- confusion matrix (rows: true class, columns: predicted) + class names
* ``confusion.png``   -- the same, plotted with class names
* ``predictions.csv`` -- actual,predicted class name per test image (``dvc plots``, confusion template)

The metrics and the confusion matrix are added to the training run's MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time

import numpy as np

from pipeline import paths, plots, tracking
from pipeline._util import PipelineError, read_json, remove, summary, write_json, write_text
from pipeline.params import load


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise PipelineError(f"got {y_pred.shape} predictions for {y_true.shape} labels")
    if len(y_pred) and (y_pred.min() < 0 or y_pred.max() >= n):
        raise PipelineError(f"predictions outside [0, {n - 1}]")
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def scores(cm: np.ndarray, classes: list[str]) -> dict:
    total = int(cm.sum())
    per_class = cm.diagonal() / np.maximum(cm.sum(axis=1), 1)
    return {
        "test_acc": float(cm.trace() / total) if total else 0.0,
        "test_images": total,
        "per_class_acc": {c: float(a) for c, a in zip(classes, per_class)},
    }


def load_test_set(path=paths.PREPARED):
    """(x normalised float32, y, classes) from the prepared dataset."""
    from cnn.data import load_cifar10, normalization_stats, normalize

    if not path.is_file():
        raise PipelineError(f"{path} not found; run the normalize stage first (dvc repro normalize)")
    ds = load_cifar10(path)
    mean, std = normalization_stats(path, ds)
    return normalize(ds.test_x, mean, std), ds.test_y, ds.classes


#: The outputs that log_evaluation logs as artifacts, under evaluation/.
ARTIFACTS = (paths.CONFUSION_PNG, paths.CONFUSION, paths.EVAL_METRICS)


def log_evaluation(tracker, d, result: dict) -> None:
    """The evaluation (eval.json's ``result``, and the files beside it in ``d``) into the
    training run's MLflow run; pipeline.log_run logs the same from a run's outputs."""
    tracker.log_metrics({"eval_test_acc": result["test_acc"],
                         **{f"eval_acc_{c}": a for c, a in result["per_class_acc"].items()}})
    for name in ARTIFACTS:
        tracker.log_artifact(d / name, "evaluation")


def evaluate(run: str) -> dict:
    from cnn.train import load_model, model_backend, predict

    d = paths.run_dir(run)
    outputs = paths.evaluate_outputs(run)
    ckpt = d / paths.BEST_CHECKPOINT
    if not ckpt.is_file():
        raise PipelineError(f"{ckpt} not found; run the training stage first (dvc repro train@{run})")
    config = read_json(d / paths.CONFIG)
    mlflow_info = read_json(d / paths.MLFLOW_RUN)
    x, y, classes = load_test_set()
    # Only now that every input is there: a missing one leaves the last evaluation in place.
    remove(outputs)
    model = load_model(str(ckpt), backend=config["backend"], device=config["device"])
    t0 = time.perf_counter()
    pred = predict(model, x)  # on the host: the device's work is done
    seconds = time.perf_counter() - t0
    cm = confusion(y, pred, len(classes))
    result = scores(cm, classes)
    result.update(inference_seconds=seconds, device=repr(model_backend(model)))

    try:
        write_json(d / paths.EVAL_METRICS, result)
        write_json(d / paths.CONFUSION, {"classes": classes, "rows": "true class", "columns": "predicted class",
                                         "matrix": cm.tolist()})
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["actual", "predicted"])
        w.writerows((classes[a], classes[p]) for a, p in zip(y.tolist(), pred.tolist()))
        write_text(d / paths.PREDICTIONS, buf.getvalue())
        plots.confusion_matrix(cm, classes, d / paths.CONFUSION_PNG,
                               title=f"{run}: test accuracy {100 * result['test_acc']:.2f}%")
    except BaseException:
        remove(outputs)
        raise

    log_evaluation(tracking.attach_run(mlflow_info), d, result)
    print(f"evaluate@{run}: test accuracy {result['test_acc']:.4f} on {result['test_images']} images",
          file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=summary(__doc__))
    ap.add_argument("run", help="name of an entry under runs in params.yaml")
    ap.add_argument("--params", default=str(paths.PARAMS), help="the pipeline's params file")
    args = ap.parse_args(argv)
    params = load(args.params)
    params.run(args.run)
    evaluate(args.run)
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)
