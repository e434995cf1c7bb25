"""Stateless array functions: im2col/col2im, softmax, cross-entropy, initialisation.

Everything here goes through the backend seam (``B = backend_of(x)``), so it runs unchanged
on NumPy, PyTorch tensors and CuPy.

Convolution patches are laid out channels-last, ``(N, Ho, Wo, kh, kw, C)``: one patch is a
contiguous row, so the convolution is a single large matrix product whose result is already
the output in channels-last memory, and no transpose of the big activation is ever needed.
"""
from __future__ import annotations

import math

import numpy as np

from cnn.backend import backend_of

# Weight initialisation draws from this generator; cnn.backend.manual_seed reseeds it.
init_rng = np.random.default_rng(0)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} is too small for kernel {kernel} with stride {stride} "
                         f"and padding {padding}: use a larger input, a smaller kernel or more padding")
    return out


def window(offset: int, out_size: int, stride: int) -> slice:
    """Rows (or columns) of the padded input that kernel offset ``offset`` visits."""
    return slice(offset, offset + stride * (out_size - 1) + 1, stride)


def pad_channels_last(x, padding: int, value: float = 0.0):
    """x: (N, C, H, W) -> (N, H + 2p, W + 2p, C), channels-last, padded with ``value``: a
    new array, or with ``padding == 0`` the transposed view of ``x`` (contiguous only when
    ``x`` is channels-last in memory)."""
    B = backend_of(x)
    xt = B.transpose(x, (0, 2, 3, 1))
    if padding == 0:
        return xt
    n, h, w, c = xt.shape
    out = B.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=B.dtype_name(x))
    if value:
        out[...] = value
    out[:, padding:padding + h, padding:padding + w, :] = xt
    return out


def im2col(x, kernel_size: tuple[int, int], stride: int, padding: int, out=None):
    """Unfold every convolution patch of ``x`` into a row.

    x: (N, C, H, W) -> cols: (N * Ho * Wo, kh * kw * C), rows ordered (n, ho, wo) and
    columns (i, j, c). In channels-last memory the kw * C values of one kernel row are
    contiguous, so a strided view of the padded input turns into ``cols`` in a single copy
    with long contiguous runs; no loop over images, pixels or kernel offsets. ``out``: an
    optional buffer of that shape to fill (see ``layers.Workspace``).
    """
    B = backend_of(x)
    kh, kw = kernel_size
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, stride, padding)
    wo = conv_output_size(w, kw, stride, padding)
    padded = B.contiguous(pad_channels_last(x, padding))  # (N, Hp, Wp, C)
    sn, sh, sw = padded.shape[1] * padded.shape[2] * c, padded.shape[2] * c, c
    patches = B.as_strided(padded, (n, ho, wo, kh, kw, c), (sn, sh * stride, sw * stride, sh, sw, 1))
    cols = B.empty(patches.shape, dtype=B.dtype_name(x)) if out is None else out.reshape(patches.shape)

    def copy(patches, cols):
        cols[...] = patches

    B.map_chunks(copy, patches, cols)
    return cols.reshape(n * ho * wo, kh * kw * c)


def patch_offsets(cols, input_shape, kernel_size: tuple[int, int], stride: int, padding: int) -> list:
    """cols: (N * Ho * Wo, kh * kw * C) -> the kh * kw views (N, Ho, Wo, C) that hold the
    patch entries of one kernel offset each, in (i, j) row-major order."""
    n, c, h, w = input_shape
    kh, kw = kernel_size
    ho = conv_output_size(h, kh, stride, padding)
    wo = conv_output_size(w, kw, stride, padding)
    cols = cols.reshape(n, ho, wo, kh, kw, c)
    return [cols[:, :, :, i, j, :] for i in range(kh) for j in range(kw)]


def col2im(offsets: list, input_shape, kernel_size: tuple[int, int], stride: int, padding: int):
    """Adjoint of :func:`im2col`: sum every patch gradient back onto the input grid.

    offsets: the kh * kw arrays (N, Ho, Wo, C) of each kernel offset's patch gradients, in
    (i, j) row-major order -> (N, C, H, W) (a channels-last view). Overlapping patches are
    summed by one strided add per kernel offset, not by a scatter-add. Either
    ``patch_offsets(cols, ...)`` of a (N * Ho * Wo, kh * kw * C) ``cols`` (made once for a
    reused buffer: on PyTorch every view is an operator call, which on a GPU costs host time
    whatever its size), or contiguous blocks computed offset by offset.
    """
    n, c, h, w = input_shape
    kh, kw = kernel_size
    ho = conv_output_size(h, kh, stride, padding)
    wo = conv_output_size(w, kw, stride, padding)
    B = backend_of(offsets[0])
    grad = B.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=B.dtype_name(offsets[0]))
    windows = [(window(i, ho, stride), window(j, wo, stride)) for i in range(kh) for j in range(kw)]

    def accumulate(grad, *offsets):
        for (rows, columns), part in zip(windows, offsets):
            target = grad[:, rows, columns, :]
            target += part  # in place through the view: grad[...] += would also copy it back

    B.map_chunks(accumulate, grad, *offsets)
    grad = grad[:, padding:padding + h, padding:padding + w, :]
    return B.transpose(grad, (0, 3, 1, 2))


def log_softmax(logits):
    """logits: (N, K) -> log-probabilities (N, K), stable for any finite logits."""
    B = backend_of(logits)
    shifted = logits - B.max(logits, axis=1, keepdims=True)
    return shifted - B.log(B.sum(B.exp(shifted), axis=1, keepdims=True))


def softmax(logits):
    """logits: (N, K) -> probabilities (N, K); the max is subtracted first, so exp never overflows."""
    B = backend_of(logits)
    shifted = logits - B.max(logits, axis=1, keepdims=True)
    e = B.exp(shifted)
    return e / B.sum(e, axis=1, keepdims=True)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) and its gradient, fused.

    logits: (N, K) float; labels: (N,) int64 class indices.
    Returns (loss: 0-d array, dlogits: (N, K)) with dlogits = (softmax - onehot) / N,
    the well-conditioned form of the gradient (no division by a probability).
    """
    B = backend_of(logits)
    n = logits.shape[0]
    # (N, 1) labels would broadcast against the rows into an (N, N) pick: a wrong loss and
    # no error; so would a label of -1 (the last class).
    if not hasattr(labels, "shape") or backend_of(labels) is not B:
        got = f"a {backend_of(labels)!r} array" if hasattr(labels, "shape") else f"a {type(labels).__name__}"
        raise TypeError(f"labels must be an integer array on the logits' backend, {B!r}; got {got}: "
                        "convert them with cnn.backend_of(logits).asarray(labels)")
    if tuple(labels.shape) != (n,) or not B.dtype_name(labels).startswith("int"):
        raise ValueError(f"labels must be {n} integer class indices, shape ({n},) like the rows of the "
                         f"({n}, K) logits; got shape {tuple(labels.shape)} of {B.dtype_name(labels)}")
    # Checked on the CPU only: a GPU step is device work alone (the GPU would wait for the
    # read, and a recorded step cannot read values back; see cnn.replay).
    if B.device == "cpu" and not B.can_record and n:
        low, high, k = int(labels.min()), int(labels.max()), logits.shape[1]
        if low < 0 or high >= k:
            raise ValueError(f"labels must be class indices from 0 to {k - 1} for {k} logits per "
                             f"row; got values from {low} to {high}")
    rows = B.arange(n)
    logp = log_softmax(logits)
    loss = -B.mean(logp[rows, labels])
    grad = B.exp(logp)
    grad[rows, labels] -= 1.0
    grad /= n
    return loss, grad


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, a: float = math.sqrt(5)) -> np.ndarray:
    """He (Kaiming) uniform initialisation, float32, drawn from ``init_rng``.

    U(-b, b) with b = gain * sqrt(3 / fan_in) and gain = sqrt(2 / (1 + a^2)) (He et al., for
    leaky ReLU slope ``a``). The default a = sqrt(5) gives b = 1 / sqrt(fan_in): PyTorch's
    default for Conv2d and Linear, so the engine starts from the same distribution as its
    torch.nn twins and the two train alike.
    """
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    return init_rng.uniform(-bound, bound, shape).astype(np.float32)


def constant(shape, value, dtype: str = "float32") -> np.ndarray:
    """A host array of ``shape`` filled with ``value``: an initial value, moved to the
    model's backend by ``Module.to`` like the random ones."""
    return np.full(shape, value, dtype=dtype)


def bias_uniform(size: int, fan_in: int) -> np.ndarray:
    """PyTorch's default bias initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), float32."""
    bound = 1.0 / math.sqrt(fan_in)
    return init_rng.uniform(-bound, bound, size).astype(np.float32)
