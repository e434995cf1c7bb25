"""Forget a run that params.yaml no longer lists: its dvc.lock entries and runs/<run>/.

DVC keeps the dvc.lock entries of stages that no longer exist, as a run's
settings@/train@/evaluate@ stages do once its entry is deleted from params.yaml; and
runs/<run>/ holds its committed outputs and its git-ignored resume files, which a later
run of the same name with ``resume: true`` would otherwise pick up. Delete the run's entry
from params.yaml first, then ``python -m pipeline.forget <run>`` and ``dvc repro -s report``.
"""

from __future__ import annotations

import argparse

import yaml

from pipeline import params as P
from pipeline import paths
from pipeline._util import PipelineError, remove, summary, write_text

LOCK = "dvc.lock"
RUN_STAGES = ("settings", "train", "evaluate")


def forget(runs: list[str], params: P.Params) -> list[str]:
    """Remove each run's lock entries and folder; returns what went, for the message."""
    runs = list(dict.fromkeys(runs))  # a run named twice is forgotten once
    listed = [r for r in runs if r in params.runs]
    if listed:
        raise PipelineError(f"{', '.join(listed)} {'is' if len(listed) == 1 else 'are'} still listed under "
                            f"`runs` in {paths.PARAMS}: delete the entry there first")
    try:
        with open(LOCK, encoding="utf-8") as f:
            lock = yaml.safe_load(f) or {}
    except FileNotFoundError:
        lock = {}
    stages = lock.get("stages") or {}
    entries = [f"{s}@{r}" for r in runs for s in RUN_STAGES if f"{s}@{r}" in stages]
    folders = [paths.run_dir(r) for r in runs if paths.run_dir(r).exists()]
    if not entries and not folders:
        raise PipelineError(f"nothing to forget: {LOCK} has no stage of {', '.join(runs)} and "
                            f"there is no {' or '.join(str(paths.run_dir(r)) for r in runs)}")
    if entries:
        for name in entries:
            del stages[name]
        # DVC reads any YAML; it writes the file in its own layout again at its next change.
        write_text(LOCK, yaml.safe_dump(lock, sort_keys=False, width=1 << 16))
    remove(folders)
    return entries + [f"{d}/" for d in folders]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.forget", description=summary(__doc__))
    ap.add_argument("runs", nargs="+", metavar="run", help="a run no longer in params.yaml")
    args = ap.parse_args(argv)
    gone = forget(args.runs, P.load())
    print(f"removed {', '.join(gone)}; next: dvc repro -s report, then commit the deletions")
    return 0


if __name__ == "__main__":
    from pipeline._util import run_main

    run_main(main)
