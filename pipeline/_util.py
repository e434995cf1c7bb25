"""Small helpers shared by the stage scripts: errors, atomic writes, CLI entry."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

from cnn.atomic import atomic_path
from cnn.errors import UserError
from cnn.train import request_stop, stop_as_interrupted


class PipelineError(Exception):
    """An error with a message meant for the user (no traceback is shown)."""


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; run the stage that produces it first (dvc repro)") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e}); re-run the stage that produces it") from None


def remove(paths) -> None:
    """Delete files or directories if they exist."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _sigterm(signum, frame):  # pragma: no cover - exercised by signals only
    request_stop(SystemExit(128 + signum))


def summary(doc: str) -> str:
    """A module docstring's first paragraph as plain text, for ``--help``."""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's ``main`` and turn known errors into one clear line + exit code.

    Exit codes: 0 ok, 1 known failure (message on stderr), 2 bad params/usage,
    130 interrupted. SIGTERM is turned into an exception so ``finally`` blocks and
    :func:`atomic_path` clean up temporary files.
    """
    from pipeline.params import ParamsError

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, stop_as_interrupted)
    try:
        rc = main(argv)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` etc.
        sys.stderr.close()
        sys.exit(0)
    except UserError as e:  # the engine's errors with a message meant for the user
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rc or 0)
