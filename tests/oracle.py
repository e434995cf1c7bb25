"""Helpers for checking the engine against PyTorch autograd (the oracle).

The oracle always runs on the CPU in float64: our float64 results must match it tightly,
our float32 results loosely (tolerances below, scaled to the magnitude of the values).

The fixtures that parametrise tests over backends/devices and dtypes live in conftest.py
and are built from ``BACKEND_PARAMS`` / ``DTYPE_PARAMS`` here.

Every oracle computation runs under ``torch.enable_grad()``, whatever grad mode the
caller left on.
"""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cnn.backend import backend_of

# -- tolerances -------------------------------------------------------------------------

# dtype -> (rtol, atol); atol is multiplied by max(1, largest |expected| value).
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-4, 1e-5),
}

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# -- backends / devices -------------------------------------------------------------------

def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def _cupy_ok() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # pragma: no cover - depends on the machine
        return False


# (backend name, device, reason to skip or None). Add rows to run on more devices.
DEVICE_CASES = [
    ("numpy", "cpu", None),
    ("torch", "cpu", None),
    ("torch", "cuda", None if _cuda_ok() else "no CUDA GPU visible to PyTorch here"),
    ("cupy", "cuda", None if _cupy_ok() else "CuPy with a CUDA GPU is not available here"),
]


def backend_params(names=None):
    """pytest params over DEVICE_CASES (optionally only some backend names)."""
    params = []
    for name, device, reason in DEVICE_CASES:
        if names is not None and name not in names:
            continue
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


BACKEND_PARAMS = backend_params()
DTYPE_PARAMS = [pytest.param("float64", id="f64"), pytest.param("float32", id="f32")]


# -- conversion and comparison --------------------------------------------------------------

def to_numpy(a) -> np.ndarray:
    """Any engine array (numpy, torch on any device, cupy) or torch tensor -> numpy."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np.asarray(a)
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return backend_of(a).to_numpy(a)


def channels_last(B, x):
    """The same logical (N, C, H, W) array stored channels-last in memory (a transposed view)."""
    return B.transpose(B.contiguous(B.transpose(x, (0, 2, 3, 1))), (0, 3, 1, 2))


def assert_close(actual, expected, dtype: str, what: str = "", rtol=None, atol=None):
    """Compare an engine array with an expected array (numpy / torch).

    Checks the shape, that ``actual`` has dtype ``dtype``, that it is finite, and the values
    within the dtype's tolerance: rtol, plus atol scaled by max(1, largest |expected|).
    """
    a = to_numpy(actual)
    e = to_numpy(expected).astype(np.float64)
    assert tuple(a.shape) == tuple(e.shape), f"{what}: shape {a.shape} != expected {e.shape}"
    assert str(a.dtype) == dtype, f"{what}: dtype {a.dtype}, expected {dtype}"
    r, t = TOLERANCES[dtype]
    rtol = r if rtol is None else rtol
    atol = t if atol is None else atol
    scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    np.testing.assert_allclose(a.astype(np.float64), e, rtol=rtol, atol=atol * scale,
                               err_msg=what)


# -- running a layer on our engine and in torch ---------------------------------------------

@dataclass
class LayerRun:
    out: object            # forward output (engine array or torch tensor)
    grad_in: object        # input gradient (None when not computed)
    grads: dict            # parameter name -> gradient


def run_ours(layer, x: np.ndarray, grad_out: np.ndarray | None, B, dtype: str,
             train: bool = True, layout: str = "contiguous", move: bool = True) -> LayerRun:
    """Forward (and backward when ``grad_out`` is given) of one engine module.

    ``x`` and ``grad_out`` are host arrays, moved to backend ``B`` in ``dtype``;
    ``layout='channels_last'`` feeds them as channels-last views.
    """
    if move:
        layer.to(B, dtype=dtype)
    layer.train(train)
    xb = B.asarray(np.ascontiguousarray(x), dtype=dtype)
    if layout == "channels_last":
        xb = channels_last(B, xb)
    out = layer.forward(xb)
    grad_in, grads = None, {}
    if grad_out is not None:
        gb = B.asarray(np.ascontiguousarray(grad_out), dtype=dtype)
        if layout == "channels_last" and gb.ndim == 4:
            gb = channels_last(B, gb)
        grad_in = layer.backward(gb)
        grads = {name: p.grad for name, p in layer.named_parameters()}
    return LayerRun(out, grad_in, grads)


def torch_state(ours) -> dict:
    """Our module's state_dict as torch tensors."""
    return {k: torch.from_numpy(np.asarray(v)) for k, v in ours.state_dict().items()}


def load_into_torch(ours, theirs: torch.nn.Module, dtype: str = "float64") -> torch.nn.Module:
    """Copy our module's state into the torch module (strict key match) and cast it."""
    theirs.load_state_dict(torch_state(ours), strict=True)
    return theirs.to(TORCH_DTYPES[dtype])


def run_torch(theirs: torch.nn.Module, x: np.ndarray, grad_out: np.ndarray | None,
              train: bool = True, dtype: str = "float64") -> LayerRun:
    """The oracle: forward/backward of a torch module with autograd, on the CPU."""
    theirs.train(train)
    with torch.enable_grad():
        xt = torch.tensor(x, dtype=TORCH_DTYPES[dtype], requires_grad=True)
        for p in theirs.parameters():
            p.grad = None
        out = theirs(xt)
        grads = {}
        if grad_out is not None:
            out.backward(torch.tensor(grad_out, dtype=TORCH_DTYPES[dtype]))
            grads = {name: p.grad for name, p in theirs.named_parameters()}
    return LayerRun(out.detach(), None if grad_out is None else xt.grad, grads)


def compare_runs(ours: LayerRun, theirs: LayerRun, dtype: str, check_grad_in: bool = True,
                 rtol=None, atol=None) -> None:
    assert_close(ours.out, theirs.out, dtype, "forward output", rtol, atol)
    if check_grad_in:
        assert ours.grad_in is not None, "backward returned no input gradient"
        assert_close(ours.grad_in, theirs.grad_in, dtype, "input gradient", rtol, atol)
    assert set(ours.grads) == set(theirs.grads), \
        f"parameters differ: ours {sorted(ours.grads)}, torch {sorted(theirs.grads)}"
    for name, g in ours.grads.items():
        assert g is not None, f"{name}.grad was not filled by backward"
        assert_close(g, theirs.grads[name], dtype, f"grad of {name}", rtol, atol)


def check_layer(ours, theirs: torch.nn.Module, x: np.ndarray, B, dtype: str, *,
                train: bool = True, grad_out: np.ndarray | None = None, rng=None,
                layout: str = "contiguous", check_grad_in: bool = True,
                rtol=None, atol=None) -> tuple[LayerRun, LayerRun]:
    """Run ``ours`` (engine, backend ``B``, ``dtype``) and ``theirs`` (torch, same weights)
    on ``x`` and compare output, input gradient and every parameter gradient.

    Input, upstream gradient and weights are first rounded to ``dtype`` so that both sides
    see the same numbers; the torch oracle then computes in float64.
    """
    x = np.asarray(x).astype(dtype).astype(np.float64)
    ours.to(B, dtype=dtype)
    load_into_torch(ours, theirs, "float64")
    if grad_out is None:
        theirs.eval()  # eval mode: probing the output shape must not touch BN running stats
        with torch.no_grad():
            shape = tuple(theirs(torch.from_numpy(x)).shape)
        grad_out = (rng or np.random.default_rng(0)).standard_normal(shape)
    grad_out = np.asarray(grad_out).astype(dtype).astype(np.float64)
    ref = run_torch(theirs, x, grad_out, train=train)
    got = run_ours(ours, x, grad_out, B, dtype, train=train, layout=layout, move=False)
    compare_runs(got, ref, dtype, check_grad_in=check_grad_in, rtol=rtol, atol=atol)
    return got, ref


def printed_as_installed_torch(ours) -> str:
    """repr(ours) as the installed PyTorch would print its twin: the engine prints as
    torch 2.13 (the pinned version), whose batch norm shows a bias flag that earlier
    versions (a GPU machine's, say) do not."""
    text = repr(ours)
    if "bias=" not in repr(torch.nn.BatchNorm2d(1)):
        text = text.replace(", bias=True, track_running_stats", ", track_running_stats")
    return text


def with_workers(monkeypatch, B, workers: int) -> None:
    """The NumPy backend ``B`` as it is on a machine with ``workers`` cores (for this test)."""
    monkeypatch.setattr(B, "workers", workers)
    monkeypatch.setattr(B, "_pool", ThreadPoolExecutor(workers) if workers > 1 else None)
