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

import contextlib
import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnn.errors import UserError


class DeviceError(UserError, ValueError):
    """A backend or device that does not exist, or is not present on this machine."""


class Backend:
    """NumPy-style backend; ``xp`` is the array module (numpy, or cupy for the subclass)."""

    name = "numpy"

    # Conv2d.backward's patch gradients: one matrix product per kernel offset, each into its
    # own contiguous block, rather than one product whose rows interleave the offsets.
    # NumPy pays per inner loop, and col2im's adds then run over whole image rows instead
    # of one pixel's channels. Where each operator costs host time (a GPU), one product.
    patch_grads_per_offset = True

    def __init__(self, xp=np, device: str = "cpu"):
        self.xp = xp
        self.device = device
        self.seed(0)  # not default_rng(0): see seed
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        blas = _host_blas() if xp is np else None
        # As many threads as BLAS was given: OMP_NUM_THREADS=1 (two runs side by side, a
        # core each) means one thread here too; read from the environment where
        # threadpoolctl cannot see BLAS (Apple's Accelerate, say).
        given = ([lib.num_threads for lib in blas.lib_controllers] if blas else
                 [int(v) for v in (os.environ.get("OMP_NUM_THREADS"),) if v and v.isdigit() and int(v) > 0])
        self.workers = min([cores] + given)
        self._pool = ThreadPoolExecutor(self.workers) if xp is np and self.workers > 1 else None
        self._blas = blas if self._pool is not None else None

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

    def empty_like(self, a):
        """Uninitialised, with ``a``'s shape, dtype and memory layout."""
        return self.xp.empty_like(a)

    def arange(self, n: int):
        return self.xp.arange(n)

    def copy(self, a):
        return self.xp.array(a, copy=True)  # an array even for a NumPy scalar

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

    # -- math -----------------------------------------------------------------------
    #: Backend.matmul cuts a product into blocks of at least this many multiply-adds and
    #: ``matmul_min_width`` rows (or columns), at most ``matmul_max_blocks`` of them.
    matmul_block_size, matmul_min_width, matmul_max_blocks = 1 << 22, 64, 8

    def matmul(self, a, b, out=None):
        """a @ b. On the CPU BLAS runs on one thread, and a large 2-d product is cut into
        blocks of rows (of columns, when ``a`` has fewer rows than ``b`` has columns) that
        the pool's threads share. The blocks depend on the shapes alone, not on the number
        of threads, so neither does the result. BLAS's own threads wait for work by
        spinning, on the cores that the pool's element-wise work needs, and on a machine
        busier than its cores a step then takes several times as long (README: Benchmark)."""
        blocks = 0
        if self.xp is np and a.ndim == b.ndim == 2:
            m, n = a.shape[0], b.shape[1]
            blocks = min(m * a.shape[1] * n // self.matmul_block_size,
                         max(m, n) // self.matmul_min_width, self.matmul_max_blocks)
            if out is not None and (out.shape != (m, n) or np.may_share_memory(out, a)
                                    or np.may_share_memory(out, b)):
                blocks = 0  # NumPy's own checks and copies
        with self._one_blas_thread():
            if blocks < 2:
                return self.xp.matmul(a, b, out=out)
            if out is None:
                out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
            if a.shape[0] >= b.shape[1]:
                self.map_chunks(lambda a, out: np.matmul(a, b, out=out), a, out, chunks=blocks)
            else:  # a weight gradient: b's columns, as rows of b.T
                self.map_chunks(lambda bt, out_t: np.matmul(a, bt.T, out=out_t.T), b.T, out.T, chunks=blocks)
            return out

    @contextlib.contextmanager
    def _one_blas_thread(self):
        """BLAS on one thread for the engine's products: once woken, BLAS's own threads
        spin, and would take the cores from the pool's element-wise work. Process-wide,
        as BLAS's setting is: from the first of any threads' engine products to the end
        of the last, so two threads training at once do not undo each other's pin."""
        global _pins, _unpinned
        if self._blas is None:
            yield
            return
        with _pin_lock:
            if _pins == 0:
                _unpinned = [lib.num_threads for lib in self._blas.lib_controllers]
                for lib in self._blas.lib_controllers:
                    lib.set_num_threads(1)
            _pins += 1
        try:
            yield
        finally:
            with _pin_lock:
                _pins -= 1
                if _pins == 0:
                    for lib, threads in zip(self._blas.lib_controllers, _unpinned):
                        lib.set_num_threads(threads)

    def sum(self, a, axis=None, keepdims=False):
        return a.sum(axis=axis, keepdims=keepdims)

    def mean(self, a, axis=None, keepdims=False):
        return a.mean(axis=axis, keepdims=keepdims)

    def max(self, a, axis=None, keepdims=False):
        return a.max(axis=axis, keepdims=keepdims)

    def column_sums(self, a, block: int = 512):
        """a: (M, K) -> (K,), accurate and fast.

        Matrix products with a vector of ones (BLAS: several times faster than numpy's
        row-by-row reduction), split over the pool, sum blocks of ``block`` rows; the block
        sums are added in float64. A single float32 sum over 65,536 rows would be off by
        about 1e-5 relative, enough to flip ReLUs after batch norm; this is off by ~1e-7
        (up to ~1e-6 where the values are all alike: the blocks' float32 errors then add up).
        """
        xp = self.xp
        m = a.shape[0]
        full = m - m % block
        with self._one_blas_thread():
            total = xp.ones(m - full, dtype=a.dtype) @ a[full:]
            if full:
                ones = xp.ones(block, dtype=a.dtype)
                blocks = self.map_chunks(lambda parts: ones @ parts, a[:full].reshape(full // block, block, -1))
                blocks = blocks[0] if len(blocks) == 1 else xp.concatenate(blocks)
                total = blocks.sum(axis=0, dtype="float64") + total
        return total.astype(a.dtype)

    def argmax(self, a, axis):
        return a.argmax(axis=axis)

    def maximum(self, a, b, out=None):
        return self.xp.maximum(a, b, out=out)

    def multiply(self, a, b, out=None):
        return self.xp.multiply(a, b, out=out)

    def subtract(self, a, b, out=None):
        return self.xp.subtract(a, b, out=out)

    def exp(self, a):
        return self.xp.exp(a)

    def log(self, a):
        return self.xp.log(a)

    def sqrt(self, a):
        return self.xp.sqrt(a)

    def item(self, a) -> float:
        return float(a)

    # -- lists of arrays (optimizer updates) ----------------------------------------
    _LIST_OPS = {"add": operator.add, "mul": operator.mul,
                 "add_": operator.iadd, "sub_": operator.isub, "mul_": operator.imul}

    def foreach(self, op: str, xs: list, other) -> list:
        """``op`` ("add", "mul"; "add_", "sub_", "mul_" in place) of each array in
        ``xs`` with the matching array of the list ``other``, or with the scalar ``other``.
        Returns the results (``xs`` itself for the in-place ops). Each element is the same
        single arithmetic operation as ``x + y`` etc., so the results are too."""
        others = other if isinstance(other, list) else [other] * len(xs)
        fn = self._LIST_OPS[op]
        return [fn(x, y) for x, y in zip(xs, others)]

    # -- parallel element-wise work ------------------------------------------------
    def map_chunks(self, fn, *arrays, min_size: int = 1 << 16, chunks: int | None = None):
        """Run ``fn(*parts)`` on matching chunks of ``arrays`` split along axis 0; return
        the list of results, in chunk order.

        NumPy runs one thread per call, but releases the GIL inside its loops, so the
        NumPy backend hands the chunks to one thread per core: memory-bound element-wise
        work (the part BLAS does not cover) then uses every core too. ``fn`` must only
        write into its own parts. Other backends parallelise internally and run ``fn`` once.
        ``chunks``: exactly that many (NumPy only), whatever the number of threads.
        """
        n = arrays[0].shape[0]
        if chunks is None:
            if self._pool is None or n < 2 or arrays[0].size < min_size:
                return [fn(*arrays)]
            chunks = min(self.workers, n)
        bounds = [n * i // chunks for i in range(chunks + 1)]
        if self._pool is None:
            return [fn(*(a[lo:hi] for a in arrays)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        float_errors = np.geterr()  # per thread in NumPy: the workers follow the caller's

        def run(*parts):
            with np.errstate(**float_errors):
                return fn(*parts)

        futures = [self._pool.submit(run, *(a[lo:hi] for a in arrays))
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        return [f.result() for f in futures]

    # -- randomness -----------------------------------------------------------------
    def seed(self, seed) -> None:
        """Reseed this backend's generator (``seed``: int or sequence of ints)."""
        # Not default_rng(seed) itself: the weights (default_rng(seed)) and the loader's
        # epoch plans (default_rng([seed, epoch])) draw from NumPy's generator seeded so,
        # and dropout masks would repeat their random bits.
        self.rng = self.xp.random.default_rng(_fold(seed, _DROPOUT_STREAM))

    def uniform(self, shape, dtype: str = "float32"):
        """Uniform [0, 1) samples drawn on the backend's device."""
        return self.rng.random(shape, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU); used only for timing."""

    can_record = False

    def record(self, fn):
        """The device work of ``fn()`` recorded for replay: ``.replay()`` launches it again
        on the same memory, running no Python. Recording does not run the work. Only where
        ``can_record``."""
        raise NotImplementedError(f"{self!r} cannot record device work")


class CupyBackend(Backend):
    name = "cupy"
    patch_grads_per_offset = False

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
    """PyTorch tensors as plain arrays: no autograd, no ``torch.nn``.

    The engine's tensors never require a gradient, so autograd records none of its
    operations; PyTorch's grad mode is left as it is, for the user's own torch code.
    """

    name = "torch"
    patch_grads_per_offset = False

    def __init__(self, device: str = "cpu"):
        import torch

        self.torch = torch
        self.xp = torch
        self.device = str(torch.device(device))
        self.rng = torch.Generator(device=self.device)
        self.rng.manual_seed(0)
        self._pool = None  # torch parallelises its own kernels

    def __repr__(self) -> str:
        if self.device.startswith("cuda"):
            return f"torch {self.device} ({self.torch.cuda.get_device_name(self.device)})"
        return f"torch ({self.device})"

    def _dtype(self, dtype):
        return None if dtype is None else getattr(self.torch, str(dtype))

    def asarray(self, a, dtype: str | None = None):
        if isinstance(a, np.ndarray):
            a = self.torch.from_numpy(a)
        elif getattr(a, "requires_grad", False):
            a = a.detach()  # the engine computes gradients by hand: autograd has nothing to record
        return self.torch.as_tensor(a, dtype=self._dtype(dtype), device=self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def zeros(self, shape, dtype: str = "float32"):
        return self.torch.zeros(shape, dtype=self._dtype(dtype), device=self.device)

    def empty(self, shape, dtype: str = "float32"):
        return self.torch.empty(shape, dtype=self._dtype(dtype), device=self.device)

    def zeros_like(self, a):
        return self.torch.zeros_like(a)

    def empty_like(self, a):
        return self.torch.empty_like(a)

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

    def column_sums(self, a):
        return a.sum(dim=0)

    def matmul(self, a, b, out=None):
        return self.torch.matmul(a, b, out=out)

    def sum(self, a, axis=None, keepdims=False):
        return a.sum() if axis is None else a.sum(dim=axis, keepdim=keepdims)

    def mean(self, a, axis=None, keepdims=False):
        return a.mean() if axis is None else a.mean(dim=axis, keepdim=keepdims)

    def max(self, a, axis=None, keepdims=False):
        return a.max() if axis is None else a.amax(dim=axis, keepdim=keepdims)

    def argmax(self, a, axis):
        return a.argmax(dim=axis)

    def maximum(self, a, b, out=None):
        if not isinstance(b, self.torch.Tensor):
            return self.torch.clamp_min(a, b, out=out)
        return self.torch.maximum(a, b, out=out)

    def multiply(self, a, b, out=None):
        return self.torch.mul(a, b, out=out)

    def subtract(self, a, b, out=None):
        return self.torch.sub(a, b, out=out)

    def foreach(self, op: str, xs: list, other) -> list:
        # One multi-tensor kernel (torch.optim's "foreach" path) instead of one per array.
        if not xs:
            return []
        out = getattr(self.torch, f"_foreach_{op}")(xs, other)
        return xs if op.endswith("_") else out

    def seed(self, seed) -> None:
        # torch.Generator takes one integer; fold a sequence of ints into one with numpy.
        # (Another generator than NumPy's, so no stream of its own is needed.)
        self.rng.manual_seed(_fold(seed))

    def uniform(self, shape, dtype: str = "float32"):
        return self.torch.rand(shape, generator=self.rng, dtype=self._dtype(dtype), device=self.device)

    @property
    def can_record(self) -> bool:
        return self.device.startswith("cuda")

    def record(self, fn):
        # A CUDA graph. Our generator is registered so that dropout masks drawn in a replay
        # advance it exactly as the same draws made eagerly would.
        if not self.can_record:
            return super().record(fn)
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.rng)
        # The outer stream context puts back the stream that was current: when a capture
        # fails, torch.cuda.graph raises before it restores it, and every later eager
        # kernel would run on its capture stream.
        rng_state = self.rng.get_state()
        try:
            with (torch.cuda.device(self.device), torch.cuda.stream(torch.cuda.current_stream(self.device)),
                  torch.cuda.graph(graph)):
                fn()
        except BaseException:
            # A failed capture can leave the generators it registered marked as capturing
            # (pytorch/pytorch#171263), and every later draw from them fails. A new generator
            # with the state from before the capture draws on as if none had been tried.
            self.rng = torch.Generator(self.device)
            self.rng.set_state(rng_state)
            raise
        return graph

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            self.torch.mps.synchronize()


BACKENDS = ("numpy", "torch", "cupy")
#: How to get CuPy, for the messages that find it missing.
CUPY_INSTALL = "on a machine with a CUDA GPU, pip install -e '.[cupy]' in the repository root (cupy-cuda12x)"
DEVICES = ("auto", "cpu", "cuda", "mps")


def torch_type(x) -> str | None:
    """The class name of a torch object ("device", "dtype", "Tensor"), else None (without
    importing torch)."""
    return type(x).__name__ if type(x).__module__ == "torch" else None


def names_a_device(x) -> bool:
    """Whether ``x`` is a torch.device or the name of one ("cpu", "cuda:1"; not "auto")."""
    return torch_type(x) == "device" or (isinstance(x, str) and x.split(":")[0] in DEVICES[1:])


def resolve_device(backend: str, device: str = "auto") -> str:
    """Turn ``auto`` into the best device the backend can use here (``device``: a name,
    or a ``torch.device``)."""
    if torch_type(device) == "device":
        device = str(device)  # torch.device("cuda", 1) -> "cuda:1"
    if not isinstance(device, str):
        raise DeviceError(f"a device is a name ({', '.join(DEVICES)}, cuda:N) or a torch.device, "
                          f"got {type(device).__name__} {device!r}")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if backend == "numpy":
        if device not in ("auto", "cpu"):
            raise DeviceError(f"the numpy backend runs on the CPU only, not {device!r}: "
                             "use --backend torch or cupy for a GPU")
        return "cpu"
    if backend == "cupy":
        if device in ("cpu", "mps"):
            raise DeviceError(f"the cupy backend runs on CUDA only, not {device!r}")
        if device not in ("auto", "cuda", "cuda:0"):
            # CuPy computes on its current device, and every CuPy array maps back to one
            # backend (backend_of): another GPU would silently be GPU 0.
            n = device.partition(":")[2] or "N"
            raise DeviceError(f"the cupy backend runs on the first visible GPU (cuda), not {device!r}: "
                              f"make GPU {n} the first with CUDA_VISIBLE_DEVICES={n}, or use --backend torch")
        return "cuda"
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but PyTorch sees no CUDA GPU here: "
                          "choose device auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' was asked for, but PyTorch sees no MPS device here: "
                          "choose device auto or cpu")
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
                raise DeviceError(f"the cupy backend needs CuPy: {CUPY_INSTALL}") from err
        if _seed is not None:
            _backends[key].seed(_seed)
    return _backends[key]


def get_backend(name: str = "numpy", device: str = "auto") -> Backend:
    """The backend called ``name`` on ``device`` (one shared instance per pair)."""
    if name not in BACKENDS:
        hint = (f" ({name!r} is a device: pick a backend and pass device={name!r}, e.g. "
                f"get_backend('torch', {name!r}) or model.to('torch', device={name!r}))"
                if names_a_device(name) else "")
        raise DeviceError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}{hint}")
    return _make_backend(name, resolve_device(name, device))


def backend_of(x) -> Backend:
    """The backend that owns array ``x``."""
    if isinstance(x, (np.ndarray, np.generic)):
        return _make_backend("numpy", "cpu")
    module = type(x).__module__
    if module.startswith("torch"):
        return _make_backend("torch", str(x.device))
    if module.startswith("cupy"):
        return _make_backend("cupy", "cuda")
    raise TypeError(f"expected a numpy, torch or cupy array, got {type(x).__name__}")


_seed = None  # the last manual_seed, for backends made after it
_DROPOUT_STREAM = 1


def _fold(seed, stream: int | None = None) -> int:
    """``seed`` (an int or a sequence of ints) as one non-negative 63-bit integer; with
    ``stream``, that of an independent stream (NumPy's SeedSequence spawn key)."""
    sequence = np.random.SeedSequence(seed, spawn_key=() if stream is None else (stream,))
    return int(sequence.generate_state(1, np.uint64)[0] >> 1)


_pin_lock = threading.Lock()
_pins, _unpinned = 0, []  # engine products running with BLAS pinned; BLAS's thread counts before


def _host_blas():
    """threadpoolctl's handle on the BLAS libraries loaded in this process, for pinning
    them to one thread (Backend.matmul); None where none has a thread count to set."""
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None


def manual_seed(seed: int) -> None:
    """Seed weight initialisation and the generator of every backend, made so far or later."""
    global _seed
    from cnn import functional

    functional.init_rng = np.random.default_rng(seed)
    _seed = seed
    for backend in _backends.values():
        backend.seed(seed)
