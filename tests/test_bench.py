"""The benchmark CLI: every case runs in its own process and reports what the README quotes."""
import json
import os
import re

import numpy as np
import pytest

from cnn import bench

torch = pytest.importorskip("torch")


def test_bench_reports_time_and_ops_per_case(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "simple", "--engines", "torch", "torch-replay", "native",
                       "--batch-sizes", "2", "--steps", "1", "--repeats", "1", "--warmup", "1",
                       "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["model"], r["engine"], r["batch_size"]) for r in results] == \
        [("simple", "torch", 2), ("simple", "torch-replay", 2), ("simple", "native", 2)]
    for r in results:
        assert r["ms_per_step"] > 0 and len(r["ms_blocks"]) == 1
        assert r["ops_per_step"] > 10  # a training step is many operators, never none
    # Native convolution is one operator where the engine's im2col, matmul and col2im are several.
    assert results[0]["ops_per_step"] > results[2]["ops_per_step"]
    # The CPU cannot record a step, so the replaying engine runs the same eager step.
    assert results[1]["ops_per_step"] == results[0]["ops_per_step"]
    assert "replayed" not in results[1]["where"]
    table = capsys.readouterr().out
    assert "ops/step" in table and "x native" in table


def test_a_failed_case_is_one_line_and_the_exit_status_says_so(capsys, monkeypatch):
    """A case that fails in its process (out of GPU memory, say) is its exception's line."""
    import subprocess

    real_run = subprocess.run

    def run(cmd, **kwargs):
        if "simple:torch:2" in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\n  ...\n"
                                               "torch.OutOfMemoryError: CUDA out of memory.\n")
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench.main(["--models", "simple", "--engines", "numpy", "torch", "--batch-sizes", "2",
                       "--steps", "1", "--repeats", "1", "--warmup", "0"]) == 1
    captured = capsys.readouterr()
    assert "simple torch batch 2: failed: torch.OutOfMemoryError: CUDA out of memory." in captured.err
    assert "Traceback" not in captured.err and "1 case(s) failed: simple:torch:2" in captured.err
    assert "numpy: numpy (cpu)" in captured.out  # the other case is reported as usual


def test_numpy_runs_on_the_cpu_whatever_the_device(tmp_path):
    """--device names the GPU for the torch engines; numpy cases ignore it, even where that
    device does not exist."""
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "simple", "--engines", "numpy", "--device", "mps", "--batch-sizes", "2",
                       "--steps", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["engine"] == "numpy"
    # the machine, so that figures from two machines are not compared unawares
    assert result["machine"] == bench.machine() and result["machine"]["cores"] == os.cpu_count()
    assert (result["machine"]["numpy"], result["machine"]["torch"]) == (np.__version__, torch.__version__)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1; got 0"),
    (["--repeats", "0"], "--repeats must be at least 1; got 0"),
    (["--batch-sizes", "64", "0"], "every --batch-sizes value must be at least 1; got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0; got -1"),
    (["--busy", "-2"], "--busy must be >= 0; got -2"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--engines", "cupy", "--device", "cpu"], "the cupy backend runs on CUDA only, not 'cpu'"),
    (["--json", "/nonexistent-folder/bench.json"], "--json /nonexistent-folder/bench.json: cannot write there"),
])
def test_bench_refuses_bad_settings_before_timing_anything(args, message, capsys):
    """Up front, each naming its flag: a benchmark on a GPU lease is too costly to lose at its end."""
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_without_cupy_says_how_to_install_it_before_timing_anything(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        bench.main(["--engines", "cupy", "--device", "cuda"])
    assert e.value.code == 2 and "--engines cupy needs CuPy: on a machine with a CUDA GPU, pip install" in (
        capsys.readouterr().err)


def test_each_case_runs_in_its_own_process_on_the_device_asked_for(monkeypatch, capsys):
    import subprocess

    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        model, engine, bs = cmd[cmd.index("--case") + 1].split(":")
        row = dict(model=model, engine=engine, where="cpu", batch_size=int(bs), ms_per_step=1.0,
                   ms_blocks=[1.0], peak_rss_mb=1.0)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.main(["--models", "simple", "resnet", "--engines", "torch", "native", "--device", "cpu",
                       "--batch-sizes", "2", "8", "--steps", "7", "--repeats", "4", "--warmup", "5"]) == 0
    cases = [c[c.index("--case") + 1] for c in commands]
    assert cases == [f"{m}:{e}:{b}" for b in (2, 8) for m in ("simple", "resnet") for e in ("torch", "native")]
    for flag, value in (("--device", "cpu"), ("--steps", "7"), ("--repeats", "4"), ("--warmup", "5")):
        assert all(c[c.index(flag) + 1] == value for c in commands), flag


def test_busy_processes_spin_beside_each_case_and_stop_after_it(monkeypatch, tmp_path):
    import subprocess

    events, spinners = [], []

    class Spinner:
        def __init__(self, cmd):
            assert cmd[1:] == ["-c", f"import os\nwhile os.getppid() == {os.getpid()}: pass"]
            self.alive = True
            spinners.append(self)

        def kill(self):
            self.alive = False

        def wait(self):
            events.append("stopped" if not self.alive else "waited on a live one")

    def fake_run(cmd, **kw):
        events.append(f"case with {sum(s.alive for s in spinners)} spinning")
        model, engine, bs = cmd[cmd.index("--case") + 1].split(":")
        if engine == "native":
            raise KeyboardInterrupt  # a case that never returns: the spinners must still stop
        row = dict(model=model, engine=engine, where="cpu", batch_size=int(bs), ms_per_step=1.0,
                   ms_blocks=[1.0], peak_rss_mb=1.0)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "Popen", Spinner)
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "simple", "--engines", "torch", "--busy", "3", "--json", str(out)]) == 0
    assert events == ["case with 3 spinning"] + ["stopped"] * 3
    assert json.loads(out.read_text())[0]["busy"] == 3
    events.clear()
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--models", "simple", "--engines", "native", "--busy", "2"])
    assert events == ["case with 2 spinning"] + ["stopped"] * 2
    with pytest.raises(SystemExit):
        bench.main(["--busy", "-1"])


def test_a_case_reports_its_fastest_block_per_step(monkeypatch):
    """Each timed block is its time over its steps; ms/step is the fastest block's."""
    from types import SimpleNamespace

    clock = iter([0.0, 0.08, 1.0, 1.04, 2.0, 2.12])  # blocks of 4 steps: 20, 10 and 30 ms a step
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    r = bench._time_case("simple", "numpy", "cpu", 2, steps=4, repeats=3, warmup=0)
    assert r["ms_blocks"] == pytest.approx([20.0, 10.0, 30.0]) and r["ms_per_step"] == pytest.approx(10.0)


def test_the_ratio_is_to_native_with_the_same_model_and_batch_size(capsys):
    rows = [dict(model=model, engine=engine, where="cpu", batch_size=bs, ms_per_step=ms, peak_rss_mb=1.0)
            for model, engine, bs, ms in (("simple", "torch", 64, 20.0), ("simple", "torch", 512, 30.0),
                                          ("resnet", "native", 64, 40.0), ("resnet", "native", 512, 40.0),
                                          ("simple", "native", 64, 10.0), ("simple", "native", 512, 60.0))]
    for r in rows[:2]:
        bench._print_row(r, rows)
    first, second = (line.split() for line in capsys.readouterr().out.splitlines())
    assert first[:3] == ["simple", "64", "torch:"] and second[:3] == ["simple", "512", "torch:"]
    assert first[6] == "2.00" and second[6] == "0.50"
    # s/epoch: ms/step over the 50,000 training images in batches of that size
    assert first[5] == f"{20.0 / 1000 * 50_000 / 64:.1f}" and second[5] == f"{30.0 / 1000 * 50_000 / 512:.1f}"


def test_an_operator_counts_once_however_many_it_calls_inside():
    import torch

    a, b = torch.ones(3, 4), torch.ones(5, 4)
    assert bench._count_ops(lambda: torch.add(a, a)) == 1
    assert bench._count_ops(lambda: torch.nn.functional.linear(a, b)) == 1  # aten::linear, not its mm


def _benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_reference():
    return _benchmark_script("native_reference")


@pytest.mark.parametrize("loss, verdict, status", [(1.25, "IDENTICAL", 0), (1.2500001, "DIFFERENT", 1)])
def test_reproduce_epoch_compares_the_first_epoch_to_the_last_digit(loss, verdict, status, tmp_path, monkeypatch,
                                                                   capsys):
    """It re-trains epoch 1 of the run's recipe (here stood in for) and compares it with the
    committed first row exactly; a CPU row that differs points at the thread count."""
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path)
    run = tmp_path / "runs" / "simple_20ep_torch_aug"
    run.mkdir(parents=True)
    (run / "history.csv").write_text("epoch,loss,train_acc,test_acc,lr,seconds\n1,1.25,0.5,0.625,0.01,60.0\n"
                                     "2,1.0,0.6,0.7,0.01,60.0\n")
    (run / "metrics.json").write_text('{"device": "torch (cpu)"}')
    script, configs = _benchmark_script("reproduce_epoch"), []

    def fit(config):
        configs.append(config)
        return SimpleNamespace(history=[{"loss": loss, "train_acc": 0.5, "test_acc": 0.625}], device="torch (cpu)")

    monkeypatch.setattr(script, "fit", fit)
    assert script.main(["simple_20ep_torch_aug"]) == status
    out = capsys.readouterr().out
    assert out.splitlines()[-2 if status else -1] == verdict
    assert ("thread count" in out) == bool(status)
    (config,) = configs
    assert (config.epochs, config.model, config.backend, config.augment) == (1, "simple", "torch", True)


def test_reproduce_epoch_against_a_revision_trains_with_that_revisions_engine(tmp_path, monkeypatch):
    """--against REV trains epoch 1 with the cnn/ of REV in a process of its own: here a
    repository whose one commit holds this engine, so it must match the engine in-process
    to the last bit, and one whose engine was changed to scale the loss gradient must not."""
    import shutil
    import subprocess
    from dataclasses import replace
    from pathlib import Path

    from cnn.config import TrainConfig
    from cnn.synthetic import write_synthetic_cifar10
    from cnn.train import fit

    script = _benchmark_script("reproduce_epoch")
    repo = tmp_path / "repo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "cnn", repo / "cnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "cnn"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "engine"], check=True)
    functional = repo / "cnn" / "functional.py"
    text = functional.read_text()
    assert text.count("def softmax_cross_entropy(") == 1
    functional.write_text(text + "\n_original = softmax_cross_entropy\n\n\ndef softmax_cross_entropy(*a, **k):\n"
                                 "    loss, grad = _original(*a, **k)\n    return loss, grad * 1.5\n")
    subprocess.run([*git, "commit", "-q", "-am", "a changed gradient"], check=True)

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=96, n_test=32, seed=0)
    config = TrainConfig(model="simple", epochs=1, batch_size=32, augment=True, data=str(data),
                         out=str(tmp_path / "here"), progress=False)
    here = {k: fit(config).history[0][k] for k in script.COMPARED}
    monkeypatch.chdir(repo)
    device, same = script.epoch_one_at("HEAD~1", replace(config, out=str(tmp_path / "same")))
    assert device == "numpy (cpu)" and {k: same[k] for k in script.COMPARED} == here
    _, changed = script.epoch_one_at("HEAD", replace(config, out=str(tmp_path / "changed")))
    assert changed["loss"] != here["loss"]
    with pytest.raises(script.UserError, match="git archive no-such-rev cnn failed"):
        script.epoch_one_at("no-such-rev", config)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "'epochs' must be a positive integer; got 0"),
    (["--gamma", "0"], "'gamma' must be a number in (0, 1]; got 0.0"),
    (["--data", "/nonexistent/cifar.tar.gz"], "/nonexistent/cifar.tar.gz does not exist"),
])
def test_native_reference_refuses_what_cnn_train_refuses(flags, message, capsys):
    """The baseline takes cnn.train's flags and checks: a bad one is one line, no traceback."""
    assert _native_reference().main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_native_reference_trains_the_recipe_it_is_given(tmp_path, capsys):
    from cnn.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=128, n_test=32, seed=0)
    # 32 test images: the accuracy cannot rise 20 epochs in a row, so patience 1 stops it
    assert _native_reference().main(["--data", str(data), "--epochs", "20", "--early-stop", "1",
                                     "--optimizer", "adam", "--lr", "0.001", "--batch-size", "16",
                                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    epochs = [line for line in out if line.startswith("Epoch")]
    assert epochs[0].startswith("Epoch   1/20 | Loss: ") and "LR: 0.001000" in epochs[0]
    assert len(epochs) < 20 and out[-2] == "Early stop: no better test accuracy for 1 epoch"
    # the last line gives what the engine's report compares: best, final and train accuracy
    assert out[-1].startswith("native torch.nn simple on cpu: best test accuracy ")
    assert "final test " in out[-1] and ", train " in out[-1]


@pytest.mark.parametrize("flags, optimizer, settings", [
    (["--optimizer", "adam", "--lr", "0.002", "--betas", "0.8", "0.95", "--weight-decay", "0.001"],
     "Adam", dict(lr=0.002, betas=(0.8, 0.95), weight_decay=0.001)),
    (["--momentum", "0.5", "--nesterov", "--weight-decay", "0"],
     "SGD", dict(lr=0.01, momentum=0.5, nesterov=True, weight_decay=0.0)),
], ids=["adam", "sgd"])
def test_native_reference_builds_the_optimizer_the_flags_ask_for(flags, optimizer, settings, tmp_path,
                                                                  monkeypatch, capsys):
    import torch

    from cnn.synthetic import write_synthetic_cifar10

    made = []
    real = getattr(torch.optim, optimizer)

    def recording(params, **kwargs):
        made.append(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, optimizer, recording)
    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=32, n_test=16, seed=0)
    assert _native_reference().main(["--data", str(data), "--epochs", "2", "--batch-size", "16",
                                     "--schedule", "step", "--milestones", "1", "--gamma", "0.5",
                                     "--device", "cpu", *flags]) == 0
    assert made == [settings]
    rates = [line.split("LR: ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("Epoch")]
    base = settings["lr"]
    assert rates == [f"{base:.6f}", f"{base * 0.5:.6f}"]  # the step schedule's gamma at epoch 1


def test_native_reference_reports_a_diverged_run_as_cnn_train_does(tmp_path, capsys):
    from cnn.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=32, n_test=16, seed=0)
    assert _native_reference().main(["--data", str(data), "--epochs", "3", "--batch-size", "16",
                                     "--lr", "1e10", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the training loss became nan in epoch ") and "the run diverged" in err


def _epoch_values(line):
    """{'Loss': ..., 'Train': ..., 'Test': ...} of one epoch line."""
    fields = dict(part.strip().split(": ") for part in line.split(" | ")[1:])
    return {k: float(fields[k].rstrip("s")) for k in ("Loss", "Train", "Test")}


def test_native_reference_train_accuracy_is_a_fraction_of_the_training_images(tmp_path, capsys):
    from cnn.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=128, n_test=16, seed=0)
    assert _native_reference().main(["--data", str(data), "--epochs", "4", "--optimizer", "adam",
                                     "--lr", "0.001", "--batch-size", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    epochs = [_epoch_values(line) for line in out if line.startswith("Epoch")]
    assert all(0 <= e["Train"] <= 1 for e in epochs)
    assert out[-1].endswith(f", train {epochs[-1]['Train']:.4f}")


def test_native_reference_final_test_accuracy_is_the_last_epochs_not_the_best(tmp_path, monkeypatch, capsys):
    """The report compares best and final accuracy with the engine's: a model that gets
    the first test image right in epoch 1 and nothing in epoch 2 ends below its best."""
    import torch

    from cnn.data import load_cifar10
    from cnn.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=16, n_test=16, seed=0)
    first_label = int(load_cifar10(data).test_y[0])

    class Scripted(torch.nn.Module):  # evaluation predicts first_label, then an 11th class no image has
        def __init__(self):
            super().__init__()
            self.fc, self.evaluations = torch.nn.Linear(3 * 32 * 32, 11), 0

        def forward(self, x):
            if self.training:
                return self.fc(x.flatten(1))
            self.evaluations += 1
            pick = first_label if self.evaluations == 1 else 10
            return torch.nn.functional.one_hot(torch.full((len(x),), pick), 11).float()

    module = _native_reference()
    monkeypatch.setattr(module, "torch_twin", lambda name: Scripted())
    assert module.main(["--data", str(data), "--epochs", "2", "--batch-size", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    first, last = (_epoch_values(line) for line in out if line.startswith("Epoch"))
    assert first["Test"] > 0 and last["Test"] == 0
    assert f"best test accuracy {first['Test']:.4f} at epoch 1; final test 0.0000, train " in out[-1]


def test_native_reference_counts_an_all_wrong_first_epoch_as_the_best_so_far(tmp_path, monkeypatch, capsys):
    """Accuracy 0 is a result too: the best epoch is 1, not 0 (no epoch)."""
    import torch

    from cnn.synthetic import write_synthetic_cifar10

    def always_wrong(name):  # an 11th class that no image has wins every prediction
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 11))
        with torch.no_grad():
            model[1].weight.zero_()
            model[1].bias.copy_(torch.arange(11.0) * 100)
        return model

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=16, n_test=16, seed=0)
    module = _native_reference()
    monkeypatch.setattr(module, "torch_twin", always_wrong)
    assert module.main(["--data", str(data), "--epochs", "1", "--batch-size", "16", "--lr", "1e-9",
                        "--device", "cpu"]) == 0
    assert "best test accuracy 0.0000 at epoch 1;" in capsys.readouterr().out.splitlines()[-1]


def test_native_reference_seeds_the_torch_weights_with_its_seed(tmp_path, monkeypatch, capsys):
    import torch

    from cnn.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=16, n_test=16, seed=0)
    module = _native_reference()
    seeds, real = [], module.torch_twin
    monkeypatch.setattr(module, "torch_twin", lambda name: seeds.append(torch.initial_seed()) or real(name))
    assert module.main(["--data", str(data), "--epochs", "1", "--batch-size", "16", "--seed", "7",
                        "--device", "cpu"]) == 0
    assert seeds == [7]


def test_native_reference_runs_on_the_automatic_device_by_default(tmp_path, capsys):
    from cnn.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=16, n_test=16, seed=0)
    assert _native_reference().main(["--data", str(data), "--epochs", "1", "--batch-size", "16"]) == 0
    assert re.search(r"^native torch.nn simple on (cpu|cuda(:\d+)?|mps): ", capsys.readouterr().out.splitlines()[-1])


def test_native_reference_checks_the_device_for_torch_and_names_no_engine_flag(capsys):
    """Its settings are checked as a torch run's: with the engine's default backend, NumPy,
    --device cuda would be refused with advice to pass --backend, which it does not take."""
    assert _native_reference().main(["--device", "cuda", "--data", "/nonexistent/cifar.tar.gz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "backend" not in err
