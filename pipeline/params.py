"""Load and validate ``params.yaml``.

Every stage calls :func:`load` before doing any work, so a typo in any run
(an unknown key, an unknown model, a non-positive epoch count, an LR that is
not a number...) stops the whole pipeline with a message that names the run
and the key, and nothing is computed.

Layout of ``params.yaml``::

    data:      {url, md5, retries, timeout}   # download stage
    mlflow:    {experiment}                   # MLflow experiment name
    progress:  true                           # tqdm bars during training
    resume:    false                          # continue from runs/<run>/last.npz
    defaults:  {model, epochs, ...}           # every training knob, once
    runs:
      <name>: {key: value, ...}               # overrides merged over defaults

Only ``data.url``/``data.md5``, ``defaults`` and ``runs.<name>`` are DVC
params dependencies; the other keys do not change results, so editing them
does not re-run anything. ``defaults`` and ``runs.<name>`` are those of the
``settings@<name>`` stage, which writes the run's resolved settings, less the
knobs without effect, to ``runs/<name>/settings.json``: the train stage depends
on that file, so a default that the run overrides, or that has no effect on it,
does not retrain it.

``python -m pipeline.params`` validates the file and prints the resolved runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnn.checks import boolean, integer, number, show
from cnn.config import CHECKS, combination_problems, inert_schedule, unused_knobs

from pipeline._util import summary, write_json

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
MD5_RE = re.compile(r"^[0-9a-f]{32}$")

MODEL_TITLES = {"simple": "SimpleCNN", "resnet": "SmallResNet"}


class ParamsError(ValueError):
    """params.yaml is invalid; the message lists every problem found."""


# --------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and only true/false as booleans (``no`` and
    ``off`` are strings in YAML 1.2), and refuses a key given twice in one mapping (PyYAML
    keeps the last silently), all as DVC does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's booleans and numbers, as DVC (ruamel.yaml) reads them: PyYAML's 1.1 rules read
# `seed: 010` as 8 (octal) and `epochs: 1:30` as 90 (base 60), where DVC sees 10 and a string.
_NUMBER_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0b[01_]+|0o[0-7_]+|0x[0-9a-fA-F_]+|[0-9][0-9_]*)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1 if text[0] == "-" else 1), text.lstrip("+-")
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)  # 010 is ten


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


# --------------------------------------------------------------------- checkers
# The training knobs are checked by the engine's own table (cnn.config.CHECKS); the
# pipeline adds the sections only it has. A checker returns an error string or None.

#: Every training knob, in the order TrainConfig declares them.
RUN_KEYS = CHECKS

DATA_KEYS = {
    "url": lambda v: None if isinstance(v, str) and v.strip() else f"must be a non-empty URL; got {show(v)}",
    "md5": lambda v: None  # either case, as md5sum or a web page prints it (CIFAR10_MD5 too)
    if isinstance(v, str) and MD5_RE.match(v.lower())
    else f"must be 32 hex digits; got {show(v)}",
    "retries": integer(0),
    "timeout": number(0, low_open=True),
}
DATA_DEFAULTS = {"retries": 5, "timeout": 60}

TOP_KEYS = ("data", "mlflow", "progress", "resume", "defaults", "runs")


# ------------------------------------------------------------------ the model
@dataclass(frozen=True)
class DataParams:
    url: str
    md5: str
    retries: int = 5
    timeout: float = 60


@dataclass(frozen=True)
class Params:
    data: DataParams
    runs: dict[str, dict[str, Any]]  # resolved: defaults merged under each run
    experiment: str = "cifar10-cnn"
    progress: bool = True
    resume: bool = False
    source: str = "params.yaml"

    def run(self, name: str) -> dict[str, Any]:
        if name not in self.runs:
            known = ", ".join(self.runs) or "(none)"
            raise ParamsError(f"{self.source}: no run named '{name}' under runs (known runs: {known})")
        return dict(self.runs[name])

    def effective(self, name: str) -> dict[str, Any]:
        """``run(name)`` without the knobs that have no effect there (the step schedule's
        milestones under cosine, Adam's betas for SGD...; cnn.config.unused_knobs): what
        ``settings@<name>`` writes, so that editing such a default retrains nothing."""
        settings = self.run(name)
        unused = unused_knobs(settings)
        return {k: v for k, v in settings.items() if k not in unused}


def _check_keys(where: str, mapping: dict, checkers: dict, problems: list[str]) -> None:
    for key, value in mapping.items():
        if key not in checkers:
            problems.append(
                f"{where}: unknown key '{key}' (allowed keys: {', '.join(checkers)})"
            )
            continue
        msg = checkers[key](value)
        if msg:
            problems.append(f"{where}: '{key}' {msg}")


def validate(raw: Any, source: str = "params.yaml") -> Params:
    """Validate the parsed YAML ``raw``; raise :class:`ParamsError` listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level; got {show(raw)}")

    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{source}: unknown top-level key '{key}' (allowed keys: {', '.join(TOP_KEYS)})")

    # data
    data = raw.get("data")
    data_params = None
    if not isinstance(data, dict):
        problems.append(f"{source}: 'data' must be a mapping with url and md5; got {show(data)}")
    else:
        _check_keys("data", data, DATA_KEYS, problems)
        for key in ("url", "md5"):
            if key not in data:
                problems.append(f"data: missing key '{key}'")
        if not problems:
            data_params = DataParams(**{**DATA_DEFAULTS, **data, "md5": data["md5"].lower()})

    # mlflow / progress / resume
    mlflow = raw.get("mlflow", {}) or {}
    experiment = "cifar10-cnn"
    if not isinstance(mlflow, dict):
        problems.append(f"{source}: 'mlflow' must be a mapping; got {show(mlflow)}")
    else:
        _check_keys(
            "mlflow",
            mlflow,
            {"experiment": lambda v: None if isinstance(v, str) and v.strip() else f"must be a non-empty name; got {show(v)}"},
            problems,
        )
        experiment = mlflow.get("experiment", experiment)
    for key in ("progress", "resume"):
        if key in raw and (msg := boolean(raw[key])):
            problems.append(f"{source}: '{key}' {msg}")

    # defaults
    defaults = raw.get("defaults", {}) or {}
    if not isinstance(defaults, dict):
        problems.append(f"{source}: 'defaults' must be a mapping of training knobs; got {show(defaults)}")
        defaults = {}
    else:
        _check_keys("defaults", defaults, RUN_KEYS, problems)

    # runs
    runs_raw = raw.get("runs")
    runs: dict[str, dict] = {}
    if not isinstance(runs_raw, dict) or not runs_raw:
        problems.append(f"{source}: 'runs' must be a non-empty mapping of run name -> settings; got {show(runs_raw)}")
    else:
        for name, settings in runs_raw.items():
            where = f"run '{name}'"
            if not isinstance(name, str):
                problems.append(f"{where}: YAML reads this run name as {type(name).__name__} {name!r}, not "
                                f"text: quote it ('{name}': ...)")
                continue
            if not RUN_NAME_RE.match(name):
                problems.append(
                    f"{where}: run names may contain only letters, digits, '_' and '-' "
                    "(they become DVC stage names and directory names)"
                )
                continue
            if settings is None:
                settings = {}
            if not isinstance(settings, dict):
                problems.append(f"{where}: settings must be a mapping; got {show(settings)}")
                continue
            _check_keys(where, settings, RUN_KEYS, problems)
            merged = {k: v for k, v in defaults.items() if k in RUN_KEYS}
            merged.update({k: v for k, v in settings.items() if k in RUN_KEYS})
            missing = [k for k in RUN_KEYS if k not in merged]
            if missing:
                problems.append(
                    f"{where}: missing key(s) {', '.join(missing)} (set them under defaults or in the run)"
                )
            problems.extend(f"{where}: {p}" for p in combination_problems(merged))
            runs[name] = {k: merged[k] for k in RUN_KEYS if k in merged}

    if problems:
        lines = "\n  ".join(problems)
        raise ParamsError(f"invalid {source} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  {lines}")

    assert data_params is not None
    return Params(
        data=data_params,
        runs=runs,
        experiment=experiment,
        progress=raw.get("progress", True),
        resume=raw.get("resume", False),
        source=source,
    )


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path`` (default: ``params.yaml`` in the working directory)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run the pipeline from the repository root)") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    return validate(raw, source=str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.params", description=summary(__doc__))
    ap.add_argument("--params", default="params.yaml", help="the params file to check")
    ap.add_argument("--run", help="print only this run's resolved settings")
    ap.add_argument("--out", help="write those in effect to this JSON file instead (with --run; the "
                                  "settings stage)")
    args = ap.parse_args(argv)
    if args.out and not args.run:
        ap.error("--out needs --run")
    params = load(args.params)
    for run in [args.run] if args.run else params.runs:
        if inert := inert_schedule(params.run(run)):
            print(f"note: run {run}: {inert}", file=sys.stderr)
    if args.out:
        write_json(args.out, params.effective(args.run))
    elif args.run:
        print(json.dumps(params.run(args.run), indent=2))
    else:
        print(json.dumps(params.runs, indent=2))
        print(f"{args.params}: OK ({len(params.runs)} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Through the imported module: run with -m, this file is __main__, whose ParamsError is
    # another class than the pipeline.params.ParamsError that run_main catches.
    from pipeline._util import run_main
    from pipeline.params import main as params_main

    run_main(params_main)
