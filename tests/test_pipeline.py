"""Tests of the DVC + MLflow pipeline: pipeline/, params.yaml, dvc.yaml.

Fast tests call the stage code in-process. The tests marked ``slow`` build
throwaway git + DVC repositories under tmp_path from the project's own files,
feed them a tiny synthetic CIFAR-10 archive (``cnn.synthetic``) through
``CIFAR10_SOURCE``/``CIFAR10_MD5``, shrink the runs to one epoch (the real
params.yaml is never touched) and run the real tools: ``dvc repro``,
``dvc exp run --queue`` + ``dvc queue start -j 2``, and ``mlflow server`` on a
loopback port. They run by default; ``-m "not slow"`` skips them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY_RUNS = ("simple_5ep_numpy", "simple_5ep_torch")  # one per backend
PROJECT_FILES = ("cnn", "pipeline", "params.yaml", "dvc.yaml", ".dvcignore", ".gitignore")
N_TRAIN, N_TEST = 300, 100

# MLflow's SQLAlchemy store triggers this on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import download as dl  # noqa: E402
from pipeline import params as P  # noqa: E402
from pipeline import paths, tracking  # noqa: E402


# ============================================================================ helpers
def md5_of(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def clean_env(**extra) -> dict:
    """The test process's environment without DVC/MLflow/CIFAR10 settings, venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "CIFAR10_"))}
    env["PATH"] = str(Path(PY).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        OMP_NUM_THREADS="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(args, cwd, env, timeout=300, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def dvc(*args, cwd, env, **kw) -> subprocess.CompletedProcess:
    return run([PY, "-m", "dvc", *args], cwd, env, **kw)


def stage(module: str, *args, cwd, env, **kw) -> subprocess.CompletedProcess:
    return run([PY, "-m", f"pipeline.{module}", *args], cwd, env, **kw)


def tiny_params(**changes) -> dict:
    """The real params.yaml with only TINY_RUNS left, each cut to one epoch."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["runs"] = {name: {**params["runs"][name], "epochs": 1} for name in TINY_RUNS}
    params.update(changes)
    return params


def make_project(dest: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC repository holding the project's pipeline files."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    env = clean_env()
    run(["git", "init", "-q"], dest, env)
    dvc("init", "-q", cwd=dest, env=env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "project"], dest, env)
    return dest


def clone_project(src: Path, dest: Path) -> Path:
    """Copy a project (git, DVC cache, outputs) without its MLflow store or DVC temp state."""
    def ignore(d, names):
        skip = {"mlflow.db", "mlartifacts", "mlruns", "__pycache__"}
        if Path(d).name == ".dvc":
            skip.add("tmp")
        return [n for n in names if n in skip]

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest


def rewrite_archive(src: Path, dest: Path, *, drop: tuple[str, ...] = (), labels: dict | None = None) -> Path:
    """A copy of a CIFAR-10 archive without some members, or with some labels replaced."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz") as tout:
        for m in tin.getmembers():
            if m.name.split("/")[-1] in drop:
                continue
            data = tin.extractfile(m).read() if m.isfile() else None
            base = m.name.split("/")[-1]
            if labels and base in labels:
                batch = pickle.loads(data, encoding="bytes")
                batch[b"labels"] = labels[base](batch[b"labels"])
                data = pickle.dumps(batch)
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def mlflow_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING:") and "MLflow" in line]


# ============================================================================ fixtures
@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    from cnn.synthetic import write_synthetic_cifar10

    path = write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic") / "cifar-10-python.tar.gz",
                                   n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return Path(path), md5_of(path)


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory, archive):
    """A project on which `dvc repro` has run (two one-epoch runs), committed."""
    path, md5 = archive
    proj = make_project(tmp_path_factory.mktemp("e2e") / "project")
    env = clean_env(CIFAR10_SOURCE=path, CIFAR10_MD5=md5)
    t0 = time.perf_counter()
    result = dvc("repro", cwd=proj, env=env, timeout=600)
    print(f"dvc repro: {time.perf_counter() - t0:.1f}s")
    run(["git", "add", "-A"], proj, env)
    run(["git", "commit", "-qm", "repro"], proj, env)
    return proj, env, result


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port; yields its URL."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [PY, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited:\n" + (tmp_path / "mlflow-server.log").read_text())
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# ============================================================================ params (fast)
def test_default_params_are_the_reference_table():
    """The six runs of the reference table keep their recipes; a user's added run is fine."""
    params = P.load(REPO / "params.yaml")
    assert {"simple_5ep_numpy", "simple_20ep_torch", "simple_20ep_torch_aug", "simple_5ep_torch",
            "resnet_50ep_step", "resnet_50ep_cosine"} <= set(params.runs)
    expect = {
        "simple_5ep_numpy": dict(model="simple", epochs=5, backend="numpy", augment=False, schedule="none"),
        "simple_20ep_torch": dict(model="simple", epochs=20, backend="torch", augment=False),
        "simple_20ep_torch_aug": dict(model="simple", epochs=20, backend="torch", augment=True),
        "simple_5ep_torch": dict(model="simple", epochs=5, backend="torch"),
        "resnet_50ep_step": dict(model="resnet", epochs=50, augment=True, schedule="step",
                                 milestones=[30, 40], gamma=0.1, early_stop=10, backend="torch"),
        "resnet_50ep_cosine": dict(model="resnet", epochs=50, augment=True, schedule="cosine",
                                   early_stop=0, backend="torch"),
    }
    for name, want in expect.items():
        cfg = params.run(name)
        assert {k: cfg[k] for k in want} == want, name
        assert (cfg["optimizer"], cfg["momentum"], cfg["weight_decay"], cfg["batch_size"], cfg["lr"],
                cfg["device"]) == ("sgd", 0.9, 1e-4, 64, 0.01, "auto"), name
        assert set(cfg) == set(P.RUN_KEYS)
    assert params.data.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert params.data.md5 == "c58f30108f718f92721af3b95e74349a"
    # every knob maps onto cnn.train.TrainConfig
    from cnn.train import TrainConfig

    TrainConfig(**params.run("resnet_50ep_step")).validate()


BAD_PARAMS = [
    ("model", "vgg", "'model' must be one of simple, resnet"),
    ("schedule", "linear", "'schedule' must be one of none, step, cosine"),
    ("backend", "jax", "'backend' must be one of numpy, torch, cupy"),
    ("optimizer", "rmsprop", "'optimizer' must be one of sgd, adam"),
    ("epochs", 0, "'epochs' must be a positive integer"),
    ("epochs", -3, "'epochs' must be a positive integer"),
    ("epochs", 2.5, "'epochs' must be a positive integer"),
    ("batch_size", 0, "'batch_size' must be a positive integer"),
    ("lr", 0, "'lr' must be a positive number"),
    ("lr", -0.1, "'lr' must be a positive number"),
    ("lr", "fast", "'lr' must be a positive number; got 'fast'"),
    ("lr", float("nan"), "'lr' must be a positive number"),
    ("lr", True, "'lr' must be a positive number"),
    ("device", "tpu", "'device' must be one of auto, cpu, cuda, mps"),
    ("momentum", 1.5, "'momentum' must be a number in [0, 1)"),
    ("milestones", [40, 30], "'milestones' must be strictly increasing"),
    ("augment", "yes", "'augment' must be true or false"),
    ("learning_rate", 0.1, "unknown key 'learning_rate'"),
    # two knobs, each valid alone
    ("device", "cuda", "'device' must be auto or cpu with backend numpy"),
    ("nesterov", True, "'nesterov' needs a momentum > 0"),
]


@pytest.mark.parametrize("key,value,message", BAD_PARAMS, ids=[f"{k}={v!r}" for k, v, _ in BAD_PARAMS])
def test_invalid_run_params_name_the_run_and_key(key, value, message):
    raw = tiny_params()
    raw["runs"]["simple_5ep_torch"][key] = value
    if key == "device":
        raw["runs"]["simple_5ep_torch"]["backend"] = "numpy"
    if key == "nesterov":
        raw["runs"]["simple_5ep_torch"]["momentum"] = 0
    with pytest.raises(P.ParamsError) as e:
        P.validate(raw)
    assert "run 'simple_5ep_torch'" in str(e.value)
    assert message in str(e.value)
    assert "simple_5ep_numpy" not in str(e.value)


def test_invalid_params_other_sections():
    raw = tiny_params()
    raw["defaults"]["lrr"] = 0.1
    raw["data"]["md5"] = "nope"
    raw["extra"] = 1
    raw["runs"]["bad name!"] = {}
    del raw["defaults"]["seed"]
    with pytest.raises(P.ParamsError) as e:
        P.validate(raw)
    msg = str(e.value)
    for part in ("defaults: unknown key 'lrr'", "data: 'md5' must be 32 hex digits",
                 "unknown top-level key 'extra'", "run 'bad name!'", "missing key(s) seed"):
        assert part in msg
    with pytest.raises(P.ParamsError, match="no run named 'nope'"):
        P.validate(tiny_params()).run("nope")
    with pytest.raises(P.ParamsError, match="'runs' must be a non-empty mapping"):
        P.validate({**tiny_params(), "runs": {}})


@pytest.mark.parametrize("name", ["a.b", "-x", "a/b", "a b", ""])
def test_run_names_that_are_no_stage_or_folder_name_are_refused(name):
    raw = tiny_params()
    raw["runs"][name] = {}
    with pytest.raises(P.ParamsError, match="run names may contain only letters"):
        P.validate(raw)


def test_a_run_name_that_yaml_reads_as_a_number_says_to_quote_it(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  simple_5ep_numpy:", "  2024:", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(P.ParamsError, match=r"run '2024': YAML reads this run name as int 2024, not text: "
                                            r"quote it \('2024': ...\)"):
        P.load(tmp_path / "params.yaml")


@pytest.mark.parametrize("key", ["progress", "resume"])
def test_top_level_switches_must_be_booleans_and_default_sensibly(key):
    with pytest.raises(P.ParamsError, match=f"'{key}' must be true or false; got 'yes'"):
        P.validate({**tiny_params(), key: "yes"})
    raw = tiny_params()
    del raw["progress"], raw["resume"]
    params = P.validate(raw)
    assert params.progress is True and params.resume is False


def test_an_adam_run_depends_on_no_sgd_knob():
    from cnn.config import unused_knobs

    assert unused_knobs({"optimizer": "adam", "schedule": "none"}) == {"milestones", "gamma", "momentum", "nesterov"}
    raw = tiny_params()
    raw["runs"]["simple_5ep_torch"]["optimizer"] = "adam"
    effective = P.validate(raw).effective("simple_5ep_torch")
    assert "betas" in effective and not {"momentum", "nesterov"} & set(effective)


def test_params_yaml_reads_floats_and_booleans_like_dvc(tmp_path):
    """YAML 1.2, as DVC reads params.yaml: 1e-3 is a float, and `no` is the string 'no'
    (PyYAML alone would read 1e-3 as a string and `no` as false)."""
    text = (REPO / "params.yaml").read_text().replace("lr: 0.01", "lr: 1e-3", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert P.load(tmp_path / "params.yaml").run("simple_5ep_numpy")["lr"] == 0.001
    (tmp_path / "params.yaml").write_text(text.replace("augment: false", "augment: FALSE", 1))
    assert P.load(tmp_path / "params.yaml").run("simple_5ep_numpy")["augment"] is False
    (tmp_path / "params.yaml").write_text(text.replace("augment: false", "augment: no", 1))
    with pytest.raises(P.ParamsError, match="'augment' must be true or false; got 'no'"):
        P.load(tmp_path / "params.yaml")


@pytest.mark.parametrize("scalar", ["010", "08", "0o10", "0x1F", "0b11", "1:30", "1:30.5", "1e-3", "1E3", "1.",
                                    ".5", "-.inf", "1_000", "1_0.5", "+5", "12e", ".e5", "no", "yes", "True", "~",
                                    "1.2.3", "[1, 010]"])
def test_params_yaml_reads_every_scalar_as_dvc_does(scalar):
    """PyYAML's YAML 1.1 read `seed: 010` as 8 and `epochs: 1:30` as 90, where DVC (and
    `dvc params diff`, `dvc exp show`) saw 10 and a string."""
    from dvc.utils.serialize import parse_yaml

    ours = yaml.load(f"k: {scalar}\n", Loader=P._Loader)["k"]
    theirs = parse_yaml(f"k: {scalar}\n", "params.yaml")["k"]
    theirs = list(theirs) if isinstance(theirs, list) else theirs  # ruamel's CommentedSeq
    assert (type(ours), ours) == (type(theirs), theirs)


def test_params_notes_a_step_schedule_that_never_steps(tmp_path, capsys):
    """Valid (a short trial of a long recipe is one), but worth a note: the report would
    show "step (30, 40; ×0.1)" for a rate that never changed."""
    text = (REPO / "params.yaml").read_text().replace("    epochs: 50\n    augment: true\n    schedule: step",
                                                       "    epochs: 5\n    augment: true\n    schedule: step", 1)
    (tmp_path / "params.yaml").write_text(text)
    P.main(["--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert ("note: run resnet_50ep_step: every milestone (30, 40) is at or past the last epoch (5): the step "
            "schedule never lowers the learning rate") in err
    assert err.count("note:") == 1


def test_resume_files_are_seen_by_neither_git_nor_dvc():
    """They are not outputs: git must not commit them, and the report stage's `runs`
    dependency must not count them, or a clone (which lacks them) would see it changed."""
    import fnmatch

    dvcignore = [line for line in (REPO / ".dvcignore").read_text().splitlines()
                 if line and not line.startswith("#")]
    for name in (paths.LAST_CHECKPOINT, paths.ENGINE_STAMP, paths.EPOCH_DEVICES):
        path = f"runs/any_run/{name}"
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
        assert any(fnmatch.fnmatch(path, pattern) for pattern in dvcignore), path


def test_params_yaml_refuses_a_run_named_twice_like_dvc(tmp_path):
    """PyYAML would keep the second silently; DVC refuses the file."""
    text = (REPO / "params.yaml").read_text()
    text += "\n  simple_5ep_numpy:\n    epochs: 1\n"
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(P.ParamsError, match="key 'simple_5ep_numpy' appears twice"):
        P.load(tmp_path / "params.yaml")


def test_dvc_yaml_matches_pipeline_paths():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def names(entries):
        return sorted(next(iter(e)) if isinstance(e, dict) else e for e in entries)

    k = "${key}"
    train = spec["train"]["do"]
    assert spec["settings"]["foreach"] == spec["train"]["foreach"] == spec["evaluate"]["foreach"] == "${runs}"
    settings = spec["settings"]["do"]
    assert sorted(settings["params"]) == sorted(["defaults", f"runs.{k}"]) and "params" not in train
    assert names(settings["outs"]) == [paths.settings_output(k).as_posix()]
    assert settings["cmd"].endswith(f"--out {paths.settings_output(k).as_posix()}")
    assert paths.settings_output(k).as_posix() in train["deps"]
    train_outs = names(train["outs"] + train["metrics"] + train["plots"])
    assert train_outs == sorted(p.as_posix() for p in paths.train_outputs(k))
    ev = spec["evaluate"]["do"]
    assert names(ev["outs"] + ev["metrics"] + ev["plots"]) == sorted(p.as_posix() for p in paths.evaluate_outputs(k))
    assert names(spec["download"]["outs"]) == [paths.RAW_ARCHIVE.as_posix()]
    assert sorted(spec["download"]["params"]) == ["data.md5", "data.url"]
    assert names(spec["normalize"]["outs"]) == sorted([paths.PREPARED.as_posix(), paths.STATS.as_posix()])
    assert names(spec["report"]["outs"]) == sorted(
        p.as_posix() for p in (paths.RESULTS_MD, paths.TRAINING_CURVES_PNG, paths.REPORT_CONFUSION_DIR))


def test_data_section_checks_md5_url_retries_and_timeout():
    """An md5 one digit too long, a blank URL, no md5 at all or a zero timeout is refused;
    retries may be 0, and both default (5 retries, 60 s) when left out."""
    def problems(**data):
        raw = tiny_params()
        raw["data"] = {k: v for k, v in {**raw["data"], **data}.items() if v is not None}
        with pytest.raises(P.ParamsError) as e:
            P.validate(raw)
        return str(e.value)

    assert "data: 'md5' must be 32 hex digits" in problems(md5="c58f30108f718f92721af3b95e74349a0")
    assert "data: 'url' must be a non-empty URL" in problems(url="  ")
    assert "data: missing key 'md5'" in problems(md5=None)
    assert "data: 'timeout' must be a positive number; got 0" in problems(timeout=0)
    raw = tiny_params()
    raw["data"] = {"url": raw["data"]["url"], "md5": raw["data"]["md5"]}
    assert (P.validate(raw).data.retries, P.validate(raw).data.timeout) == (5, 60)
    raw["data"]["retries"] = 0
    assert P.validate(raw).data.retries == 0
    raw["data"]["md5"] = raw["data"]["md5"].upper()  # as md5sum or a web page may print it
    assert P.validate(raw).data.md5 == raw["data"]["md5"].lower()


def test_the_mlflow_experiment_comes_from_params_yaml():
    assert P.validate({**tiny_params(), "mlflow": {"experiment": "my-exp"}}).experiment == "my-exp"
    assert P.validate({k: v for k, v in tiny_params().items() if k != "mlflow"}).experiment == "cifar10-cnn"


# ============================================================================ download (fast)
class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """1st request: HTTP 500; 2nd: half the body, then the connection drops; 3rd: honours
    Range, unless ``honours_range`` is off (then the whole body, HTTP 200)."""

    body = b""
    requests: list = []
    honours_range = True

    def log_message(self, *a):
        pass

    def do_GET(self):
        n = len(self.requests)
        self.requests.append(self.headers.get("Range"))
        if self.path != "/cifar-10-python.tar.gz":
            self.send_error(404)
        elif n == 0:
            self.send_error(500)
        elif n == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body[: len(self.body) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            start = start if self.honours_range else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
            self.send_header("Content-Length", str(len(self.body) - start))
            self.end_headers()
            self.wfile.write(self.body[start:])


@pytest.fixture
def flaky_server(archive):
    _FlakyHandler.body = archive[0].read_bytes()
    _FlakyHandler.requests = []
    _FlakyHandler.honours_range = True
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("honours_range", [True, False], ids=["resumed", "server_ignores_range"])
def test_download_retries_and_resumes_over_http(honours_range, flaky_server, archive, tmp_path, monkeypatch):
    """A server that ignores Range sends the whole file again: it replaces the half already
    there rather than being appended to it."""
    _FlakyHandler.honours_range = honours_range
    monkeypatch.setattr(dl, "BACKOFF_BASE", 0.01)
    monkeypatch.setenv("CIFAR10_SOURCE", f"{flaky_server}/cifar-10-python.tar.gz")
    monkeypatch.setenv("CIFAR10_MD5", archive[1])
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    dl.download(P.validate(tiny_params()), dest)
    assert md5_of(dest) == archive[1]
    assert _FlakyHandler.requests[0] is None and _FlakyHandler.requests[2].startswith("bytes=")
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temp files left


def test_download_http_404_fails_fast(flaky_server, archive, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_SOURCE", f"{flaky_server}/missing.tar.gz")
    monkeypatch.setenv("CIFAR10_MD5", archive[1])
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    with pytest.raises(dl.PipelineError, match="HTTP 404"):
        dl.download(P.validate(tiny_params()), dest)
    assert len(_FlakyHandler.requests) == 1
    assert not dest.parent.exists()


def test_download_network_error_gives_up_after_retries(tmp_path, monkeypatch, archive):
    monkeypatch.setattr(dl, "BACKOFF_BASE", 0.01)
    monkeypatch.setenv("CIFAR10_SOURCE", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    params = P.validate({**tiny_params(), "data": {**tiny_params()["data"], "retries": 2}})
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    with pytest.raises(dl.PipelineError, match=r"after 3 attempt\(s\).*CIFAR10_SOURCE"):
        dl.download(params, dest)
    assert not dest.parent.exists()


POINT_AT_AN_ARCHIVE = "Point CIFAR10_SOURCE (or data.url) at cifar-10-python.tar.gz or a copy of it"


def _bad_archives(archive, tmp_path):
    path, md5 = archive
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    missing = rewrite_archive(path, tmp_path / "missing.tar.gz", drop=("data_batch_3",))
    return {
        "md5 mismatch": (path, "0" * 32, ["md5 mismatch", "expected 00000000000000000000000000000000 (CIFAR10_MD5)",
                                          f"got {md5}"]),
        "truncated": (truncated, md5_of(truncated), ["truncated or corrupt", POINT_AT_AN_ARCHIVE]),
        "missing batch": (missing, md5_of(missing), ["missing cifar-10-batches-py/data_batch_3", POINT_AT_AN_ARCHIVE]),
        "no such file": (tmp_path / "nope.tar.gz", md5, ["does not exist", "CIFAR10_SOURCE"]),
        "official md5": (path, None, ["md5 mismatch", "params.yaml data.md5", f"CIFAR10_MD5={md5}"]),
    }


@pytest.mark.parametrize("case", ["md5 mismatch", "truncated", "missing batch", "no such file", "official md5"])
def test_download_rejects_bad_archives(case, archive, tmp_path):
    src, md5, messages = _bad_archives(archive, tmp_path)[case]
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work)
    env = clean_env(PYTHONPATH=REPO, CIFAR10_SOURCE=src.as_uri() if case == "truncated" else src,
                    **({"CIFAR10_MD5": md5} if md5 else {}))
    p = stage("download", cwd=work, env=env, check=False)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    for m in messages:
        assert m in p.stderr
    assert "Delete" not in p.stderr  # the source is the user's own file
    assert not (work / "data").exists()  # nothing left behind, not even an empty folder


def test_download_takes_an_upper_case_md5_and_refuses_a_bad_gzip_checksum(archive, tmp_path):
    """CIFAR10_MD5 as md5sum or a web page prints it, either case; and an archive whose
    members all read but whose gzip CRC is wrong is corrupt (a bit flipped in transfer)."""
    path, md5 = archive
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "params.yaml", work)
    p = stage("download", cwd=work, env=clean_env(PYTHONPATH=REPO, CIFAR10_SOURCE=path, CIFAR10_MD5=md5.upper()),
              check=False)
    assert p.returncode == 0, p.stderr
    bad = tmp_path / "bad-crc.tar.gz"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    bad.write_bytes(bytes(data))
    shutil.rmtree(work / "data")
    p = stage("download", cwd=work, env=clean_env(PYTHONPATH=REPO, CIFAR10_SOURCE=bad, CIFAR10_MD5=md5_of(bad)),
              check=False)
    assert p.returncode == 1 and "truncated or corrupt" in p.stderr and "Traceback" not in p.stderr
    assert not (work / "data").exists()


def test_a_failed_download_keeps_the_archive_that_was_there(archive, tmp_path):
    """An archive with another md5 (say, a mirror, when the official one is asked for) is
    replaced only by a verified one: a download that fails leaves it as it was."""
    path, md5 = archive
    work = tmp_path / "work"
    (work / paths.RAW_ARCHIVE).parent.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", work)
    shutil.copy(path, work / paths.RAW_ARCHIVE)
    env = clean_env(PYTHONPATH=REPO, CIFAR10_SOURCE=str(tmp_path / "no-such.tar.gz"), CIFAR10_MD5="0" * 32)
    p = stage("download", cwd=work, env=env, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert md5_of(work / paths.RAW_ARCHIVE) == md5
    assert sorted(f.name for f in (work / paths.RAW_ARCHIVE).parent.iterdir()) == [paths.RAW_ARCHIVE.name]


def test_download_backs_off_exponentially_up_to_a_minute(monkeypatch):
    """1, 2, 4, ... seconds between attempts, never more than 60 (BACKOFF_BASE 1)."""
    slept = []
    monkeypatch.setattr(dl, "BACKOFF_BASE", 1.0)
    monkeypatch.setattr(dl.time, "sleep", slept.append)

    def fail(url, dest, timeout):
        raise dl._Retryable("connection reset")

    monkeypatch.setattr(dl, "_attempt", fail)
    with pytest.raises(dl.PipelineError, match=r"after 9 attempt\(s\)"):
        dl.fetch_url("http://example.invalid/a.tar.gz", Path("unused"), retries=8, timeout=1)
    assert slept == [1, 2, 4, 8, 16, 32, 60, 60]


class _TwiceCutHandler(http.server.BaseHTTPRequestHandler):
    """Honours Range, but the first response stops at 60% of the file and the second
    (resumed there) after another 10%: 70% received is more than that second response's
    Content-Length, yet it is cut too and must be resumed again, not taken as complete."""

    body = b""
    requests: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.requests.append(self.headers.get("Range"))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.send_header("Content-Length", str(len(self.body) - start))
        self.end_headers()
        cut = {1: len(self.body) * 6 // 10, 2: len(self.body) * 7 // 10}.get(len(self.requests), len(self.body))
        part = self.body[start:cut]
        self.wfile.write(part)
        self.wfile.flush()
        self.close_connection = True


def test_a_resumed_download_that_is_cut_again_is_resumed_again(archive, tmp_path, monkeypatch):
    _TwiceCutHandler.body = archive[0].read_bytes()
    _TwiceCutHandler.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TwiceCutHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(dl, "BACKOFF_BASE", 0.01)
        monkeypatch.setenv("CIFAR10_SOURCE", f"http://127.0.0.1:{srv.server_address[1]}/cifar-10-python.tar.gz")
        monkeypatch.setenv("CIFAR10_MD5", archive[1])
        dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
        dl.download(P.validate(tiny_params()), dest)
    finally:
        srv.shutdown()
        srv.server_close()
    assert md5_of(dest) == archive[1]
    n = len(_TwiceCutHandler.body)
    assert _TwiceCutHandler.requests == [None, f"bytes={n * 6 // 10}-", f"bytes={n * 7 // 10}-"]


def test_a_range_the_server_cannot_satisfy_restarts_the_download(tmp_path, monkeypatch):
    """HTTP 416 on resuming (the partial file is not a prefix the server knows): the part
    already there goes, so the next attempt starts from byte 0, not from the same range."""
    import urllib.error

    dest = tmp_path / "part"
    dest.write_bytes(b"stale part")

    def refuse(req, timeout):
        raise urllib.error.HTTPError(req.full_url, 416, "Range Not Satisfiable", {}, None)

    monkeypatch.setattr(dl.urllib.request, "urlopen", refuse)
    with pytest.raises(dl._Retryable, match="HTTP 416"):
        dl._attempt("http://example.invalid/a.tar.gz", dest, timeout=1)
    assert not dest.exists()


def test_check_archive_wants_every_member_the_loader_reads(archive, tmp_path):
    for member in ("test_batch", "batches.meta"):
        missing = rewrite_archive(archive[0], tmp_path / f"no-{member}.tar.gz", drop=(member,))
        with pytest.raises(dl.PipelineError, match=f"missing cifar-10-batches-py/{member}. Run the stage again "
                                                   "to download it anew, or fetch it another way and set "
                                                   "CIFAR10_SOURCE="):
            dl.check_archive(missing, "https://mirror.example/c.tar.gz")


def test_cifar10_md5_that_is_no_md5_is_refused(monkeypatch):
    monkeypatch.setenv("CIFAR10_MD5", "abc123")
    with pytest.raises(dl.PipelineError, match="CIFAR10_MD5 must be 32 hex digits; got 'abc123'"):
        dl.resolve_source(P.validate(tiny_params()))


def test_download_checks_a_copy_against_data_md5_and_clears_stale_temporary_files(archive, tmp_path, monkeypatch):
    """Without CIFAR10_MD5 the md5 of params.yaml is the one checked (and matched); the
    temporary file of a killed earlier attempt is removed."""
    path, md5 = archive
    monkeypatch.delenv("CIFAR10_MD5", raising=False)
    monkeypatch.setenv("CIFAR10_SOURCE", str(path))
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    dest.parent.mkdir()
    (dest.parent / f".{dest.name}.x1y2.tmp").write_bytes(b"left by a killed download")
    dl.download(P.validate({**tiny_params(), "data": {**tiny_params()["data"], "md5": md5}}), dest)
    assert md5_of(dest) == md5
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_download_from_a_folder_says_it_is_not_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_SOURCE", str(tmp_path))
    monkeypatch.setenv("CIFAR10_MD5", "0" * 32)
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    with pytest.raises(dl.PipelineError, match="does not exist or is not a file"):
        dl.download(P.validate(tiny_params()), dest)
    assert not dest.parent.exists()


def test_normalize_checks_what_a_training_set_needs():
    import types

    import numpy as np

    from pipeline._util import PipelineError
    from pipeline.normalize import check_dataset

    ds = types.SimpleNamespace(classes=["a", "b", "a"], train_y=np.array([0, 0, 2]), test_y=np.array([], int))
    with pytest.raises(PipelineError, match="failed validation") as e:
        check_dataset(ds, "x.tar.gz")
    for problem in ("class names are not unique", "test split is empty", "no images of class(es) b"):
        assert problem in str(e.value)


def test_normalize_rejects_bad_labels_and_leaves_nothing(archive, tmp_path):
    """Not even the prepared pair of an earlier archive, which would pass for this one's."""
    bad = rewrite_archive(archive[0], tmp_path / "bad.tar.gz", labels={"test_batch": lambda ys: [12] + ys[1:]})
    work = tmp_path / "work"
    (work / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", work)
    shutil.copy(bad, work / paths.RAW_ARCHIVE)
    (work / paths.PREPARED).parent.mkdir(parents=True)
    (work / paths.PREPARED).write_bytes(b"an earlier archive's")
    (work / paths.STATS).write_text("{}")
    p = stage("normalize", cwd=work, env=clean_env(PYTHONPATH=REPO), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "DatasetError" in p.stderr and "test_batch" in p.stderr
    assert not any((work / "data" / "prepared").iterdir())


def test_normalize_takes_its_statistics_from_the_training_set(archive, tmp_path):
    from cnn.data import channel_stats, load_cifar10

    work = tmp_path / "work"
    (work / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", work)
    shutil.copy(archive[0], work / paths.RAW_ARCHIVE)
    stage("normalize", cwd=work, env=clean_env(PYTHONPATH=REPO))
    stats = json.loads((work / paths.STATS).read_text())
    ds = load_cifar10(archive[0])
    train_mean, train_std = channel_stats(ds.train_x)
    np.testing.assert_allclose(stats["mean"], train_mean, rtol=1e-6)
    np.testing.assert_allclose(stats["std"], train_std, rtol=1e-6)
    assert not np.allclose(stats["mean"], channel_stats(ds.test_x)[0], rtol=1e-6)


def test_normalize_check_counts_the_last_class_too():
    from pipeline._util import PipelineError
    from pipeline.normalize import check_dataset

    ds = types.SimpleNamespace(classes=["a", "b", "c"], train_y=np.array([0, 1, 1]), test_y=np.array([2]))
    with pytest.raises(PipelineError, match=r"no images of class\(es\) c"):
        check_dataset(ds, "x.tar.gz")


def test_normalize_stats_count_each_split_and_refuse_a_constant_channel(archive, tmp_path, monkeypatch):
    import cnn.data
    from pipeline._util import PipelineError
    from pipeline.normalize import normalize

    out, stats_path = tmp_path / "prepared" / "cifar10.npz", tmp_path / "prepared" / "stats.json"
    stats = normalize(archive[0], out, stats_path)
    assert json.loads(stats_path.read_text()) == stats
    assert stats["train"]["images"] == N_TRAIN and stats["test"]["images"] == N_TEST
    assert sum(stats["train"]["per_class"].values()) == N_TRAIN
    assert sum(stats["test"]["per_class"].values()) == N_TEST
    assert stats["prepared"]["bytes"] == out.stat().st_size

    ds = cnn.data.load_cifar10(archive[0])
    ds.train_x[:, 1] = 128  # the green channel of every training image: one value
    monkeypatch.setattr(cnn.data, "load_cifar10", lambda path: ds)
    with pytest.raises(PipelineError, match="a channel of the training images is constant"):
        normalize(archive[0], out, stats_path)
    assert not out.exists() and not stats_path.exists()


# ============================================================================ tracking (fast)
def test_main_repo_root_escapes_dvc_executor_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12" ))
    assert tracking.main_repo_root() == (tmp_path / "repo").resolve()
    monkeypatch.delenv("DVC_ROOT")
    (tmp_path / "repo" / ".dvc").mkdir(parents=True, exist_ok=True)
    (tmp_path / "repo" / "sub").mkdir()
    assert tracking.main_repo_root(tmp_path / "repo" / "sub") == (tmp_path / "repo").resolve()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "repo"
    assert tracking.resolve_tracking_uri(root) == f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")
    assert tracking.resolve_tracking_uri(root) == f"sqlite:///{root}/team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pw@host:5000")
    assert tracking.resolve_tracking_uri(root) == "http://user:pw@host:5000"
    assert tracking.display_uri("http://user:pw@host:5000") == "http://host:5000"


def test_git_dirty_counts_code_and_params_not_pipeline_outputs(tmp_path):
    env = clean_env()
    for f in ("train.py", "dvc.lock", "runs/a/metrics.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("0\n")
    run(["git", "init", "-q"], tmp_path, env)
    run(["git", "add", "-A"], tmp_path, env)
    run(["git", "commit", "-qm", "c"], tmp_path, env)
    (tmp_path / "dvc.lock").write_text("1\n")
    (tmp_path / "runs/a/metrics.json").write_text("1\n")
    assert tracking.git_info(tmp_path, outputs=paths.PIPELINE_OUTPUTS)["git_dirty"] == "false"
    assert tracking.git_info(tmp_path)["git_dirty"] == "true"
    (tmp_path / "train.py").write_text("1\n")
    assert tracking.git_info(tmp_path, outputs=paths.PIPELINE_OUTPUTS)["git_dirty"] == "true"


def test_tracker_degrades_to_noop_after_one_warning(monkeypatch, capsys):
    class Broken:
        calls = 0

        def log_batch(self, *a, **k):
            Broken.calls += 1
            raise ConnectionError("server went away")

    monkeypatch.setattr(tracking, "_warned", False)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    t = tracking.Tracker(Broken(), "run123", uri="http://127.0.0.1:1")
    for epoch in range(1, 4):
        t.log_metrics({"loss": 1.0}, step=epoch)
    t.log_artifact(__file__)
    t.finish()
    assert not t.enabled and Broken.calls == tracking.Tracker.ATTEMPTS
    assert len(mlflow_warnings(capsys.readouterr().err)) == 1
    assert t.info()["run_id"] == "run123" and "server went away" in t.info()["disabled_reason"]


def test_a_run_whose_logging_stopped_midway_is_closed_as_incomplete(monkeypatch, capsys):
    """A store locked for longer than the retries (0.5 + 1 + 2 + 4 s) once left its run
    RUNNING for good, half-logged: finish now makes one last try to close it."""
    class LockedThenBack:
        calls = []

        def log_batch(self, *a, **k):
            raise RuntimeError("(sqlite3.OperationalError) database is locked")

        def set_tag(self, *a):
            self.calls.append(("set_tag", a))

        def set_terminated(self, *a):
            self.calls.append(("set_terminated", a))

    waits = []
    monkeypatch.setattr(tracking, "_warned", False)
    monkeypatch.setattr(tracking.time, "sleep", waits.append)
    t = tracking.Tracker(LockedThenBack(), "run123", uri="sqlite:///mlflow.db")
    t.log_metrics({"loss": 1.0}, step=1)
    assert waits == [0.5, 1.0, 2.0, 4.0] and not t.enabled
    t.finish("FINISHED")
    assert LockedThenBack.calls == [
        ("set_tag", ("run123", "logging_stopped", "log_batch failed: RuntimeError: (sqlite3.OperationalError) "
                                                  "database is locked")),
        ("set_terminated", ("run123", "FAILED"))]
    assert len(mlflow_warnings(capsys.readouterr().err)) == 1
    LockedThenBack.calls.clear()  # a server that stopped answering is not called again
    on_a_server = tracking.Tracker(LockedThenBack(), "run456", uri="http://127.0.0.1:5000")
    on_a_server.log_metrics({"loss": 1.0}, step=1)
    on_a_server.finish("FINISHED")
    assert LockedThenBack.calls == []


class _RecordingClient:
    """Stands in for MlflowClient: records what the tracker sends."""

    def __init__(self, status="RUNNING", experiment=None):
        self.calls, self.status, self.experiment = [], status, experiment

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "get_run":
                return types.SimpleNamespace(info=types.SimpleNamespace(status=self.status))
            if name == "get_experiment_by_name":
                return self.experiment
            if name == "create_experiment":
                return "exp-new"
        return call


def test_tracker_logs_metrics_at_their_step_and_params_as_dvc_writes_them():
    client = _RecordingClient()
    t = tracking.Tracker(client, "run1", uri="sqlite:///x.db")
    t.log_metrics({"loss": 1.5, "test_acc": 0.0, "seconds": None}, step=3)
    t.log_metrics({"best_epoch": 2})
    t.log_params({"resume": False, "augment": True, "lr": 0.01})
    (_, (run_id,), kw1), (_, _, kw2), (_, _, kw3) = client.calls
    assert run_id == "run1"
    assert [(m.key, m.value, m.step) for m in kw1["metrics"]] == [("loss", 1.5, 3), ("test_acc", 0.0, 3)]
    assert [(m.key, m.step) for m in kw2["metrics"]] == [("best_epoch", 0)]
    assert {p.key: p.value for p in kw3["params"]} == {"resume": "false", "augment": "true", "lr": "0.01"}


def test_tracker_info_hides_the_password_of_the_tracking_uri():
    info = tracking.Tracker(None, None, uri="http://user:secret@host:5000", reason="off").info()
    assert info["tracking_uri"] == "http://host:5000"
    assert "secret" not in json.dumps(info)


def test_a_run_recorded_in_another_store_is_not_ended():
    client = _RecordingClient()
    t = tracking.Tracker(client, "new", uri="sqlite:///here.db")
    assert t.end_abandoned({"run_id": "old", "tracking_uri": "http://elsewhere:5000"}) is None
    assert client.calls == []
    assert t.end_abandoned({"run_id": "old", "tracking_uri": "sqlite:///here.db"}) == "old"
    assert ("set_terminated", ("old", "KILLED"), {}) in client.calls


def test_experiment_gets_an_absolute_artifact_location_and_a_deleted_one_is_restored(tmp_path):
    client = _RecordingClient()
    root = tmp_path / "repo"
    loc = tracking.default_artifact_location(f"sqlite:///{root}/mlflow.db", root, "exp")
    assert loc == (root / "mlartifacts" / "exp").resolve().as_uri()
    assert tracking.default_artifact_location("http://host:5000", root, "exp") is None
    assert tracking._get_or_create_experiment(client, "exp", loc) == "exp-new"
    assert client.calls[-1] == ("create_experiment", ("exp",), {"artifact_location": loc})
    deleted = types.SimpleNamespace(lifecycle_stage="deleted", experiment_id="7", artifact_location=loc)
    client = _RecordingClient(experiment=deleted)
    assert tracking._get_or_create_experiment(client, "exp", loc) == "7"
    assert ("restore_experiment", ("7",), {}) in client.calls


def test_start_run_creates_the_experiment_under_the_main_repository(tmp_path, monkeypatch):
    client = _RecordingClient()
    client.create_run = lambda exp_id, run_name, tags: types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))
    monkeypatch.setattr(tracking, "_client", lambda uri: client)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = tracking.start_run("exp", "train@x", root=tmp_path)
    assert t.enabled and t.uri == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    assert ("create_experiment", ("exp",),
            {"artifact_location": (tmp_path / "mlartifacts" / "exp").resolve().as_uri()}) in client.calls


def test_tracking_uris_relative_to_the_main_repository(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///:memory:")
    assert tracking.resolve_tracking_uri(root) == "sqlite:///:memory:"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    assert tracking.resolve_tracking_uri(root) == (root / "mlruns").as_posix()


def test_probe_counts_an_http_error_as_reachable_and_a_missing_sqlite_folder_as_not(tmp_path, monkeypatch):
    import urllib.error

    def not_found(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(tracking.urllib.request, "urlopen", not_found)
    assert tracking.probe("http://host:5000") is None
    assert "does not exist" in tracking.probe(f"sqlite:///{tmp_path}/no-such-dir/mlflow.db")
    assert tracking.probe(f"sqlite:///{tmp_path}/mlflow.db") is None


def test_evaluation_is_not_logged_to_another_or_a_missing_store(tmp_path, monkeypatch, capsys):
    """attach_run: a run recorded under another URI, or a SQLite store that is gone, gives a
    no-op tracker (and no new empty database)."""
    monkeypatch.setattr(tracking, "_warned", False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    t = tracking.attach_run({"run_id": "abc", "tracking_uri": "http://elsewhere:5000"}, root=tmp_path)
    assert not t.enabled and t.reason == "tracking URI changed"
    assert "was logged to http://elsewhere:5000" in capsys.readouterr().err
    t = tracking.attach_run({"run_id": "abc", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}, root=tmp_path)
    assert not t.enabled and "does not exist" in t.reason
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def finished_run(stage_dir, monkeypatch):
    """A copy of the committed outputs of simple_5ep_torch, as if trained without MLflow, in
    a project whose MLflow store is a SQLite file in stage_dir (not created yet)."""
    d = paths.run_dir("simple_5ep_torch")
    shutil.copytree(REPO / d, d, ignore=shutil.ignore_patterns("last.*"), dirs_exist_ok=True)
    uri = f"sqlite:///{stage_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (d / paths.MLFLOW_RUN).write_text(json.dumps({"run_id": None, "tracking_uri": uri, "disabled_reason": "x"}))
    return d, uri


def _log_run(*args) -> int:
    from pipeline import _util, log_run

    with pytest.raises(SystemExit) as e:
        _util.run_main(log_run.main, list(args))
    return e.value.code


def _spoil(d, what):
    if what == "history: a cell that is no number":
        (d / paths.HISTORY).write_text((d / paths.HISTORY).read_text().replace("\n1,", "\n1,x", 1))
    elif what == "history: a cell missing":
        (d / paths.HISTORY).write_text((d / paths.HISTORY).read_text().replace(",", ",,", 1))
    elif what == "history: a column missing":
        (d / paths.HISTORY).write_text("epoch,loss\n1,2.0\n")
    elif what == "history: no epoch":
        (d / paths.HISTORY).write_text("epoch,loss,train_acc,test_acc,lr,seconds\n")
    elif what == "checkpoint cut short":
        (d / paths.BEST_CHECKPOINT).write_bytes((d / paths.BEST_CHECKPOINT).read_bytes()[:1000])
    elif what == "evaluated, without its plot":
        (d / paths.CONFUSION_PNG).unlink()
    elif what == "metrics without the device":
        (d / paths.METRICS).write_text(json.dumps({"best_test_acc": 0.5}))
    elif what == "config not a mapping":
        (d / paths.CONFIG).write_text("[]")


@pytest.mark.parametrize("what, message", [
    ("history: a cell that is no number", "history.csv is not a training history"),
    ("history: a cell missing", "history.csv is not a training history"),
    ("history: a column missing", "history.csv is not what the pipeline writes"),
    ("history: no epoch", "history.csv is not what the pipeline writes"),
    ("checkpoint cut short", "best.npz cannot be read"),
    ("evaluated, without its plot", "confusion.png not found: reproduce the run's stages first "
                                    "(dvc repro evaluate@simple_5ep_torch)"),
    ("metrics without the device", "metrics.json is not what the pipeline writes (it has device, stopped_early)"),
    ("config not a mapping", "config.json is not what the pipeline writes"),
])
def test_log_run_refuses_outputs_it_cannot_log_before_asking_mlflow(what, message, finished_run, capsys):
    """A bad output is an error up front, not a half-logged run; the next run named is still tried."""
    d, uri = finished_run
    _spoil(d, what)
    before = (d / paths.MLFLOW_RUN).read_bytes()
    assert _log_run("simple_5ep_torch", "simple_5ep_numpy") == 1
    err = capsys.readouterr().err
    assert f"error: simple_5ep_torch: {d}/" in err and message in err, err
    assert "error: simple_5ep_numpy: " in err  # tried too (it has no outputs here)
    assert "error: not logged: simple_5ep_torch, simple_5ep_numpy" in err
    assert not Path(uri[len("sqlite:///"):]).exists() and (d / paths.MLFLOW_RUN).read_bytes() == before


def test_log_run_to_a_server_that_cannot_be_reached_fails_at_once(finished_run, monkeypatch, capsys):
    d, _ = finished_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    before = (d / paths.MLFLOW_RUN).read_bytes()
    t0 = time.perf_counter()
    assert _log_run("simple_5ep_torch") == 1
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "cannot be used (cannot reach http://127.0.0.1:" in err and "nothing logged" in err
    assert "continuing without MLflow" not in err  # the stages' warning would contradict the error
    assert (d / paths.MLFLOW_RUN).read_bytes() == before


def test_log_run_of_a_run_not_evaluated_says_how_to_record_it(finished_run, capsys):
    from mlflow.tracking import MlflowClient

    d, uri = finished_run
    for name in paths.evaluate_outputs("simple_5ep_torch"):
        Path(name).unlink()
    assert _log_run("simple_5ep_torch") == 0
    assert ("record that with `dvc commit -f train@simple_5ep_torch`, then `dvc repro evaluate@simple_5ep_torch` "
            "(which adds the evaluation to the MLflow run)") in capsys.readouterr().err
    run = MlflowClient(uri).get_run(json.loads((d / paths.MLFLOW_RUN).read_text())["run_id"])
    assert "test_acc" in run.data.metrics and not any(k.startswith("eval_") for k in run.data.metrics)
    assert not {"git_commit", "git_dirty", "mlflow.source.git.commit"} & set(run.data.tags)  # not known


def test_log_run_logs_a_run_deleted_from_the_store_again(finished_run, capsys):
    from mlflow.tracking import MlflowClient

    d, uri = finished_run
    assert _log_run("simple_5ep_torch") == 0
    first = json.loads((d / paths.MLFLOW_RUN).read_text())["run_id"]
    assert _log_run("simple_5ep_torch") == 1
    assert f"error: simple_5ep_torch: it is already MLflow run {first} in {uri}" in capsys.readouterr().err
    MlflowClient(uri).delete_run(first)  # in MLflow's trash: no longer in the UI
    assert _log_run("simple_5ep_torch") == 0
    assert json.loads((d / paths.MLFLOW_RUN).read_text())["run_id"] not in (first, None)


def test_a_new_sqlite_store_is_created_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow migrates a new database in many steps: one interrupted halfway would fail every
    later run ("table ... already exists"). So it is made beside the store, then moved there."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    real_replace = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracking.start_run("cifar10-cnn", "train@r", root=tmp_path)
    assert not db.exists()
    monkeypatch.setattr(tracking.os, "replace", real_replace)
    tracker = tracking.start_run("cifar10-cnn", "train@r", root=tmp_path)
    assert tracker.enabled
    tracker.finish()
    assert MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id).info.status == "FINISHED"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mlflow.db")] == []


def test_dvc_stage_and_experiment_names_name_the_mlflow_run(monkeypatch):
    for var in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    assert tracking.run_name_for(tracking.dvc_context("train@a")) == "train@a"
    monkeypatch.setenv("DVC_STAGE", "train@b")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lark")
    ctx = tracking.dvc_context("train@a")
    assert ctx == {"dvc_stage": "train@b", "dvc_exp_name": "bushy-lark"}
    assert tracking.run_name_for(ctx) == "bushy-lark:train@b"


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """The working directory of a train stage whose fit is to be stood in for: the
    project's params.yaml and its runs' settings.json, a stand-in prepared file (its
    statistics only), MLflow off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # no-op tracker
    monkeypatch.setattr(tracking, "_warned", False)
    shutil.copy(REPO / "params.yaml", tmp_path)
    for run in P.load().runs:
        P.main(["--run", run, "--out", str(paths.settings_output(run))])
    paths.PREPARED.parent.mkdir(parents=True)
    np.savez(paths.PREPARED, mean=np.full(3, 0.5), std=np.full(3, 0.25))  # what resuming reads
    return tmp_path


def test_training_error_is_reported_and_outputs_removed(stage_dir, monkeypatch, capsys):
    import cnn.train
    from pipeline import _util, train

    def diverging_fit(config, on_epoch_end=None):
        on_epoch_end({"epoch": 1, "loss": 2.3, "train_acc": 0.1, "test_acc": 0.1, "lr": 0.01, "seconds": 1.0,
                      "device": "numpy (cpu)"})
        raise cnn.train.TrainingError("the training loss became nan in epoch 2: the run diverged")

    monkeypatch.setattr(cnn.train, "fit", diverging_fit)
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: TrainingError: the training loss became nan" in err and "Traceback" not in err
    assert not any((stage_dir / out).exists() for out in paths.train_outputs("simple_5ep_torch"))


def test_interrupted_run_keeps_what_resume_needs(stage_dir, monkeypatch, capsys):
    import cnn.train
    from pipeline import _util, train

    d = paths.run_dir("simple_5ep_torch")

    def interrupted_fit(config, on_epoch_end=None):
        (d / paths.BEST_CHECKPOINT).write_bytes(b"best")
        (d / paths.LAST_CHECKPOINT).write_bytes(b"last")
        on_epoch_end({"epoch": 1, "loss": 2.3, "train_acc": 0.1, "test_acc": 0.1, "lr": 0.01, "seconds": 1.0,
                      "device": "numpy (cpu)"})
        raise KeyboardInterrupt

    monkeypatch.setattr(cnn.train, "fit", interrupted_fit)
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    err = capsys.readouterr().err
    assert e.value.code == 130 and (f"train@simple_5ep_torch: interrupted; with `resume: true` in params.yaml, "
                                    f"dvc repro continues from {d / paths.LAST_CHECKPOINT}") in err
    assert (d / paths.BEST_CHECKPOINT).read_bytes() == b"best"
    assert (d / paths.LAST_CHECKPOINT).read_bytes() == b"last"
    assert (d / paths.ENGINE_STAMP).read_text().strip() == train.engine_fingerprint()
    assert not any(p.exists() for p in paths.train_outputs("simple_5ep_torch") if p.name != paths.BEST_CHECKPOINT)


@pytest.mark.parametrize("resume, message", [
    ("false", "interrupted; no epoch had finished, so there is nothing to resume"),
    # as in the copies that `dvc exp run --temp` and `--queue` train in: no last.npz
    ("true", "resume: true, but there is no runs/simple_5ep_torch/last.npz (with its best.npz) to continue here"),
])
def test_a_stage_without_an_epoch_to_resume_says_so(resume, message, stage_dir, monkeypatch, capsys):
    import cnn.train
    from pipeline import _util, train

    text = (stage_dir / "params.yaml").read_text()
    (stage_dir / "params.yaml").write_text(text.replace("resume: false", f"resume: {resume}", 1))

    def interrupted_fit(config, on_epoch_end=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnn.train, "fit", interrupted_fit)
    with pytest.raises(SystemExit):
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert f"train@simple_5ep_torch: {message}" in capsys.readouterr().err


def test_the_stage_names_one_epoch_in_the_singular(stage_dir, monkeypatch, capsys):
    import cnn.train
    from pipeline import _util, train

    text = (stage_dir / "params.yaml").read_text()
    old = "  simple_5ep_torch:\n    model: simple\n    epochs: 5\n"
    assert old in text
    (stage_dir / "params.yaml").write_text(text.replace(old, old.replace("epochs: 5", "epochs: 1")))
    P.main(["--run", "simple_5ep_torch", "--out", str(paths.settings_output("simple_5ep_torch"))])

    def interrupted_fit(config, on_epoch_end=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnn.train, "fit", interrupted_fit)
    with pytest.raises(SystemExit):
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert "train@simple_5ep_torch: SimpleCNN, 1 epoch, backend torch\n" in capsys.readouterr().err


def test_resume_with_a_last_checkpoint_but_no_best_one_says_it_trains_from_the_start(
        stage_dir, monkeypatch, capsys):
    """Resuming needs the pair: last.npz alone (its best.npz lost) is not enough either."""
    import cnn.train
    from pipeline import _util, train

    text = (stage_dir / "params.yaml").read_text()
    (stage_dir / "params.yaml").write_text(text.replace("resume: false", "resume: true", 1))
    (paths.run_dir("simple_5ep_torch") / paths.LAST_CHECKPOINT).write_bytes(b"last")

    def interrupted_fit(config, on_epoch_end=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnn.train, "fit", interrupted_fit)
    with pytest.raises(SystemExit):
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert ("train@simple_5ep_torch: resume: true, but runs/simple_5ep_torch/best.npz, written with "
            "runs/simple_5ep_torch/last.npz, is missing: training from epoch 1") in capsys.readouterr().err


def test_a_stage_signal_asks_training_to_stop_also_at_its_next_batch(monkeypatch):
    """run_main's SIGTERM and SIGINT handlers go through cnn.train.request_stop, so a stop
    whose exception is lost in a __del__ (MLflow's SQLAlchemy) still ends the training."""
    import cnn.train
    from pipeline import _util

    installed = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.__setitem__(signum, handler))
    monkeypatch.setattr(cnn.train, "_pending_stop", [])
    with pytest.raises(SystemExit):
        _util.run_main(lambda argv: 0, [])
    with pytest.raises(SystemExit) as term:
        installed[signal.SIGTERM](signal.SIGTERM, None)
    assert term.value.code == 128 + signal.SIGTERM and cnn.train._pending_stop == [term.value]
    with pytest.raises(KeyboardInterrupt) as interrupt:
        installed[signal.SIGINT](signal.SIGINT, None)
    assert cnn.train._pending_stop == [interrupt.value]


def _one_epoch_fit(run_dir, before=lambda: None):
    """Stands in for cnn.train.fit: ``before()``, then one finished epoch on the CPU whose
    best.npz is in ``run_dir``."""
    def fit(config, on_epoch_end=None):
        before()
        (run_dir / paths.BEST_CHECKPOINT).write_bytes(b"best")
        epoch = {"epoch": 1, "loss": 2.3, "train_acc": 0.1, "test_acc": 0.1, "lr": 0.01, "seconds": 1.0}
        on_epoch_end({**epoch, "device": "numpy (cpu)"})
        return types.SimpleNamespace(history=[epoch], best_checkpoint=str(run_dir / paths.BEST_CHECKPOINT),
                                     best_test_acc=0.1, best_epoch=1, stopped_early=False, device="numpy (cpu)")
    return fit


def test_a_failure_after_training_keeps_what_resume_needs(stage_dir, monkeypatch):
    """Writing the metrics or the plot can fail (a full disk) once all epochs are trained:
    the resume pair stays, so `resume: true` continues instead of training all over."""
    import cnn.train
    from pipeline import _util, train

    d = paths.run_dir("simple_5ep_torch")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cnn.train, "fit", _one_epoch_fit(d, lambda: (d / paths.LAST_CHECKPOINT).write_bytes(b"last")))
    monkeypatch.setattr(train, "summarize", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert (d / paths.BEST_CHECKPOINT).read_bytes() == b"best"
    assert (d / paths.LAST_CHECKPOINT).read_bytes() == b"last"


def test_a_model_without_a_title_trains_under_its_name(stage_dir, monkeypatch):
    """The README: a new model's table comes "under its title in MODEL_TITLES or its name";
    the train stage once failed on the missing title, after removing the run's outputs."""
    import cnn.train
    from pipeline import _util, train

    d = paths.run_dir("simple_5ep_torch")
    monkeypatch.setattr(cnn.train, "fit", _one_epoch_fit(d))
    monkeypatch.setattr(train, "MODEL_TITLES", {})
    with pytest.raises(SystemExit) as done:
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert done.value.code == 0
    assert json.loads((d / paths.CONFIG).read_text())["model_name"] == "simple"


@pytest.mark.parametrize("error, raised, status", [(OSError(28, "No space left on device"), OSError, "FAILED"),
                                                   (KeyboardInterrupt(), SystemExit, "KILLED")])
def test_a_run_stopped_after_training_is_closed_as_the_cause_says(stage_dir, monkeypatch, error, raised, status):
    """Ctrl-C while the outputs are written is an interruption, not a failure."""
    import cnn.train
    from pipeline import _util, train

    closed = []

    def stopped(*args):
        raise error

    real_start_run = tracking.start_run

    def start_run(*args, **kwargs):
        tracker = real_start_run(*args, **kwargs)
        tracker.finish = closed.append
        return tracker

    monkeypatch.setattr(cnn.train, "fit", _one_epoch_fit(paths.run_dir("simple_5ep_torch")))
    monkeypatch.setattr(train, "summarize", stopped)
    monkeypatch.setattr(tracking, "start_run", start_run)
    with pytest.raises(raised):
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert closed == [status]


@pytest.mark.parametrize("ending, status, code", [("diverges", "FAILED", 1), ("interrupted", "KILLED", 130),
                                                  ("terminated", "KILLED", 128 + signal.SIGTERM)])
def test_an_mlflow_run_that_fails_or_is_interrupted_says_which(ending, status, code, stage_dir, monkeypatch):
    import cnn.train
    from mlflow.tracking import MlflowClient

    from pipeline import _util, train

    uri = f"sqlite:///{stage_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def ending_fit(config, on_epoch_end=None):
        if ending == "interrupted":
            raise KeyboardInterrupt
        if ending == "terminated":  # SIGTERM, as pipeline._util's handler raises it
            raise SystemExit(128 + signal.SIGTERM)
        raise cnn.train.TrainingError("the training loss became nan in epoch 1: the run diverged")

    monkeypatch.setattr(cnn.train, "fit", ending_fit)
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert e.value.code == code
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifar10-cnn").experiment_id])
    assert run.info.status == status


def test_a_recorded_mlflow_run_that_already_ended_is_left_as_it_is(stage_dir, monkeypatch, capsys):
    """Only a run still RUNNING was abandoned: one that ended (FAILED, say) keeps its status."""
    import cnn.train
    from mlflow.tracking import MlflowClient

    from pipeline import _util, train

    uri = f"sqlite:///{stage_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    d = paths.run_dir("simple_5ep_torch")
    ended = tracking.start_run("cifar10-cnn", "train@simple_5ep_torch", root=stage_dir)
    ended.finish("FAILED")
    d.mkdir(parents=True, exist_ok=True)
    (d / paths.LIVE_MLFLOW_RUN).write_text(json.dumps(ended.info()))

    def interrupted_fit(config, on_epoch_end=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnn.train, "fit", interrupted_fit)
    with pytest.raises(SystemExit):
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert "marked KILLED" not in capsys.readouterr().err
    run = MlflowClient(uri).get_run(ended.run_id)
    assert run.info.status == "FAILED" and not any(k.startswith("ended_by") for k in run.data.tags)


def test_an_mlflow_run_left_running_by_a_dead_process_is_marked_killed(stage_dir, monkeypatch, capsys):
    """kill -9 leaves the training's MLflow run RUNNING; the stage's next start closes it.
    The new run also says who ran it, from where, and on which images (mean/std)."""
    import cnn.train
    from mlflow.tracking import MlflowClient

    from pipeline import _util, train

    uri = f"sqlite:///{stage_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    d = paths.run_dir("simple_5ep_torch")
    dead = tracking.start_run("cifar10-cnn", "train@simple_5ep_torch", root=stage_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / paths.LIVE_MLFLOW_RUN).write_text(json.dumps(dead.info()))
    seen_live = []
    monkeypatch.setattr(cnn.train, "fit", _one_epoch_fit(
        d, lambda: seen_live.append(json.loads((d / paths.LIVE_MLFLOW_RUN).read_text())["run_id"])))
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert e.value.code == 0
    assert f"MLflow run {dead.run_id}, left RUNNING by a training process that died, is now marked KILLED" \
        in capsys.readouterr().err
    client = MlflowClient(uri)
    assert client.get_run(dead.run_id).info.status == "KILLED"
    new = client.get_run(json.loads((d / paths.MLFLOW_RUN).read_text())["run_id"])
    assert seen_live == [new.info.run_id] and not (d / paths.LIVE_MLFLOW_RUN).exists()
    assert new.info.status == "FINISHED" and new.data.tags["mlflow.source.name"] == "pipeline/train.py"
    assert new.data.tags["mlflow.user"] and new.data.params["data_mean"] == "0.5000, 0.5000, 0.5000"


@pytest.mark.parametrize("settings", ["missing", "stale"])
def test_train_refuses_settings_that_are_not_the_resolved_ones(stage_dir, capsys, settings):
    """DVC records settings.json as what train@<run> used: params.yaml edited and the train
    stage run alone must not train on other settings than those."""
    from pipeline import _util, train

    path = paths.settings_output("simple_5ep_torch")
    if settings == "missing":
        path.unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "epochs": 6}))
    committed = {paths.run_dir("simple_5ep_torch") / name: f"committed {name}".encode()
                 for name in (paths.METRICS, paths.HISTORY, paths.BEST_CHECKPOINT)}
    for f, content in committed.items():
        f.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert all(f.read_bytes() == content for f, content in committed.items())  # results kept
    state = "is missing" if settings == "missing" else "is not what params.yaml resolves to"
    assert e.value.code == 1 and f"settings.json {state}: resolve the run's settings first, with " \
        "`dvc repro settings@simple_5ep_torch` (-f if DVC finds it up to date)" in capsys.readouterr().err
    assert not paths.run_dir("simple_5ep_torch").joinpath(paths.ENGINE_STAMP).exists()  # nothing done


def test_a_live_run_record_of_a_running_training_stops_a_second_one(stage_dir, monkeypatch, capsys):
    """A record whose process still runs here means the run is training: a second training
    would write into the same folder, so it stops before touching anything. Without MLflow
    the record of a dead run stays, for when the store is back."""
    import socket

    import cnn.train
    from pipeline import _util, train

    here, alive = socket.gethostname(), os.getppid()  # pytest's parent: alive, and not this process
    assert train._still_running({"pid": alive, "host": here}) == alive
    for dead in ({"pid": alive, "host": "another-machine"}, {"pid": os.getpid(), "host": here},
                 {"pid": 0, "host": here}, ["not", "a", "record"]):
        assert train._still_running(dead) is None, dead
    assert tracking.Tracker(None, None).end_abandoned({"run_id": "r"}) is None
    d = paths.run_dir("simple_5ep_torch")
    live = d / paths.LIVE_MLFLOW_RUN
    live.write_text(json.dumps({"run_id": "r", "pid": alive, "host": here}))
    (d / paths.HISTORY).write_text("the last run's")
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    assert e.value.code == 1 and f"train@simple_5ep_torch is already running here (pid {alive}" \
        in capsys.readouterr().err
    assert (d / paths.HISTORY).read_text() == "the last run's"

    live.write_text('{"run_id": "r"}')

    def interrupted(config, on_epoch_end=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnn.train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train("simple_5ep_torch", P.load())
    assert live.read_text() == '{"run_id": "r"}'


def test_resume_without_an_engine_stamp_says_so(tmp_path, capsys):
    from pipeline import train

    (tmp_path / paths.LAST_CHECKPOINT).write_bytes(b"last")
    assert train.resumable_meta(tmp_path / paths.LAST_CHECKPOINT, {}, None) is None
    assert f"no {paths.ENGINE_STAMP} beside it" in capsys.readouterr().err


def test_evaluate_without_its_inputs_keeps_the_last_evaluation(stage_dir, capsys):
    """Run directly (as the README's stage table allows), evaluate checks its inputs before
    it deletes the outputs of the last evaluation."""
    from pipeline import _util, evaluate

    run = "simple_5ep_torch"
    paths.PREPARED.unlink()
    d = paths.run_dir(run)
    d.mkdir(parents=True, exist_ok=True)
    (d / paths.BEST_CHECKPOINT).write_bytes(b"")
    for name in (paths.CONFIG, paths.MLFLOW_RUN):
        (d / name).write_text("{}")
    for out in paths.evaluate_outputs(run):
        out.write_text("the last evaluation")
    with pytest.raises(SystemExit) as e:
        _util.run_main(evaluate.main, [run])
    assert e.value.code == 1 and "cifar10.npz not found" in capsys.readouterr().err
    assert all(out.read_text() == "the last evaluation" for out in paths.evaluate_outputs(run))


def test_report_lists_runs_not_trained_yet(tmp_path, monkeypatch):
    """Part of the table can be regenerated at a time: runs without outputs are listed, not fatal."""
    from pipeline import report, train

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path)
    params = P.load(paths.PARAMS)
    done = "simple_5ep_numpy"
    d = paths.run_dir(done)
    d.mkdir(parents=True, exist_ok=True)
    cfg = params.run(done)
    history = [{"epoch": 1, "loss": 1.5, "train_acc": 0.45, "test_acc": 0.5779, "lr": 0.01, "seconds": 70.0}]
    (d / paths.HISTORY).write_text(train.history_csv(history))
    (d / paths.CONFIG).write_text(json.dumps(cfg))
    (d / paths.METRICS).write_text(json.dumps({"best_test_acc": 0.5779, "best_epoch": 1, "final_train_acc": 0.45,
                                               "final_test_acc": 0.5612, "epochs_run": 1, "seconds_per_epoch": 70.0, "device": "numpy (cpu)"}))
    (d / paths.EVAL_METRICS).write_text(json.dumps({"test_acc": 0.5779, "per_class_acc": {"cat": 0.5}}))
    (d / paths.MLFLOW_RUN).write_text(json.dumps({"run_id": None}))
    (d / paths.CONFUSION_PNG).write_bytes(b"stand-in")  # the report only copies it

    trained_only = paths.run_dir("simple_5ep_torch")  # trained, not evaluated yet
    trained_only.mkdir(parents=True)
    for name in (paths.METRICS, paths.CONFIG):
        shutil.copy(d / name, trained_only / name)
    report.report(params)
    md = paths.RESULTS_MD.read_text()
    assert "`simple_5ep_numpy`" in md and "57.79%" in md
    assert "| Final test accuracy |" in md and "| 56.12% |" in md
    pending = md.split("## Not run yet", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{run}`" in pending for run in params.runs if run != done)
    assert "`simple_5ep_numpy`" not in pending
    assert (paths.REPORT_CONFUSION_DIR / f"{done}.png").read_bytes() == b"stand-in"  # the run's own figure


def test_a_run_resumed_on_another_device_reports_each_part():
    """A GPU run finished on the CPU: one device and one mean s/epoch would misdescribe it."""
    from types import SimpleNamespace

    from pipeline import report, train

    history = [{"epoch": e, "loss": 1.0, "train_acc": 0.5, "test_acc": 0.5, "lr": 0.01, "seconds": s}
               for e, s in [(1, 14.0), (2, 16.0), (3, 300.0)]]
    result = SimpleNamespace(best_test_acc=0.5, best_epoch=1, stopped_early=False, device="torch (cpu)")
    gpu, cpu = "torch cuda:0 (NVIDIA H200)", "torch (cpu)"
    m = train.summarize(result, history, [gpu, gpu, cpu])
    assert m["device"] == f"{gpu} (epochs 1-2) + {cpu} (epochs 3-3)"
    assert m["devices"] == [{"device": gpu, "epochs": [1, 2], "seconds_per_epoch": 15.0},
                            {"device": cpu, "epochs": [3, 3], "seconds_per_epoch": 300.0}]
    assert report._seconds_per_epoch(m) == "15.0 / 300.0"
    one = train.summarize(result, history, [cpu] * 3)  # one device: the usual two fields
    assert one["device"] == cpu and "devices" not in one and report._seconds_per_epoch(one) == "110.0"
    # resumed on the CPU with no epoch left to train: its epochs ran on the GPU, not here
    done = train.summarize(result, history, [gpu] * 3)
    assert done["device"] == gpu and "devices" not in done


def test_metrics_give_the_final_epoch_beside_the_best():
    from types import SimpleNamespace

    from pipeline import train

    history = [{"epoch": e, "loss": 1.0, "train_acc": t, "test_acc": a, "lr": 0.01, "seconds": 1.0}
               for e, t, a in [(1, 0.5, 0.6), (2, 0.7, 0.4)]]
    result = SimpleNamespace(best_test_acc=0.6, best_epoch=1, stopped_early=False, device="numpy (cpu)")
    m = train.summarize(result, history, ["numpy (cpu)"] * 2)
    assert (m["best_test_acc"], m["best_epoch"], m["final_test_acc"], m["final_train_acc"]) == (0.6, 1, 0.4, 0.7)


def test_an_epoch_missing_from_the_device_log_ran_where_last_npz_was_written(tmp_path):
    """A kill between writing last.npz and the device log leaves the log one epoch short."""
    from pipeline import train

    (tmp_path / paths.EPOCH_DEVICES).write_text(json.dumps(["gpu", "gpu"]))
    assert train.earlier_devices(tmp_path, {"history": [{}] * 3, "device": "cpu"}) == ["gpu", "gpu", "cpu"]
    assert train.earlier_devices(tmp_path, {"history": [{}], "device": "cpu"}) == ["cpu"]  # a log of another run


def test_confusion_rows_are_actual_classes_and_per_class_accuracy_is_their_recall():
    from pipeline import evaluate

    cm = evaluate.confusion([0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], 2)
    assert cm.tolist() == [[3, 1], [0, 2]]
    result = evaluate.scores(cm, ["a", "b"])
    assert result["per_class_acc"] == {"a": 0.75, "b": 1.0} and result["test_acc"] == pytest.approx(5 / 6)


def test_the_report_puts_each_figure_in_its_column():
    from pipeline import report

    cfg = {"model": "simple", "epochs": 10, "augment": False, "schedule": "none", "backend": "numpy",
           "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 64, "seed": 0,
           "early_stop": 2}
    metrics = {"best_test_acc": 0.61, "best_epoch": 2, "final_test_acc": 0.55, "final_train_acc": 0.72,
               "seconds_per_epoch": 3.0, "epochs_run": 4, "stopped_early": True, "device": "numpy (cpu)"}
    data = {"r": {"config": cfg, "metrics": metrics, "eval": {"test_acc": 0.61, "per_class_acc": {}},
                  "mlflow": {"run_id": None}}}
    stats = {"train": {"images": 300}, "test": {"images": 100}, "classes": ["a"] * 10,
             "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    md = report.render(data, stats)
    assert "Dataset: 300 training and 100 test images" in md
    assert "| `r` | 4 / 10 (early stop) | no | none | numpy | numpy (cpu) | **61.00%** (epoch 2) | 55.00% | 72.00% | 3.0 |" in md


def test_a_run_moved_twice_names_the_device_of_every_epoch(stage_dir, monkeypatch, capsys):
    """GPU (epochs 1-2), interrupted; resumed on the CPU (3), interrupted; finished on the
    GPU (4-5): each epoch keeps the device it ran on, not the one that wrote last.npz."""
    from dataclasses import asdict

    import cnn.train
    from cnn.checkpoint import read_meta, save_checkpoint
    from pipeline import _util, train

    name, d = "simple_5ep_torch", paths.run_dir("simple_5ep_torch")
    params = yaml.safe_load(paths.PARAMS.read_text())
    params["resume"] = True
    paths.PARAMS.write_text(yaml.safe_dump(params, sort_keys=False))
    gpu, cpu = "torch cuda:0 (NVIDIA H200)", "torch (cpu)"

    def fit_on(device, epochs):
        def fake_fit(config, on_epoch_end=None):
            out = Path(config.out)
            history = read_meta(out / "last.npz")["history"] if config.resume else []
            for e in range(len(history), min(len(history) + epochs, config.epochs)):
                m = {"epoch": e + 1, "loss": 1.0, "train_acc": 0.5, "test_acc": 0.5, "lr": 0.01, "seconds": 1.0}
                history.append(m)
                meta = {"model": config.model, "config": asdict(config), "device": device,
                        "history": history, "epoch": e + 1}
                if e == 0:  # the best epoch: the resumed parts must keep its checkpoint
                    save_checkpoint(out / "best.npz", {}, meta)
                save_checkpoint(out / "last.npz", {}, meta)
                on_epoch_end({**m, "device": device})
            if len(history) < config.epochs:
                raise KeyboardInterrupt
            return cnn.train.TrainResult(history, 0.5, 1, out / "best.npz", out / "last.npz", False, device)
        return fake_fit

    for device, epochs in [(gpu, 2), (cpu, 1), (gpu, 2)]:
        monkeypatch.setattr(cnn.train, "fit", fit_on(device, epochs))
        with pytest.raises(SystemExit):
            _util.run_main(train.main, [name])
    metrics = json.loads((d / paths.METRICS).read_text())
    assert metrics["device"] == f"{gpu} (epochs 1-2) + {cpu} (epochs 3-3) + {gpu} (epochs 4-5)"
    assert json.loads((d / paths.EPOCH_DEVICES).read_text()) == [gpu, gpu, cpu, gpu, gpu]
    assert read_meta(d / paths.BEST_CHECKPOINT)["epoch"] == 1
    assert json.loads((d / paths.CONFIG).read_text())["device_used"] == metrics["device"]


def test_report_without_any_finished_run_is_a_clear_error(tmp_path, monkeypatch):
    from pipeline import report
    from pipeline._util import PipelineError

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path)
    paths.RESULTS_MD.parent.mkdir(parents=True)
    paths.RESULTS_MD.write_text("an earlier report, of runs whose outputs are gone")
    with pytest.raises(PipelineError, match="no run has been trained"):
        report.report(P.load(paths.PARAMS))
    assert not paths.RESULTS_MD.exists()


def test_engine_errors_are_one_line_messages(stage_dir, monkeypatch, capsys):
    """A device this machine lacks (params.yaml cannot know) is the user's to fix: one
    line, no traceback."""
    import cnn.backend
    import cnn.train
    from pipeline import _util, train

    def no_gpu(backend, device="auto"):
        raise cnn.backend.DeviceError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here: "
                                      "choose device auto or cpu")

    monkeypatch.setattr(cnn.train, "get_backend", no_gpu)
    with pytest.raises(SystemExit) as e:
        _util.run_main(train.main, ["simple_5ep_torch"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert "error: DeviceError: device 'cuda' was asked for" in err


def test_params_check_command_reports_bad_files_in_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    params = tiny_params()
    params["defaults"]["lr"] = -1
    bad.write_text(yaml.safe_dump(params))
    p = run([sys.executable, "-m", "pipeline.params", "--params", str(bad)], cwd=REPO,
            env=clean_env(), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'lr' must be a positive number; got -1" in p.stderr


def test_download_from_an_unsupported_url_scheme_fails_at_once(tmp_path, monkeypatch, archive):
    monkeypatch.setattr(dl, "BACKOFF_BASE", 60.0)  # a retry would hang the test
    monkeypatch.setenv("CIFAR10_SOURCE", "s3://bucket/cifar-10-python.tar.gz")
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    with pytest.raises(dl.PipelineError, match="s3 URL scheme. Use an http"):
        dl.download(P.validate(tiny_params()), dest)
    assert not dest.parent.exists()


def test_evaluate_scores_the_best_checkpoint_and_writes_rows_as_true_classes(archive, tmp_path, monkeypatch):
    """best.npz (every image -> class 3) and last.npz (-> class 0) differ: the evaluation is the
    best one's. Its predictions.csv, confusion.json and MLflow metrics say which is which."""
    from cnn.checkpoint import save_checkpoint
    from cnn.data import load_cifar10, save_prepared
    from cnn.models import build_model
    from pipeline import evaluate

    monkeypatch.chdir(tmp_path)
    ds = load_cifar10(archive[0])
    save_prepared(paths.PREPARED, ds, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    run, d = "r", paths.run_dir("r")
    for name, cls in ((paths.BEST_CHECKPOINT, 3), (paths.LAST_CHECKPOINT, 0)):
        state = build_model("simple").state_dict()
        state["16.weight"] = np.zeros_like(state["16.weight"])
        state["16.bias"] = np.eye(10, dtype=np.float32)[cls]
        save_checkpoint(d / name, state, {"model": "simple"})
    (d / paths.CONFIG).write_text(json.dumps({"backend": "torch", "device": "cpu"}))
    (d / paths.MLFLOW_RUN).write_text(json.dumps({"run_id": "r1"}))
    client = _RecordingClient()
    monkeypatch.setattr(tracking, "attach_run", lambda info: tracking.Tracker(client, info["run_id"]))

    result = evaluate.evaluate(run)
    counts = np.bincount(ds.test_y, minlength=10)
    assert result["test_acc"] == pytest.approx(counts[3] / N_TEST)
    assert result["per_class_acc"] == {c: float(i == 3) for i, c in enumerate(ds.classes)}
    assert json.loads((d / paths.EVAL_METRICS).read_text())["test_acc"] == result["test_acc"]
    with open(d / paths.PREDICTIONS) as f:
        assert [(r["actual"], r["predicted"]) for r in csv.DictReader(f)] == \
            [(ds.classes[y], ds.classes[3]) for y in ds.test_y]
    matrix = np.array(json.loads((d / paths.CONFUSION).read_text())["matrix"])
    assert matrix[:, 3].tolist() == counts.tolist() and matrix.sum() == N_TEST  # rows: true classes
    metrics = {m.key: m.value for name, _, kw in client.calls if name == "log_batch" for m in kw["metrics"]}
    assert metrics == {"eval_test_acc": result["test_acc"],
                       **{f"eval_acc_{c}": float(i == 3) for i, c in enumerate(ds.classes)}}
    artifacts = [args for name, args, _ in client.calls if name == "log_artifact"]
    assert sorted(Path(path).name for _, path, _ in artifacts) == sorted(
        [paths.CONFUSION_PNG, paths.CONFUSION, paths.EVAL_METRICS])
    assert {folder for _, _, folder in artifacts} == {"evaluation"}


def test_the_test_set_is_normalised_with_the_prepared_statistics(archive, tmp_path):
    from cnn.data import load_cifar10, normalize, save_prepared
    from pipeline import evaluate

    ds = load_cifar10(archive[0])
    path = tmp_path / "cifar10.npz"
    save_prepared(path, ds, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    x, y, classes = evaluate.load_test_set(path)
    np.testing.assert_array_equal(x, normalize(ds.test_x, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]))
    assert y.tolist() == ds.test_y.tolist() and classes == ds.classes


def test_a_prediction_past_the_last_class_is_an_error():
    from pipeline import evaluate
    from pipeline._util import PipelineError

    with pytest.raises(PipelineError, match=r"predictions outside \[0, 1\]"):
        evaluate.confusion([0, 1], [0, 2], 2)


def test_confusion_of_predictions_and_labels_of_other_lengths_is_an_error():
    from pipeline import evaluate
    from pipeline._util import PipelineError

    with pytest.raises(PipelineError, match=r"got \(3,\) predictions for \(2,\) labels"):
        evaluate.confusion([0, 1], [0, 1, 1], 2)


def test_tracking_warns_once_per_process(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_warned", False)
    tracking.warn_once("MLflow server unreachable")
    tracking.warn_once("something else")
    assert capsys.readouterr().err == "WARNING: MLflow server unreachable\n"


def test_the_report_describes_each_recipe_and_the_reloaded_evaluation():
    """Sections in model order (SimpleCNN first), a step schedule with its milestones, a run
    that ran all its epochs as one number, both optimizers with their knobs, the evaluation's
    accuracy (not the training-time one) and per-class accuracy in percent."""
    from pipeline import report

    base = {"augment": True, "backend": "torch", "batch_size": 64, "seed": 1, "early_stop": 0, "weight_decay": 5e-4}
    resnet = {**base, "model": "resnet", "epochs": 50, "schedule": "cosine", "optimizer": "adam", "lr": 0.001,
              "betas": [0.9, 0.999]}
    simple = {**base, "model": "simple", "epochs": 30, "schedule": "step", "milestones": [10, 20], "gamma": 0.1,
              "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}
    metrics = {"best_test_acc": 0.72, "best_epoch": 28, "final_test_acc": 0.71, "final_train_acc": 0.8,
               "seconds_per_epoch": 2.0, "epochs_run": 30, "stopped_early": False, "device": "torch (cpu)"}
    data = {"res": {"config": resnet, "metrics": {**metrics, "epochs_run": 50}, "mlflow": {"run_id": None},
                    "eval": {"test_acc": 0.6, "per_class_acc": {"cat": 0.5, "dog": 0.7}}},
            "sim": {"config": simple, "metrics": metrics, "mlflow": {"run_id": "0123456789abcdef"},
                    "eval": {"test_acc": 0.7, "per_class_acc": {"cat": 0.65, "dog": 0.75}}}}
    stats = {"train": {"images": 300}, "test": {"images": 100}, "classes": ["cat", "dog"],
             "mean": [0.49139, 0.48216, 0.44653], "std": [0.24703, 0.24349, 0.26159]}
    md = report.render(data, stats)
    assert md.index("## SimpleCNN") < md.index("## SmallResNet")
    assert "| `sim` | 30 | yes | step (10, 20; ×0.1) | torch | torch (cpu) | **72.00%** (epoch 28) |" in md
    assert "| `res` | 50 | yes | cosine | torch |" in md
    assert "| `sim` | SGD lr 0.05, momentum 0.9, Nesterov, wd 0.0005 | 64 | 1 | off |" in md
    assert "| `res` | Adam lr 0.001, β (0.9, 0.999), wd 0.0005 | 64 | 1 | off |" in md
    assert "| Run | Test accuracy | cat | dog | MLflow run |" in md
    assert "| `sim` | **70.00%** | 65.0 | 75.0 | `0123456789ab` |" in md
    assert "| `res` | **60.00%** | 50.0 | 70.0 | `–` |" in md
    assert "mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616)" in md


def _drawn(monkeypatch):
    """The figures pipeline.plots draws, kept open instead of saved."""
    from pipeline import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    return plots, figures


def test_the_confusion_figure_normalises_each_true_class_row(monkeypatch, tmp_path):
    plots, figures = _drawn(monkeypatch)
    cm = np.array([[3, 1, 0], [0, 2, 0], [5, 0, 5]])
    plots.confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png", title="t")
    ax = figures[0].axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), cm / cm.sum(axis=1, keepdims=True))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    counts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert counts == {(i, j): str(cm[i, j]) for i in range(3) for j in range(3)}  # (row, column)
    plots._plt().close(figures[0])


def test_training_curves_plot_each_group_and_each_quantity(monkeypatch, tmp_path):
    plots, figures = _drawn(monkeypatch)
    h = lambda loss, train, test: [{"epoch": 1, "loss": loss, "train_acc": train, "test_acc": test}]  # noqa: E731
    plots.training_curves({"a": h(2.0, 0.5, 0.25), "b": h(1.5, 0.75, 0.625)}, tmp_path / "c.png",
                          groups={"SimpleCNN": ["a"], "SmallResNet": ["b"]})
    rows = np.array(figures[0].axes).reshape(-1, 2)[:2]
    got = [([list(line.get_ydata()) for line in loss.lines], [list(line.get_ydata()) for line in acc.lines])
           for loss, acc in rows]
    assert got == [([[2.0]], [[25.0], [50.0]]), ([[1.5]], [[62.5], [75.0]])]  # solid test, dashed train
    assert [line.get_linestyle() for line in rows[0][1].lines] == ["-", "--"]
    plots._plt().close(figures[0])


# ============================================================================ end to end (slow)
@pytest.mark.slow
def test_dvc_repro_end_to_end(repro_project, archive):
    proj, env, result = repro_project
    # --- stage outputs
    assert md5_of(proj / paths.RAW_ARCHIVE) == archive[1]
    stats = json.loads((proj / paths.STATS).read_text())
    assert stats["train"]["images"] == N_TRAIN and stats["test"]["images"] == N_TEST
    assert len(stats["mean"]) == len(stats["std"]) == 3 and stats["prepared"]["bytes"] > 0
    for name in TINY_RUNS:
        d = proj / "runs" / name
        for out in paths.train_outputs(name) + paths.evaluate_outputs(name):
            assert (proj / out).is_file(), out
        m = json.loads((d / paths.METRICS).read_text())
        assert set(m) >= {"best_test_acc", "best_epoch", "final_train_acc", "final_test_acc",
                          "seconds_per_epoch", "epochs_run", "device"}
        assert m["epochs_run"] == 1 and m["best_epoch"] == 1 and 0 <= m["best_test_acc"] <= 1
        assert m["device"].startswith(name.rsplit("_", 1)[1])  # "numpy ..." / "torch ..."
        with open(d / paths.HISTORY) as f:
            rows = list(csv.DictReader(f))
        assert [r["epoch"] for r in rows] == ["1"] and set(rows[0]) >= {"loss", "train_acc", "test_acc", "lr"}
        ev = json.loads((d / paths.EVAL_METRICS).read_text())
        assert ev["test_acc"] == pytest.approx(m["best_test_acc"])  # reloaded checkpoint = best epoch
        assert len(ev["per_class_acc"]) == 10
        assert ev["device"] == m["device"] and ev["inference_seconds"] > 0
        cm = json.loads((d / paths.CONFUSION).read_text())
        assert len(cm["classes"]) == 10 and sum(map(sum, cm["matrix"])) == N_TEST
        with open(d / paths.PREDICTIONS) as f:  # one row per test image: its class, then the guess
            pairs = [(r["actual"], r["predicted"]) for r in csv.DictReader(f)]
        from cnn.data import load_cifar10

        assert [a for a, _ in pairs] == [cm["classes"][y] for y in load_cifar10(archive[0]).test_y]
        counts = np.zeros((10, 10), int)
        for a, p in pairs:
            counts[cm["classes"].index(a), cm["classes"].index(p)] += 1
        assert counts.tolist() == cm["matrix"]  # rows: actual classes

    # --- dvc.lock: each run's settings depend on its own params and the defaults only, and
    # its train stage on those resolved settings
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"download", "normalize", "report",
                         *(f"{s}@{n}" for s in ("settings", "train", "evaluate") for n in TINY_RUNS)}
    for name in TINY_RUNS:
        assert set(lock[f"settings@{name}"]["params"]["params.yaml"]) == {"defaults", f"runs.{name}"}
        in_effect = {k: v for k, v in (tiny_params()["defaults"] | tiny_params()["runs"][name]).items()
                     if k not in ("milestones", "gamma", "betas")}  # SGD, no step schedule
        assert json.loads((proj / paths.settings_output(name)).read_text()) == in_effect
        assert paths.settings_output(name).as_posix() in {d["path"] for d in lock[f"train@{name}"]["deps"]}
    assert set(lock["download"]["params"]["params.yaml"]) == {"data.url", "data.md5"}
    assert "up to date" in dvc("status", cwd=proj, env=env).stdout

    # --- dvc metrics show
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=proj, env=env).stdout)
    files = next(iter(metrics.values()))["data"]
    for name in TINY_RUNS:
        assert files[f"runs/{name}/metrics.json"]["data"]["best_epoch"] == 1
        assert "test_acc" in files[f"runs/{name}/eval.json"]["data"]

    # --- dvc plots show renders the history and confusion plots
    dvc("plots", "show", "-o", str(proj.parent / "plots"), cwd=proj, env=env)
    assert (proj.parent / "plots" / "index.html").stat().st_size > 0

    # --- MLflow: one run per training stage in the repo's SQLite store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cifar10-cnn")
    assert exp.artifact_location == (proj / "mlartifacts" / "cifar10-cnn").resolve().as_uri()
    runs = {r.data.tags["dvc_stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {f"train@{n}" for n in TINY_RUNS}
    head = run(["git", "rev-parse", "HEAD~1"], proj, env).stdout.strip()  # the commit dvc repro ran on
    for name in TINY_RUNS:
        r = runs[f"train@{name}"]
        cfg = tiny_params()["defaults"] | tiny_params()["runs"][name]
        assert r.info.status == "FINISHED" and r.info.run_name == f"train@{name}"
        assert r.info.run_id == json.loads((proj / "runs" / name / paths.MLFLOW_RUN).read_text())["run_id"]
        assert r.data.params["backend"] == cfg["backend"] and r.data.params["lr"] == str(cfg["lr"])
        assert r.data.params["epochs"] == "1" and r.data.params["run"] == name
        assert r.data.params["resume"] == "false"
        run_dir = proj / "runs" / name
        assert json.loads((run_dir / paths.CONFIG).read_text())["device_used"] == \
            json.loads((run_dir / paths.METRICS).read_text())["device"]
        assert r.data.metrics["epochs_run"] == 1 and r.data.metrics["best_epoch"] == 1  # integers too
        assert r.data.tags["mlflow.source.git.commit"] == head
        for key in ("loss", "train_acc", "test_acc", "lr", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1], key
        assert "eval_test_acc" in r.data.metrics and "eval_acc_cat" in r.data.metrics
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoints")}
        assert arts == {"checkpoints/best.npz"}
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {
            "curves.png", "history.csv", "metrics.json", "config.json"}
        assert {a.path for a in client.list_artifacts(r.info.run_id, "evaluation")} >= {"evaluation/confusion.png"}
        local = Path(r.info.artifact_uri.removeprefix("file://")) / "checkpoints" / "best.npz"
        assert local.read_bytes() == (proj / "runs" / name / "best.npz").read_bytes()

    # --- report: generated, every run, numbers from the stage outputs
    md = (proj / paths.RESULTS_MD).read_text()
    assert "generated" in md.lower() and "## SimpleCNN" in md
    for name in TINY_RUNS:
        m = json.loads((proj / "runs" / name / paths.METRICS).read_text())
        assert f"`{name}`" in md and f"{100 * m['best_test_acc']:.2f}%" in md
        assert (proj / paths.REPORT_CONFUSION_DIR / f"{name}.png").is_file()
    assert (proj / paths.TRAINING_CURVES_PNG).stat().st_size > 0


@pytest.mark.slow
def test_only_the_edited_run_is_stale(repro_project, archive, tmp_path):
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    # another offline source with the same bytes: not a change for DVC
    mirror = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    mirror.parent.mkdir()
    shutil.copy(archive[0], mirror)
    env = {**env, "CIFAR10_SOURCE": mirror.as_uri()}
    assert "up to date" in dvc("status", cwd=proj, env=env).stdout
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["runs"]["simple_5ep_torch"]["seed"] = 7
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # `dvc status` lists the stages whose own dependencies changed (train@simple_5ep_torch
    # follows once settings has run, evaluate once train has); report lists the runs, so it
    # depends on all of `runs`.
    stale = set(json.loads(dvc("status", "--json", cwd=proj, env=env).stdout))
    assert stale == {"settings@simple_5ep_torch", "report"}


@pytest.mark.slow
def test_defaults_that_every_run_overrides_or_ignores_retrain_nothing(repro_project, tmp_path):
    """Every settings stage re-runs (they depend on all of `defaults`), writes the same
    settings in effect, and so no train stage runs."""
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["defaults"]["epochs"] = 9  # every tiny run sets epochs: 1
    params["defaults"]["betas"] = [0.5, 0.6]  # Adam's: no effect on these SGD runs
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc("repro", cwd=proj, env=env, timeout=600).stdout
    assert "Running stage 'settings@simple_5ep_torch'" in out and "Running stage 'train@" not in out
    assert "up to date" in dvc("status", cwd=proj, env=env).stdout


@pytest.mark.slow
def test_a_forgotten_run_leaves_no_stage_behind(repro_project, tmp_path):
    """DVC keeps the lock entries of a run deleted from params.yaml; pipeline.forget drops
    them and the run's folder (resume files included), and DVC reads the lock it wrote."""
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    (proj / "runs" / "simple_5ep_torch" / "last.npz").write_bytes(b"resume file")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    del params["runs"]["simple_5ep_torch"]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    kept = {k: v for k, v in yaml.safe_load((proj / "dvc.lock").read_text())["stages"].items()
            if not k.endswith("@simple_5ep_torch") and k != "report"}
    out = stage("forget", "simple_5ep_torch", "simple_5ep_torch", cwd=proj, env=env).stdout
    assert out.startswith("removed settings@simple_5ep_torch, train@simple_5ep_torch, evaluate@simple_5ep_torch, "
                          "runs/simple_5ep_torch/; next: dvc repro -s report")
    assert not (proj / "runs" / "simple_5ep_torch").exists()
    dvc("repro", "-s", "report", cwd=proj, env=env)
    assert "up to date" in dvc("status", cwd=proj, env=env).stdout
    lock = (proj / "dvc.lock").read_text()
    assert "simple_5ep_torch" not in lock
    assert {k: v for k, v in yaml.safe_load(lock)["stages"].items() if k != "report"} == kept


NOT_A_RUN_NAME = ": not a run name (letters, digits, '_' and '-')"


@pytest.mark.parametrize("runs, message", [
    (["simple_5ep_torch"], "simple_5ep_torch is still listed under `runs` in params.yaml: delete the entry there first"),
    (["old", "odl"], "nothing to forget of odl: dvc.lock has no stage of it and there is no runs/odl"),
    # names that would make runs/<name> another folder than a run's
    ([".."], "'..'" + NOT_A_RUN_NAME), (["old", "."], "'.'" + NOT_A_RUN_NAME), ([""], "''" + NOT_A_RUN_NAME),
    (["/tmp"], "'/tmp'" + NOT_A_RUN_NAME), (["old/"], "'old/'" + NOT_A_RUN_NAME),
])
def test_forget_removes_nothing_unless_every_run_named_has_something_to_remove(runs, message, stage_dir,
                                                                               monkeypatch, capsys):
    from pipeline import _util, forget

    def refuse(folders):  # were the name check to go, "/tmp" must still not be deleted
        raise AssertionError(f"forget would remove {folders}")

    monkeypatch.setattr(forget, "remove", refuse)
    (stage_dir / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train@old:\n    cmd: x\n")
    (stage_dir / "runs" / "old").mkdir()
    with pytest.raises(SystemExit) as e:
        _util.run_main(forget.main, runs)
    assert e.value.code == 1 and capsys.readouterr().err == f"error: {message}\n"
    assert (stage_dir / "runs" / "old").is_dir() and (stage_dir / "runs" / "simple_5ep_torch").is_dir()
    assert "train@old" in (stage_dir / "dvc.lock").read_text()


LOCK_WITH_OLD = ("schema: '2.0'\nstages:\n  settings@old:\n    cmd: a\n  train@old:\n    cmd: b\n"
                 "  train@oldest:\n    cmd: c\n")


@pytest.mark.parametrize("lock, folder, removed", [
    (LOCK_WITH_OLD, True, "settings@old, train@old, runs/old/"),
    (LOCK_WITH_OLD, False, "settings@old, train@old"),  # its folder already deleted by hand
    ("schema: '2.0'\nstages:\n  train@oldest:\n    cmd: c\n", True, "runs/old/"),
    (None, True, "runs/old/"),  # no dvc.lock: nothing was ever recorded
])
def test_forget_removes_what_there_is_of_a_run_and_nothing_else(lock, folder, removed, stage_dir, capsys):
    from pipeline import _util, forget

    if lock is not None:
        (stage_dir / "dvc.lock").write_text(lock)
    if folder:
        (stage_dir / "runs" / "old").mkdir()
        (stage_dir / "runs" / "old" / "last.npz").write_bytes(b"resume file")
    (stage_dir / "runs" / "oldest").mkdir()
    with pytest.raises(SystemExit) as e:
        _util.run_main(forget.main, ["old", "old"])  # named twice, forgotten once
    assert e.value.code == 0
    assert capsys.readouterr().out == f"removed {removed}; next: dvc repro -s report, then commit the deletions\n"
    assert not (stage_dir / "runs" / "old").exists() and (stage_dir / "runs" / "oldest").is_dir()
    if lock is None:
        assert not (stage_dir / "dvc.lock").exists()
    else:
        assert yaml.safe_load((stage_dir / "dvc.lock").read_text()) == {
            "schema": "2.0", "stages": {"train@oldest": {"cmd": "c"}}}


@pytest.mark.parametrize("lock", ["stages: [train@old\n", "stages: [train@old]\n", "- train@old\n"])
def test_forget_refuses_a_lock_file_it_cannot_read(lock, stage_dir, capsys):
    from pipeline import _util, forget

    (stage_dir / "dvc.lock").write_text(lock)
    (stage_dir / "runs" / "old").mkdir()
    with pytest.raises(SystemExit) as e:
        _util.run_main(forget.main, ["old"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: dvc.lock is not ") and "git checkout dvc.lock" in err
    assert (stage_dir / "runs" / "old").is_dir() and (stage_dir / "dvc.lock").read_text() == lock


@pytest.mark.slow
def test_a_typo_in_params_leaves_the_trained_run_in_place(repro_project, tmp_path):
    """DVC deletes a stage's outputs before running it unless they persist: the train stage
    persists them and removes them itself only after params.yaml passed its checks."""
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    run_dir = proj / "runs" / "simple_5ep_torch"
    before = {f.name: f.read_bytes() for f in run_dir.iterdir()}
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["runs"]["simple_5ep_torch"]["epoch"] = params["runs"]["simple_5ep_torch"].pop("epochs")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = dvc("repro", cwd=proj, env=env, check=False)
    assert p.returncode != 0 and "run 'simple_5ep_torch': unknown key 'epoch'" in p.stdout + p.stderr
    assert {f.name: f.read_bytes() for f in run_dir.iterdir()} == before


@pytest.mark.slow
def test_queued_experiments_log_to_the_main_store(repro_project, tmp_path):
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")  # fresh store: no mlflow.db, no mlartifacts
    assert not (proj / "mlflow.db").exists()
    dvc("exp", "run", "--queue", "-n", "exp-numpy", "-S", "runs.simple_5ep_numpy.epochs=2", cwd=proj, env=env)
    dvc("exp", "run", "--queue", "-n", "exp-torch", "-S", "++runs.simple_5ep_torch.seed=3", cwd=proj, env=env)
    dvc("queue", "start", "-j", "2", cwd=proj, env=env)
    deadline = time.monotonic() + 400
    while True:
        status = dvc("queue", "status", cwd=proj, env=env).stdout
        done = {n for n in ("exp-numpy", "exp-torch")
                if any(n in line and ("Success" in line or "Failed" in line) for line in status.splitlines())}
        if len(done) == 2 and "0 active" in status:
            break
        if time.monotonic() > deadline:
            logs = "\n".join(dvc("queue", "logs", n, cwd=proj, env=env, check=False).stdout for n in ("exp-numpy", "exp-torch"))
            pytest.fail(f"queue did not finish:\n{status}\n{logs}")
        time.sleep(2)
    assert status.count("Success") == 2, status + "\n" + "\n".join(
        dvc("queue", "logs", n, cwd=proj, env=env, check=False).stdout for n in ("exp-numpy", "exp-torch"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cifar10-cnn")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"exp-numpy:train@simple_5ep_numpy", "exp-torch:train@simple_5ep_torch"}
    assert [m.step for m in client.get_metric_history(runs["exp-numpy:train@simple_5ep_numpy"].info.run_id,
                                                      "test_acc")] == [1, 2]
    for r in runs.values():
        assert r.info.status == "FINISHED" and r.data.tags["dvc_exp_name"] in r.info.run_name
        uri = r.info.artifact_uri
        assert uri.startswith((proj / "mlartifacts").resolve().as_uri()), uri
        ckpt = Path(uri.removeprefix("file://")) / "checkpoints" / "best.npz"
        assert ckpt.is_file() and ckpt.stat().st_size > 0
        assert "eval_test_acc" in r.data.metrics
    for e in client.search_experiments():  # nothing points into the deleted temp copies
        assert ".dvc/tmp" not in e.artifact_location, e
    assert not list((proj / ".dvc" / "tmp").glob("exps/tmp*/mlflow.db"))


@pytest.mark.slow
def test_mlflow_server_over_http(repro_project, mlflow_server, tmp_path):
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    env = {**env, "MLFLOW_TRACKING_URI": mlflow_server}
    name = "simple_5ep_torch"
    p = stage("train", name, cwd=proj, env=env)
    assert not mlflow_warnings(p.stderr), p.stderr
    stage("evaluate", name, cwd=proj, env=env)
    run_id = json.loads((proj / "runs" / name / paths.MLFLOW_RUN).read_text())["run_id"]
    assert run_id and not (proj / "mlflow.db").exists()

    api = f"{mlflow_server}/api/2.0/mlflow"
    r = http_json(f"{api}/runs/get?run_id={run_id}")["run"]
    assert r["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in r["data"]["params"]}
    tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
    metrics = {m["key"] for m in r["data"]["metrics"]}
    assert params["backend"] == "torch" and params["run"] == name
    assert tags["dvc_stage"] == f"train@{name}"
    assert {"best_test_acc", "eval_test_acc", "test_acc"} <= metrics
    hist = http_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=test_acc")["metrics"]
    assert [m["step"] for m in hist] == [1]
    arts = http_json(f"{api}/artifacts/list?run_id={run_id}&path=checkpoints")["files"]
    assert [a["path"] for a in arts] == ["checkpoints/best.npz"] and arts[0]["file_size"] > 0


@pytest.mark.slow
def test_unreachable_tracking_server(repro_project, tmp_path):
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    name = "simple_5ep_torch"
    t0 = time.perf_counter()
    p = stage("train", name, cwd=proj, env=env)
    assert time.perf_counter() - t0 < 120
    assert len(mlflow_warnings(p.stderr)) == 1, p.stderr
    assert "unavailable" in mlflow_warnings(p.stderr)[0]
    for out in paths.train_outputs(name):
        assert (proj / out).is_file(), out
    info = json.loads((proj / "runs" / name / paths.MLFLOW_RUN).read_text())
    assert info["run_id"] is None and "disabled_reason" in info
    p = stage("evaluate", name, cwd=proj, env=env)
    assert len(mlflow_warnings(p.stderr)) == 1, p.stderr
    assert (proj / "runs" / name / paths.EVAL_METRICS).is_file()
    assert not (proj / "mlflow.db").exists()


@pytest.mark.slow
def test_a_run_trained_without_mlflow_is_logged_afterwards_as_the_stages_log_it(repro_project, tmp_path):
    """pipeline.log_run makes an MLflow run of a finished run's outputs, with what its stages
    log: here one run trained and evaluated with no store to log to, and one whose run is in
    another store (the original project's, as for the committed runs of a fresh clone)."""
    from mlflow.tracking import MlflowClient

    proj0, env, _ = repro_project
    proj = clone_project(proj0, tmp_path / "project")
    name, other = "simple_5ep_torch", "simple_5ep_numpy"
    off = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    for s in ("train", "evaluate"):
        stage(s, name, cwd=proj, env=off)
    recorded = {n: (proj / "runs" / n / paths.MLFLOW_RUN).read_bytes() for n in (name, other)}
    assert json.loads(recorded[name])["run_id"] is None

    p = stage("log_run", name, other, cwd=proj, env=env)
    assert f"`dvc commit -f train@{name} evaluate@{name}`, then `dvc repro -s report`" in p.stderr
    assert f"a copy of run {json.loads(recorded[other])['run_id']}" in p.stderr

    def runs_of(root):
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        exp = client.get_experiment_by_name("cifar10-cnn")
        return client, {r.data.tags["pipeline_run"]: r for r in client.search_runs([exp.experiment_id])}

    def artifacts(client, run_id, folder=None):
        found = set()
        for a in client.list_artifacts(run_id, folder):
            found |= artifacts(client, run_id, a.path) if a.is_dir else {a.path}
        return found

    client, logged = runs_of(proj)
    client0, original = runs_of(proj0)
    assert set(logged) == {name, other}
    info = json.loads((proj / "runs" / name / paths.MLFLOW_RUN).read_text())
    assert info["run_id"] == logged[name].info.run_id and "disabled_reason" not in info
    assert (proj / "runs" / other / paths.MLFLOW_RUN).read_bytes() == recorded[other]  # the other store's record
    assert logged[other].data.tags["source_run_id"] == original[other].info.run_id
    for n in (name, other):
        new, old = logged[n], original[n]
        assert new.info.status == "FINISHED" and new.info.run_name == old.info.run_name == f"train@{n}"
        assert new.data.params == old.data.params  # the same settings and data
        assert set(new.data.metrics) == set(old.data.metrics)
        git = {"git_commit", "git_dirty", "mlflow.source.git.commit"}  # the outputs do not say
        assert set(old.data.tags) - {"mlflow.runName"} - git == set(new.data.tags) - {
            "mlflow.runName", "logged_from_outputs", "source_run_id", "source_tracking_uri"}
        assert new.data.tags["logged_from_outputs"] == f"runs/{n}"
        assert artifacts(client, new.info.run_id) == artifacts(client0, old.info.run_id)
        with open(proj / "runs" / n / paths.HISTORY) as f:
            rows = list(csv.DictReader(f))
        for key, column in (("test_acc", "test_acc"), ("epoch_seconds", "seconds")):
            assert [(m.step, m.value) for m in client.get_metric_history(new.info.run_id, key)] == \
                [(int(r["epoch"]), float(r[column])) for r in rows]
        assert new.data.metrics["eval_test_acc"] == \
            json.loads((proj / "runs" / n / paths.EVAL_METRICS).read_text())["test_acc"]

    again = stage("log_run", name, other, cwd=proj, env=env, check=False)
    assert again.returncode == 1 and f"already MLflow run {info['run_id']}" in again.stderr
    assert f"already copied to sqlite:///{proj / 'mlflow.db'}, as run {logged[other].info.run_id}" in again.stderr
    assert len(client.search_runs([logged[name].info.experiment_id])) == 2
    # what the message says to do records the run again
    dvc("commit", "-f", f"train@{name}", f"evaluate@{name}", cwd=proj, env=env)
    dvc("repro", "-s", "report", cwd=proj, env=env)
    assert "up to date" in dvc("status", cwd=proj, env=env).stdout
    assert f"`{info['run_id'][:12]}`" in (proj / paths.RESULTS_MD).read_text()


@pytest.mark.slow
def test_dvc_repro_stops_on_bad_params_and_bad_md5(archive, tmp_path):
    path, md5 = archive
    bad = tiny_params()
    bad["runs"]["simple_5ep_torch"]["lr"] = "fast"
    bad["runs"]["simple_5ep_numpy"]["epoch"] = 3
    proj = make_project(tmp_path / "project", bad)
    env = clean_env(CIFAR10_SOURCE=path, CIFAR10_MD5=md5)
    p = dvc("repro", cwd=proj, env=env, check=False)
    assert p.returncode != 0
    err = p.stdout + p.stderr
    assert "run 'simple_5ep_torch': 'lr' must be a positive number; got 'fast'" in err
    assert "run 'simple_5ep_numpy': unknown key 'epoch'" in err
    assert not (proj / "data").exists() and not (proj / "dvc.lock").exists()

    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    p = dvc("repro", cwd=proj, env={**env, "CIFAR10_MD5": "f" * 32}, check=False)
    assert p.returncode != 0 and "md5 mismatch" in p.stdout + p.stderr
    assert not (proj / paths.RAW_ARCHIVE).exists() and not (proj / "dvc.lock").exists()


@pytest.mark.slow
def test_resume_continues_a_run_only_with_the_same_settings(repro_project, tmp_path):
    proj, env, _ = repro_project
    proj = clone_project(proj, tmp_path / "project")
    env = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # MLflow off: faster
    name = "simple_5ep_torch"
    d = proj / "runs" / name
    first = (d / paths.HISTORY).read_text().splitlines()[1]
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["resume"] = True
    params["runs"][name]["epochs"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def train():  # the commands of settings@<run> and train@<run>
        stage("params", "--run", name, "--out", str(paths.settings_output(name)), cwd=proj, env=env)
        return stage("train", name, cwd=proj, env=env)

    train()
    history = (d / paths.HISTORY).read_text().splitlines()
    assert len(history) == 3 and history[1] == first  # epoch 1 kept from last.npz, epoch 2 trained
    assert json.loads((d / paths.CONFIG).read_text())["resumed"] is True
    metrics = json.loads((d / paths.METRICS).read_text())
    # Both parts ran here: the replayed epoch's device (from last.npz) is this one, not a "move".
    assert metrics["epochs_run"] == 2 and "devices" not in metrics and "+" not in metrics["device"]

    params["runs"][name]["lr"] = 0.02  # a different run: must start over
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = train()
    assert "not resuming" in p.stderr and "lr" in p.stderr
    assert json.loads((d / paths.CONFIG).read_text())["resumed"] is False

    with np.load(proj / paths.PREPARED) as z:  # same settings, other images (as their stats say)
        prepared = {k: z[k] for k in z.files}
    np.savez(proj / paths.PREPARED, **{**prepared, "mean": prepared["mean"] + 0.01})
    p = train()
    assert "not resuming" in p.stderr and "the data: its per-channel mean/std" in p.stderr
    assert json.loads((d / paths.CONFIG).read_text())["resumed"] is False

    with open(proj / "cnn" / "layers.py", "a") as f:  # same settings, other engine code
        f.write("\n# edited\n")
    p = train()
    assert "not resuming" in p.stderr and "engine code (cnn/) changed" in p.stderr
    assert json.loads((d / paths.CONFIG).read_text())["resumed"] is False
