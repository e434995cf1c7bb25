"""Optimizers and learning-rate schedules against torch.optim (float64, tight)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnn.models import ResidualBlock, simple_cnn
from cnn.module import Parameter
from cnn.optim import SGD, Adam, lr_at
from tests.oracle import to_numpy

SHAPES = [(3, 4), (5,), (2, 3, 2, 2), (1,)]
STEPS = 50

SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=1e-2),
    "momentum_wd": dict(lr=0.01, momentum=0.9, weight_decay=1e-4),
    "nesterov_wd": dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=5e-3),
}
ADAM_CONFIGS = {
    "default": dict(lr=1e-3),
    "weight_decay": dict(lr=1e-2, weight_decay=1e-2),
    "betas_eps": dict(lr=5e-3, betas=(0.8, 0.95), eps=1e-6),
    "betas_wd": dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1),
}


def make_params(B, rng):
    """Matching (ours, torch) parameter lists in float64 on backend B."""
    values = [rng.standard_normal(s) for s in SHAPES]
    ours = [Parameter(B.asarray(v.copy(), dtype="float64")) for v in values]
    theirs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    return ours, theirs


def set_grads(ours, theirs, B, rng, skip=()):
    for i, (p, t) in enumerate(zip(ours, theirs)):
        if i in skip:
            p.grad, t.grad = None, None
            continue
        g = rng.standard_normal(t.shape) * 2.0
        p.grad = B.asarray(g, dtype="float64")
        t.grad = torch.tensor(g, dtype=torch.float64)


def assert_params_equal(ours, theirs, what=""):
    for i, (p, t) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(to_numpy(p.data), t.detach().numpy(), rtol=1e-12, atol=1e-14,
                                   err_msg=f"{what} param {i}")


def torch_optimizer(kind, params, cfg):
    if kind == "sgd":
        return torch.optim.SGD(params, **cfg)
    return torch.optim.Adam(params, **cfg)


def our_optimizer(kind, params, cfg):
    return SGD(params, **cfg) if kind == "sgd" else Adam(params, **cfg)


CASES = [("sgd", k) for k in SGD_CONFIGS] + [("adam", k) for k in ADAM_CONFIGS]


def config(kind, name):
    return (SGD_CONFIGS if kind == "sgd" else ADAM_CONFIGS)[name]


@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_many_steps_equal_torch_optim(kind, name, backend, rng):
    cfg = config(kind, name)
    ours, theirs = make_params(backend, rng)
    opt, ref = our_optimizer(kind, ours, cfg), torch_optimizer(kind, theirs, cfg)
    for step in range(STEPS):
        set_grads(ours, theirs, backend, rng)
        opt.step()
        ref.step()
        if step in (0, 1, STEPS - 1):
            assert_params_equal(ours, theirs, f"step {step}")
    assert opt.steps == STEPS


@pytest.mark.parametrize("kind,name", [("sgd", "momentum_wd"), ("adam", "weight_decay")])
def test_parameters_without_grad_are_skipped_like_torch(kind, name, backend, rng):
    """A parameter whose grad is None in a step is left alone (no decay, no momentum), as in
    torch.optim. For Adam the bias correction then uses that parameter's own step count."""
    cfg = config(kind, name)
    ours, theirs = make_params(backend, rng)
    opt, ref = our_optimizer(kind, ours, cfg), torch_optimizer(kind, theirs, cfg)
    for step in range(10):
        set_grads(ours, theirs, backend, rng, skip={0} if step < 3 else ({1} if step % 2 else ()))
        opt.step()
        ref.step()
    assert_params_equal(ours, theirs)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_optimizer_per_group_equals_torch_param_groups(kind, backend, rng):
    """The README's stand-in for param_groups: two optimizers over two sets of parameters,
    each with its own lr and weight decay, equal one torch optimizer with two groups."""
    ours, theirs = make_params(backend, rng)
    slow, fast = dict(lr=1e-3, weight_decay=1e-2), dict(lr=1e-2, weight_decay=0.0)
    if kind == "sgd":
        slow["momentum"] = fast["momentum"] = 0.9
    opts = [our_optimizer(kind, ours[:2], slow), our_optimizer(kind, ours[2:], fast)]
    ref = torch_optimizer(kind, [dict(params=theirs[:2], **slow), dict(params=theirs[2:], **fast)], {})
    for _ in range(10):
        set_grads(ours, theirs, backend, rng)
        for opt in opts:
            opt.step()
        ref.step()
    assert_params_equal(ours, theirs)


@pytest.mark.parametrize("kind,name", [("sgd", "momentum"), ("sgd", "nesterov"), ("sgd", "momentum_wd"),
                                       ("adam", "default")])
def test_steps_on_one_gradient_equal_torch_and_leave_it_alone(kind, name, backend, rng):
    """One gradient stepped three times: a momentum buffer that shared the gradient's memory
    would change it (and itself) in place; torch.optim leaves the gradient as it was."""
    cfg = config(kind, name)
    ours, theirs = make_params(backend, rng)
    opt, ref = our_optimizer(kind, ours, cfg), torch_optimizer(kind, theirs, cfg)
    set_grads(ours, theirs, backend, rng)
    grads = [to_numpy(p.grad).copy() for p in ours]
    for _ in range(3):
        opt.step()
        ref.step()
    assert_params_equal(ours, theirs)
    for p, g in zip(ours, grads):
        np.testing.assert_array_equal(to_numpy(p.grad), g)


@pytest.mark.parametrize("kind,name", [("sgd", "momentum_wd"), ("adam", "weight_decay")])
def test_scalar_parameter_equals_torch(kind, name, backend, rng):
    """A 0-d parameter (e.g. a learnable temperature). With NumPy, arithmetic on 0-d arrays
    returns numpy scalars, which the backend seam must accept."""
    cfg = config(kind, name)
    p = Parameter(backend.asarray(np.array(0.7), dtype="float64"))
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    opt, ref = our_optimizer(kind, [p], cfg), torch_optimizer(kind, [t], cfg)
    for _ in range(5):
        g = rng.standard_normal()
        p.grad, t.grad = backend.asarray(np.array(g), dtype="float64"), torch.tensor(g, dtype=torch.float64)
        opt.step()
        ref.step()
    assert to_numpy(p.data).shape == ()
    np.testing.assert_allclose(to_numpy(p.data), t.item(), rtol=1e-12)


@pytest.mark.parametrize("kind,name", [("sgd", "momentum_wd"), ("sgd", "nesterov"),
                                       ("adam", "default"), ("adam", "betas_wd")])
def test_state_dict_round_trip_continues_identically(kind, name, backend, rng):
    cfg = config(kind, name)
    ours, theirs = make_params(backend, rng)
    opt, ref = our_optimizer(kind, ours, cfg), torch_optimizer(kind, theirs, cfg)
    for _ in range(20):
        set_grads(ours, theirs, backend, rng)
        opt.step()
        ref.step()
    flat = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    assert int(flat["steps"]) == 20
    # a save/load through an .npz, as in a checkpoint
    import io

    buf = io.BytesIO()
    np.savez(buf, **flat)
    buf.seek(0)
    with np.load(buf) as data:
        flat = {k: data[k] for k in data.files}
    # fresh parameters with the same values, a fresh optimizer, loaded state
    resumed = [Parameter(backend.asarray(to_numpy(p.data).copy(), dtype="float64")) for p in ours]
    opt2 = our_optimizer(kind, resumed, cfg)
    opt2.load_state_dict(flat)
    assert opt2.steps == 20
    for _ in range(15):
        set_grads(ours, theirs, backend, rng)
        for p, q in zip(resumed, ours):
            q_grad = to_numpy(q.grad)
            p.grad = backend.asarray(q_grad.copy(), dtype="float64")
        opt.step()
        opt2.step()
        ref.step()
    for p, q in zip(resumed, ours):
        np.testing.assert_array_equal(to_numpy(p.data), to_numpy(q.data))
    assert_params_equal(resumed, theirs, "resumed vs torch")


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.pop("steps"), "no 'steps' entry"),
    (lambda f: f.update({"9.momentum_buffer": np.zeros(1)}), "'9.momentum_buffer' does not belong to SGD over 4"),
    (lambda f: f.update({"0.exp_avg": np.zeros((3, 4))}), "'0.exp_avg' does not belong to SGD .*momentum_buffer"),
    (lambda f: f.update({"3.momentum_buffer": np.zeros(2)}), r"'3.momentum_buffer' has shape \(2,\), its parameter \(1,\)"),
])
def test_load_state_dict_refuses_another_optimizers_state_and_changes_nothing(edit, message, backend, rng):
    ours, _ = make_params(backend, rng)
    opt = SGD(ours, lr=0.1, momentum=0.9)
    for _ in range(2):
        for p in ours:
            p.grad = backend.asarray(rng.standard_normal(tuple(p.data.shape)), dtype="float64")
        opt.step()
    flat = opt.state_dict()
    bad = dict(flat)
    edit(bad)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert opt.steps == 2
    for key, value in opt.state_dict().items():
        np.testing.assert_array_equal(value, flat[key])


def test_lr_may_be_any_real_number_type():
    assert SGD([Parameter(np.zeros(2))], lr=np.float32(0.5)).lr == 0.5


def test_optimizer_state_is_on_the_parameters_backend(backend, rng):
    ours, _ = make_params(backend, rng)
    opt = Adam(ours, lr=1e-3)
    for p in ours:
        p.grad = backend.asarray(np.ones(p.shape), dtype="float64")
    opt.step()
    opt2 = Adam(ours, lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    for state in opt2.state:
        assert state["step"] == 1  # a per-parameter counter, as in torch.optim.Adam
        for key, v in state.items():
            if key != "step":
                assert type(v) is type(ours[0].data)


# ---------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------

def torch_lrs(make_scheduler, base_lr, epochs):
    """lr of each epoch 0..epochs-1 from a torch scheduler stepped once per epoch."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("milestones,gamma,epochs", [
    ((30, 40), 0.1, 50),
    ((5,), 0.5, 12),
    ((2, 4, 6), 0.3, 10),
    ((7, 3), 0.1, 10),        # unsorted
    ((3, 3, 6), 0.5, 9),      # repeated milestone: gamma applied twice
    ((100,), 0.1, 20),        # never reached
    ((0, 1), 0.1, 4),         # from the first epoch
])
def test_step_schedule_equals_multisteplr(milestones, gamma, epochs):
    base = 0.05
    expected = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, list(milestones), gamma),
                         base, epochs)
    got = [lr_at(e, base, "step", epochs, milestones, gamma) for e in range(epochs)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("epochs", [1, 2, 5, 50, 200])
def test_cosine_schedule_equals_cosine_annealing(epochs):
    base = 0.1
    expected = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
                         base, epochs)
    got = [lr_at(e, base, "cosine", epochs) for e in range(epochs)]
    # torch updates the lr recursively (a few ulps of drift); ours is the closed form.
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    assert got[0] == base


def test_none_schedule_is_constant():
    assert [lr_at(e, 0.02, "none", 10) for e in range(10)] == [0.02] * 10


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(0, 0.1, "linear", 10)


# ---------------------------------------------------------------------------------------
# Invalid arguments
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.1", None])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_invalid_lr_raises(kind, lr):
    """In the constructor, and when set between steps (else the next step fails in NumPy)."""
    params = [Parameter(np.zeros(3))]
    with pytest.raises(ValueError, match="learning rate must be a number >= 0; got "):
        our_optimizer(kind, params, dict(lr=lr))
    opt = our_optimizer(kind, params, dict(lr=0.1))
    with pytest.raises(ValueError, match="learning rate must be a number >= 0; got "):
        opt.lr = lr
    assert opt.lr == 0.1


def test_empty_parameter_list_raises():
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_parameter_given_twice_is_refused(kind):
    """Each step would update it twice (torch.optim only warns)."""
    model = simple_cnn()
    with pytest.raises(ValueError, match=r"got parameter 0 again as parameter 16 \(32, 3, 3, 3\): pass each "
                                         r"Parameter once"):
        our_optimizer(kind, model.parameters() + model[0].parameters(), dict(lr=0.1))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("params, message", [
    (lambda: simple_cnn(), r"got a Sequential: pass model.parameters\(\)"),  # iterable: fails at step()
    (lambda: ResidualBlock(2, 2), r"got a ResidualBlock: pass model.parameters\(\)"),  # not iterable
    (lambda: torch.nn.Linear(2, 2).parameters(),
     r"got a torch.nn.parameter.Parameter: pass model.parameters\(\) of a cnn model"),
    (lambda: [{"params": simple_cnn().parameters(), "lr": 0.1}],
     "got a dict: parameter groups are not supported: step one optimizer per group"),
    (lambda: [simple_cnn()], r"got a Sequential: pass model.parameters\(\) of a cnn model$"),
    (lambda: [Parameter(np.zeros(2)), *torch.nn.Linear(2, 2).parameters()],
     r"got a torch.nn.parameter.Parameter: pass model.parameters\(\) of a cnn model"),
], ids=["model", "block", "torch parameters", "param groups", "list of models", "mixed"])
def test_an_optimizer_given_something_else_than_parameters_says_what_to_pass(kind, params, message):
    with pytest.raises(TypeError, match=f"{'SGD' if kind == 'sgd' else 'Adam'} takes Parameters, " + message):
        (SGD if kind == "sgd" else Adam)(params(), lr=0.1)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_zero_grad_drops_the_gradients_by_default_as_torch(kind):
    params = [Parameter(np.ones(3, np.float32)), Parameter(np.ones(2, np.float32))]
    opt = (SGD if kind == "sgd" else Adam)(params, lr=0.1)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([Parameter(np.zeros(2))], lr=0.1, nesterov=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: SGD(p, 0.1, momentum=-0.9), r"momentum must be a number >= 0; got -0.9"),
    (lambda p: SGD(p, 0.1, weight_decay=float("nan")), r"weight_decay must be a number >= 0; got nan"),
    (lambda p: Adam(p, betas=(1.0, 0.999)), r"beta1 must be a number in \[0, 1\); got 1.0"),
    (lambda p: Adam(p, betas=(0.9,)), r"betas must be a pair"),
    (lambda p: Adam(p, eps=-1e-8), r"eps must be a number >= 0"),
])
def test_invalid_hyperparameters_raise_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make([Parameter(np.zeros(2))])


def test_sgd_arguments_after_momentum_are_keywords():
    """torch.optim.SGD(p, lr, momentum, dampening, weight_decay, nesterov): a positional call
    written for it would set other knobs here, so it fails instead."""
    with pytest.raises(TypeError):
        SGD([Parameter(np.zeros(2))], 0.1, 0.9, 0.5, 1e-4)
    assert SGD([Parameter(np.zeros(2))], 0.1, 0.9).momentum == 0.9


def test_lr_can_be_changed_between_steps(rng):
    """fit() sets optimizer.lr each epoch: the new lr must be used (as a torch param group)."""
    p = Parameter(np.ones(3))
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([t], lr=0.1, momentum=0.9)
    for step in range(7):
        lr = 0.1 * 0.5 ** step if step != 3 else 0  # lr 0 is taken, as torch.optim takes it
        opt.lr = lr
        ref.param_groups[0]["lr"] = lr
        g = rng.standard_normal(3)
        p.grad, t.grad = g.copy(), torch.from_numpy(g.copy())
        opt.step()
        ref.step()
    np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-13)
    assert math.isfinite(float(p.data.sum()))


def test_a_model_moved_after_the_optimizer_stepped_is_a_clear_error():
    """Momentum buffers stay where they were made; load_state_dict moves them."""
    import cnn

    p = Parameter(np.ones(3, np.float32))
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = np.ones(3, np.float32)
    opt.step()
    B = cnn.get_backend("torch", "cpu")
    p.data, p.grad = B.asarray(p.data), B.asarray(np.ones(3, np.float32))
    with pytest.raises(RuntimeError, match=r"SGD's state is on numpy \(cpu\) but the parameters are now on torch"):
        opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.step()
    np.testing.assert_allclose(to_numpy(p.data), 1 - 0.1 - 0.1 * 1.9)


def test_an_optimizer_state_keeps_the_learning_rate_and_its_kind():
    """A hand-set lr (a schedule's) comes back with the state, as in torch.optim; the state
    of another optimizer is refused rather than loaded as an empty one."""
    params = [Parameter(np.zeros(3, np.float32))]
    opt = SGD(params, lr=0.1, momentum=0.9)
    opt.lr = 0.001
    fresh = SGD(params, lr=0.1, momentum=0.9)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.lr == pytest.approx(0.001)
    with pytest.raises(ValueError, match="optimizer state is SGD's, not Adam's"):
        Adam(params, lr=0.1).load_state_dict(opt.state_dict())
