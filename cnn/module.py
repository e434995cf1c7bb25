"""``Module`` and ``Parameter``: the user-facing API, modelled on ``torch.nn.Module``.

A module computes ``forward(x)`` and, by hand, ``backward(grad_out) -> grad_in``; backward
also fills ``p.grad`` of each of its parameters (overwriting, not accumulating: every
parameter is used once per forward), or sets it to None for a frozen one
(``requires_grad = False``). Sub-modules assigned as attributes are registered in
order, which gives ``state_dict()`` PyTorch's key names (``0.weight``, ``3.bn1.running_mean``).

Unlike autograd, nothing tracks changes made in place: a layer keeps references to the
arrays that ``backward`` needs (ReLU its output, Linear its input), so changing one in
place between ``forward`` and ``backward`` (``y = relu(x); y += skip``) changes the
gradient. Write ``y = relu(x) + skip`` instead.
"""
from __future__ import annotations

from collections import OrderedDict, namedtuple
from typing import Callable, Iterator

import numpy as np

from cnn.backend import Backend, DeviceError, backend_of, get_backend, names_a_device, torch_type


class Parameter:
    """A trainable array and its gradient (``None`` until a backward pass fills it).

    ``requires_grad = False`` freezes it, as in PyTorch: backward leaves its ``grad`` None
    (and skips computing it where it can), so optimizers, which update only parameters
    with a gradient, leave it as it is.
    """

    __slots__ = ("data", "grad", "_requires_grad")

    def __init__(self, data, requires_grad: bool = True):
        # A torch tensor that autograd tracks is taken as plain data, as a layer's input is:
        # the layers update it in place, which autograd refuses, and gradients come from backward().
        self.data = data.detach() if getattr(data, "requires_grad", False) else data
        self.grad = None
        self.requires_grad = requires_grad

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if not isinstance(value, bool):  # "no" or 0 would freeze or not by accident
            raise TypeError(f"requires_grad must be True or False, got {value!r}")
        self._requires_grad = value

    def requires_grad_(self, requires_grad: bool = True) -> "Parameter":
        self.requires_grad = requires_grad
        return self

    # The array's description, as torch's Parameter gives it (the array itself is .data).
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    def size(self, dim: int | None = None):
        """The shape, or its ``dim``-th entry, as PyTorch's ``size()``."""
        if dim is None:
            return self.shape
        if not -len(self.shape) <= dim < len(self.shape):
            raise IndexError(f"dimension {dim} is out of range for a parameter of shape {self.shape}")
        return self.shape[dim]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    @property
    def dtype(self):
        """The array's dtype, as its library names it (np.float32, torch.float32)."""
        return self.data.dtype

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def __repr__(self) -> str:
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}{frozen})"


def zero_grads(params, set_to_none: bool = True) -> None:
    """Drop every gradient of ``params`` (``set_to_none=False``: fill them with zeros), as
    PyTorch's ``zero_grad`` of a module or an optimizer."""
    for p in params:
        if set_to_none or p.grad is None:
            p.grad = None
        else:
            p.grad[...] = 0


#: The dtypes a model computes in (``Module.to(dtype=...)``).
FLOAT_DTYPES = ("float32", "float64")

# What load_state_dict returns, as in PyTorch.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _array_names(kind: type, dtype, device) -> tuple[str, str, str]:
    """(library, device, dtype) of an array, as the backends name them: ``("torch",
    "cuda:0", "float32")``."""
    library = kind.__module__.partition(".")[0]
    return library, {"numpy": "cpu", "cupy": "cuda"}.get(library, str(device)), str(dtype).removeprefix("torch.")


def check_grad(name: str, grad, expected: tuple | None) -> None:
    """``grad`` must be an array of the shape, array type, dtype and device of the output
    that ``Module._output`` remembered (``expected``; None: nothing to check). NumPy would
    broadcast a (1, C, H, W) gradient of an (N, C, H, W) output, or give a float32 layer
    float64 gradients, without a word. ``name``: the module, for the message."""
    if expected is None:
        return
    shape, kind, dtype, device = expected
    if (type(grad) is kind and grad.dtype == dtype and getattr(grad, "device", None) == device
            and tuple(grad.shape) == shape and not getattr(grad, "requires_grad", False)):
        return
    if getattr(grad, "requires_grad", False):
        # The layers write into arrays made from it, which autograd refuses deep inside, or
        # the parameters' gradients (and, after a step, the parameters) would carry its graph.
        raise TypeError(f"{name}.backward() got a torch tensor that autograd tracks (requires_grad=True): "
                        "pass grad.detach(); the engine computes gradients itself")
    if not hasattr(grad, "shape") or not hasattr(grad, "dtype"):
        raise TypeError(f"{name}.backward() takes an array (NumPy, torch or CuPy) like the output "
                        f"of its forward pass, got {type(grad).__name__}")
    if tuple(grad.shape) != shape:
        raise ValueError(f"{name}.backward() got a gradient of shape {tuple(grad.shape)} for an output "
                         f"of shape {shape}: pass the loss gradient with respect to the last forward "
                         "pass's output")
    got, want = _array_names(type(grad), grad.dtype, getattr(grad, "device", None)), _array_names(*expected[1:])
    if got != want:  # (an ndarray subclass, such as a memmap, is still a NumPy array)
        raise TypeError(f"{name}.backward() got a {got[0]} ({got[1]}) {got[2]} gradient for a {want[0]} "
                        f"({want[1]}) {want[2]} output: convert it with backend.asarray(grad, "
                        f"dtype={want[2]!r}) on the output's backend")


class Module:
    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        registries = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if isinstance(value, (Parameter, Module)):
            if registries[0] is None:
                raise AttributeError(f"cannot assign {type(value).__name__} {name!r} before "
                                     f"Module.__init__(): call super().__init__() first in "
                                     f"{type(self).__name__}.__init__")
            mine, other = registries if isinstance(value, Parameter) else registries[::-1]
            other.pop(name, None)
            self._buffers.pop(name, None)
            mine[name] = value
        elif registries[0] is not None:
            for kind, registry in zip(("a Parameter", "a Module"), registries):
                if name in registry:
                    # None empties the slot (Conv2d's bias = None), which keeps its place in
                    # the order as in PyTorch; anything else is a mistake, such as an array
                    # where a Parameter belongs.
                    if value is not None:
                        raise TypeError(f"cannot assign {type(value).__name__} to {name!r} of "
                                        f"{type(self).__name__}: assign {kind}, or None to remove it")
                    registry[name] = None
            if name in self._buffers:
                self.register_buffer(name, value)  # checked as a new one
                return
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if name in self.__dict__.get("_buffers", {}):
            del self._buffers[name]
            return
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __getattr__(self, name):
        # Only reached for names not found normally: buffers live in _buffers.
        buffers = self.__dict__.get("_buffers", {})
        if name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def add_module(self, name: str, module: "Module | None") -> None:
        """Register ``module`` (or an empty slot, None) under ``name``, as PyTorch's: for
        names made at run time (``self.add_module(f"block{i}", ...)``)."""
        # As torch's: a name must not hide an attribute ("forward", "training", a parameter)
        # nor make state_dict keys ambiguous; "cache" would be emptied by clear_caches().
        if not isinstance(name, str):
            raise TypeError(f"a module name is a string, got {type(name).__name__} {name!r}")
        if (not name or "." in name or name == "cache"
                or (hasattr(self, name) and name not in self._modules)):
            raise KeyError(f"{type(self).__name__} cannot name a module {name!r}: use a non-empty string "
                           "without '.' that is not already an attribute")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module({name!r}, ...) takes a Module or None, got {type(module).__name__}")
        if module is None:
            self._modules[name] = None
        setattr(self, name, module)

    def get_submodule(self, target: str) -> "Module":
        """The module at dotted path ``target`` ("layer.0.conv1"; "" is this one), as PyTorch's."""
        module = self
        for name in target.split(".") if target else []:
            child = module._modules.get(name)
            if child is None:
                raise AttributeError(f"{type(module).__name__} has no submodule {name!r} (looking for {target!r})")
            module = child
        return module

    def register_buffer(self, name: str, value) -> None:
        """State that is saved and moved with the module but not trained (e.g. running means):
        an array (NumPy, torch or CuPy), or None for an empty slot."""
        if value is not None:
            try:
                if isinstance(value, np.generic):  # a scalar has no place to load a state into
                    raise TypeError
                backend_of(value).dtype_name(value)
            except (TypeError, AttributeError):
                raise TypeError(f"buffer {name!r} of {type(self).__name__} must be an array (NumPy, torch or "
                                f"CuPy) or None, got {type(value).__name__}: wrap it as "
                                "np.asarray(value, dtype=np.float32)") from None
        if name not in self._buffers and (name in self._parameters or name in self._modules
                                          or name in self.__dict__):
            raise KeyError(f"attribute {name!r} already exists in {type(self).__name__}: "
                           "a buffer needs a name of its own")
        self._buffers[name] = value

    # -- computation ----------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward(x): a module defines its own")

    def backward(self, grad_out):
        raise NotImplementedError(f"{type(self).__name__} has no backward(grad_out): there is no autograd "
                                  "here, so a module with a forward pass of its own writes its backward pass "
                                  "too (ResidualBlock in cnn/models.py is an example)")

    def __call__(self, x):
        if getattr(x, "requires_grad", False):
            # A torch tensor that autograd tracks: the layers' in-place operations would fail
            # on it, or record the weights into an ever-growing graph. Gradients here are
            # computed by backward(), so autograd has nothing to track.
            x = x.detach()
        return self.forward(x)

    def _output(self, out):
        """``out``, remembered as the output whose gradient ``backward`` takes (see
        ``_take_cache``). Raw attributes, no names: every layer's forward pass runs this."""
        self.__dict__["_output_like"] = (tuple(out.shape), type(out), out.dtype, getattr(out, "device", None))
        return out

    def _take_cache(self, grad_out=None):
        """What ``forward`` kept for ``backward``, handed over once: each forward pass
        allows one backward pass, and a backward pass without one is a clear error. With
        ``grad_out``, also checks that it is like the output of that forward pass (a
        gradient of another shape would otherwise broadcast into a wrong one, silently)."""
        cache = self.__dict__.get("cache")
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() has no forward pass to go back "
                               "through: call the model on a batch first (one backward per forward; "
                               "a module used twice in a model keeps its last forward pass only)")
        if grad_out is not None:
            check_grad(type(self).__name__, grad_out, self.__dict__.get("_output_like"))
        self.cache = None
        return cache

    def clear_caches(self) -> "Module":
        """Drop what every module's last forward pass kept for backward: after evaluation,
        which needs no backward, that is the activations of a whole batch."""
        for _, module in self.named_modules():
            if "cache" in module.__dict__:
                module.cache = None
        return self

    # -- traversal ------------------------------------------------------------------
    # Registries may hold None (an emptied slot, see __setattr__): every walk skips those.
    def named_modules(self, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, "Module"]]:
        """(path, module) of this module and every descendant, depth first; a module used
        twice comes once, under its first path (unless ``remove_duplicate=False``)."""
        return self._walk(prefix, set() if remove_duplicate else None)

    def _walk(self, prefix: str, seen: set | None) -> Iterator[tuple[str, "Module"]]:
        if seen is not None:
            if id(self) in seen:
                return
            seen.add(id(self))
        yield prefix, self
        for name, child in self.named_children():
            yield from child._walk(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self) -> Iterator["Module"]:
        return (module for _, module in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        return ((name, child) for name, child in self._modules.items() if child is not None)

    def children(self) -> Iterator["Module"]:
        return (child for _, child in self.named_children())

    def _state_owners(self, prefix: str, recurse: bool) -> Iterator[tuple[str, "Module"]]:
        return self.named_modules(prefix) if recurse else iter([(prefix, self)])

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """Each parameter once, under its first path (after ``prefix``; this module's own
        only, without ``recurse``): a layer used twice (shared weights) must not be updated
        twice by the optimizer. One Parameter in two places (tied weights) is a ValueError:
        each backward overwrites the gradient, so it would get one place's share only, where
        autograd adds them."""
        first_path = {}
        for path, module in self._state_owners(prefix, recurse):
            for name, p in module._parameters.items():
                if p is None:
                    continue
                key = f"{path}.{name}" if path else name
                if id(p) in first_path:
                    raise ValueError(f"{key} is the same Parameter as {first_path[id(p)]}: tied weights are "
                                     "not supported, because backward overwrites gradients (the parameter "
                                     "would get one layer's share only). Give each layer its own Parameter")
                first_path[id(p)] = key
                yield key, p

    def parameters(self, recurse: bool = True) -> list[Parameter]:
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, object]]:
        for path, module in self._state_owners(prefix, recurse):
            for name, value in module._buffers.items():
                if value is not None:
                    yield (f"{path}.{name}" if path else name), value

    def buffers(self, recurse: bool = True) -> list:
        return [value for _, value in self.named_buffers(recurse=recurse)]

    def apply(self, fn: Callable[["Module"], None]) -> "Module":
        """``fn(module)`` for every descendant, then this module (as PyTorch: children first)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads(self.parameters(), set_to_none)

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        """Freeze (False) or unfreeze every parameter, as PyTorch's ``requires_grad_``."""
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def train(self, mode: bool = True) -> "Module":
        if not isinstance(mode, bool):
            raise ValueError(f"training mode must be True or False, got {mode!r}")
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- state ----------------------------------------------------------------------
    def _named_state(self):
        """(key, owner module, attribute name, is_parameter, array) in PyTorch's state_dict
        order: a module used twice has its state under both paths, as in PyTorch."""
        for path, module in self.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for name, p in module._parameters.items():
                if p is not None:
                    yield prefix + name, module, name, True, p.data
            for name, value in module._buffers.items():
                if value is not None:
                    yield prefix + name, module, name, False, value

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Host (NumPy) copies of every parameter and buffer, under PyTorch's key names
        (copies, unlike PyTorch's views: changing one leaves the model as it is)."""
        return OrderedDict((key, np.array(backend_of(value).to_numpy(value), copy=True))
                           for key, _, _, _, value in self._named_state())

    def load_state_dict(self, state: dict, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays (NumPy, torch or cupy) into this module's arrays, in place, on its
        own backend and dtype.

        All or nothing: every key and shape is checked first, and a ValueError lists every
        mismatch, so a failed load leaves the module as it was. ``strict=False`` skips
        missing and unexpected keys (shapes must still match) and returns them, as PyTorch
        does: ``(missing_keys, unexpected_keys)``."""
        own = {key: rest for key, *rest in self._named_state()}
        problems = []
        missing = [key for key in own if key not in state]  # in state_dict order, as PyTorch
        unexpected = [key for key in state if key not in own]
        if strict and (missing or unexpected):
            problems.append(f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        loads = []
        for key, value in state.items():
            if key not in own:
                continue
            module, name, is_param, current = own[key]
            value = np.asarray(value) if isinstance(value, (np.ndarray, list, float, int)) else \
                backend_of(value).to_numpy(value)
            if tuple(value.shape) != tuple(current.shape):
                problems.append(f"{key}: checkpoint has shape {tuple(value.shape)}, "
                                f"model expects {tuple(current.shape)}")
            loads.append((module, name, is_param, current, value))
        if problems:
            raise ValueError(f"state_dict does not match {type(self).__name__}: " + "; ".join(problems))
        for module, name, is_param, current, value in loads:
            B = backend_of(current)
            # Into the model's own arrays, as PyTorch copies: references to them (a recorded
            # step's, the caller's p.data) stay valid, and the caller's arrays stay apart.
            current[...] = B.asarray(np.asarray(value), dtype=B.dtype_name(current))
            if is_param:
                module._parameters[name].grad = None  # a gradient of other weights
        return IncompatibleKeys(missing, unexpected)

    def to(self, backend: Backend | str | None = None, device: str | None = None,
           dtype: str | None = None) -> "Module":
        """Move every parameter and buffer to ``backend`` on ``device`` (``auto`` when not
        given), and cast floats to ``dtype`` (a name, a NumPy dtype or a torch dtype). With
        no backend, the model's own: ``to(dtype=...)`` keeps it where it is, and
        ``to(device=...)`` moves it on its own backend, as in PyTorch."""
        # As torch's model.to("cuda"), .to(torch.device(...)), .to(device, dtype) or
        # .to(torch.float64): the model's own backend, on that device or in that dtype.
        if names_a_device(backend):
            if device is not None and dtype is None:
                dtype = device  # the second of torch's to(device, dtype)
            elif device is not None:
                raise TypeError(f"Module.to() got a device twice ({backend!r} and {device!r})")
            backend, device = None, backend
        elif torch_type(backend) == "dtype" or isinstance(backend, np.dtype) or (
                isinstance(backend, type) and issubclass(backend, np.generic)):
            backend, dtype = None, backend
        if backend is None:
            first = next(self._named_state(), None)
            own = backend_of(first[-1]) if first else get_backend("numpy")
            if own.name == "numpy" and device is not None and str(device) not in ("cpu", "auto"):
                where = str(device)
                raise DeviceError(f"this model is on the numpy backend, which runs on the CPU only: move it to "
                                  f"{where!r} with model.to('torch', device={where!r})"
                                  + (" or model.to('cupy')" if where.startswith("cuda") else ""))
            backend = own if device is None else own.name
        if not isinstance(backend, (Backend, str)):
            raise TypeError(f"Module.to() takes a backend name ('numpy', 'torch', 'cupy') or a "
                            f"Backend, then device= and dtype=, got {backend!r}: for example "
                            "model.to('torch', device='cuda') or model.to(dtype='float64')")
        if dtype is not None:
            # torch.float64 is no NumPy dtype, but its name without "torch." is
            try:
                dtype = str(dtype)[6:] if str(dtype).startswith("torch.") else str(np.dtype(dtype))
            except TypeError:
                raise TypeError(f"Module.to() got {dtype!r} where a dtype belongs: for example "
                                "model.to('cpu', torch.float64) or model.to(dtype='float64')") from None
            # an integer dtype would truncate every weight, and half precision has no
            # random draws (dropout) on NumPy nor the accuracy the layers' sums assume
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"Module.to() casts to float32 or float64, got dtype {dtype}")
        if isinstance(backend, str):
            backend = get_backend(backend, device or "auto")
        for _, module, name, is_param, value in list(self._named_state()):
            host = backend_of(value).to_numpy(value)
            if dtype is not None and host.dtype.kind == "f":
                host = host.astype(dtype)
            module._assign(name, is_param, backend.asarray(np.asarray(host, order="C")))
        return self

    # torch.nn's shorthands for to()
    def float(self) -> "Module":
        return self.to(dtype="float32")

    def double(self) -> "Module":
        return self.to(dtype="float64")

    def cpu(self) -> "Module":
        return self.to(device="cpu")

    def cuda(self, device: int | str | None = None) -> "Module":
        return self.to(device="cuda" if device is None else device if isinstance(device, str) else f"cuda:{device}")

    def _assign(self, name: str, is_param: bool, value) -> None:
        """Replace this module's own parameter (dropping its stale gradient) or buffer."""
        if is_param:
            self._parameters[name].data = value
            self._parameters[name].grad = None
        else:
            self._buffers[name] = value

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self.named_children():
            child_lines = repr(child).splitlines()
            lines.append(f"  ({name}): " + "\n  ".join(child_lines))
        return "\n".join(lines) + "\n)" if len(lines) > 1 else lines[0] + ")"
