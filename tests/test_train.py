"""The training loop, checkpoints and CLI on a tiny synthetic CIFAR-10 archive."""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cnn
import cnn.train as train_mod
from cnn.atomic import atomic_path
from cnn.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from cnn.config import data_conflicts, problems
from cnn.data import DataLoader, load_cifar10, normalize
from cnn.layers import Dropout
from cnn.synthetic import write_synthetic_cifar10
from cnn.torch_twins import torch_twin
from cnn.train import TrainConfig, TrainingError, fit, load_model, main, predict
from tests import recording
from tests.oracle import to_numpy, with_workers

HISTORY_KEYS = {"epoch", "loss", "train_acc", "test_acc", "lr", "seconds"}
EPOCH_LINE = re.compile(r"^Epoch +(\d+)/(\d+) \| Loss: \d+\.\d{4} \| Train: [01]\.\d{4} \| "
                        r"Test: [01]\.\d{4} \| LR: \d+\.\d{6} \| Time: \d+\.\ds$", re.M)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """200 training and 50 test images in the official tar.gz format."""
    return write_synthetic_cifar10(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz",
                                   n_train=200, n_test=50, seed=0)


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("tiny") / "cifar-10-python.tar.gz",
                                   n_train=50, n_test=20, seed=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def base_config(archive, out, **kw) -> TrainConfig:
    """Augmentation on (shuffle, crops, flips and dropout all random), a step schedule that
    halves the lr after epoch 1 (cosine would depend on the total number of epochs)."""
    cfg = TrainConfig(model="simple", epochs=2, augment=True, schedule="step", milestones=[1],
                      gamma=0.5, lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=50, seed=0,
                      backend="numpy", data=str(archive), out=str(out), progress=False)
    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def full_run(archive, runs):
    """An uninterrupted 2-epoch run."""
    out = runs / "full"
    return fit(base_config(archive, out)), out


@pytest.fixture(scope="module")
def one_epoch_run(archive, runs):
    """Epoch 1 of the same run; its last.npz is copied aside before anything resumes it."""
    out = runs / "first"
    result = fit(base_config(archive, out, epochs=1))
    snapshot = runs / "first_epoch1.npz"
    shutil.copy(out / "last.npz", snapshot)
    return result, out, snapshot


def assert_same_state(a: dict, b: dict, what=""):
    assert list(a) == list(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}{k}"
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}{k}")


# ---------------------------------------------------------------------------------------
# fit: history, checkpoints, determinism, resume
# ---------------------------------------------------------------------------------------

def test_fit_history_and_checkpoint_files(full_run):
    result, out = full_run
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert set(h) == HISTORY_KEYS
        assert np.isfinite(h["loss"]) and h["loss"] > 0 and h["seconds"] > 0
        assert 0.0 <= h["train_acc"] <= 1.0 and 0.0 <= h["test_acc"] <= 1.0
    assert [h["lr"] for h in result.history] == [0.01, 0.005]
    assert result.best_checkpoint == out / "best.npz" and result.best_checkpoint.exists()
    assert result.last_checkpoint == out / "last.npz" and result.last_checkpoint.exists()
    accs = [h["test_acc"] for h in result.history]
    assert result.best_test_acc == max(accs)
    assert result.best_epoch == 1 + accs.index(max(accs))
    assert not result.stopped_early
    assert result.history[0]["test_acc"] > 0.2  # learnable data: better than chance (0.1)
    meta = read_meta(out / "last.npz")
    assert meta["epoch"] == 2 and meta["model"] == "simple"
    assert meta["history"] == result.history
    assert read_meta(out / "best.npz")["epoch"] == result.best_epoch
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_gives_identical_weights(archive, runs, one_epoch_run):
    _, _, snapshot = one_epoch_run
    again = fit(base_config(archive, runs / "again", epochs=1))
    a = load_checkpoint(snapshot)
    b = load_checkpoint(again.last_checkpoint)
    assert_same_state(a.model_state, b.model_state, "model ")
    assert_same_state(a.optimizer_state, b.optimizer_state, "optimizer ")


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(archive, full_run, one_epoch_run):
    full, full_out = full_run
    first, out, _ = one_epoch_run
    resumed = fit(base_config(archive, out, epochs=2, resume=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # its time too: epoch 1 was not trained again
    a = load_checkpoint(full_out / "last.npz")
    b = load_checkpoint(out / "last.npz")
    assert_same_state(a.model_state, b.model_state, "model ")
    assert_same_state(a.optimizer_state, b.optimizer_state, "optimizer ")
    for h_full, h_res in zip(full.history, resumed.history):
        assert {k: v for k, v in h_full.items() if k != "seconds"} == \
               {k: v for k, v in h_res.items() if k != "seconds"}
    assert (resumed.best_test_acc, resumed.best_epoch) == (full.best_test_acc, full.best_epoch)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_each_epoch_draws_its_own_order_crops_and_dropout(backend_name, tiny_archive, tmp_path, monkeypatch):
    """Epoch e trains on the loader's epoch e (shuffle, crops, flips) with dropout masks of
    its own. A loop that forgot to move either on would repeat epoch 1's, and would still
    resume exactly, so the resume tests cannot see it."""
    batches, masks = [], []
    loader_iter, dropout_forward = DataLoader.__iter__, Dropout.forward

    def spy_iter(self):
        for xb, yb in loader_iter(self):
            if self.shuffle:  # the training loader: one batch per epoch here
                batches.append((self.epoch, to_numpy(xb).copy()))
            yield xb, yb

    def spy_forward(self, x):
        out = dropout_forward(self, x)
        if self.training:
            masks.append(to_numpy(self.cache[0]).copy())
        return out

    monkeypatch.setattr(DataLoader, "__iter__", spy_iter)
    monkeypatch.setattr(Dropout, "forward", spy_forward)
    fit(base_config(tiny_archive, tmp_path / "run", epochs=3, backend=backend_name, device="cpu"))  # 50 images, batch 50
    assert [epoch for epoch, _ in batches] == [0, 1, 2] and len(masks) == 3
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(batches[a][1], batches[b][1]), (a, b)
        assert not np.array_equal(masks[a], masks[b]), (a, b)


def _fit_counting_recordings(config, monkeypatch, record=None):
    """fit(config) with TorchBackend.record wrapped (or replaced by ``record``); returns
    the last checkpoint (cnn.checkpoint.Checkpoint) and how many steps were recorded."""
    from cnn.backend import TorchBackend

    real, recordings = record or TorchBackend.record, []

    def counting(self, fn):
        recordings.append(fn)
        return real(self, fn)

    with monkeypatch.context() as patch:
        if record is not None:
            patch.setattr(TorchBackend, "can_record", True)
        patch.setattr(TorchBackend, "record", counting)
        fit(config)
    return load_checkpoint(Path(config.out) / "last.npz"), len(recordings)


def _assert_same_run(a, b):
    assert_same_state(a.model_state, b.model_state, "model ")
    assert_same_state(a.optimizer_state, b.optimizer_state, "optimizer ")
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert drop(a.meta["history"]) == drop(b.meta["history"])


def test_the_stand_in_recording_behaves_like_a_cuda_graph():
    """What the next test relies on: recording runs nothing, a replay repeats in-place
    updates but not the Python (a rebinding or a host-side count), and a read back to the
    host while recording fails."""
    state, python_runs = {"in_place": torch.zeros(2), "rebound": torch.zeros(2)}, []

    def step():
        state["in_place"] += 1
        state["rebound"] = state["rebound"] + 1
        python_runs.append(1)

    graph = recording.record(None, step)
    assert state["in_place"].tolist() == [0, 0]
    for _ in range(3):
        graph.replay()
    assert state["in_place"].tolist() == [3, 3]
    assert state["rebound"].tolist() == [1, 1]  # each replay recomputes it from the old array
    assert len(python_runs) == 1
    with pytest.raises(RuntimeError, match="read a value back to the host"):
        recording.record(None, lambda: state["in_place"].sum().item())


def _step_replay(monkeypatch):
    """A StepReplay over a step that adds its batch's sum into a device total, on the torch
    CPU backend with the stand-in recording; returns it, the total and the step's Python runs."""
    from cnn.backend import TorchBackend
    from cnn.replay import StepReplay

    monkeypatch.setattr(TorchBackend, "can_record", True)
    monkeypatch.setattr(TorchBackend, "record", recording.record)
    B = cnn.get_backend("torch", "cpu")
    total, python_runs = B.zeros((1,)), []

    def step(x, y):
        total[...] += B.sum(x)
        python_runs.append(1)

    return StepReplay(step, B), total, python_runs, B


def test_step_replay_records_the_second_batch_and_replays_the_rest(monkeypatch):
    run, total, python_runs, B = _step_replay(monkeypatch)
    batches = [B.asarray(np.full(4, i, np.float32)) for i in range(1, 5)]
    for x in batches:
        run(x, x)
    assert len(python_runs) == 2 and run.replays == 3  # eager, recorded (not run), 3 replays
    assert float(total) == 4 * (1 + 2 + 3 + 4)
    # the recording reads copies: the caller's batches are left as they were
    assert [to_numpy(x).tolist() for x in batches] == [[i] * 4 for i in range(1, 5)]


def test_step_replay_drops_its_recording_after_a_batch_of_another_shape(monkeypatch):
    """The other shape's eager step reallocates the workspaces the recording uses."""
    run, total, python_runs, B = _step_replay(monkeypatch)
    a, b = B.asarray(np.ones(4, np.float32)), B.asarray(np.ones(2, np.float32))
    for x in (a, a, b, a):
        run(x, x)
    assert len(python_runs) == 4 and run.replays == 1  # after b, a runs eagerly again
    assert float(total) == 4 + 4 + 2 + 4


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_the_epoch_loss_weights_each_batch_by_its_images(backend_name, tiny_archive, tmp_path, monkeypatch):
    """50 images in batches of 20, 20 and 10: the epoch's loss is the mean over images,
    so the last, smaller batch counts half as much as the others."""
    losses, real = [], train_mod.softmax_cross_entropy

    def spy(logits, labels):
        loss, grad = real(logits, labels)
        losses.append((float(loss), len(labels)))
        return loss, grad

    monkeypatch.setattr(train_mod, "softmax_cross_entropy", spy)
    result = fit(base_config(tiny_archive, tmp_path / "run", epochs=1, batch_size=20, backend=backend_name,
                             device="cpu"))
    train = losses[:3]
    assert [n for _, n in train] == [20, 20, 10]
    assert result.history[0]["loss"] == pytest.approx(sum(loss * n for loss, n in train) / 50, rel=1e-6)


def test_a_nan_loss_on_the_cpu_stops_at_the_next_read(tiny_archive, tmp_path, monkeypatch):
    """On the CPU the loss is read every 50 steps, the first included (it costs nothing
    there), so a NaN in step 1 stops training then, not at the end of the epoch."""
    steps, real = [], train_mod.softmax_cross_entropy

    def nan(logits, labels):
        loss, grad = real(logits, labels)
        steps.append(1)
        return loss * float("nan"), grad

    monkeypatch.setattr(train_mod, "softmax_cross_entropy", nan)
    with pytest.raises(TrainingError):
        fit(base_config(tiny_archive, tmp_path / "run", epochs=1, batch_size=10))
    assert len(steps) == 1


@pytest.mark.parametrize("model", ["simple", "resnet"])
def test_replayed_steps_train_exactly_like_eager_ones(model, archive, tmp_path, monkeypatch):
    """cnn.replay on the CPU, with tests/recording.py standing in for CUDA graphs (replays
    repeat the logged operators on the logged tensors, no Python): batches copied into the
    recorded inputs, the smaller last batch run eagerly, a new recording each epoch (the
    learning rate changes), nothing the step does lost in a replay. (On CUDA the next test
    does the same with real CUDA graphs.)"""
    cfg = base_config(archive, tmp_path / "eager", model=model, backend="torch", device="cpu",
                      batch_size=64)
    eager, none = _fit_counting_recordings(cfg, monkeypatch)
    assert none == 0  # the CPU cannot record: every step ran eagerly
    replayed, recordings = _fit_counting_recordings(
        replace(cfg, out=str(tmp_path / "replayed")), monkeypatch, record=recording.record)
    assert recordings == 2  # 200 images: per epoch, 64 eager, 64 recorded, 64 replayed, 8 eager
    assert int(replayed.optimizer_state["steps"]) == 8
    _assert_same_run(eager, replayed)


def test_a_step_that_fails_to_record_runs_eagerly_with_a_warning(archive, tmp_path, monkeypatch):
    """A failed recording launches nothing: that batch and the rest step eagerly, no step
    lost or doubled, and the warning says why. (The failure comes at the end of the capture,
    after all of the step's Python ran, as when CUDA refuses to close a capture.)"""
    def failing(self, fn):
        recording.record(self, fn)
        raise RuntimeError("operation not permitted when stream is capturing")

    cfg = base_config(archive, tmp_path / "eager", backend="torch", device="cpu", batch_size=64)
    eager, _ = _fit_counting_recordings(cfg, monkeypatch)
    with pytest.warns(RuntimeWarning, match="runs eagerly .* not permitted when stream is capturing"):
        failed, attempts = _fit_counting_recordings(
            replace(cfg, out=str(tmp_path / "failed")), monkeypatch, record=failing)
    assert attempts == 2  # once per epoch: each epoch's runner tries again
    _assert_same_run(eager, failed)


def test_adam_steps_are_never_replayed(archive, tmp_path, monkeypatch):
    """Adam's bias correction changes every step on the host: a replay would freeze it."""
    cfg = base_config(archive, tmp_path, backend="torch", device="cpu", batch_size=64,
                      optimizer="adam", lr=1e-3, epochs=1)
    _, recordings = _fit_counting_recordings(cfg, monkeypatch, record=recording.record)
    assert recordings == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch here")
@pytest.mark.filterwarnings("error:recording the training step")  # no silent eager fallback
@pytest.mark.parametrize("model", ["simple", "resnet"])
def test_cuda_graph_replays_train_exactly_like_eager_steps(model, archive, tmp_path, monkeypatch):
    """Real CUDA graphs: the same kernels, so bit-identical weights, optimizer state and
    history (SimpleCNN's dropout included: its generator advances as in eager steps)."""
    from cnn.backend import TorchBackend

    cfg = base_config(archive, tmp_path / "graph", model=model, backend="torch", device="cuda",
                      batch_size=64)
    replayed, recordings = _fit_counting_recordings(cfg, monkeypatch)
    assert recordings == 2
    monkeypatch.setattr(TorchBackend, "can_record", False)
    eager, none = _fit_counting_recordings(replace(cfg, out=str(tmp_path / "eager")), monkeypatch)
    assert none == 0
    _assert_same_run(eager, replayed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch here")
def test_a_cuda_step_that_cannot_be_recorded_runs_eagerly_on_the_stream_it_had():
    """A step that reads a value back to the host cannot be captured in a CUDA graph: the
    warning says so, every step runs eagerly once, and later kernels stay on the stream that
    was current (a failed capture must not leave its capture stream behind), and draw from
    the engine's generator as if no capture had been tried (a failed capture can leave the
    generator it registered unable to draw, pytorch/pytorch#171263)."""
    from cnn.backend import get_backend
    from cnn.replay import StepReplay

    B = get_backend("torch", "cuda")
    total = B.zeros((1,), "float32")
    draws = []

    def step(x, y):
        draws.append(B.uniform((5,)))  # as Dropout draws its mask
        total[...] += B.sum(x)
        B.item(total)  # a host read: refused while a stream is capturing

    run, x = StepReplay(step, B), B.asarray(np.ones(4, np.float32))
    stream, rng_state = torch.cuda.current_stream(), B.rng.get_state()
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        for _ in range(3):
            run(x, x)
    assert torch.cuda.current_stream() == stream
    assert run.replays == 0 and B.item(total) == 12.0  # 3 steps of 4: none lost or doubled
    untouched = torch.Generator(B.device)
    untouched.set_state(rng_state)
    eager = [torch.rand(5, generator=untouched, device=B.device) for _ in range(4)]
    # the draw made while recording is not one: the three steps and the next draw are eager's four
    assert all(torch.equal(a, b) for a, b in zip([draws[0], *draws[2:], B.uniform((5,))], eager))


@pytest.mark.parametrize("change, message", [
    ({"model": "resnet"}, "model 'simple' -> 'resnet'"),
    ({"lr": 0.1}, "lr 0.01 -> 0.1"),
    ({"optimizer": "adam"}, "optimizer 'sgd' -> 'adam'"),
    ({"batch_size": 25, "augment": False}, "augment True -> False; batch_size 50 -> 25"),
])
def test_resume_with_other_settings_is_refused(archive, runs, one_epoch_run, change, message):
    """Resuming continues the run that wrote last.npz, or refuses: SGD momentum loaded into
    Adam, or another learning rate, would make a run that no uninterrupted one equals."""
    _, _, snapshot = one_epoch_run
    out = runs / f"changed_{'_'.join(change)}"
    out.mkdir()
    shutil.copy(snapshot, out / "last.npz")
    with pytest.raises(CheckpointError, match=re.escape(f"other settings ({message})")):
        fit(base_config(archive, out, resume=True, **change))
    assert read_meta(out / "last.npz")["epoch"] == 1  # untouched


def test_resume_on_other_data_is_refused(runs, one_epoch_run, tmp_path):
    """The same settings on other images (the official archive where a mirror was, at the
    same path) would train one run on two data sets."""
    _, _, snapshot = one_epoch_run
    other = write_synthetic_cifar10(tmp_path / "cifar-10-python.tar.gz", n_train=200, n_test=50, seed=3)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(snapshot, out / "last.npz")
    with pytest.raises(CheckpointError, match=re.escape("other settings (the data: its per-channel mean/std")):
        fit(base_config(other, out, resume=True))


def test_resume_may_not_change_epochs_under_the_cosine_schedule(tiny_archive, tmp_path, monkeypatch):
    """Cosine rates depend on the total number of epochs: 2 then 4 is not a 4-epoch run."""
    _patch_training(monkeypatch, [0.5] * 8)
    fit(base_config(tiny_archive, tmp_path / "cosine", epochs=2, schedule="cosine"))
    with pytest.raises(CheckpointError, match=r"other settings \(epochs 2 -> 4: the cosine schedule's learning "
                                              r"rates depend on the number of epochs\)"):
        fit(base_config(tiny_archive, tmp_path / "cosine", epochs=4, schedule="cosine", resume=True))
    fit(base_config(tiny_archive, tmp_path / "step", epochs=2))
    assert len(fit(base_config(tiny_archive, tmp_path / "step", epochs=4, resume=True)).history) == 4


def test_resume_ignores_knobs_without_effect_and_the_device(tiny_archive, tmp_path, monkeypatch):
    """Milestones under the cosine schedule, Adam's betas for SGD, and the spelling of the
    device change nothing a run computes, so they do not block resuming; milestones under
    the step schedule do."""
    _patch_training(monkeypatch, [0.5] * 8)
    fit(base_config(tiny_archive, tmp_path / "cosine", epochs=2, schedule="cosine"))
    resumed = fit(base_config(tiny_archive, tmp_path / "cosine", epochs=2, schedule="cosine", milestones=[7],
                              betas=[0.5, 0.6], device="cpu", resume=True))
    assert len(resumed.history) == 2
    fit(base_config(tiny_archive, tmp_path / "step", epochs=2))
    with pytest.raises(CheckpointError, match=r"other settings \(milestones \[1\] -> \[7\]\)"):
        fit(base_config(tiny_archive, tmp_path / "step", epochs=2, milestones=[7], resume=True))


def test_resume_may_not_ask_for_fewer_epochs_than_are_done(tiny_archive, tmp_path, monkeypatch, capsys):
    """A 1-epoch run cannot continue a checkpoint of epoch 2: it would report 2 epochs."""
    _patch_training(monkeypatch, [0.5] * 4)
    out = tmp_path / "run"
    fit(base_config(tiny_archive, out, epochs=2))
    with pytest.raises(CheckpointError, match=r"other settings \(epochs 2 -> 1, fewer than the 2 already trained\)"):
        fit(base_config(tiny_archive, out, epochs=1, resume=True))
    assert len(fit(base_config(tiny_archive, out, epochs=2, resume=True)).history) == 2


def test_resume_without_a_checkpoint_says_it_starts_from_epoch_1(tiny_archive, tmp_path, monkeypatch, capsys):
    _patch_training(monkeypatch, [0.5])
    fit(base_config(tiny_archive, tmp_path / "typo", epochs=1, resume=True))
    assert f"Nothing to resume: no {tmp_path / 'typo' / 'last.npz'}" in capsys.readouterr().out


def test_best_checkpoint_loads_into_the_torch_twin(archive, full_run):
    result, _ = full_run
    ck = load_checkpoint(result.best_checkpoint)
    twin = torch_twin("simple", ck.model_state).eval()  # strict=True
    ds = load_cifar10(archive)
    x = normalize(ds.test_x[:8], ck.meta["mean"], ck.meta["std"])
    ours = load_model(result.best_checkpoint)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    got = ours(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_load_model_and_predict_reproduce_the_reported_accuracy(archive, full_run, backend):
    result, _ = full_run
    model = load_model(result.best_checkpoint, backend=backend, device="cpu")
    assert not model.training
    meta = read_meta(result.best_checkpoint)
    ds = load_cifar10(archive)
    x = normalize(ds.test_x, meta["mean"], meta["std"])
    preds = predict(model, x, batch_size=16)
    assert preds.dtype == np.int64 and preds.shape == (len(ds.test_y),)
    assert float((preds == ds.test_y).mean()) == pytest.approx(result.best_test_acc, abs=1e-12)


def test_predict_gives_the_model_its_mode_back_and_refuses_raw_pixels():
    model = cnn.simple_cnn().train()
    x = np.zeros((3, 3, 32, 32), np.float32)
    assert predict(model, x).shape == (3,) and model.training and model[15].training  # Dropout too
    assert predict(model.eval(), x[:0]).shape == (0,) and not model.training
    with pytest.raises(ValueError, match=r"got uint8 pixels: cnn.data.normalize\(x, mean, std\) first"):
        predict(model, np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError):  # 16x16 images: too small for SimpleCNN's Linear
        predict(model.train(), np.zeros((2, 3, 16, 16), np.float32))
    assert model.training and all(m.cache is None for m in model.modules() if "cache" in vars(m))


def _nan_loss(monkeypatch):
    real = train_mod.softmax_cross_entropy

    def nan_loss(logits, labels):
        loss, grad = real(logits, labels)
        return loss * float("nan"), grad

    monkeypatch.setattr(train_mod, "softmax_cross_entropy", nan_loss)


def test_diverging_run_raises_and_keeps_the_last_good_checkpoint(archive, runs, one_epoch_run, monkeypatch):
    """Resume the 1-epoch run; epoch 2 diverges (NaN loss)."""
    _, _, snapshot = one_epoch_run
    out = runs / "diverge"
    out.mkdir()
    shutil.copy(snapshot, out / "last.npz")
    before = load_checkpoint(out / "last.npz")
    _nan_loss(monkeypatch)
    with pytest.raises(TrainingError, match=re.escape(f"diverged. Lower the learning rate (--lr, or lr in params.yaml), or add a schedule; "
                                                      f"the last good checkpoint ({out / 'last.npz'}) is kept.")):
        fit(base_config(archive, out, epochs=2, resume=True))
    after = load_checkpoint(out / "last.npz")
    assert after.meta["epoch"] == 1
    assert_same_state(before.model_state, after.model_state, "model ")
    assert_same_state(before.optimizer_state, after.optimizer_state, "optimizer ")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_diverging_first_epoch_raises_training_error_and_leaves_no_folder(tiny_archive, tmp_path, monkeypatch):
    """A NaN loss in the very first epoch: TrainingError, and no checkpoint is written, nor
    the output folder that would have held it."""
    _nan_loss(monkeypatch)
    out = tmp_path / "runs" / "diverged"
    with pytest.raises(TrainingError, match="became nan in epoch 1: .* no epoch finished, so there is no checkpoint"):
        fit(base_config(tiny_archive, out, epochs=1, augment=False))
    assert not (tmp_path / "runs").exists()


def test_weights_sent_to_inf_by_an_epochs_last_steps_are_never_checkpointed(tiny_archive, tmp_path, monkeypatch):
    """Each loss is computed before its step, so an epoch's losses can all be finite while
    its last step overflows the weights: that epoch once became the 'good' last.npz."""
    real = train_mod._train_epoch

    def overflowing_in_epoch_2(model, optimizer, loader, B, epoch, config, last_path):
        result = real(model, optimizer, loader, B, epoch, config, last_path)
        if epoch == 1:
            model[0].weight.data[0, 0, 0, 0] = float("inf")
        return result

    monkeypatch.setattr(train_mod, "_train_epoch", overflowing_in_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=re.escape("the weights became inf or NaN in epoch 2: the run diverged. "
                                                      f"Lower the learning rate (--lr, or lr in params.yaml), or add a schedule; the last good checkpoint "
                                                      f"({out / 'last.npz'}) is kept.")):
        fit(base_config(tiny_archive, out, epochs=3, augment=False))
    for name in ("last.npz", "best.npz"):
        ck = load_checkpoint(out / name)
        assert ck.meta["epoch"] == 1 and all(np.isfinite(v).all() for v in ck.model_state.values())


def test_a_run_that_really_diverges_says_so_once_without_numpy_warnings(tiny_archive, tmp_path, monkeypatch):
    """lr 1e3: the weights overflow to inf, then NaN. NumPy's overflow warnings (from the
    worker threads of map_chunks too) would only precede the clear error, so none is shown."""
    numpy_backend = cnn.get_backend("numpy")
    if numpy_backend._pool is None:  # a one-core machine: give map_chunks its worker threads
        with_workers(monkeypatch, numpy_backend, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(TrainingError, match="in epoch 1: the run diverged"):
            fit(base_config(tiny_archive, tmp_path / "run", epochs=1, lr=1e3, batch_size=10, augment=False))


# ---------------------------------------------------------------------------------------
# Early stopping (training and evaluation patched out: only the bookkeeping runs)
# ---------------------------------------------------------------------------------------

def _patch_training(monkeypatch, accuracies):
    calls = iter(accuracies)
    monkeypatch.setattr(train_mod, "_train_epoch", lambda *a, **k: (1.0, 0.5))
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: next(calls))


@pytest.mark.parametrize("accs,patience,stopped_after,best", [
    ([0.5] * 10, 2, 3, (0.5, 1)),                        # fixed accuracy
    ([0.3, 0.6, 0.6, 0.55, 0.7, 0.1], 2, 4, (0.6, 2)),   # equal is not better
    ([0.3, 0.4, 0.35, 0.5, 0.45, 0.4, 0.3], 3, 7, (0.5, 4)),
])
def test_early_stopping_after_patience_epochs_without_improvement(
        tiny_archive, tmp_path, monkeypatch, capsys, accs, patience, stopped_after, best):
    _patch_training(monkeypatch, accs)
    result = fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=patience))
    assert result.stopped_early
    assert len(result.history) == stopped_after
    assert [h["test_acc"] for h in result.history] == accs[:stopped_after]
    assert (result.best_test_acc, result.best_epoch) == best
    assert read_meta(tmp_path / "last.npz")["bad_epochs"] == patience
    assert read_meta(tmp_path / "best.npz")["epoch"] == best[1]
    assert "Early stop" in capsys.readouterr().out


def test_messages_count_epochs_in_the_singular_for_one_only():
    from cnn.checks import counted

    assert [counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tiny_archive, tmp_path, monkeypatch, capsys):
    _patch_training(monkeypatch, [0.5] * 10)
    fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=2))  # stops after epoch 3
    again = fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=2, resume=True))
    assert again.stopped_early and len(again.history) == 3
    assert "had stopped early" in capsys.readouterr().out
    more_patience = fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=4, resume=True))
    assert more_patience.stopped_early and len(more_patience.history) == 5


def test_early_stop_messages_count_the_epochs_without_improvement(tiny_archive, tmp_path, monkeypatch, capsys):
    _patch_training(monkeypatch, [0.5] * 10)
    fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=1))  # stops after epoch 2
    assert "Early stop: no better test accuracy for 1 epoch (best 0.5000 at epoch 1)" in capsys.readouterr().out
    fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=1, resume=True))
    assert "had stopped early (no better test accuracy for 1 epoch): nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("first_patience", [0, 5], ids=["off", "not_spent"])
def test_a_run_resumed_with_a_patience_it_has_spent_says_so(first_patience, tiny_archive, tmp_path, monkeypatch,
                                                            capsys):
    """Three epochs without early stopping (or with a patience of 5), then resumed with
    early_stop 1: it did not stop early, but it has had no better test accuracy for as long
    as the new patience allows."""
    _patch_training(monkeypatch, [0.5] * 10)
    fit(base_config(tiny_archive, tmp_path, epochs=3, early_stop=first_patience))
    again = fit(base_config(tiny_archive, tmp_path, epochs=10, early_stop=1, resume=True))
    assert again.stopped_early and len(again.history) == 3
    assert (f"{tmp_path / 'last.npz'} has already spent the patience of early_stop 1 (no better test accuracy "
            "for 2 epochs): nothing to train") in capsys.readouterr().out


def test_no_early_stop_when_off(tiny_archive, tmp_path, monkeypatch):
    _patch_training(monkeypatch, [0.5] * 4)
    result = fit(base_config(tiny_archive, tmp_path, epochs=4, early_stop=0))
    assert not result.stopped_early and len(result.history) == 4


# ---------------------------------------------------------------------------------------
# Checkpoint atomicity
# ---------------------------------------------------------------------------------------

def _state(value):
    return {"0.weight": np.full((2, 3), value, np.float32), "1.num_batches_tracked": np.array(3)}


@pytest.mark.parametrize("fail_in", ["savez", "replace"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "last.npz"
    save_checkpoint(path, _state(1.0), {"epoch": 1}, {"steps": np.array(4)})
    original = path.read_bytes()

    if fail_in == "savez":
        def broken(f, **arrays):  # writes part of the file, then the disk "fills up"
            f.write(b"PK\x03\x04 half a zip file")
            raise OSError("No space left on device")

        monkeypatch.setattr(np, "savez", broken)
    else:
        def broken(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, _state(2.0), {"epoch": 2}, {"steps": np.array(8)})
    monkeypatch.undo()

    assert path.read_bytes() == original
    ck = load_checkpoint(path)
    assert ck.meta["epoch"] == 1 and int(ck.optimizer_state["steps"]) == 4
    np.testing.assert_array_equal(ck.model_state["0.weight"], _state(1.0)["0.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.npz"]  # no temp file left


def test_a_first_save_that_fails_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Interrupted while writing a run's first checkpoint: neither the temporary file nor
    the folders made for it stay (a folder that holds something else does)."""
    def interrupted(f, **arrays):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "runs" / "new" / "last.npz", _state(1.0), {"epoch": 1})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "runs" / "new" / "last.npz", _state(1.0), {"epoch": 1})
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["notes.txt"]


def test_an_atomic_write_to_a_link_replaces_the_link_not_the_file_it_points_to(tmp_path):
    """With DVC's symlink cache, an output is a link into the cache, which must not change."""
    cached, link = tmp_path / "cache_entry", tmp_path / "settings.json"
    cached.write_text("old")
    link.symlink_to(cached)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert not link.is_symlink() and link.read_text() == "new" and cached.read_text() == "old"


@pytest.mark.parametrize("stream", ["/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/1"])
def test_an_atomic_write_to_stdout_never_renames_onto_it(stream, monkeypatch):
    """Redirected to a file, /dev/stdout resolves to a regular file; a temporary file renamed
    onto it would replace the device link itself (as root, for every later process) and
    print nothing. Nothing is written here: the temporary file and the rename are refused."""
    def refused(*args, **kwargs):
        raise AssertionError("atomic_path made a temporary file or renamed one onto a stream")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(os, "replace", refused)
    with atomic_path(stream) as path:
        assert path == Path(stream)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_an_atomic_write_to_a_stream_writes_into_it(tmp_path):
    """``--out /dev/stdout``: renaming a temporary file onto it would replace the device
    (or pipe) with a file, and print nothing."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so the writer need not wait

    def write():
        with atomic_path(fifo) as path:
            path.write_text("settings")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(timeout=10)
    assert not writer.is_alive(), "the write into the pipe did not finish"
    try:
        assert os.read(reader, 100) == b"settings" and fifo.is_fifo()
    finally:
        os.close(reader)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_an_npz_without_meta_is_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "weights.npz", **{"0.weight": np.ones((2, 3), np.float32)})
    with pytest.raises(CheckpointError, match="weights.npz has no 'meta' entry"):
        load_checkpoint(tmp_path / "weights.npz")


def test_checkpoint_data_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    path, synced = tmp_path / "last.npz", []
    real = os.fsync

    def spy(fd):
        synced.append(path.exists())  # the new file must not be in place yet
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(path, {"w": np.ones(3)}, {"epoch": 1})
    assert synced == [False] and path.exists()


def test_checkpoint_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "c.npz", _state(3.0), {"epoch": 5, "history": [{"a": 1}]},
                           {"steps": np.array(2), "0.momentum_buffer": np.ones(3)})
    ck = load_checkpoint(path)
    assert_same_state(ck.model_state, _state(3.0))
    assert ck.meta["epoch"] == 5 and ck.meta["history"] == [{"a": 1}]
    assert set(ck.optimizer_state) == {"steps", "0.momentum_buffer"}


def test_unreadable_checkpoint_raises_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="bad.npz is not a checkpoint: not a complete .npz archive"):
        load_checkpoint(bad)
    good = save_checkpoint(tmp_path / "good.npz", _state(1.0), {"epoch": 1}).read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.npz is not a checkpoint: not a complete"):
        load_checkpoint(truncated)
    corrupt = tmp_path / "corrupt.npz"  # a flipped byte in the first array's data
    at = good.index(np.full((2, 3), 1.0, np.float32).tobytes())
    corrupt.write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:])
    with pytest.raises(CheckpointError, match="corrupt.npz is truncated or corrupt"):
        load_checkpoint(corrupt)
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(CheckpointError, match="folder.npz is a folder, not a checkpoint file: pass the .npz file"):
        load_checkpoint(tmp_path / "folder.npz")
    bad_meta = tmp_path / "bad_meta.npz"
    np.savez(bad_meta, meta=np.array("{not json"), **_state(1.0))
    with pytest.raises(CheckpointError, match="bad_meta.npz: its 'meta' entry is not valid JSON"):
        load_checkpoint(bad_meta)
    newer = save_checkpoint(tmp_path / "newer.npz", _state(1.0), {"format_version": 99})
    with pytest.raises(CheckpointError, match="newer.npz is in checkpoint format 99, newer than this code reads"):
        load_checkpoint(newer)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.npz")


def test_checkpoints_that_do_not_fit_raise_clear_errors(archive, runs, full_run):
    result, _ = full_run
    out = runs / "best_as_last"
    out.mkdir()
    shutil.copy(result.best_checkpoint, out / "last.npz")  # model only: no optimizer state
    with pytest.raises(CheckpointError, match="cannot resume from .*no 'steps' entry"):
        fit(base_config(archive, out, resume=True))
    ck = load_checkpoint(result.best_checkpoint)
    del ck.model_state["0.weight"]
    partial = save_checkpoint(out / "partial.npz", ck.model_state, ck.meta)
    with pytest.raises(CheckpointError, match=r"does not hold a model this engine builds .*missing keys \['0.weight'\]"):
        load_model(partial)


# ---------------------------------------------------------------------------------------
# Settings checks (cnn.config): each knob's bounds, and the checks between knobs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {"epochs": True}, {"batch_size": True}, {"augment": 1}, {"nesterov": 0},
    {"lr": math.inf}, {"weight_decay": math.inf}, {"momentum": 1.0}, {"milestones": [30, 30]},
], ids=str)
def test_settings_that_are_refused(settings):
    (key,) = settings
    assert [p for p in problems(settings) if p.startswith(f"'{key}' ")], settings


@pytest.mark.parametrize("settings", [
    {"gamma": 1.0},  # (0, 1]: no decay is allowed
    {"optimizer": "adam", "nesterov": True, "momentum": 0},  # SGD knobs mean nothing to Adam
], ids=str)
def test_settings_that_are_accepted(settings):
    assert problems(settings) == []


def test_resume_refuses_data_whose_mean_or_std_alone_differs():
    meta = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    assert data_conflicts(meta, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == []
    assert data_conflicts(meta, [0.1, 0.2, 0.9], [0.4, 0.5, 0.6])
    assert data_conflicts(meta, [0.1, 0.2, 0.3], [0.4, 0.5, 0.9])


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def _config_of(argv, monkeypatch):
    seen = []

    def capture(config):
        seen.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "fit", capture)
    assert train_mod.main(argv) == 130
    return asdict(seen[0])


def test_every_cli_flag_reaches_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = _config_of(["--model", "resnet", "--epochs", "3", "--augment", "--schedule", "step",
                      "--milestones", "1", "2", "--gamma", "0.5", "--early-stop", "2", "--optimizer", "adam",
                      "--lr", "0.1", "--momentum", "0.8", "--betas", "0.8", "0.9", "--nesterov", "--weight-decay", "0.001",
                      "--batch-size", "32", "--seed", "7", "--backend", "torch", "--device", "cpu",
                      "--data", "d.tar.gz", "--resume", "--no-progress"], monkeypatch)
    assert got == dict(model="resnet", epochs=3, augment=True, schedule="step", milestones=[1, 2], gamma=0.5,
                       early_stop=2, optimizer="adam", lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.001,
                       betas=[0.8, 0.9], batch_size=32, seed=7, backend="torch", device="cpu", data="d.tar.gz",
                       out="checkpoints/resnet", resume=True, progress=False)
    plain = _config_of([], monkeypatch)
    assert plain == {**asdict(train_mod.TrainConfig()), "out": "checkpoints/simple"}


def test_cli_prints_epoch_lines_and_returns_0(tiny_archive, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["--model", "simple", "--epochs", "1", "--batch-size", "25", "--data",
                 str(tiny_archive), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = EPOCH_LINE.findall(captured.out)
    assert lines == [("1", "1")], captured.out
    assert "LR: 0.010000" in captured.out
    assert "Best test accuracy" in captured.out
    assert (out / "best.npz").exists() and (out / "last.npz").exists()


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "'epochs' must be a positive integer; got 0"),
    (["--batch-size", "-3"], "'batch_size' must be a positive integer; got -3"),
    (["--lr", "0"], "'lr' must be a positive number; got 0.0"),
    (["--lr", "nan"], "'lr' must be a positive number; got nan"),
    (["--early-stop", "-1"], "'early_stop' must be an integer >= 0; got -1"),
    (["--epochs", "0", "--momentum", "2"], "'epochs' must be a positive integer; got 0; "
                                           "'momentum' must be a number in [0, 1); got 2.0"),
    (["--backend", "numpy", "--device", "cuda"], "'device' must be auto or cpu with backend numpy"),
    (["--backend", "cupy", "--device", "cuda:1"], "'device' must be auto or cuda with backend cupy"),
    (["--device", "foo"], "'device' must be one of auto, cpu, cuda, mps (or cuda:N); got 'foo'\n"),
])
def test_cli_bad_argument_returns_2_with_a_clear_message(args, message, tiny_archive, tmp_path, capsys):
    code = main([*args, "--data", str(tiny_archive), "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "x" / "last.npz").exists()


def test_cli_out_that_is_a_file_returns_2(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    code = main(["--epochs", "1", "--data", str(tmp_path / "nowhere.tar.gz"),
                 "--out", str(tmp_path / "taken"), "--no-progress"])
    assert code == 2 and "taken is a file: choose another --out" in capsys.readouterr().err


def test_cli_out_that_is_a_dangling_link_returns_2_before_training(tiny_archive, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "_train_epoch", lambda *a: pytest.fail("trained before checking --out"))
    (tmp_path / "run").symlink_to(tmp_path / "scratch" / "run")
    code = main(["--epochs", "1", "--data", str(tiny_archive), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert f"run is a link to {tmp_path / 'scratch' / 'run'}, which does not exist: choose another --out" \
        in capsys.readouterr().err


def test_cli_out_under_a_dangling_link_returns_2(tiny_archive, tmp_path, capsys):
    (tmp_path / "scratch").symlink_to(tmp_path / "gone")
    code = main(["--epochs", "1", "--data", str(tiny_archive), "--out", str(tmp_path / "scratch" / "run"),
                 "--no-progress"])
    assert code == 2 and f"({tmp_path / 'scratch'} is a link to {tmp_path / 'gone'}, which does not exist)" \
        in capsys.readouterr().err


def test_cli_out_that_cannot_be_made_returns_2(tiny_archive, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    code = main(["--epochs", "1", "--data", str(tiny_archive), "--out", str(tmp_path / "taken" / "run"),
                 "--no-progress"])
    assert code == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys: a folder no one can write to, root included")
def test_cli_out_that_cannot_be_written_returns_2_before_training(tiny_archive, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "_train_epoch", lambda *a: pytest.fail("trained before checking --out"))
    code = main(["--epochs", "1", "--data", str(tiny_archive), "--out", "/sys", "--no-progress"])
    assert code == 2
    assert "cannot write to the output folder /sys (Permission denied): choose another --out" \
        in capsys.readouterr().err


def test_cli_interrupted_returns_130_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    """Only a last.npz of this run's settings is one that --resume continues."""
    written_by = {}

    def interrupted(config):
        if config.out in written_by:  # an epoch had finished, with these settings
            save_checkpoint(Path(config.out) / "last.npz", {},
                            {"config": asdict(replace(config, **written_by[config.out])), "epoch": 1})
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "fit", interrupted)
    out, last = str(tmp_path / "o"), tmp_path / "o" / "last.npz"
    assert main(["--out", out, "--no-progress"]) == 130
    assert capsys.readouterr().err == "interrupted; no epoch had finished, so there is nothing to resume\n"
    written_by[out] = {}
    assert main(["--out", out, "--no-progress"]) == 130
    assert capsys.readouterr().err == f"interrupted; --resume continues from {last}\n"
    written_by[out] = {"model": "resnet"}
    assert main(["--out", out, "--no-progress"]) == 130
    assert capsys.readouterr().err == (f"interrupted before the first epoch ended; {last} is another "
                                       "run's (other settings), which --resume would refuse\n")


def test_cli_interrupted_on_other_images_says_that_resume_would_refuse(tmp_path, capsys, monkeypatch):
    """The same settings, but last.npz was trained on other data (their mean/std differ)."""
    out = tmp_path / "o"

    def interrupted(config):
        save_checkpoint(out / "last.npz", {}, {"config": asdict(config), "epoch": 1,
                                                "mean": [0.5] * 3, "std": [0.25] * 3})
        err = KeyboardInterrupt()
        err.data_stats = ([0.4] * 3, [0.25] * 3)  # as fit notes them on the way out
        raise err

    monkeypatch.setattr(train_mod, "fit", interrupted)
    assert main(["--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err == (f"interrupted before the first epoch ended; {out / 'last.npz'} is "
                                       "another run's (other images), which --resume would refuse\n")


def test_fit_notes_its_data_on_an_interruption(tiny_archive, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        fit(base_config(tiny_archive, tmp_path / "run", epochs=1))
    mean, std = info.value.data_stats
    assert len(mean) == len(std) == 3 and all(0 < s for s in std)


@pytest.mark.slow
def test_cli_sigterm_is_an_interruption_that_leaves_no_temporary_file(tiny_archive, tmp_path):
    """`timeout`, a batch scheduler or a closing terminal sends SIGTERM, not SIGINT."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cnn.train", "--epochs", "100000", "--batch-size", "10",
                             "--data", str(tiny_archive), "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"interrupted; --resume continues from {out / 'last.npz'}" in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost exception
def test_a_stop_signal_whose_exception_was_lost_still_stops_training(tiny_archive, tmp_path, monkeypatch):
    """A signal that lands while a __del__ runs (SQLAlchemy's weakref callbacks, under
    MLflow) has its exception printed as "Exception ignored" and dropped; the stop it asked
    for still comes, at the next batch."""
    steps, real = [], train_mod.softmax_cross_entropy

    class LosesTheStop:
        def __del__(self):
            train_mod.request_stop(KeyboardInterrupt())

    def step(logits, labels):
        steps.append(1)
        if len(steps) == 2:
            LosesTheStop()  # dropped at once: Python prints the exception and goes on
        return real(logits, labels)

    monkeypatch.setattr(train_mod, "softmax_cross_entropy", step)
    with pytest.raises(KeyboardInterrupt):
        fit(base_config(tiny_archive, tmp_path / "run", epochs=1, batch_size=10))
    assert len(steps) == 2  # not one batch more
    assert not train_mod._pending_stop  # raised once


def test_a_stop_request_raises_at_once_and_is_kept_for_the_next_batch(monkeypatch):
    """Raised in the signal handler: a signal during evaluation or a checkpoint write stops
    there, not only at the next training batch."""
    monkeypatch.setattr(train_mod, "_pending_stop", [])
    stop = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info:
        train_mod.request_stop(stop)
    assert info.value is stop and train_mod._pending_stop == [stop]


def test_a_stop_left_over_from_an_earlier_run_does_not_stop_the_next(tiny_archive, tmp_path, monkeypatch):
    """A stop that was raised by the handler and never reached a batch (it landed during the
    last epoch's evaluation, say) must not end the next fit() in the same process."""
    class LeftOver(Exception):
        pass

    monkeypatch.setattr(train_mod, "_pending_stop", [LeftOver()])
    result = fit(base_config(tiny_archive, tmp_path / "run", epochs=1, batch_size=10))
    assert len(result.history) == 1 and not train_mod._pending_stop


def test_tuples_are_taken_for_the_list_settings_and_saved_as_lists():
    """betas=(0.9, 0.999) as torch.optim writes it; saved (JSON) and read back, the settings
    must equal those a resumed run compares them with."""
    import json

    config = TrainConfig(optimizer="adam", betas=(0.5, 0.6), schedule="step", milestones=(2, 3))
    config.validate()
    assert config == TrainConfig(optimizer="adam", betas=[0.5, 0.6], schedule="step", milestones=[2, 3])
    assert json.loads(json.dumps(asdict(config))) == asdict(config)


def test_the_parser_without_the_engine_flags_gives_the_default_config():
    """benchmarks/native_reference.py's parser has no --backend, --out, --resume nor
    --no-progress: those settings are TrainConfig's defaults, not other values."""
    parser = train_mod.build_parser(engine=False)
    for flag in ("--backend", "--out", "--resume", "--no-progress"):
        assert flag not in parser.format_help()
    assert train_mod.config_from_args(parser.parse_args([])) == TrainConfig()


def test_cli_notes_flags_without_effect(tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "fit", interrupted)
    main(["--schedule", "cosine", "--milestones", "1", "2", "--betas", "0.5", "0.6", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "note: --betas has no effect with --schedule cosine --optimizer sgd" in err
    assert "note: --milestones has no effect" in err and "--gamma" not in err  # left at its default


@pytest.mark.parametrize("flags, noted", [
    (["--schedule", "step", "--epochs", "5"], True),  # the default milestones, 30 and 40
    (["--schedule", "step", "--epochs", "30"], True),  # the rate would change for epoch 31
    (["--schedule", "step", "--epochs", "31"], False),
    (["--schedule", "step", "--epochs", "5", "--milestones", "3", "9"], False),
    (["--schedule", "cosine", "--epochs", "5"], False),
])
def test_cli_notes_a_step_schedule_that_never_steps(flags, noted, tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "fit", interrupted)
    main(flags + ["--out", str(tmp_path)])
    note = "is at or past the last epoch" in capsys.readouterr().err
    assert note == noted


def test_cli_reports_a_bad_value_without_a_note_that_it_has_no_effect(tmp_path, capsys):
    """A gamma of 0 is refused under any schedule; a note that it does nothing beside the
    error would contradict it."""
    assert main(["--gamma", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: invalid training settings: 'gamma' must be a number in (0, 1]; got 0.0\n"


def test_cli_missing_data_returns_2(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    code = main(["--epochs", "1", "--data", str(missing), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "nowhere" in err


def test_cli_unknown_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", "vgg"])
    assert info.value.code == 2
    assert "invalid choice: 'vgg'" in capsys.readouterr().err


def test_an_empty_path_is_refused_rather_than_taken_as_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--out", "", "--data", " "]) == 2
    assert capsys.readouterr().err == ("error: invalid training settings: 'data' must name a path; got ' '; "
                                       "'out' must name a path; got ''\n")
    assert list(tmp_path.iterdir()) == []
