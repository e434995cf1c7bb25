"""A CPU stand-in for a CUDA graph, for testing cnn.replay without a GPU.

``record(fn)`` runs ``fn`` once under a dispatch mode that logs every tensor operator it
issues, with the very tensors it read and wrote, then undoes every write it made (a CUDA
graph capture launches nothing). ``replay()`` issues the logged operators again on those
same tensors, with the logged scalars, and runs none of ``fn``'s Python. So, as with a real
graph, a step that rebinds state to a new tensor instead of updating it in place, or keeps
a count on the host, replays wrongly; and reading a value back to the host while
recording raises, as it does in a capture.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cnn import backend as backend_module


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.undo = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("the recorded step read a value back to the host")
        for arg, value in zip(func._schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                     func._schema.arguments[len(args):]]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                self.undo += [(t, t.clone()) for t in _tensors(value)]
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class Recording:
    def __init__(self, fn):
        # The engine's generators (dropout) and torch's own: drawing from them is a write too.
        generators = [torch.default_generator] + [
            b.rng for b in backend_module._backends.values() if isinstance(b.rng, torch.Generator)]
        states = [g.get_state() for g in generators]
        log = _Log()
        with log:
            fn()
        for tensor, before in reversed(log.undo):
            tensor.copy_(before)
        for g, state in zip(generators, states):
            g.set_state(state)
        self.ops = log.ops

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            if func.is_view:
                continue  # the logged view still aliases the same memory
            again = func(*args, **kwargs)
            for old, new in zip(_tensors(out), _tensors(again)):
                if old is not new:
                    old.copy_(new)


def record(backend, fn) -> Recording:
    """Drop-in for ``TorchBackend.record`` on the CPU (monkeypatch it, and ``can_record``)."""
    return Recording(fn)
