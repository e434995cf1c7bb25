"""Does the engine as it is now still produce a committed run? Re-train its first epoch.

    python benchmarks/reproduce_epoch.py simple_5ep_numpy            # on the run's own backend
    python benchmarks/reproduce_epoch.py resnet_50ep_step --device cuda

Trains epoch 1 of a ``params.yaml`` run (same model, recipe, seed and prepared data) into a
temporary folder and compares its loss, train and test accuracy with the first row of the
committed ``runs/<run>/history.csv``, exactly (the loss is a float32 sum over 50,000
images, so one changed rounding anywhere in a step shows). A change to ``cnn/`` that is
meant not to change results passes this on the device that produced the row: GPU kernels
and CPU libraries round differently, so a row is reproducible only on its own kind of
device, and on a CPU with the thread count it was trained with (OMP_NUM_THREADS; PyTorch
splits its sums by thread).

On another machine (another CPU, BLAS build or GPU), ``--against REV`` asks the question
that can still be answered there: does the engine as it is now train epoch 1 exactly as
the engine of git revision REV (its ``cnn/``, in a process of its own) does, on this
machine? ``--against`` alone means HEAD, which checks uncommitted changes.

    python benchmarks/reproduce_epoch.py simple_5ep_numpy --against           # vs HEAD
    python benchmarks/reproduce_epoch.py simple_5ep_numpy --against 8caa74e

Exit status (as cmp's): 0 when identical, 1 when not, 2 when it could not tell (bad
arguments, or training failed).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import traceback
from dataclasses import asdict, replace

from cnn.errors import UserError
from cnn.train import TrainConfig, fit
from pipeline import params as params_mod
from pipeline.params import ParamsError
from pipeline import paths

COMPARED = ("loss", "train_acc", "test_acc")

# Run by another revision's engine: trains the configuration given as JSON, prints epoch 1 as JSON.
DRIVER = """
import json, sys
import cnn
from cnn.train import TrainConfig, fit
assert cnn.__file__.startswith(sys.argv[2]), f"imported {cnn.__file__}, not the engine in {sys.argv[2]}"
result = fit(TrainConfig(**json.loads(sys.argv[1])))
print(json.dumps({"device": result.device, **result.history[0]}))
"""


def epoch_one_at(rev: str, config: TrainConfig) -> tuple[str, dict]:
    """(device, epoch 1's history row) of ``config`` trained by the ``cnn/`` of git revision ``rev``."""
    archive = subprocess.run(["git", "archive", rev, "cnn"], capture_output=True)
    if archive.returncode:
        raise UserError(f"git archive {rev} cnn failed: {archive.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory() as tree:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
        # In the tree, with absolute paths: `python -c` imports from its working directory first.
        config = replace(config, data=os.path.abspath(config.data), out=os.path.abspath(config.out))
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(asdict(config)), tree], cwd=tree,
                              env={**os.environ, "PYTHONPATH": tree}, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.splitlines()
    print("\n".join(lines if done.returncode else lines[:-1]))
    if done.returncode:
        raise UserError(f"training with the engine of {rev} failed (exit status {done.returncode}; "
                        "its error is above)")
    row = json.loads(lines[-1])
    return row.pop("device"), row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run named in params.yaml, with a committed runs/<run>/history.csv")
    p.add_argument("--device", help="override the run's device (auto | cpu | cuda)")
    p.add_argument("--against", nargs="?", const="HEAD", metavar="REV",
                   help="compare with epoch 1 trained here by the engine of git revision REV "
                        "(default HEAD), not with the committed row")
    args = p.parse_args(argv)

    cfg = params_mod.load().run(args.run)
    folder = paths.run_dir(args.run)
    with tempfile.TemporaryDirectory() as out:
        # Epoch 1's learning rate is the base rate under every schedule, whatever the length.
        config = replace(TrainConfig(**cfg, data=str(paths.PREPARED), out=out, progress=False),
                         epochs=1, **({"device": args.device} if args.device else {}))
        if args.against:
            produced_on, committed = epoch_one_at(args.against, replace(config, out=f"{out}/against"))
            label = f"trained by the engine of {args.against}"
        else:
            with open(folder / paths.HISTORY) as f:
                committed = next(csv.DictReader(f))
            produced_on = json.loads((folder / paths.METRICS).read_text())["device"]
            label = "committed"
        result = fit(config)
    again = result.history[0]
    print(f"{label} (on {produced_on}):")
    print("  " + "  ".join(f"{k} {float(committed[k])!r}" for k in COMPARED))
    print(f"trained by the engine as it is now (on {result.device}):")
    print("  " + "  ".join(f"{k} {again[k]!r}" for k in COMPARED))
    same = all(float(committed[k]) == again[k] for k in COMPARED)
    print("IDENTICAL" if same else "DIFFERENT")
    if not same and "cpu" in result.device and not args.against:
        print("(a CPU row reproduces only on a CPU and BLAS build like the one that trained it, and "
              "with the same thread count (compare OMP_NUM_THREADS with that run's); on another "
              "machine, compare the engine with the one that made the row: --against REV)")
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, ParamsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - an engine bug: show where
        traceback.print_exc()
        sys.exit(2)
