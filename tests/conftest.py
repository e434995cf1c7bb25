"""Shared pytest configuration and fixtures.

Engine tests: the fixtures ``backend`` (every array backend/device present: numpy and torch
on the CPU always, torch/CuPy on CUDA when a GPU is visible, otherwise skipped with the
reason) and ``dtype`` (float64 with tight, float32 with loose tolerances). The helpers that
run a layer on our engine and on the PyTorch autograd oracle and compare them live in
tests/oracle.py; add a device row to ``tests.oracle.DEVICE_CASES`` to extend the matrix.
"""
import numpy as np
import pytest

from cnn.backend import get_backend
from tests.oracle import BACKEND_PARAMS, DTYPE_PARAMS


def pytest_configure(config):
    # Slow tests still run by default; `pytest -m "not slow"` skips them.
    config.addinivalue_line("markers", "slow: end-to-end tests that run DVC, MLflow and training (seconds to minutes)")


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """A ``cnn.backend.Backend``: numpy cpu, torch cpu, torch/cupy cuda when present."""
    name, device = request.param
    return get_backend(name, device)


@pytest.fixture(params=DTYPE_PARAMS)
def dtype(request):
    """'float64' (tight tolerances) or 'float32' (loose); see tests.oracle.TOLERANCES."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
