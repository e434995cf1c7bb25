"""A training step replayed from a recording: one launch instead of ~1,500 operator calls.

On a GPU, a small batch's step costs the host time of issuing its operators, not their
arithmetic (``python -m cnn.bench`` counts them: ops/step). A CUDA graph records the kernels
of one step and launches them all again with one call. A replay runs no Python: the same
kernels, on the same memory, with the same scalars. So the recorded step must keep all
state in place (tests/test_models.py checks that a step does), read nothing back to the
host, and be recorded again when a scalar baked into it (the learning rate) changes.
"""
from __future__ import annotations

import warnings
from typing import Callable

from cnn.backend import Backend


class StepReplay:
    """Calls ``step(x, y)`` for each batch, eagerly or by replaying a recording of it.

    For each batch shape, the first batch runs eagerly (creating the layer workspaces,
    momentum buffers and accumulators that the recording then uses), the second is recorded
    and replayed, and the rest are copied into the recorded inputs and replayed. An eager
    step of another shape (an epoch's last, smaller batch) drops the recording, because it
    reallocated workspaces that the recording uses. Where the backend cannot record (NumPy,
    PyTorch off CUDA) every step runs eagerly, so results never depend on which happened.
    If recording fails, a warning says why and the steps run eagerly (a recording launches
    nothing, so the batch being recorded is then stepped eagerly: no step is lost or doubled).
    Make a new one whenever a value the step reads on the host changes: each epoch, for
    the learning rate. ``replays`` counts the steps that were replayed.
    """

    def __init__(self, step: Callable, B: Backend):
        self.step, self.B = step, B
        self.graph = self.inputs = self.recorded_shapes = self.eager_shapes = None
        self.can_record, self.replays = B.can_record, 0

    def __call__(self, x, y) -> None:
        shapes = (tuple(x.shape), tuple(y.shape))
        if self.graph is not None and shapes == self.recorded_shapes:
            self.inputs[0][...] = x
            self.inputs[1][...] = y
            self._replay()
            return
        if shapes == self.eager_shapes and self.can_record:
            inputs = (self.B.copy(x), self.B.copy(y))
            try:
                self.graph = self.B.record(lambda: self.step(*inputs))
            except RuntimeError as err:
                warnings.warn(f"recording the training step on {self.B!r} failed, so it runs "
                              f"eagerly (same results, more host time): {err}", RuntimeWarning)
                self.can_record = False
            else:
                self.inputs, self.recorded_shapes = inputs, shapes
                self._replay()
                return
        self.graph = None
        self.step(x, y)
        self.eager_shapes = shapes

    def _replay(self) -> None:
        self.graph.replay()
        self.replays += 1
