"""Forget a run that params.yaml no longer lists: its dvc.lock entries and runs/<run>/.

DVC keeps the dvc.lock entries of stages that no longer exist, as a run's
settings@/train@/evaluate@ stages do once its entry is deleted from params.yaml; and
runs/<run>/ holds its committed outputs and its git-ignored resume files, which a later
run of the same name with ``resume: true`` would otherwise pick up. Delete the run's entry
from params.yaml first, then ``python -m pipeline.forget <run>`` and ``dvc repro -s report``.
(params.yaml must list at least one run, so the last one cannot be forgotten.)
"""

from __future__ import annotations

import argparse

import yaml

from pipeline import params as P
from pipeline import paths
from pipeline._util import PipelineError, remove, summary, write_text

RUN_STAGES = ("settings", "train", "evaluate")


def _read_lock() -> dict:
    """dvc.lock as a mapping ({} if there is none)."""
    try:
        lock = yaml.safe_load(paths.LOCK.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{paths.LOCK} is not valid YAML ({e}): restore it with git checkout {paths.LOCK}") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("stages", {}), dict):
        raise PipelineError(f"{paths.LOCK} is not a DVC lock file (no mapping of stages): "
                            f"restore it with git checkout {paths.LOCK}")
    return lock


def forget(runs: list[str], params: P.Params) -> list[str]:
    """Remove each run's lock entries and folder; returns what went, for the message.
    Nothing is removed unless every run named has something to remove."""
    runs = list(dict.fromkeys(runs))  # a run named twice is forgotten once
    # The name becomes a path that is deleted: ".", "" or "/x" must not reach it.
    bad = [r for r in runs if not P.RUN_NAME_RE.fullmatch(r)]
    if bad:
        raise PipelineError(f"{', '.join(map(repr, bad))}: not a run name (letters, digits, '_' and '-')")
    listed = [r for r in runs if r in params.runs]
    if listed:
        raise PipelineError(f"{', '.join(listed)} {'is' if len(listed) == 1 else 'are'} still listed under "
                            f"`runs` in {paths.PARAMS}: delete the entry there first")
    lock = _read_lock()
    stages = lock.get("stages") or {}
    entries = {r: [f"{s}@{r}" for s in RUN_STAGES if f"{s}@{r}" in stages] for r in runs}
    folders = [paths.run_dir(r) for r in runs if paths.run_dir(r).exists()]
    unknown = [r for r in runs if not entries[r] and paths.run_dir(r) not in folders]
    if unknown:
        raise PipelineError(f"nothing to forget of {', '.join(unknown)}: {paths.LOCK} has no stage of "
                            f"{'it' if len(unknown) == 1 else 'them'} and there is no "
                            f"{' or '.join(str(paths.run_dir(r)) for r in unknown)}")
    gone = [name for r in runs for name in entries[r]]
    if gone:
        for name in gone:
            del stages[name]
        # DVC reads any YAML; it writes the file in its own layout again at its next change.
        write_text(paths.LOCK, yaml.safe_dump(lock, sort_keys=False, width=1 << 16))
    remove(folders)
    return gone + [f"{d}/" for d in folders]


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
