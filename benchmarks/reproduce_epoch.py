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
splits its sums by thread). Exit status (as cmp's): 0 when identical, 1 when not, 2 when it could not tell
(bad arguments, or training failed).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import traceback
from dataclasses import replace

from cnn.errors import UserError
from cnn.train import TrainConfig, fit
from pipeline import params as params_mod
from pipeline.params import ParamsError
from pipeline import paths

COMPARED = ("loss", "train_acc", "test_acc")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run named in params.yaml, with a committed runs/<run>/history.csv")
    p.add_argument("--device", help="override the run's device (auto | cpu | cuda)")
    args = p.parse_args(argv)

    cfg = params_mod.load().run(args.run)
    folder = paths.run_dir(args.run)
    with open(folder / paths.HISTORY) as f:
        committed = next(csv.DictReader(f))
    produced_on = json.loads((folder / paths.METRICS).read_text())["device"]
    with tempfile.TemporaryDirectory() as out:
        # Epoch 1's learning rate is the base rate under every schedule, whatever the length.
        config = replace(TrainConfig(**cfg, data=str(paths.PREPARED), out=out, progress=False),
                         epochs=1, **({"device": args.device} if args.device else {}))
        result = fit(config)
    again = result.history[0]
    print(f"committed (produced on {produced_on}):")
    print("  " + "  ".join(f"{k} {float(committed[k])!r}" for k in COMPARED))
    print(f"reproduced on {result.device}:")
    print("  " + "  ".join(f"{k} {again[k]!r}" for k in COMPARED))
    same = all(float(committed[k]) == again[k] for k in COMPARED)
    print("IDENTICAL" if same else "DIFFERENT")
    if not same and "cpu" in result.device:
        print("(a CPU row reproduces only with the thread count it was trained with: compare "
              "OMP_NUM_THREADS with that run's)")
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
