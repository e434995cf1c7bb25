"""The one array-backend seam.

Every layer asks ``B = backend_of(x)`` for the backend that owns its input (Chainer's
``get_array_module`` idea) and calls array functions through ``B``; layers never import
numpy or torch themselves. Three backends share one interface:

- ``numpy``: the default, on the CPU.
- ``torch``: PyTorch tensors on ``cpu``, ``cuda`` or ``mps`` (``auto`` picks the best one
  present). Only tensor arithmetic is used, never autograd or ``torch.nn``.
- ``cupy``: NumPy semantics on an NVIDIA GPU (optional dependency).

Arrays keep the NumPy/PyTorch logical layout ``(N, C, H, W)``; layers may store them
channels-last in memory (a transposed view), which both libraries handle transparently.
"""
from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float64")


class Backend:
    """NumPy-style backend; ``xp`` is the array module (numpy, or cupy for the subclass)."""

    name = "numpy"

    def __init__(self, xp=np, device: str = "cpu"):
        self.xp = xp
        self.device = device
        self.rng = xp.random.default_rng(0)

    def __repr__(self) -> str:
        return f"{self.name} ({self.device})"

    # -- creation and transfer -------------------------------------------------------
    def asarray(self, a, dtype: str | None = None):
        """Host or backend array -> this backend's array (no copy when already there)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape, dtype: str = "float32"):
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype: str = "float32"):
        return self.xp.empty(shape, dtype=dtype)

    def zeros_like(self, a):
        """Zeros with ``a``'s shape, dtype and memory layout."""
        return self.xp.zeros_like(a)

    def full_like(self, a, value):
        return self.xp.full_like(a, value)

    def arange(self, n: int):
        return self.xp.arange(n)

    def copy(self, a):
        return a.copy()

    def contiguous(self, a):
        return self.xp.ascontiguousarray(a)

    def dtype_name(self, a) -> str:
        return str(a.dtype)

    def astype(self, a, dtype: str):
        return a.astype(dtype, copy=False)

    # -- shape ----------------------------------------------------------------------
    def transpose(self, a, axes):
        return a.transpose(axes)

    def as_strided(self, a, shape, strides):
        """A view of contiguous ``a`` with ``strides`` counted in elements (not bytes)."""
        item = a.itemsize
        return self.xp.lib.stride_tricks.as_strided(a, shape, tuple(s * item for s in strides))

    def is_contiguous(self, a) -> bool:
        return bool(a.flags.c_contiguous)

    # -- math -----------------------------------------------------------------------
    def sum(self, a, axis=None, keepdims=False):
        return a.sum(axis=axis, keepdims=keepdims)

    def mean(self, a, axis=None, keepdims=False):
        return a.mean(axis=axis, keepdims=keepdims)

    def max(self, a, axis=None, keepdims=False):
        return a.max(axis=axis, keepdims=keepdims)

    def column_sums(self, a):
        """a: (M, K) -> (K,). A matrix-vector product: BLAS is several times faster
        (and multithreaded) than numpy's row-by-row reduction."""
        return self.xp.ones(a.shape[0], dtype=a.dtype) @ a

    def column_dots(self, a, b):
        """a, b: (M, K) -> (K,) with out[k] = sum_m a[m, k] * b[m, k], without a temporary."""
        return self.xp.einsum("mk,mk->k", a, b)

    def argmax(self, a, axis):
        return a.argmax(axis=axis)

    def maximum(self, a, b):
        return self.xp.maximum(a, b)

    def where(self, cond, a, b):
        return self.xp.where(cond, a, b)

    def exp(self, a):
        return self.xp.exp(a)

    def log(self, a):
        return self.xp.log(a)

    def sqrt(self, a):
        return self.xp.sqrt(a)

    def isfinite(self, a) -> bool:
        return bool(self.xp.isfinite(a).all())

    def item(self, a) -> float:
        return float(a)

    # -- randomness -----------------------------------------------------------------
    def seed(self, seed) -> None:
        """Reseed this backend's generator (``seed``: int or sequence of ints)."""
        self.rng = self.xp.random.default_rng(seed)

    def uniform(self, shape, dtype: str = "float32"):
        """Uniform [0, 1) samples drawn on the backend's device."""
        return self.rng.random(shape, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU); used only for timing."""


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self, device: str = "cuda"):
        import cupy

        super().__init__(cupy, device)

    def __repr__(self) -> str:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return f"cupy cuda:{cupy.cuda.Device().id} ({props['name'].decode()})"

    def to_numpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def synchronize(self) -> None:
        self.xp.cuda.Stream.null.synchronize()


class TorchBackend(Backend):
    """PyTorch tensors as plain arrays: no autograd, no ``torch.nn``."""

    name = "torch"

    def __init__(self, device: str = "cpu"):
        import torch

        torch.set_grad_enabled(False)  # the engine computes every gradient by hand
        self.torch = torch
        self.xp = torch
        self.device = str(torch.device(device))
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(0)

    def __repr__(self) -> str:
        if self.device.startswith("cuda"):
            return f"torch {self.device} ({self.torch.cuda.get_device_name(self.device)})"
        return f"torch ({self.device})"

    def _dtype(self, dtype):
        return None if dtype is None else getattr(self.torch, str(dtype))

    def asarray(self, a, dtype: str | None = None):
        if isinstance(a, np.ndarray):
            a = self.torch.from_numpy(a)
        return self.torch.as_tensor(a, dtype=self._dtype(dtype), device=self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def zeros(self, shape, dtype: str = "float32"):
        return self.torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)

    def empty(self, shape, dtype: str = "float32"):
        return self.torch.empty(shape, dtype=self._dtype(dtype), device=self.device)

    def zeros_like(self, a):
        return self.torch.zeros_like(a)

    def full_like(self, a, value):
        return self.torch.full_like(a, value)

    def arange(self, n: int):
        return self.torch.arange(n, device=self.device)

    def copy(self, a):
        return a.clone()

    def contiguous(self, a):
        return a.contiguous()

    def dtype_name(self, a) -> str:
        return str(a.dtype).removeprefix("torch.")

    def astype(self, a, dtype: str):
        return a.to(self._dtype(dtype))

    def transpose(self, a, axes):
        return a.permute(axes)

    def as_strided(self, a, shape, strides):
        return a.as_strided(shape, strides)

    def is_contiguous(self, a) -> bool:
        return a.is_contiguous()

    def column_sums(self, a):
        return a.sum(dim=0)

    def column_dots(self, a, b):
        return (a * b).sum(dim=0)

    def sum(self, a, axis=None, keepdims=False):
        return a.sum() if axis is None else a.sum(dim=axis, keepdim=keepdims)

    def mean(self, a, axis=None, keepdims=False):
        return a.mean() if axis is None else a.mean(dim=axis, keepdim=keepdims)

    def max(self, a, axis=None, keepdims=False):
        return a.max() if axis is None else a.amax(dim=axis, keepdim=keepdims)

    def argmax(self, a, axis):
        return a.argmax(dim=axis)

    def maximum(self, a, b):
        if not isinstance(b, self.torch.Tensor):
            return a.clamp_min(b)
        return self.torch.maximum(a, b)

    def isfinite(self, a) -> bool:
        return bool(self.torch.isfinite(a).all())

    def seed(self, seed) -> None:
        # torch.Generator takes one integer; fold a sequence of ints into one with numpy.
        self.rng.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1))

    def uniform(self, shape, dtype: str = "float32"):
        return self.torch.rand(shape, generator=self.rng, dtype=self._dtype(dtype), device=self.device)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            self.torch.mps.synchronize()


BACKENDS = ("numpy", "torch", "cupy")
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(backend: str, device: str = "auto") -> str:
    """Turn ``auto`` into the best device the backend can use here."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if backend == "numpy":
        if device not in ("auto", "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU only, not {device!r}: "
                             "use --backend torch or cupy for a GPU")
        return "cpu"
    if backend == "cupy":
        if device in ("cpu", "mps"):
            raise ValueError(f"the cupy backend runs on CUDA only, not {device!r}")
        return "cuda" if device == "auto" else device
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but PyTorch sees no CUDA GPU here")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for but PyTorch sees no MPS device here")
    return device


_backends: dict[tuple[str, str], Backend] = {}


def _make_backend(name: str, device: str) -> Backend:
    if name == "torch":
        import torch

        dev = torch.device(device)
        if dev.type != "cpu" and dev.index is None:  # "cuda" and "cuda:0" are one device
            dev = torch.device(dev.type, torch.cuda.current_device() if dev.type == "cuda" else 0)
        device = str(dev)
    key = (name, device)
    if key not in _backends:
        if name == "numpy":
            _backends[key] = Backend(np, "cpu")
        elif name == "torch":
            _backends[key] = TorchBackend(device)
        elif name == "cupy":
            try:
                _backends[key] = CupyBackend(device)
            except ImportError as err:
                raise ValueError("the cupy backend needs CuPy: pip install 'cnn-from-scratch[cupy]'") from err
        else:
            raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return _backends[key]


def get_backend(name: str = "numpy", device: str = "auto") -> Backend:
    """The backend called ``name`` on ``device`` (one shared instance per pair)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return _make_backend(name, resolve_device(name, device))


def backend_of(x) -> Backend:
    """The backend that owns array ``x``."""
    if isinstance(x, np.ndarray):
        return _make_backend("numpy", "cpu")
    module = type(x).__module__
    if module.startswith("torch"):
        return _make_backend("torch", str(x.device))
    if module.startswith("cupy"):
        return _make_backend("cupy", "cuda")
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(x).__name__}")


def manual_seed(seed: int) -> None:
    """Seed weight initialisation and the generators of every backend made so far."""
    from cnn import functional

    functional.init_rng = np.random.default_rng(seed)
    for backend in _backends.values():
        backend.seed(seed)
