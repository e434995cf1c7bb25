"""File layout of the pipeline, relative to the repository root.

``dvc.yaml`` names the same paths (it cannot import them);
``tests/test_pipeline.py`` checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
LOCK = Path("dvc.lock")  # written by DVC; pipeline.forget drops a removed run's entries

# download / normalize
RAW_ARCHIVE = Path("data/raw/cifar-10-python.tar.gz")
PREPARED = Path("data/prepared/cifar10.npz")
STATS = Path("data/prepared/stats.json")

# settings@<run> / train@<run> / evaluate@<run>: everything under runs/<run>/
RUNS = Path("runs")
SETTINGS = "settings.json"        # the run's entry merged over defaults (settings stage)
BEST_CHECKPOINT = "best.npz"      # written by cnn.train.fit (DVC out)
LAST_CHECKPOINT = "last.npz"      # written by fit, used by `resume`; not a DVC out
ENGINE_STAMP = "last.engine"      # fingerprint of the cnn/ code that wrote last.npz; not a DVC out
EPOCH_DEVICES = "last.devices"    # the device of each epoch in last.npz (JSON list); not a DVC out
LIVE_MLFLOW_RUN = "last.mlflow"   # the MLflow run of the training in progress (JSON); not a DVC out
HISTORY = "history.csv"           # per-epoch metrics (dvc plots)
METRICS = "metrics.json"          # final training metrics (dvc metrics)
CONFIG = "config.json"            # the resolved run configuration + device
MLFLOW_RUN = "mlflow.json"        # MLflow run id, for evaluate to log into
CURVES = "curves.png"             # per-run training curves
EVAL_METRICS = "eval.json"        # test accuracy + per-class accuracy (dvc metrics)
CONFUSION = "confusion.json"      # confusion matrix + class names
CONFUSION_PNG = "confusion.png"
PREDICTIONS = "predictions.csv"   # actual,predicted (dvc plots, confusion template)

# report
REPORTS = Path("reports")
RESULTS_MD = REPORTS / "results.md"
TRAINING_CURVES_PNG = REPORTS / "training_curves.png"
REPORT_CONFUSION_DIR = REPORTS / "confusion"


# Everything the stages write (dvc.lock by DVC): changes there do not make a run's code dirty.
PIPELINE_OUTPUTS = (str(LOCK), "data", str(RUNS), str(REPORTS))


def run_dir(run: str) -> Path:
    return RUNS / run


def settings_output(run: str) -> Path:
    return run_dir(run) / SETTINGS


def train_outputs(run: str) -> list[Path]:
    d = run_dir(run)
    return [d / n for n in (BEST_CHECKPOINT, HISTORY, METRICS, CONFIG, MLFLOW_RUN, CURVES)]


def evaluate_outputs(run: str) -> list[Path]:
    d = run_dir(run)
    return [d / n for n in (EVAL_METRICS, CONFUSION, CONFUSION_PNG, PREDICTIONS)]
