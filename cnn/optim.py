"""Optimizers and learning-rate schedules whose updates equal ``torch.optim``'s.

Updates are in place on each parameter's array, through the backend (SGD's as a few
multi-tensor ``Backend.foreach`` operations), so they run on every backend.
"""
from __future__ import annotations

import math

import numpy as np

from cnn.backend import backend_of
from cnn.checks import number, require, type_name
from cnn.module import Module, Parameter, zero_grads


class Optimizer:
    #: The per-parameter state entries this optimizer keeps (and checkpoints).
    state_keys: tuple[str, ...] = ()

    def __init__(self, params, lr: float):
        if isinstance(params, Module):
            raise TypeError(f"{type(self).__name__} takes Parameters, got a {type(params).__name__}: "
                            "pass model.parameters()")
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        stray = next((p for p in self.params if not isinstance(p, Parameter)), None)
        if stray is not None:
            hint = ("parameter groups are not supported: step one optimizer per group" if isinstance(stray, dict)
                    else "pass model.parameters() of a cnn model")
            raise TypeError(f"{type(self).__name__} takes Parameters, got a {type_name(stray)}: {hint}")
        seen = {}
        for i, p in enumerate(self.params):
            if seen.setdefault(id(p), i) != i:  # each step would update it twice (torch.optim warns)
                raise ValueError(f"{type(self).__name__} got parameter {seen[id(p)]} again as parameter {i} "
                                 f"{tuple(p.shape)}: pass each Parameter once")
        self.lr = lr
        self.state: list[dict] = [{} for _ in self.params]
        self.steps = 0

    @property
    def lr(self) -> float:
        """The learning rate of the next step; set it between steps (a schedule does)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = float(require(value, "learning rate", number(0, low_open=False)))  # 0 as torch.optim

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads(self.params, set_to_none)

    #: Whether :meth:`update` is device work only, with no value that changes from step to
    #: step computed on the host, so that a recorded training step can replay it (cnn.replay).
    replayable = False

    def step(self) -> None:
        """Update every parameter that has a gradient; those without one are left alone."""
        self.steps += 1
        self.update()

    def update(self) -> None:
        """The arithmetic of :meth:`step` without its step count (host state, which a
        replayed step, cnn.replay, does not run: the caller counts those steps)."""
        active = [(p, state) for p, state in zip(self.params, self.state) if p.grad is not None]
        if active:
            params, states = zip(*active)
            self._check_state_is_with(params[0], states[0])
            self._update(list(params), list(states))

    def _check_state_is_with(self, p: Parameter, state: dict) -> None:
        """The state arrays of ``p`` must live where ``p`` does (one check stands for all)."""
        B = backend_of(p.data)
        for value in state.values():
            if not isinstance(value, int) and backend_of(value) is not B:
                raise RuntimeError(
                    f"{type(self).__name__}'s state is on {backend_of(value)!r} but the parameters "
                    f"are now on {B!r}: the model moved after the optimizer stepped. Create the "
                    "optimizer after model.to(...), or move its state: opt.load_state_dict(opt.state_dict())")

    def _update(self, params: list[Parameter], states: list[dict]) -> None:
        """Update the parameters that have a gradient (with their state dicts)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat host arrays for npz checkpoints: ``name`` (the optimizer's class), ``lr``
        (which the caller may have changed, as a schedule does), ``steps`` and
        ``<param index>.<buffer>``."""
        out = {"name": np.array(type(self).__name__), "lr": np.array(self.lr), "steps": np.array(self.steps)}
        for i, state in enumerate(self.state):
            for key, value in state.items():
                out[f"{i}.{key}"] = np.array(value if isinstance(value, int)
                                             else backend_of(value).to_numpy(value))
        return out

    def load_state_dict(self, flat: dict) -> None:
        """Restore what :meth:`state_dict` wrote; a ValueError (and no change) if ``flat``
        is not the state of this optimizer over parameters of these shapes."""
        if "steps" not in flat:
            raise ValueError("optimizer state has no 'steps' entry: not an optimizer state_dict "
                             "(a best.npz checkpoint holds the model only; resume from last.npz)")
        if "name" in flat and str(flat["name"]) != type(self).__name__:
            raise ValueError(f"optimizer state is {flat['name']}'s, not {type(self).__name__}'s")
        state: list[dict] = [{} for _ in self.params]
        for name, value in flat.items():
            if name in ("name", "lr", "steps"):
                continue
            index, _, key = name.partition(".")
            if not (index.isdigit() and int(index) < len(self.params)) or key not in self.state_keys:
                raise ValueError(f"optimizer state entry {name!r} does not belong to {type(self).__name__} "
                                 f"over {len(self.params)} parameters (its state: {', '.join(self.state_keys)})")
            if key == "step":
                state[int(index)][key] = int(value)
                continue
            p = self.params[int(index)].data
            if tuple(np.shape(value)) != tuple(p.shape):
                raise ValueError(f"optimizer state {name!r} has shape {tuple(np.shape(value))}, "
                                 f"its parameter {tuple(p.shape)}")
            B = backend_of(p)
            # A copy: the buffers are updated in place (see Module.load_state_dict).
            state[int(index)][key] = B.asarray(np.array(value, order="C"), dtype=B.dtype_name(p))
        self.steps, self.state = int(flat["steps"]), state
        if "lr" in flat:  # states written before it was saved keep the optimizer's own
            self.lr = float(flat["lr"])


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``:
    g = grad + wd * p;  buf = momentum * buf + g;  p -= lr * (g + momentum * buf if nesterov else buf)."""

    replayable = True
    state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, *, nesterov: bool = False,
                 weight_decay: float = 0.0):
        # Keywords after momentum: torch.optim.SGD's next positional argument is dampening,
        # which this SGD does not have, so a positional call from torch code must fail.
        super().__init__(params, lr)
        momentum = float(require(momentum, "momentum", number(0, low_open=False)))
        weight_decay = float(require(weight_decay, "weight_decay", number(0, low_open=False)))
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = momentum, bool(nesterov), weight_decay

    def _update(self, params: list[Parameter], states: list[dict]) -> None:
        # Whole-list operations: a handful of multi-tensor kernels per step on PyTorch
        # instead of six operators per parameter, each the same arithmetic as p -= lr * g.
        B = backend_of(params[0].data)
        data = [p.data for p in params]
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = B.foreach("add", grads, B.foreach("mul", data, self.weight_decay))
        if self.momentum:
            old = [(s["momentum_buffer"], g) for s, g in zip(states, grads) if "momentum_buffer" in s]
            if old:
                bufs, gs = map(list, zip(*old))
                B.foreach("add_", B.foreach("mul_", bufs, self.momentum), gs)
            for s, g in zip(states, grads):
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = B.copy(g)
            bufs = [s["momentum_buffer"] for s in states]
            grads = B.foreach("add", grads, B.foreach("mul", bufs, self.momentum)) if self.nesterov else bufs
        B.foreach("sub_", data, B.foreach("mul", grads, self.lr))


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam``.
    (Not replayable: the bias correction of each step is computed on the host.)"""

    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = tuple(float(require(b, f"beta{i}", number(0, low_open=False, high=1)))
                           for i, b in enumerate(betas, 1))
        self.eps = float(require(eps, "eps", number(0, low_open=False)))
        self.weight_decay = float(require(weight_decay, "weight_decay", number(0, low_open=False)))

    def _update(self, params: list[Parameter], states: list[dict]) -> None:
        for p, state in zip(params, states):
            self._update_one(p, state)

    def _update_one(self, p: Parameter, state: dict) -> None:
        B = backend_of(p.data)
        b1, b2 = self.betas
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if "exp_avg" not in state:
            state["exp_avg"] = B.zeros_like(p.data)
            state["exp_avg_sq"] = B.zeros_like(p.data)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        # Each parameter counts its own steps (it may have skipped some without a gradient).
        t = state["step"] = state.get("step", 0) + 1
        step_size = self.lr / (1 - b1 ** t)
        denom = B.sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
        p.data -= step_size * (m / denom)


OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "step", "cosine")


def lr_at(epoch: int, base_lr: float, schedule: str = "none", epochs: int = 1,
          milestones=(30, 40), gamma: float = 0.1) -> float:
    """Learning rate for 0-based ``epoch``, stepped once per epoch.

    ``step`` equals ``MultiStepLR(milestones, gamma)``; ``cosine`` equals
    ``CosineAnnealingLR(T_max=epochs, eta_min=0)``.
    """
    if schedule == "none":
        return base_lr
    if schedule == "step":
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    if schedule == "cosine":
        return base_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
