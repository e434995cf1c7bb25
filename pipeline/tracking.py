"""MLflow tracking for the pipeline, robust to queues and unreachable servers.

* **Where runs go.** ``MLFLOW_TRACKING_URI`` if set (e.g. a team server);
  otherwise a SQLite database ``mlflow.db`` in the root of the *main* repository,
  with artifacts under ``mlartifacts/`` there (absolute paths). "Main" matters for
  ``dvc exp run --queue``/``--temp``: those run in a temporary copy under
  ``.dvc/tmp/exps/`` that DVC deletes afterwards, but DVC sets ``DVC_ROOT`` to the
  parent repository for them, so runs and artifacts still land in the main store.
* **Fresh databases.** MLflow creates and migrates a SQLite schema without a lock;
  the first connection and the experiment creation happen under an ``fcntl`` file
  lock so parallel queue workers do not race.
* **Unreachable servers.** An HTTP store is probed once with a short timeout and
  MLflow's own HTTP retries are shortened; if the store cannot be used, one
  warning is printed and logging becomes a no-op. Any later logging failure also
  degrades to a no-op (after one quick retry). Training never fails
  because of MLflow, and every result is still in the DVC outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

# Shorter HTTP retry loops than MLflow's defaults (7 retries, backoff factor 2 =
# minutes of waiting) unless the user chose their own. Must be set before use.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

PROBE_TIMEOUT_S = 3.0
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_EXEC_TMP = (".dvc", "tmp", "exps")  # where DVC puts queue/temp executors

_warned = False


def warn_once(message: str) -> None:
    """Print one warning per process (the first one wins)."""
    global _warned
    if not _warned:
        _warned = True
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------- locations
def _outside_executor(path: Path) -> Path:
    """``<repo>/.dvc/tmp/exps/tmpXYZ/...`` -> ``<repo>``; other paths unchanged."""
    parts = path.parts
    for i in range(len(parts) - len(_EXEC_TMP) + 1):
        if parts[i : i + len(_EXEC_TMP)] == _EXEC_TMP:
            return Path(*parts[:i])
    return path


def main_repo_root(cwd: str | os.PathLike | None = None) -> Path:
    """The main repository's root, also from inside a DVC queue's temporary copy.

    DVC exports ``DVC_ROOT`` to every stage command; for queued and ``--temp``
    experiments it points to the parent repository, not the executor's temporary
    directory. Without DVC (a stage run by hand), search upwards for ``.dvc``.
    """
    env = os.environ.get("DVC_ROOT")
    if env:
        root = Path(env)
    else:
        here = Path(cwd or os.getcwd()).resolve()
        root = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)
    return _outside_executor(root.resolve())


def _is_local_scheme(uri: str) -> bool:
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme in ("", "file", "sqlite") or (len(scheme) == 1 and os.name == "nt")


def resolve_tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` (relative local paths anchored at the main repo), or the default."""
    root = root or main_repo_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{(root / DB_NAME).as_posix()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:" and not Path(rel).is_absolute():
            return f"sqlite:///{(root / rel).as_posix()}"
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "" and not Path(uri).is_absolute():
        return (root / uri).as_posix()
    return uri


def default_artifact_location(uri: str, root: Path, experiment: str) -> str | None:
    """Absolute artifact location for a new experiment in a local store; None = server default."""
    if not _is_local_scheme(uri):
        return None
    return (root / ARTIFACTS_DIR / experiment).resolve().as_uri()


def display_uri(uri: str) -> str:
    """The URI without any user:password."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.password or parsed.username:
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        return urllib.parse.urlunparse(parsed._replace(netloc=netloc))
    return uri


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the store at ``uri`` cannot be used, or None if it looks usable."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None  # the server answered: reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return f"cannot reach {display_uri(uri)} ({reason})"
    db = _sqlite_file(uri)
    if db is not None and not db.parent.is_dir():
        return f"directory {db.parent} of the SQLite store does not exist"
    return None


@contextlib.contextmanager
def init_lock(uri: str, root: Path) -> Iterator[None]:
    """Exclusive lock serialising store creation/migration across processes."""
    key = hashlib.sha1(uri.encode()).hexdigest()[:12]
    lock_dir = root / ".dvc" / "tmp"
    if not lock_dir.is_dir():
        lock_dir = Path(tempfile.gettempdir())
    path = lock_dir / f"mlflow-init-{key}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_info(cwd: str | os.PathLike | None = None, outputs: tuple[str, ...] = ()) -> dict[str, str]:
    """The commit and ``git_dirty``: whether tracked files other than ``outputs`` differ from
    it. ``outputs``: what the pipeline itself writes (dvc.lock, stage outputs); `dvc repro`
    rewrites dvc.lock after every stage, which would mark every run after the first dirty."""
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    info = {}
    commit = git("rev-parse", "HEAD")
    if commit:
        info["mlflow.source.git.commit"] = commit
        info["git_commit"] = commit
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                     *(f":(exclude){path}" for path in outputs))
        if status is not None:
            info["git_dirty"] = "true" if status else "false"
    return info


def dvc_context(stage_default: str) -> dict[str, str]:
    """DVC stage / experiment names exported by DVC to stage commands."""
    ctx = {"dvc_stage": os.environ.get("DVC_STAGE") or stage_default}
    if os.environ.get("DVC_EXP_NAME"):
        ctx["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        ctx["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return ctx


def run_name_for(ctx: dict[str, str]) -> str:
    return f"{ctx['dvc_exp_name']}:{ctx['dvc_stage']}" if "dvc_exp_name" in ctx else ctx["dvc_stage"]


# ---------------------------------------------------------------- tracker
def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.store.db", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs a whole SQLAlchemy traceback at ERROR for a locked SQLite store, even when a
    # retry then succeeds; the Tracker says in one warning when logging really stops.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _mlflow_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class Tracker:
    """A thin wrapper over ``MlflowClient`` that never raises.

    Use :func:`start_run` or :func:`attach_run`. ``enabled`` is False for the
    no-op tracker (MLflow unavailable); every method is then a no-op.
    """

    ATTEMPTS = 2
    # A locked SQLite store (another stage writing, a `dvc queue` worker) frees up within
    # seconds: waits of 0.5, 1, 2 and 4 s before giving up. (Not for a server that does not
    # answer: each try of that waits out MLflow's own HTTP timeout and retries.)
    LOCKED_ATTEMPTS = 5

    def __init__(self, client=None, run_id: str | None = None, *, uri: str = "", experiment_id: str | None = None,
                 experiment: str | None = None, run_name: str | None = None, reason: str | None = None):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self.experiment = experiment
        self.run_name = run_name
        self.reason = reason  # why tracking is off
        self._lost = None  # the client of a run whose logging stopped midway

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _disable(self, what: str, err: BaseException) -> None:
        self.reason = f"{what} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warn_once(
            f"MLflow logging to {display_uri(self.uri)} stopped ({self.reason}); "
            "continuing without MLflow. All results are still written to the DVC outputs."
        )
        self._lost, self.client = self.client, None

    def _call(self, method: str, *args, **kwargs) -> bool:
        """``self.client.<method>(*args, **kwargs)`` with quick retries; never raises."""
        if not self.enabled:
            return False
        attempt = 0
        while True:
            try:
                getattr(self.client, method)(*args, **kwargs)
                return True
            except Exception as e:  # noqa: BLE001 - tracking must never break training
                attempt += 1
                if attempt >= (self.LOCKED_ATTEMPTS if "database is locked" in str(e) else self.ATTEMPTS):
                    self._disable(method, e)
                    return False
                time.sleep(0.5 * 2 ** (attempt - 1))

    # --- logging API ------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, _mlflow_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, _mlflow_value(v)) for k, v in tags.items()]
        self._call("log_batch", self.run_id, tags=items)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        self._call("log_batch", self.run_id, metrics=items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self._lost is not None and self.run_id:
            # Logging stopped midway: one last try to close the run as incomplete, so that
            # it does not stay RUNNING, half-logged, in the MLflow UI. Not on a server, which
            # may have stopped answering: each call would wait out MLflow's HTTP timeouts.
            if self.uri.startswith(("http://", "https://")):
                return
            try:
                self._lost.set_tag(self.run_id, "logging_stopped", self.reason)
                self._lost.set_terminated(self.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - tracking must never break training
                pass
            return
        self._call("set_terminated", self.run_id, status)

    def end_abandoned(self, info: dict[str, Any] | None) -> str | None:
        """Mark KILLED the run that ``info`` names (the record of a training in progress,
        left behind by a process that died without closing its run), if it is in this
        store and still RUNNING; return its id. Best effort: never raises."""
        if not self.enabled or not isinstance(info, dict) or not info.get("run_id") \
                or info.get("tracking_uri") != display_uri(self.uri):
            return None
        run_id = info["run_id"]
        try:
            if self.client.get_run(run_id).info.status != "RUNNING":
                return None
            self.client.set_tag(run_id, "ended_by", f"run {self.run_id}: the process of this run had died")
            self.client.set_terminated(run_id, "KILLED")
            return run_id
        except Exception:  # noqa: BLE001 - tracking must never break training
            return None

    def info(self) -> dict[str, Any]:
        """What the train stage stores in ``runs/<run>/mlflow.json``."""
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "tracking_uri": display_uri(self.uri),
            **({"disabled_reason": self.reason} if self.reason else {}),
        }


def _client(uri: str):
    _quiet_mlflow_logs()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store (None for another store or an in-memory one)."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


def _missing_sqlite_file(uri: str) -> bool:
    """Whether ``uri`` is a SQLite store whose file does not exist yet (MLflow, if asked
    anything, would create it)."""
    db = _sqlite_file(uri)
    return db is not None and not db.is_file()


def _create_sqlite_store(path: Path) -> None:
    """Create and migrate a new SQLite store in a file beside ``path``, then move it there.
    MLflow migrates a new database in many steps; one interrupted halfway (Ctrl-C early in
    the first run) would fail every later run with "table ... already exists"."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    _quiet_mlflow_logs()
    tmp = path.with_name(f".{path.name}.creating")
    tmp.unlink(missing_ok=True)  # left by an interrupted creation
    SqlAlchemyStore(f"sqlite:///{tmp}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH).engine.dispose()
    os.replace(tmp, path)


def has_run(uri: str, run_id: str) -> bool:
    """Whether the store at ``uri`` holds MLflow run ``run_id``, not deleted (False if it
    cannot say: probe the store first, since a server that does not answer is waited for)."""
    if _missing_sqlite_file(uri):
        return False  # asking would create the database
    try:
        return _client(uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - a run it does not have, or a store that cannot answer
        return False


def runs_tagged(uri: str, experiment: str, key: str, value: str) -> list[str]:
    """Ids of the runs of ``experiment`` in the store at ``uri``, not deleted, whose tag
    ``key`` is ``value``."""
    if _missing_sqlite_file(uri):
        return []  # asking would create the database
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r.info.run_id for r in client.search_runs([exp.experiment_id], f"tags.{key} = '{value}'")]


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created meanwhile by another process (remote servers)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    loc = exp.artifact_location or ""
    scheme = urllib.parse.urlparse(loc).scheme
    if loc and (scheme == "" or len(scheme) == 1) and not Path(loc).is_absolute():
        warn_once(
            f"MLflow experiment '{name}' stores artifacts at the relative location '{loc}'; "
            "runs from DVC queue workers will put theirs in temporary directories. "
            "Create the experiment with an absolute artifact location."
        )
    return exp.experiment_id


def start_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None,
              root: Path | None = None) -> Tracker:
    """Open a new MLflow run, or return a no-op tracker after one warning."""
    root = root or main_repo_root()
    uri = resolve_tracking_uri(root)
    reason = probe(uri)
    if reason is None:
        try:
            with init_lock(uri, root), contextlib.chdir(root):
                # chdir: a new database gets MLflow's "Default" experiment with an artifact
                # root of ./mlruns resolved against the working directory -- make that the
                # main repository, not a DVC queue's temporary copy.
                if _missing_sqlite_file(uri):
                    _create_sqlite_store(_sqlite_file(uri))
                client = _client(uri)
                exp_id = _get_or_create_experiment(client, experiment, default_artifact_location(uri, root, experiment))
            run = client.create_run(exp_id, run_name=run_name, tags={k: _mlflow_value(v) for k, v in (tags or {}).items()})
            return Tracker(client, run.info.run_id, uri=uri, experiment_id=exp_id, experiment=experiment,
                           run_name=run_name)
        except Exception as e:  # noqa: BLE001
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warn_once(
        f"MLflow tracking at {display_uri(uri)} is unavailable ({reason}); "
        "continuing without MLflow logging. All results are still written to the DVC outputs."
    )
    return Tracker(None, None, uri=uri, experiment=experiment, run_name=run_name, reason=reason)


def attach_run(info: dict[str, Any], root: Path | None = None) -> Tracker:
    """Reopen the run recorded by the train stage (``runs/<run>/mlflow.json``)."""
    run_id = info.get("run_id")
    if not run_id:
        warn_once(
            "the training run was not logged to MLflow "
            f"({info.get('disabled_reason', 'tracking was unavailable')}); evaluation results are "
            "written to the DVC outputs only."
        )
        return Tracker(None, None, reason="no MLflow run id")
    root = root or main_repo_root()
    uri = resolve_tracking_uri(root)
    recorded = info.get("tracking_uri")
    if recorded and recorded != display_uri(uri):
        warn_once(
            f"the training run was logged to {recorded} but MLflow now points at {display_uri(uri)}; "
            "evaluation results are written to the DVC outputs only."
        )
        return Tracker(None, None, uri=uri, reason="tracking URI changed")
    reason = probe(uri)
    if reason is None and _missing_sqlite_file(uri):
        reason = f"{uri} does not exist"
    if reason is None:
        try:
            client = _client(uri)
            run = client.get_run(run_id)
            return Tracker(client, run_id, uri=uri, experiment_id=run.info.experiment_id,
                           experiment=info.get("experiment"), run_name=run.info.run_name)
        except Exception as e:  # noqa: BLE001
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warn_once(
        f"MLflow run {run_id} at {display_uri(uri)} is unavailable ({reason}); "
        "evaluation results are written to the DVC outputs only."
    )
    return Tracker(None, None, uri=uri, reason=reason)
