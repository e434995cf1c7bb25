"""Layers, each with a hand-written forward/backward pair and an explicit cache.

Shapes follow PyTorch: images are ``(N, C, H, W)``, features ``(N, D)``. Convolution
outputs are channels-last in memory (a transposed view); every layer accepts any layout.
"""
from __future__ import annotations

import math

from cnn import functional as F
from cnn.backend import backend_of
from cnn.checks import boolean, integer, is_int, number, require, show
from cnn.module import Module, Parameter


def _count(v, what: str) -> int:
    return int(require(v, what, integer(1)))


def _pair(v, what: str, minimum: int) -> tuple[int, int]:
    pair = (v, v) if is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_int(a) and a >= minimum for a in pair):
        raise ValueError(f"{what} must be an integer >= {minimum} (or a pair of them); got {v!r}")
    return int(pair[0]), int(pair[1])


def _square(v, what: str, minimum: int) -> int:
    a, b = _pair(v, what, minimum)
    if a != b:
        raise ValueError(f"{what} must be the same along height and width; got {v}")
    return a


def _at_default(layer: str, **args) -> None:
    """torch.nn arguments that this engine implements at their default value only, each
    given as (value, default): taken there, since torch.nn code and the layers' printed
    form pass them, and refused elsewhere."""
    for name, (value, default) in args.items():
        if isinstance(default, bool):  # not 1 for True
            same = isinstance(value, bool) and value == default
        elif isinstance(default, int):  # np.int64(1) too, as for the sizes
            same = is_int(value) and value == default
        else:  # None, a string, a pair
            same = type(value) is type(default) and value == default
        if not same:
            hint = (": build the layer, then move it with .to(backend, device, dtype)"
                    if name in ("device", "dtype") else "")
            raise ValueError(f"{layer}({name}={value!r}) is not implemented here: only {name}={default!r}, "
                             f"torch.nn's default{hint}")


class Workspace:
    """Buffers a layer reuses from one training step to the next.

    Large arrays come straight from the operating system (above 32 MiB, such as
    SmallResNet's im2col columns) or go back to it when freed (the allocator trims freed
    heap pages, which hits batch norm's 4-8 MiB buffers), and the OS zero-fills every new
    page on first touch: that costs more than the copy that fills the array. Reusing the
    buffer pays it once.
    """

    def __init__(self):
        self.buffers = {}
        self.derived = {}

    # Scratch, so a copy of a layer (pickle, deepcopy) starts with an empty one: copying the
    # buffers would cost their size, and pickle does not keep views sharing their buffer's
    # memory, so ``views`` would hand out stale ones (wrong gradients, silently).
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, name: str, shape, B, dtype: str):
        buf = self.buffers.get(name)
        if (buf is None or tuple(buf.shape) != tuple(shape) or backend_of(buf) is not B
                or B.dtype_name(buf) != dtype):
            buf = self.buffers[name] = B.empty(tuple(shape), dtype=dtype)
        return buf

    def views(self, name: str, make, buf, *args):
        """``make(buf, *args)`` (views of the buffer ``buf``), made again only when ``buf``
        or ``args`` change: on PyTorch every view is an operator call, host time on a GPU."""
        source, made_for, views = self.derived.get(name, (None, None, None))
        if source is not buf or made_for != args:
            views = make(buf, *args)
            self.derived[name] = (buf, args, views)
        return views


def _check_input(layer: Module, x, ndim: int, channels: int | None = None, like=None) -> None:
    """x must be ``ndim``-d with ``channels`` at axis 1, and (given ``like``, the layer's
    weight) on the weight's backend and device, in its dtype: NumPy would silently compute a
    float64 input in float64 all the way down, PyTorch fails deep inside a matmul."""
    name = type(layer).__name__
    if not hasattr(x, "ndim"):
        raise TypeError(f"{name} expects an array (NumPy, torch or CuPy), got {type(x).__name__}: "
                        "convert it first, e.g. np.asarray(x, dtype=np.float32)")
    if x.ndim != ndim:
        layout = "(N, C, H, W)" if ndim == 4 else "(N, features)"
        hint = " (add a batch axis for one sample: x[None])" if x.ndim == ndim - 1 else ""
        raise ValueError(f"{name} expects a {ndim}-d input {layout}, got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} got an empty batch (shape {tuple(x.shape)}): pass at least one sample")
    if channels is not None and x.shape[1] != channels:
        what = "input channels" if ndim == 4 else "input features"
        raise ValueError(f"{name} expects {channels} {what}, got {x.shape[1]} (shape {tuple(x.shape)})")
    if like is not None:
        Bx, Bw = backend_of(x), backend_of(like)
        if Bx is not Bw or Bx.dtype_name(x) != Bw.dtype_name(like):
            raise TypeError(f"{name} has {Bw!r} {Bw.dtype_name(like)} weights but got a {Bx!r} "
                            f"{Bx.dtype_name(x)} input: convert the input with backend.asarray(x, "
                            "dtype=...), or move the model with model.to(...)")


class Conv2d(Module):
    """2-d convolution (cross-correlation) as im2col + one matrix product.

    x: (N, C_in, H, W) -> (N, C_out, Ho, Wo). weight: (C_out, C_in, kh, kw), bias: (C_out,).
    Set ``input_grad = False`` on a network's first layer to skip the unneeded col2im (and,
    as the first layer of a Sequential, the backward of the frozen layers after it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        _at_default("Conv2d", dilation=(_pair(dilation, "dilation", 1), (1, 1)), groups=(groups, 1),
                    padding_mode=(padding_mode, "zeros"), device=(device, None), dtype=(dtype, None))
        self.in_channels = _count(in_channels, "in_channels")
        self.out_channels = _count(out_channels, "out_channels")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _square(stride, "stride", 1)
        kh, kw = self.kernel_size
        # printed as torch prints it
        self.padding_name = padding if isinstance(padding, str) and padding in ("same", "valid") else None
        if padding == "same" and (self.stride != 1 or kh != kw or kh % 2 == 0):
            raise ValueError(f"Conv2d(padding='same') needs stride 1 and a square kernel of odd size here "
                             f"(got stride {self.stride}, kernel_size {self.kernel_size}): the engine pads "
                             "every side alike, so give padding as a number")
        self.padding = {"same": (kh - 1) // 2, "valid": 0}.get(padding) if self.padding_name else _square(
            padding, "padding", 0)
        fan_in = in_channels * kh * kw
        self.weight = Parameter(F.kaiming_uniform((out_channels, in_channels, kh, kw), fan_in))
        self.bias = Parameter(F.bias_uniform(out_channels, fan_in)) if bias else None
        self.input_grad = True
        self.cache = None
        self.workspace = Workspace()

    def extra_repr(self) -> str:  # as torch.nn.Conv2d's
        s, p = self.stride, self.padding
        padding = (f", padding={self.padding_name}" if self.padding_name else f", padding=({p}, {p})" if p else "")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride=({s}, {s})" + padding + ("" if self.bias is not None else ", bias=False"))

    def _weight_matrix(self, B):
        """weight (F, C, kh, kw) -> (F, kh * kw * C), matching the channels-last patch rows."""
        w = self.weight.data
        return B.transpose(w, (0, 2, 3, 1)).reshape(w.shape[0], -1)

    def forward(self, x):
        _check_input(self, x, 4, self.in_channels, like=self.weight.data)
        B = backend_of(x)
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        ho = F.conv_output_size(h, kh, self.stride, self.padding)
        wo = F.conv_output_size(w, kw, self.stride, self.padding)
        # Training reuses the column buffer; evaluation (larger batches) allocates per call,
        # and predict/evaluate drop the caches when done (Module.clear_caches).
        buf = (self.workspace.get("cols", (n * ho * wo, kh * kw * c), B, B.dtype_name(x))
               if self.training else None)
        cols2d = F.im2col(x, self.kernel_size, self.stride, self.padding, out=buf)
        w2d = self._weight_matrix(B)
        out = B.matmul(cols2d, w2d.T)  # (N*Ho*Wo, F): channels-last output, no transpose needed
        if self.bias is not None:
            out += self.bias.data
        self.cache = (cols2d, w2d, tuple(x.shape), (n, ho, wo))
        return self._output(B.transpose(out.reshape(n, ho, wo, -1), (0, 3, 1, 2)))

    def backward(self, grad_out):
        cols2d, w2d, x_shape, (n, ho, wo) = self._take_cache(grad_out)
        B = backend_of(grad_out)
        g = B.transpose(grad_out, (0, 2, 3, 1)).reshape(n * ho * wo, -1)  # (N*Ho*Wo, F)
        kh, kw = self.kernel_size
        self.weight.grad = None  # stays None when frozen: no product computed
        if self.weight.requires_grad:
            dw = B.matmul(g.T, cols2d).reshape(-1, kh, kw, x_shape[1])  # (F, kh, kw, C)
            self.weight.grad = B.contiguous(B.transpose(dw, (0, 3, 1, 2)))
        if self.bias is not None:
            self.bias.grad = B.column_sums(g) if self.bias.requires_grad else None
        if not self.input_grad:
            return None
        geometry = (x_shape, self.kernel_size, self.stride, self.padding)
        c, dtype = x_shape[1], B.dtype_name(g)
        if B.patch_grads_per_offset:  # (kh*kw, N*Ho*Wo, C): the same dot products
            dcols = self.workspace.get("dcols by offset", (kh * kw, g.shape[0], c), B, dtype)
            for k in range(kh * kw):
                B.matmul(g, w2d[:, k * c:(k + 1) * c], out=dcols[k])
            return F.col2im([part.reshape(n, ho, wo, c) for part in dcols], *geometry)
        dcols = self.workspace.get("dcols", (g.shape[0], w2d.shape[1]), B, dtype)  # (N*Ho*Wo, kh*kw*C)
        B.matmul(g, w2d, out=dcols)
        offsets = self.workspace.views("dcols offsets", F.patch_offsets, dcols, *geometry)
        return F.col2im(offsets, *geometry)


class Linear(Module):
    """x: (N, in_features) -> (N, out_features); weight (out, in) as in PyTorch.
    ``input_grad = False`` skips the input gradient, as Conv2d's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _at_default("Linear", device=(device, None), dtype=(dtype, None))
        self.in_features = in_features = _count(in_features, "in_features")
        self.out_features = out_features = _count(out_features, "out_features")
        self.weight = Parameter(F.kaiming_uniform((out_features, in_features), in_features))
        self.bias = Parameter(F.bias_uniform(out_features, in_features)) if bias else None
        self.input_grad = True
        self.cache = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        _check_input(self, x, 2, self.in_features, like=self.weight.data)
        B = backend_of(x)
        self.cache = x
        out = B.matmul(x, self.weight.data.T)
        if self.bias is not None:
            out += self.bias.data
        return self._output(out)

    def backward(self, grad_out):
        x = self._take_cache(grad_out)
        B = backend_of(grad_out)
        self.weight.grad = B.matmul(grad_out.T, x) if self.weight.requires_grad else None
        if self.bias is not None:
            self.bias.grad = B.column_sums(grad_out) if self.bias.requires_grad else None
        return B.matmul(grad_out, self.weight.data) if self.input_grad else None


class BatchNorm2d(Module):
    """Per-channel batch normalisation, x: (N, C, H, W) -> same shape.

    Train mode normalises with the batch statistics and updates the running ones exactly
    as PyTorch does (biased variance to normalise, unbiased variance into ``running_var``);
    eval mode uses the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        _at_default("BatchNorm2d", affine=(affine, True), track_running_stats=(track_running_stats, True),
                    bias=(bias, True), device=(device, None), dtype=(dtype, None))
        self.num_features = num_features = _count(num_features, "num_features")
        # PyTorch's momentum=None (a cumulative average) is not implemented
        require(momentum, "momentum", number(0, low_open=False, high=1, high_open=False))
        require(eps, "eps", number(0, low_open=True))
        self.eps, self.momentum = eps, momentum
        self.weight = Parameter(F.constant(num_features, 1.0))
        self.bias = Parameter(F.constant(num_features, 0.0))
        self.register_buffer("running_mean", F.constant(num_features, 0.0))
        self.register_buffer("running_var", F.constant(num_features, 1.0))
        self.register_buffer("num_batches_tracked", F.constant((), 0, "int64"))
        self.cache = None
        self.workspace = Workspace()

    def extra_repr(self) -> str:
        # as torch.nn.BatchNorm2d's: this one always has a weight and bias and running statistics
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine=True, "
                "bias=True, track_running_stats=True")

    def forward(self, x):
        _check_input(self, x, 4, self.num_features, like=self.weight.data)
        B = backend_of(x)
        n, c, h, w = x.shape
        x2 = _channels_last_2d(x)  # (M, C), M = N * H * W
        m = x2.shape[0]
        dtype = B.dtype_name(x)
        xc = self.workspace.get("xc", x2.shape, B, dtype) if self.training else B.empty_like(x2)
        if self.training:
            if m < 2:
                raise ValueError("BatchNorm2d in train mode needs more than one value per "
                                 f"channel, got input shape {tuple(x.shape)}: use a larger batch, "
                                 "or .eval() to normalise with the running statistics")
            mean = B.column_sums(x2) / m
            squares = self.workspace.get("squares", x2.shape, B, dtype)

            def center(x2, xc, squares):
                B.subtract(x2, mean, out=xc)
                B.multiply(xc, xc, out=squares)

            B.map_chunks(center, x2, xc, squares)
            var = B.column_sums(squares) / m
            mom = self.momentum
            # In place, as in PyTorch: the buffers stay the same arrays from step to step.
            self.running_mean *= 1 - mom
            self.running_mean += mom * mean
            self.running_var *= 1 - mom
            self.running_var += mom * var * (m / (m - 1))
            self.num_batches_tracked += 1  # stays a 0-d array
        else:
            mean, var = self.running_mean, self.running_var
            B.map_chunks(lambda x2, xc: B.subtract(x2, mean, out=xc), x2, xc)
        inv_std = 1.0 / B.sqrt(var + self.eps)
        scale, shift = self.weight.data * inv_std, self.bias.data
        out = B.empty_like(x2)

        def affine(xc, out):
            B.multiply(xc, scale, out=out)
            out += shift

        B.map_chunks(affine, xc, out)
        self.cache = (xc, inv_std, self.training)
        return self._output(B.transpose(out.reshape(n, h, w, c), (0, 3, 1, 2)))

    def backward(self, grad_out):
        xc, inv_std, batch_stats = self._take_cache(grad_out)
        B = backend_of(grad_out)
        n, c, h, w = grad_out.shape
        g = _channels_last_2d(grad_out)
        dbeta = B.column_sums(g)
        dx = B.empty_like(g)  # first holds grad * xc, for the reduction
        B.map_chunks(lambda g, xc, dx: B.multiply(g, xc, out=dx), g, xc, dx)
        dgamma = B.column_sums(dx) * inv_std  # sum(grad * x_hat)
        # dx needs both sums, frozen or not
        self.weight.grad = dgamma if self.weight.requires_grad else None
        self.bias.grad = dbeta if self.bias.requires_grad else None
        scale = self.weight.data * inv_std
        if batch_stats:
            # dx = scale * (g - mean(g) - x_hat * mean(g * x_hat)), written as a*g + b*xc + c
            # so that no normalised copy of x is kept or rebuilt.
            m = g.shape[0]
            coef_xc = -scale * inv_std * dgamma / m
            offset = -scale * dbeta / m

            def input_grad(g, xc, dx):
                B.multiply(g, scale, out=dx)
                dx += xc * coef_xc
                dx += offset
        else:
            def input_grad(g, xc, dx):
                B.multiply(g, scale, out=dx)

        B.map_chunks(input_grad, g, xc, dx)
        return B.transpose(dx.reshape(n, h, w, c), (0, 3, 1, 2))


def _channels_last_2d(x):
    """x: (N, C, H, W) -> (N * H * W, C): a free view when x is channels-last in memory."""
    B = backend_of(x)
    return B.transpose(x, (0, 2, 3, 1)).reshape(-1, x.shape[1])


class ReLU(Module):
    """max(x, 0) elementwise, any shape; keeps its output for backward (the gradient passes
    where the output is positive, as in PyTorch: none at exactly 0). ``inplace`` is taken
    for torch.nn code, and printed as torch does, but the output is always a new array:
    overwriting the input would change what the layer before keeps for its backward."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = require(inplace, "inplace", boolean)
        self.cache = None

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""

    def forward(self, x):
        B = backend_of(x)
        out = B.empty_like(x)
        B.map_chunks(lambda x, out: B.maximum(x, 0, out=out), x, out)
        self.cache = out
        return self._output(out)

    def backward(self, grad_out):
        out = self._take_cache(grad_out)
        B = backend_of(grad_out)
        grad = B.empty_like(out)
        B.map_chunks(lambda g, out, grad: B.multiply(g, out > 0, out=grad), grad_out, out, grad)
        return grad


class _Pool2d(Module):
    """Pooling over kernel offsets: one strided slice of the channels-last input per offset."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        if stride is None and self.kernel_size[0] != self.kernel_size[1]:
            raise ValueError(f"kernel_size {self.kernel_size} is not square, so the stride cannot "
                             "default to it: give stride (one integer; strides are square)")
        self.stride = _square(stride if stride is not None else kernel_size, "stride", 1)
        self.padding = _square(padding, "padding", 0)
        if self.padding * 2 > min(self.kernel_size):
            raise ValueError(f"padding {self.padding} must be at most half the kernel size {self.kernel_size}")
        self.cache = None

    def extra_repr(self) -> str:  # as torch.nn's
        kh, kw = self.kernel_size
        return f"kernel_size={kh if kh == kw else (kh, kw)}, stride={self.stride}, padding={self.padding}"

    def _windows(self, x_shape):
        """Output size (Ho, Wo) and the (row slice, column slice) of the padded input that
        each kernel offset visits."""
        kh, kw = self.kernel_size
        ho = F.conv_output_size(x_shape[2], kh, self.stride, self.padding)
        wo = F.conv_output_size(x_shape[3], kw, self.stride, self.padding)
        return (ho, wo), [(F.window(i, ho, self.stride), F.window(j, wo, self.stride))
                          for i in range(kh) for j in range(kw)]

    def _unpool(self, x_shape, part, *arrays):
        """Adjoint of the window slicing: the input gradient (N, C, H, W) from the gradient
        ``part(k, *chunks)`` (N, Ho, Wo, C) that kernel offset k receives."""
        B = backend_of(arrays[0])
        n, c, h, w = x_shape
        p = self.padding
        grad = B.zeros((n, h + 2 * p, w + 2 * p, c), dtype=B.dtype_name(arrays[0]))
        overlap = self.stride < max(self.kernel_size)
        _, windows = self._windows(x_shape)

        def scatter(grad, *chunks):
            for k, (rows, cols) in enumerate(windows):
                if overlap:
                    target = grad[:, rows, cols, :]
                    target += part(k, *chunks)  # in place through the view, as in col2im
                else:  # the windows tile the input: each position is written once
                    grad[:, rows, cols, :] = part(k, *chunks)

        B.map_chunks(scatter, grad, *arrays)
        return B.transpose(grad[:, p:p + h, p:p + w, :], (0, 3, 1, 2))


class MaxPool2d(_Pool2d):
    """x: (N, C, H, W) -> (N, C, Ho, Wo); the gradient goes to the first maximum of each
    window in row-major order, exactly as in PyTorch (ties included; a window holding a NaN,
    where PyTorch picks the NaN, is the exception)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        _at_default("MaxPool2d", dilation=(_pair(dilation, "dilation", 1), (1, 1)),
                    return_indices=(return_indices, False), ceil_mode=(ceil_mode, False))
        super().__init__(kernel_size, stride, padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dilation=1, ceil_mode=False"

    def forward(self, x):
        _check_input(self, x, 4)
        B = backend_of(x)
        padded = F.pad_channels_last(x, self.padding, -float("inf"))  # (N, Hp, Wp, C)
        (ho, wo), offsets = self._windows(x.shape)
        out = B.empty((x.shape[0], ho, wo, x.shape[1]), dtype=B.dtype_name(x))
        argmax = B.zeros(out.shape, dtype="uint8" if len(offsets) <= 256 else "int32")

        def pool(padded, out, argmax):
            out[...] = padded[:, offsets[0][0], offsets[0][1], :]
            for k, (rows, cols) in enumerate(offsets[1:], start=1):
                candidate = padded[:, rows, cols, :]
                better = candidate > out  # strict: an earlier offset keeps ties
                B.maximum(out, candidate, out=out)
                argmax += better * (k - argmax)  # where(better, k, argmax), but faster

        B.map_chunks(pool, padded, out, argmax)
        self.cache = (argmax, tuple(x.shape))
        return self._output(B.transpose(out, (0, 3, 1, 2)))

    def backward(self, grad_out):
        argmax, x_shape = self._take_cache(grad_out)
        B = backend_of(grad_out)
        g = B.transpose(grad_out, (0, 2, 3, 1))
        return self._unpool(x_shape, lambda k, g, argmax: g * (argmax == k), g, argmax)


class AvgPool2d(_Pool2d):
    """x: (N, C, H, W) -> (N, C, Ho, Wo); zero padding counts in the average, as PyTorch's default."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None):
        _at_default("AvgPool2d", ceil_mode=(ceil_mode, False), count_include_pad=(count_include_pad, True),
                    divisor_override=(divisor_override, None))
        super().__init__(kernel_size, stride, padding)

    def forward(self, x):
        _check_input(self, x, 4)
        xp = F.pad_channels_last(x, self.padding, 0.0)
        _, offsets = self._windows(x.shape)
        out = None
        for rows, cols in offsets:
            out = xp[:, rows, cols, :] * 1.0 if out is None else out + xp[:, rows, cols, :]
        out /= len(offsets)
        self.cache = tuple(x.shape)
        return self._output(backend_of(x).transpose(out, (0, 3, 1, 2)))

    def backward(self, grad_out):
        x_shape = self._take_cache(grad_out)
        B = backend_of(grad_out)
        g = B.transpose(grad_out, (0, 2, 3, 1)) / len(self._windows(x_shape)[1])
        return self._unpool(x_shape, lambda k, g: g, g)


class GlobalAvgPool2d(Module):
    """x: (N, C, H, W) -> (N, C, 1, 1), the twin of ``nn.AdaptiveAvgPool2d(1)``."""

    def forward(self, x):
        _check_input(self, x, 4)
        self.cache = tuple(x.shape)
        return self._output(backend_of(x).mean(x, axis=(2, 3), keepdims=True))

    def backward(self, grad_out):
        n, c, h, w = self._take_cache(grad_out)
        B = backend_of(grad_out)
        grad = B.empty((n, h, w, c), dtype=B.dtype_name(grad_out))
        grad[...] = B.transpose(grad_out, (0, 2, 3, 1)) / (h * w)
        return B.transpose(grad, (0, 3, 1, 2))


class Dropout(Module):
    """Inverted dropout: in train mode zero each value with probability ``p`` and scale the
    rest by 1 / (1 - p) (p = 1 zeroes all); identity in eval mode. Masks come from the
    backend's generator. ``inplace`` is taken and printed as ReLU's: the output is a new array."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        self.p = require(p, "dropout probability", number(0, low_open=False, high=1, high_open=False))
        self.inplace = require(inplace, "inplace", boolean)
        self.cache = None

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.cache = (None,)  # identity: no mask, but a forward pass to go back through
            return self._output(x)
        B = backend_of(x)
        keep = B.uniform(tuple(x.shape), dtype=B.dtype_name(x)) >= self.p
        mask = B.astype(keep, B.dtype_name(x)) * (1.0 / (1.0 - self.p) if self.p < 1 else 0.0)
        self.cache = (mask,)
        return self._output(x * mask)

    def backward(self, grad_out):
        (mask,) = self._take_cache(grad_out)
        return grad_out if mask is None else grad_out * mask


class Flatten(Module):
    """Axes ``start_dim`` to ``end_dim`` (negative: from the end) made one, as
    ``torch.nn.Flatten``; by default x: (N, C, H, W) -> (N, C * H * W) in PyTorch's
    (C, H, W) order."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        for what, v in (("start_dim", start_dim), ("end_dim", end_dim)):
            if not is_int(v):
                raise ValueError(f"{what} must be an integer (negative counts from the end); got {show(v)}")
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)
        self.cache = None

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def forward(self, x):
        shape = tuple(x.shape)
        start, end = (d + len(shape) if d < 0 else d for d in (self.start_dim, self.end_dim))
        if not 0 <= start <= end < len(shape):
            hint = ": add a batch axis for one sample, x[None]" if len(shape) == 1 and start == 1 else ""
            raise ValueError(f"{self!r} cannot flatten an input of shape {shape}{hint}")
        self.cache = shape
        return self._output(x.reshape(*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:]))

    def backward(self, grad_out):
        return grad_out.reshape(self._take_cache(grad_out))
