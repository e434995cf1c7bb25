"""The array-backend seam itself: views, random streams, multi-tensor operations and
device selection, on the NumPy and torch (CPU) backends; CUDA is emulated where a test
needs PyTorch to see one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn.backend import DeviceError, get_backend, resolve_device
from cnn.layers import Conv2d
from tests.oracle import to_numpy, with_workers


def test_as_strided_starts_where_a_view_starts(backend):
    """A view that does not start at its storage's first element (x[1:]) keeps its offset:
    a padding-0 convolution takes its patches from such a view without a copy."""
    a = backend.asarray(np.arange(10.0))[2:]
    assert to_numpy(backend.as_strided(a, (3,), (1,))).tolist() == [2.0, 3.0, 4.0]
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 5)).astype(np.float32)
    channels_last = backend.transpose(backend.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), (0, 3, 1, 2))
    conv = Conv2d(4, 2, 1).to(backend)
    np.testing.assert_allclose(to_numpy(conv(channels_last[1:])), to_numpy(conv(backend.asarray(x[1:]))),
                               rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_uniform_draws_in_the_dtype_asked_for(dtype, backend):
    assert backend.dtype_name(backend.uniform((3,), dtype)) == dtype


# Dropout masks of a committed run come from these draws: another stream would leave every
# result reproducible in kind but not the committed ones (benchmarks/reproduce_epoch.py).
PINNED_DRAWS = {
    "numpy": [0.8467473983764648, 0.023896098136901855, 0.7159242033958435, 0.44690364599227905],
    "torch": [0.5200659036636353, 0.15558010339736938, 0.10120326280593872, 0.008575797080993652],
}


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_the_dropout_stream_of_a_seed_and_epoch_is_pinned(name):
    B = get_backend(name, "cpu")
    B.seed([0, 3])  # seed 0, epoch 3, as cnn.train seeds it
    assert to_numpy(B.uniform((4,))).tolist() == PINNED_DRAWS[name]
    B.seed([0, 4])
    assert to_numpy(B.uniform((4,))).tolist() != PINNED_DRAWS[name]


@pytest.mark.parametrize("op", ["add", "mul_"])
def test_foreach_over_no_arrays_is_no_arrays(op, backend):
    assert list(backend.foreach(op, [], 1.0)) == []


def test_unknown_and_unavailable_devices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="unknown device 'cudax'"):
        resolve_device("torch", "cudax")
    with pytest.raises(DeviceError, match=r"device 'cuda:1' was asked for, but PyTorch sees no CUDA GPU "
                                          r"here: choose device auto or cpu"):
        resolve_device("torch", "cuda:1")
    with pytest.raises(DeviceError, match=r"unknown backend 'cuda:1'.*'cuda:1' is a device"):
        get_backend("cuda:1")
    assert resolve_device("torch", "auto") in ("cpu", "mps")


def test_a_torch_device_names_the_same_device_as_its_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("torch", torch.device("cuda", 1)) == "cuda:1"
    assert resolve_device("numpy", torch.device("cpu")) == "cpu"
    assert get_backend("torch", torch.device("cpu")) is get_backend("torch", "cpu")
    with pytest.raises(DeviceError, match="unknown device 'meta'"):
        resolve_device("torch", torch.device("meta"))
    with pytest.raises(DeviceError, match=r"a device is a name \(auto, cpu, cuda, mps, cuda:N\) or a "
                                          r"torch.device, got int 0"):
        resolve_device("torch", 0)
    with pytest.raises(DeviceError, match=r"got dtype torch.float32"):  # a torch object, but no device
        resolve_device("torch", torch.float32)


def test_auto_picks_cuda_where_pytorch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("torch", "auto") == "cuda"
    assert resolve_device("torch", "cuda:1") == "cuda:1"
    assert resolve_device("numpy", "auto") == "cpu"


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("m,k,n", [(4097, 300, 1), (3000, 700, 64), (2, 2048, 256), (64, 4096, 2048),
                                   (16, 65536, 144), (300, 20, 4000)])
def test_a_product_is_cut_into_blocks_that_do_not_depend_on_the_thread_count(m, k, n, workers, monkeypatch):
    """Backend.matmul: the same blocks, so the same bits, on 1, 2, 3 or 8 threads; BLAS's
    thread count restored after. Contiguous and transposed inputs, given and new ``out``."""
    B = get_backend("numpy")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    threads = [lib.num_threads for lib in (B._blas.lib_controllers if B._blas else ())]
    with_workers(monkeypatch, B, 1)
    expected = [B.matmul(a, b), B.matmul(np.asfortranarray(a), np.asfortranarray(b))]
    np.testing.assert_allclose(expected[0], a.astype(np.float64) @ b, rtol=1e-4, atol=1e-5 * k)
    with_workers(monkeypatch, B, workers)
    out = np.full((m, n), np.nan, np.float32)
    assert B.matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, expected[0])
    np.testing.assert_array_equal(B.matmul(np.asfortranarray(a), np.asfortranarray(b)), expected[1])
    assert [lib.num_threads for lib in (B._blas.lib_controllers if B._blas else ())] == threads


def test_a_product_into_one_of_its_inputs_or_a_wrong_out_is_numpys_business():
    """An ``out`` that is an input, or of the wrong shape: NumPy's checks and copies, not blocks."""
    B = get_backend("numpy")
    a = np.random.default_rng(0).standard_normal((4, 4096)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((4096, 4096)).astype(np.float32)
    expected = a @ b
    np.testing.assert_allclose(B.matmul(a, b, out=a), expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError):
        B.matmul(b, b, out=np.empty((4097, 4096), np.float32))


def test_blas_pinned_by_two_threads_at_once_is_unpinned_after_both():
    """Two threads running products at once: BLAS goes back to its thread count after the
    last one, not to the one it was pinned to when the second started."""
    import threading

    B = get_backend("numpy")
    if B._blas is None:
        pytest.skip("no BLAS thread count to pin here")
    threads = [lib.num_threads for lib in B._blas.lib_controllers]
    a = np.ones((256, 256), np.float32)

    def work():
        for _ in range(300):
            B.matmul(a, a)

    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [lib.num_threads for lib in B._blas.lib_controllers] == threads


def test_the_numpy_backend_takes_as_many_threads_as_blas_was_given():
    """OMP_NUM_THREADS=1 (two runs side by side, a core each) is one thread for the pool too."""
    code = "import cnn; B = cnn.get_backend('numpy'); print(B.workers, B._pool is None, B._blas is None)"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "True", "True"]


def test_a_torch_tensor_that_requires_grad_is_taken_as_data():
    """backend.asarray of a tensor autograd tracks gives the data alone: the layers'
    in-place operations would fail on it, or record the weights into a graph."""
    B = get_backend("torch", "cpu")
    t = torch.ones(2, 3, requires_grad=True)
    a = B.asarray(t)
    assert not a.requires_grad and a.grad_fn is None
    assert not B.asarray(t, dtype="float64").requires_grad


def test_auto_is_no_backend_and_no_device_name(monkeypatch):
    """'auto' names no device (only a choice of one): get_backend('auto') does not suggest
    passing it as a device, and model.to('auto') is refused rather than kept on the CPU."""
    from cnn.backend import names_a_device
    from cnn.models import build_model

    assert not names_a_device("auto") and names_a_device("cpu") and names_a_device("cuda:1")
    with pytest.raises(DeviceError, match=r"unknown backend 'auto': choose one of numpy, torch, cupy$"):
        get_backend("auto")
    with pytest.raises(DeviceError, match=r"unknown backend 'auto'"):
        build_model("simple").to("auto")


@pytest.mark.parametrize("backend_name, device, message", [
    ("numpy", "mps", r"the numpy backend runs on the CPU only, not 'mps'"),
    ("numpy", "cuda", r"the numpy backend runs on the CPU only, not 'cuda'"),
    ("cupy", "mps", r"the cupy backend runs on CUDA only, not 'mps'"),
    ("cupy", "cpu", r"the cupy backend runs on CUDA only, not 'cpu'"),
])
def test_a_backend_refuses_a_device_it_cannot_run_on(backend_name, device, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(backend_name, device)


def test_cupy_runs_on_the_first_visible_gpu_and_says_how_to_pick_another():
    """CuPy computes on its current device (the first visible one): cuda:1 is refused
    rather than silently run on GPU 0. Resolved without CuPy or a GPU: names only."""
    assert resolve_device("cupy", "auto") == resolve_device("cupy", "cuda:0") == "cuda"
    with pytest.raises(DeviceError, match=r"the cupy backend runs on the first visible GPU \(cuda\), not "
                                          r"'cuda:1': make GPU 1 the first with CUDA_VISIBLE_DEVICES=1"):
        resolve_device("cupy", "cuda:1")
    with pytest.raises(DeviceError, match=r"make GPU N the first with CUDA_VISIBLE_DEVICES=N"):
        resolve_device("cupy", "cuda:")


def test_mps_is_picked_by_auto_and_refused_where_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("torch", "auto") == "mps"
    assert resolve_device("torch", "mps") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("torch", "auto") == "cpu"
    with pytest.raises(DeviceError, match=r"device 'mps' was asked for, but PyTorch sees no MPS device here"):
        resolve_device("torch", "mps")


@pytest.mark.parametrize("name", ["simple", "resnet"])
def test_numpy_results_do_not_depend_on_the_thread_count(name, monkeypatch):
    """One thread or several: the same gradients to the last bit, at every batch size (the
    pool's element-wise chunks, and products cut by shape alone), so a NumPy run resumes
    exactly on a machine with another number of cores."""
    import hashlib

    from cnn import build_model, manual_seed
    from cnn.functional import softmax_cross_entropy

    B = get_backend("numpy")
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((bs, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, bs))
               for bs in (1, 2, 3, 4, 16)]

    def gradients():
        manual_seed(0)
        model = build_model(name).train()
        digest = hashlib.sha256()
        for x, y in batches:
            _, g = softmax_cross_entropy(model(x), y)
            model.backward(g)
            digest.update(b"".join(p.grad.tobytes() for p in model.parameters()))
        return digest.hexdigest()

    hashes = {}
    for workers in (1, 2, 3, 8):
        with_workers(monkeypatch, B, workers)
        hashes[workers] = gradients()
    assert len(set(hashes.values())) == 1, hashes
