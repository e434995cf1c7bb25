"""Every layer's hand-written forward and backward against PyTorch autograd.

Each comparison checks the forward output, the input gradient returned by ``backward`` and
the gradient of every parameter, on every backend (see conftest.py), in float64 (tight)
and float32 (loose).
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cnn
from cnn import functional as F
from cnn.backend import manual_seed
from cnn.layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d,
                        Linear, MaxPool2d, ReLU)
from tests.oracle import (TOLERANCES, assert_close, check_layer, load_into_torch,
                          printed_as_installed_torch, run_ours, run_torch, to_numpy)


def randomize_bn(layer: BatchNorm2d, rng, tracked: int = 3) -> BatchNorm2d:
    """Non-trivial gamma, beta and running statistics (the defaults make BN nearly identity)."""
    c = layer.num_features
    layer.load_state_dict({
        "weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(size=c),
        "running_mean": rng.normal(size=c), "running_var": rng.uniform(0.5, 2.0, c),
        "num_batches_tracked": np.array(tracked, np.int64)})
    return layer


def randomize_bias(layer, rng):
    if layer.bias is not None:
        layer.load_state_dict({**layer.state_dict(), "bias": rng.normal(size=layer.bias.shape)})
    return layer


# ---------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------

# (C_in, C_out, kernel, stride, padding, bias, N, H, W)
CONV_CASES = [
    (5, 4, 3, 1, 1, True, 2, 7, 9),
    (5, 4, 3, 1, 0, True, 2, 7, 9),
    (5, 4, 3, 2, 0, True, 2, 7, 9),
    (5, 4, 3, 2, 1, False, 1, 7, 9),
    (3, 6, 1, 1, 0, True, 2, 7, 9),
    (3, 6, 1, 2, 0, False, 3, 7, 9),
    (3, 6, 1, 1, 1, True, 1, 5, 6),
    (2, 3, 5, 1, 1, True, 2, 7, 9),
    (2, 3, 5, 2, 0, False, 1, 9, 7),
    (2, 3, 5, 2, 1, True, 2, 8, 11),
    (4, 2, (3, 5), 1, 1, True, 2, 7, 9),
    (1, 1, 3, 1, 0, True, 1, 3, 3),  # output 1x1
    # as many or fewer output channels than input channels
    (4, 4, 3, 1, 1, True, 2, 7, 9),
    (6, 2, 3, 1, 0, False, 1, 7, 9),
    (5, 3, 5, 1, 2, True, 2, 8, 7),
    (4, 4, 1, 1, 0, True, 3, 5, 6),
]


@pytest.mark.parametrize("per_offset", [True, False], ids=["dcols_by_offset", "dcols_one_matmul"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "c{}-{}_k{}_s{}_p{}_b{}_n{}_{}x{}".format(*c))
def test_conv2d_matches_torch(case, per_offset, backend, dtype, rng, monkeypatch):
    """Both layouts of the patch gradients (Backend.patch_grads_per_offset) on every backend."""
    monkeypatch.setattr(backend, "patch_grads_per_offset", per_offset)
    c_in, c_out, k, s, p, bias, n, h, w = case
    ours = randomize_bias(Conv2d(c_in, c_out, k, stride=s, padding=p, bias=bias), rng)
    theirs = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=bias)
    x = rng.standard_normal((n, c_in, h, w))
    check_layer(ours, theirs, x, backend, dtype, rng=rng)


@pytest.mark.parametrize("padding, kernel_size", [("same", 3), ("same", 5), ("valid", 3), ("valid", (2, 3))])
def test_conv2d_takes_padding_by_name_as_torch(padding, kernel_size, backend, dtype, rng):
    ours = randomize_bias(Conv2d(3, 4, kernel_size, padding=padding), rng)
    theirs = nn.Conv2d(3, 4, kernel_size, padding=padding)
    assert repr(ours) == repr(theirs)
    check_layer(ours, theirs, rng.standard_normal((2, 3, 7, 6)), backend, dtype, rng=rng)


@pytest.mark.parametrize("args", [dict(kernel_size=4), dict(kernel_size=(3, 5)), dict(kernel_size=3, stride=2)])
def test_conv2d_same_padding_that_would_be_uneven_is_refused(args):
    """torch pads an even kernel more on one side, which the engine's one padding cannot."""
    with pytest.raises(ValueError, match=r"Conv2d\(padding='same'\) needs stride 1 and a square kernel of odd "
                                         r"size here .* give padding as a number"):
        Conv2d(2, 2, padding="same", **args)


@pytest.mark.parametrize("make, x_shape, g_shape", [
    (lambda L: L.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 5), (2, 4, 6, 5)),
    (lambda L: L.Linear(3, 4), (2, 3), (2, 4)),
], ids=["conv2d", "linear"])
def test_a_layer_without_input_grad_still_fills_parameter_grads(make, x_shape, g_shape, backend, rng):
    ours = make(cnn.layers)
    x = rng.standard_normal(x_shape)
    g = rng.standard_normal(g_shape)
    ref = run_torch(load_into_torch(ours.to(backend, dtype="float64"), make(nn)), x, g)
    ours.input_grad = False
    got = run_ours(ours, x, g, backend, "float64")
    assert got.grad_in is None
    for name in ("weight", "bias"):
        assert_close(got.grads[name], ref.grads[name], "float64", name)


def test_conv2d_reused_across_input_shapes_matches_torch(backend, rng):
    """One layer, one workspace: batches of another size and then another image size with
    the same number of patches (so the same column buffer) each get correct gradients."""
    ours = randomize_bias(Conv2d(3, 4, 3, padding=1), rng)
    theirs = nn.Conv2d(3, 4, 3, padding=1)
    for shape in [(2, 3, 6, 6), (8, 3, 3, 3), (2, 3, 6, 6), (1, 3, 6, 6)]:
        check_layer(ours, theirs, rng.standard_normal(shape), backend, "float32", rng=rng)


def test_conv2d_parameter_shapes_and_count():
    conv = Conv2d(5, 7, 3)
    assert conv.weight.shape == (7, 5, 3, 3) and conv.bias.shape == (7,)
    assert conv.num_parameters() == 7 * 5 * 9 + 7
    assert [n for n, _ in Conv2d(5, 7, 3, bias=False).named_parameters()] == ["weight"]


# ---------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_in,d_out,bias,n", [(7, 5, True, 3), (7, 5, False, 4), (9, 1, True, 1),
                                               (1, 3, False, 1)])
def test_linear_matches_torch(d_in, d_out, bias, n, backend, dtype, rng):
    ours = randomize_bias(Linear(d_in, d_out, bias=bias), rng)
    theirs = nn.Linear(d_in, d_out, bias=bias)
    check_layer(ours, theirs, rng.standard_normal((n, d_in)), backend, dtype, rng=rng)


# ---------------------------------------------------------------------------------------
# BatchNorm2d
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 5, 7, 9), (1, 3, 4, 5), (2, 1, 1, 3),
                                   (3, 2, 15, 15)],  # 675 values per channel: sums in blocks and a rest
                         ids=str)
def test_batchnorm2d_matches_torch(shape, train, backend, dtype, rng):
    c = shape[1]
    ours = randomize_bn(BatchNorm2d(c), rng)
    theirs = nn.BatchNorm2d(c)
    x = rng.standard_normal(shape) * 3 + 1.5
    check_layer(ours, theirs, x, backend, dtype, train=train, rng=rng)


@pytest.mark.parametrize("rows", [1, 511, 512, 513, 1025, 2000])
def test_column_sums_add_every_row(rows, backend, rng):
    """NumPy sums blocks of 512 rows and then the rest: every row counts, whatever M."""
    a = rng.standard_normal((rows, 3)) + 2.0
    got = to_numpy(backend.column_sums(backend.asarray(a, dtype="float32")))
    np.testing.assert_allclose(got, a.astype(np.float32).sum(axis=0, dtype=np.float64), rtol=1e-6)


def test_column_sums_add_the_block_sums_in_float64():
    """NumPy (and CuPy) add the 512-row block sums in float64: over 2**18 rows (512 blocks)
    the float32 result stays within ~1e-7 of the exact sum; adding the blocks in float32
    would be off by several times that."""
    a = (np.random.default_rng(3).standard_normal((1 << 18, 4)) + 2.0).astype(np.float32)
    got = cnn.get_backend("numpy").column_sums(a)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, a.sum(axis=0, dtype=np.float64), rtol=1.5e-7, atol=0)


@pytest.mark.parametrize("settings", [{}, {"eps": 1e-2, "momentum": 0.3}], ids=["default", "eps1e-2_momentum0.3"])
def test_batchnorm2d_running_stats_follow_torch(settings, backend, dtype, rng):
    """Several train steps update running_mean/var/num_batches_tracked as torch does; eval
    afterwards (running stats) then matches too."""
    c = 5
    ours = randomize_bn(BatchNorm2d(c, **settings), rng, tracked=0).to(backend, dtype=dtype)
    theirs = load_into_torch(ours, nn.BatchNorm2d(c, **settings), "float64")
    for step in range(4):
        shape = (3 if step % 2 else 2, c, 5, 7)
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype).astype(np.float64)
        g = rng.standard_normal(shape).astype(dtype).astype(np.float64)
        got = run_ours(ours, x, g, backend, dtype, train=True, move=False)
        ref = run_torch(theirs, x, g, train=True)
        assert_close(got.out, ref.out, dtype, f"step {step} output")
        assert_close(got.grad_in, ref.grad_in, dtype, f"step {step} input gradient")
    assert_close(ours.running_mean, theirs.running_mean, dtype, "running_mean")
    assert_close(ours.running_var, theirs.running_var, dtype, "running_var")
    tracked = to_numpy(ours.num_batches_tracked)  # its shape is checked separately below
    assert tracked.dtype == np.int64 and tracked.item() == int(theirs.num_batches_tracked) == 4
    # eval after training uses the running statistics
    x = rng.standard_normal((2, c, 3, 4)).astype(dtype).astype(np.float64)
    g = rng.standard_normal((2, c, 3, 4)).astype(dtype).astype(np.float64)
    got = run_ours(ours, x, g, backend, dtype, train=False, move=False)
    ref = run_torch(theirs, x, g, train=False)
    assert_close(got.out, ref.out, dtype, "eval output")
    assert_close(got.grad_in, ref.grad_in, dtype, "eval input gradient")
    for name in ("weight", "bias"):
        assert_close(got.grads[name], ref.grads[name], dtype, f"eval grad of {name}")
    # eval must not touch the running statistics
    assert to_numpy(ours.num_batches_tracked).item() == 4
    assert_close(ours.running_mean, theirs.running_mean, dtype, "running_mean after eval")


@pytest.mark.parametrize("how", ["fresh", "to", "load_state_dict", "train_step", "unmoved_train_step"])
def test_batchnorm2d_num_batches_tracked_stays_0d(how, backend):
    """torch's num_batches_tracked is a 0-d int64 tensor; ours must keep that shape whatever
    happens to the module (moving it, loading a state_dict, training), or a torch state_dict
    no longer loads into it."""
    if how == "unmoved_train_step" and backend.name != "numpy":
        pytest.skip("a module that was never moved holds numpy arrays")
    bn = BatchNorm2d(3)
    if how in ("to", "train_step"):
        bn.to(backend)
    if how == "load_state_dict":
        bn.load_state_dict(nn.BatchNorm2d(3).state_dict())
    if how in ("train_step", "unmoved_train_step"):
        bn(backend.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 4)), dtype="float32"))
    tracked = to_numpy(bn.num_batches_tracked)
    assert tracked.shape == (), f"num_batches_tracked has shape {tracked.shape} after {how!r}, torch's is ()"
    # state_dict() goes through backend_of(), which must accept the buffer (a numpy scalar
    # such as np.int64(1), what `0-d array + 1` gives in numpy, is rejected today).
    state = bn.state_dict()
    assert state["num_batches_tracked"].shape == ()
    assert state["num_batches_tracked"].dtype == np.int64


def test_batchnorm2d_single_value_per_channel_in_train_raises(backend):
    bn = BatchNorm2d(3).to(backend)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(backend.asarray(np.ones((1, 3, 1, 1), np.float32)))
    bn.eval()
    assert bn(backend.asarray(np.ones((1, 3, 1, 1), np.float32))).shape == (1, 3, 1, 1)


# ---------------------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------------------

def test_relu_matches_torch(backend, dtype, rng):
    x = rng.standard_normal((2, 3, 5, 7))
    x[0, 0, :2] = 0.0  # the gradient at exactly 0 is 0, as in torch
    check_layer(ReLU(), nn.ReLU(), x, backend, dtype, rng=rng)
    check_layer(ReLU(), nn.ReLU(), rng.integers(-2, 3, (4, 6)).astype(float), backend, dtype, rng=rng)


@pytest.mark.parametrize("inplace", [1, "True", None])
def test_relu_inplace_must_be_a_bool(inplace):
    """A truthy non-bool would be printed as torch's inplace=True, yet mean nothing."""
    with pytest.raises(ValueError, match="inplace must be true or false; got"):
        ReLU(inplace=inplace)


# ---------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------

# (kernel, stride, padding)
POOL_CASES = [(2, 2, 0), (3, 2, 0), (3, 2, 1), (2, 1, 0), (3, 1, 1), (2, 2, 1), (3, 3, 0),
              (1, 1, 0), (3, None, 1),
              # non-square: windows overlap along one axis only
              ((2, 3), 2, 0), ((3, 2), 2, 1)]
POOL_IDS = [f"k{k}_s{s}_p{p}".replace(" ", "") for k, s, p in POOL_CASES]


def _tie_inputs(rng, shape):
    """Inputs where many windows hold several equal maxima."""
    return {
        "normal": rng.standard_normal(shape),
        "relu": np.maximum(rng.standard_normal(shape), 0.0),
        "ints": rng.integers(0, 3, shape).astype(float),
        "constant": np.full(shape, 0.5),
        "negative": -1.0 - rng.random(shape),  # padding must never win (it is -inf, not 0)
    }


@pytest.mark.parametrize("kind", ["normal", "relu", "ints", "constant", "negative"])
@pytest.mark.parametrize("k,s,p", POOL_CASES, ids=POOL_IDS)
def test_maxpool2d_matches_torch(k, s, p, kind, backend, dtype, rng):
    x = _tie_inputs(rng, (2, 3, 7, 9))[kind]
    check_layer(MaxPool2d(k, s, p), nn.MaxPool2d(k, s, p), x, backend, dtype, rng=rng)


def test_maxpool2d_tie_gradient_goes_to_first_max_in_row_major_order(backend):
    x = np.ones((1, 1, 2, 2))
    pool = MaxPool2d(2)
    out = pool(backend.asarray(x))
    grad = to_numpy(pool.backward(backend.asarray(np.ones((1, 1, 1, 1)))))
    assert float(to_numpy(out).squeeze()) == 1.0
    np.testing.assert_array_equal(grad[0, 0], [[1.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("k,s,p", POOL_CASES, ids=POOL_IDS)
def test_avgpool2d_matches_torch(k, s, p, backend, dtype, rng):
    x = rng.standard_normal((2, 3, 7, 9))
    check_layer(AvgPool2d(k, s, p), nn.AvgPool2d(k, s, p), x, backend, dtype, rng=rng)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (1, 2, 4, 4)], ids=str)
def test_global_avg_pool_matches_adaptive_avg_pool(shape, backend, dtype, rng):
    x = rng.standard_normal(shape)
    check_layer(GlobalAvgPool2d(), nn.AdaptiveAvgPool2d(1), x, backend, dtype, rng=rng)


def test_pool_padding_larger_than_half_kernel_raises():
    with pytest.raises(ValueError, match="padding"):
        MaxPool2d(2, 2, 2)
    with pytest.raises(ValueError, match="padding"):
        AvgPool2d(3, 1, 2)


# ---------------------------------------------------------------------------------------
# Flatten
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_flatten_matches_torch_flatten(layout, backend, dtype, rng):
    x = rng.standard_normal((2, 5, 3, 4))
    g = rng.standard_normal((2, 60))
    got = run_ours(Flatten(), x, g, backend, dtype, layout=layout)
    ref = run_torch(nn.Flatten(), x, g)
    assert_close(got.out, torch.flatten(torch.from_numpy(x), 1), dtype, "flatten")
    assert_close(got.out, ref.out, dtype, "flatten")
    assert_close(got.grad_in, ref.grad_in, dtype, "flatten backward")


@pytest.mark.parametrize("start_dim, end_dim", [(0, -1), (2, 3), (1, 2), (-3, -2), (3, 3)])
def test_flatten_of_any_axes_matches_torch(start_dim, end_dim, backend, rng):
    x = rng.standard_normal((2, 5, 3, 4))
    theirs = nn.Flatten(start_dim, end_dim)
    g = rng.standard_normal(tuple(theirs(torch.from_numpy(x)).shape))
    got = run_ours(Flatten(start_dim, end_dim), x, g, backend, "float64", layout="channels_last")
    ref = run_torch(theirs, x, g)
    assert tuple(got.out.shape) == tuple(ref.out.shape)
    assert_close(got.out, ref.out, "float64", "flatten")
    assert_close(got.grad_in, ref.grad_in, "float64", "flatten backward")
    assert printed_as_installed_torch(Flatten(start_dim, end_dim)) == repr(theirs)


# ---------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_train_mask_fraction_scale_and_backward(p, backend, dtype, rng):
    manual_seed(3)
    layer = Dropout(p).to(backend).train()
    shape = (8, 16, 25, 25)  # 80,000 values
    x = 1.0 + rng.random(shape)  # never 0, so zeros in the output are dropped values
    xb = backend.asarray(x, dtype=dtype)
    out = to_numpy(layer(xb))
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    (mask,) = layer.cache
    mask = to_numpy(mask).copy()
    dropped = out == 0
    assert abs(dropped.mean() - p) < 0.01, f"zero fraction {dropped.mean():.4f} for p={p}"
    r = TOLERANCES[dtype][0]
    np.testing.assert_allclose(out[~dropped], x.astype(dtype)[~dropped] / (1 - p), rtol=r)
    g = rng.standard_normal(shape)
    grad = to_numpy(layer.backward(backend.asarray(g, dtype=dtype)))
    np.testing.assert_array_equal(grad == 0, dropped)  # same mask as the forward
    np.testing.assert_allclose(grad[~dropped], g.astype(dtype)[~dropped] / (1 - p), rtol=r)
    np.testing.assert_allclose(grad, g.astype(dtype) * mask, rtol=r)


def test_dropout_masks_are_reproducible_and_fresh_each_call(backend):
    x = backend.asarray(np.ones((4, 100), np.float32))
    layer = Dropout(0.5).to(backend)
    manual_seed(7)
    a, b = to_numpy(layer(x)), to_numpy(layer(x))
    manual_seed(7)
    c = to_numpy(layer(x))
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)


def test_numpy_dropout_masks_do_not_repeat_the_loaders_or_the_weights_random_bits():
    """The weights come from default_rng(seed) and an epoch's shuffle and crops from
    default_rng([seed, epoch]), which for epoch 0 is the same stream; the dropout masks of
    that epoch must not be drawn from it again (on a fresh backend neither)."""
    fresh, seeded = cnn.backend.Backend(), cnn.backend.Backend()
    seeded.seed([7, 0])
    for B in (fresh, seeded):
        drawn = B.uniform((1000,), dtype="float64")
        for reused in (np.random.default_rng(7), np.random.default_rng([7, 0]), np.random.default_rng(0)):
            assert not np.array_equal(drawn, reused.random(1000))


@pytest.mark.parametrize("p,train", [(0.5, False), (0.0, True), (0.0, False)])
def test_dropout_identity_in_eval_and_for_p0(p, train, backend, dtype, rng):
    layer = Dropout(p).to(backend).train(train)
    x = rng.standard_normal((3, 4, 5))
    g = rng.standard_normal((3, 4, 5))
    out = layer(backend.asarray(x, dtype=dtype))
    np.testing.assert_array_equal(to_numpy(out), x.astype(dtype))
    np.testing.assert_array_equal(to_numpy(layer.backward(backend.asarray(g, dtype=dtype))),
                                  g.astype(dtype))


def test_dropout_of_everything_zeroes_everything_as_torch(backend):
    layer = Dropout(1.0).to(backend).train()
    x = backend.asarray(np.ones((4, 5), np.float32))
    out = to_numpy(layer(x))
    np.testing.assert_array_equal(out, nn.functional.dropout(torch.ones(4, 5), 1.0).numpy())
    np.testing.assert_array_equal(to_numpy(layer.backward(x)), np.zeros((4, 5), np.float32))


@pytest.mark.parametrize("p", [1.0001, -0.1, 1.5])
def test_dropout_invalid_p_raises(p):
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(p)


# ---------------------------------------------------------------------------------------
# Memory layout: a channels-last input gives the same results
# ---------------------------------------------------------------------------------------

LAYOUT_LAYERS = {
    "conv3_p1": lambda: Conv2d(5, 4, 3, padding=1),
    "conv3_s2": lambda: Conv2d(5, 4, 3, stride=2),
    "conv1": lambda: Conv2d(5, 3, 1, bias=False),
    "bn_train": lambda: BatchNorm2d(5),
    "bn_eval": lambda: BatchNorm2d(5),
    "relu": ReLU,
    "maxpool2": lambda: MaxPool2d(2),
    "maxpool3_s2_p1": lambda: MaxPool2d(3, 2, 1),
    "avgpool3_s2_p1": lambda: AvgPool2d(3, 2, 1),
    "gap": GlobalAvgPool2d,
    "flatten": Flatten,
}


@pytest.mark.parametrize("name", list(LAYOUT_LAYERS))
def test_channels_last_input_gives_identical_results(name, backend, dtype, rng):
    x = rng.standard_normal((2, 5, 7, 9))
    layer = LAYOUT_LAYERS[name]()
    if isinstance(layer, BatchNorm2d):
        randomize_bn(layer, rng)
    layer.to(backend, dtype=dtype)
    state = layer.state_dict()
    train = name != "bn_eval"
    probe = run_ours(layer, x, None, backend, dtype, train=train, move=False)
    g = rng.standard_normal(tuple(probe.out.shape))
    layer.load_state_dict(state)
    a = run_ours(layer, x, g, backend, dtype, train=train, move=False)
    layer.load_state_dict(state)
    b = run_ours(layer, x, g, backend, dtype, train=train, move=False, layout="channels_last")
    # Bitwise identical, except the global mean, whose summation order follows the memory
    # layout (a few ulps).
    rtol, atol = (0, 0) if name != "gap" else TOLERANCES[dtype]
    assert_close(b.out, a.out, dtype, "output", rtol, atol)
    assert_close(b.grad_in, a.grad_in, dtype, "input gradient", rtol, atol)
    for k in a.grads:
        assert_close(b.grads[k], a.grads[k], dtype, f"grad of {k}", rtol, atol)


def test_channels_last_input_vs_torch(backend, rng):
    """A channels-last input through conv -> bn -> relu -> maxpool matches torch."""
    model = cnn.Sequential(Conv2d(3, 4, 3, padding=1), randomize_bn(BatchNorm2d(4), rng), ReLU(),
                           MaxPool2d(3, 2, 1))
    twin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1))
    x = rng.standard_normal((2, 3, 7, 9))
    model.to(backend, dtype="float64")
    load_into_torch(model, twin)
    g = rng.standard_normal((2, 4, 4, 5))
    ref = run_torch(twin, x, g)
    got = run_ours(model, x, g, backend, "float64", layout="channels_last", move=False)
    assert_close(got.out, ref.out, "float64", "output")
    assert_close(got.grad_in, ref.grad_in, "float64", "input gradient")
    for k, v in got.grads.items():
        assert_close(v, ref.grads[k], "float64", k)


# ---------------------------------------------------------------------------------------
# im2col / col2im
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [(3, 3), (2, 3), (1, 1)], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_col2im_is_adjoint_of_im2col(kernel, stride, padding, backend, rng):
    shape = (2, 3, 7, 8)
    x = backend.asarray(rng.standard_normal(shape))
    cols = F.im2col(x, kernel, stride, padding)
    c = backend.asarray(rng.standard_normal(tuple(cols.shape)))
    lhs = float(to_numpy(cols).ravel() @ to_numpy(c).ravel())
    back = F.col2im(F.patch_offsets(c, shape, kernel, stride, padding), shape, kernel, stride, padding)
    assert tuple(back.shape) == shape
    rhs = float(to_numpy(x).ravel() @ to_numpy(back).ravel())
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (1, 1)])
def test_im2col_matches_torch_unfold(stride, padding, backend, rng):
    """Same patches as F.unfold, up to the documented (n, ho, wo) x (i, j, c) ordering."""
    n, c, h, w, kh, kw = 2, 3, 6, 7, 3, 2
    x = rng.standard_normal((n, c, h, w))
    cols = to_numpy(F.im2col(backend.asarray(x), (kh, kw), stride, padding))
    ref = torch.nn.functional.unfold(torch.from_numpy(x), (kh, kw), padding=padding, stride=stride)
    ref = ref.numpy().reshape(n, c, kh, kw, -1).transpose(0, 4, 2, 3, 1).reshape(cols.shape)
    np.testing.assert_array_equal(cols, ref)


def test_conv2d_finite_differences():
    """Central differences of L = sum(conv(x) * G) w.r.t. x, weight and bias (float64)."""
    rng = np.random.default_rng(5)
    conv = randomize_bias(Conv2d(2, 3, 3, stride=2, padding=1), rng).to("numpy", dtype="float64")
    x = rng.standard_normal((1, 2, 4, 5))
    G = rng.standard_normal((1, 3, 2, 3))

    def loss():
        return float((conv.forward(x) * G).sum())

    loss()
    dx = conv.backward(G)
    analytic = {"x": dx, "weight": conv.weight.grad, "bias": conv.bias.grad}
    arrays = {"x": x, "weight": conv.weight.data, "bias": conv.bias.data}
    eps = 1e-6
    for name, arr in arrays.items():
        numeric = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss()
            arr[idx] = old - eps
            down = loss()
            arr[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------------------------------
# softmax, log_softmax, softmax_cross_entropy
# ---------------------------------------------------------------------------------------

def _logit_cases(rng):
    extreme = np.array([[1e4, -1e4, 0.0, 1.0],
                        [-1e4, -1e4, -1e4, -1e4],
                        [1e4, 1e4, 1e4, 1e4],
                        [0.0, 1e4, 0.0, -1e4],
                        [-1e4, 0.0, -1e4 + 1, 1e4 - 3]])
    return {
        "normal": (rng.standard_normal((6, 10)) * 3, rng.integers(0, 10, 6)),
        "batch1": (rng.standard_normal((1, 10)), np.array([7])),
        "extreme": (extreme, np.array([1, 2, 0, 3, 2])),
        "huge_spread": (np.array([[1e30, -1e30, 0.0], [3e4, 2e4, -5e4]]), np.array([1, 2])),
    }


CASES = ["normal", "batch1", "extreme", "huge_spread"]


@pytest.mark.parametrize("case", CASES)
def test_softmax_and_log_softmax_match_torch(case, backend, dtype, rng):
    logits, _ = _logit_cases(rng)[case]
    if dtype == "float32" and case == "huge_spread":
        logits = logits.clip(-1e30, 1e30)  # still representable in float32
    logits = logits.astype(dtype).astype(np.float64)
    ref_t = torch.from_numpy(logits)
    xb = backend.asarray(logits, dtype=dtype)
    p = F.softmax(xb)
    lp = F.log_softmax(xb)
    assert_close(p, torch.softmax(ref_t, 1), dtype, "softmax")
    assert_close(lp, torch.log_softmax(ref_t, 1), dtype, "log_softmax")
    np.testing.assert_allclose(to_numpy(p).sum(1), 1.0, rtol=TOLERANCES[dtype][0])


@pytest.mark.parametrize("case", CASES)
def test_softmax_cross_entropy_matches_torch(case, backend, dtype, rng):
    logits, labels = _logit_cases(rng)[case]
    logits = logits.astype(dtype).astype(np.float64)
    with torch.enable_grad():
        lt = torch.tensor(logits, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(lt, torch.from_numpy(labels))
        ref.backward()
    loss, grad = F.softmax_cross_entropy(backend.asarray(logits, dtype=dtype),
                                         backend.asarray(labels.astype(np.int64)))
    loss_np = to_numpy(loss)
    assert loss_np.shape == () and np.isfinite(loss_np) and np.isfinite(to_numpy(grad)).all()
    assert_close(loss, ref.detach(), dtype, "loss")
    assert_close(grad, lt.grad, dtype, "dlogits")


def test_softmax_cross_entropy_loss_is_a_0d_array_of_the_backend(backend):
    """Documented as a 0-d array: the seam (backend_of) must accept it. NumPy reductions
    return numpy scalars (np.float64), which backend_of rejects."""
    loss, grad = F.softmax_cross_entropy(backend.asarray(np.zeros((2, 3))),
                                         backend.asarray(np.array([0, 2])))
    assert cnn.backend_of(grad) is backend
    assert cnn.backend_of(loss) is backend, f"loss is a {type(loss).__name__}, not an array"
    assert tuple(loss.shape) == ()


@pytest.mark.parametrize("labels", [np.array([[0], [2]]), np.array([0.0, 2.0]), np.array([0, 2, 1])],
                         ids=["(N, 1)", "float", "N + 1"])
def test_softmax_cross_entropy_refuses_labels_that_are_not_one_index_per_row(backend, labels):
    """(N, 1) labels would broadcast into an (N, N) pick: a wrong loss, silently."""
    with pytest.raises(ValueError, match=r"labels must be 2 integer class indices, shape \(2,\)"):
        F.softmax_cross_entropy(backend.asarray(np.zeros((2, 3), np.float32)), backend.asarray(labels))


@pytest.mark.parametrize("labels", [torch.tensor([0, 2]), [0, 2]], ids=["torch", "list"])
def test_softmax_cross_entropy_names_labels_on_another_backend(labels):
    """The shape is right; what is wrong is where the labels live."""
    with pytest.raises(TypeError, match=r"labels must be an integer array on the logits' backend, numpy "
                                        r"\(cpu\); got a (torch \(cpu\) array|list): convert them"):
        F.softmax_cross_entropy(np.zeros((2, 3), np.float32), labels)


def test_softmax_cross_entropy_of_no_rows_checks_no_label_range(backend):
    """An empty batch has no smallest label to read (min() of nothing raises): the range
    check is skipped, and the gradient is empty too."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's mean of nothing
        _, grad = F.softmax_cross_entropy(backend.asarray(np.zeros((0, 3), np.float32)),
                                          backend.asarray(np.zeros(0, np.int64)))
    assert tuple(grad.shape) == (0, 3)


@pytest.mark.parametrize("labels, values", [([0, -1], "from -1 to 0"), ([3, 1], "from 1 to 3")])
def test_softmax_cross_entropy_refuses_labels_outside_the_classes_on_the_cpu(backend, labels, values):
    """-1 would pick the last class, silently; 3 of 3 classes an IndexError. Only the CPU
    checks: on a GPU the step stays device work alone (no value read back)."""
    if backend.device != "cpu":
        pytest.skip("the label range is checked on the CPU only")
    with pytest.raises(ValueError, match=f"labels must be class indices from 0 to 2 for 3 logits per row; got values {values}"):
        F.softmax_cross_entropy(backend.asarray(np.zeros((2, 3), np.float32)), backend.asarray(np.array(labels)))


# ---------------------------------------------------------------------------------------
# Clear errors for wrong input shapes
# ---------------------------------------------------------------------------------------

def test_wrong_rank_raises_naming_expected_shape(backend):
    B = backend
    with pytest.raises(ValueError, match=r"Conv2d expects a 4-d input \(N, C, H, W\).*\(5, 3, 7\)"):
        Conv2d(3, 4, 3).to(B)(B.asarray(np.zeros((5, 3, 7), np.float32)))
    with pytest.raises(ValueError, match=r"Linear expects a 2-d input \(N, features\).*\(2, 3, 4, 4\)"):
        Linear(48, 4).to(B)(B.asarray(np.zeros((2, 3, 4, 4), np.float32)))
    with pytest.raises(ValueError, match=r"BatchNorm2d expects a 4-d input \(N, C, H, W\)"):
        BatchNorm2d(3).to(B)(B.asarray(np.zeros((2, 3), np.float32)))
    for pool in (MaxPool2d(2), AvgPool2d(2), GlobalAvgPool2d()):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            pool(B.asarray(np.zeros((3, 8, 8), np.float32)))


@pytest.mark.parametrize("make, shape, message", [
    (lambda: Conv2d(3, 4, 3), (2, 4, 8, 8), r"Conv2d expects 3 input channels, got 4 \(shape \(2, 4, 8, 8\)\)"),
    (lambda: Linear(48, 4), (2, 47), r"Linear expects 48 input features, got 47"),
    (lambda: BatchNorm2d(3), (2, 5, 4, 4), r"BatchNorm2d expects 3 input channels, got 5"),
    (lambda: Conv2d(3, 4, 3), (0, 3, 8, 8), r"Conv2d got an empty batch \(shape \(0, 3, 8, 8\)\)"),
    (lambda: Linear(5, 2), (0, 5), r"Linear got an empty batch"),
], ids=["conv-channels", "linear-features", "bn-channels", "conv-empty", "linear-empty"])
def test_wrong_channel_count_or_empty_batch_raises_naming_the_shape(backend, make, shape, message):
    with pytest.raises(ValueError, match=message):
        make().to(backend)(backend.asarray(np.zeros(shape, np.float32)))


def test_input_of_another_dtype_or_library_raises_naming_both(backend):
    """NumPy would silently run a float64 batch through float32 weights in float64 (and
    keep float64 momentum); PyTorch would fail deep inside a matmul. BatchNorm2d too: it
    would write float64 statistics into its float32 running buffers."""
    B = backend
    lib = re.escape(repr(B))
    conv, linear, bn = Conv2d(3, 4, 3).to(B), Linear(5, 2).to(B), BatchNorm2d(3).to(B)
    with pytest.raises(TypeError, match=f"Conv2d has {lib} float32 weights but got a {lib} float64 input"):
        conv(B.asarray(np.zeros((1, 3, 5, 5)), dtype="float64"))
    with pytest.raises(TypeError, match=f"Linear has {lib} float32 weights but got a {lib} int64 input"):
        linear(B.asarray(np.zeros((1, 5), np.int64)))
    with pytest.raises(TypeError, match=f"BatchNorm2d has {lib} float32 weights but got a {lib} float64 input"):
        bn(B.asarray(np.zeros((2, 3, 4, 4)), dtype="float64"))
    if B.name != "numpy":
        with pytest.raises(TypeError, match=f"Conv2d has {lib} float32 weights but got a numpy \\(cpu\\) float32 input"):
            conv(np.zeros((1, 3, 5, 5), np.float32))


def test_a_numpy_subclass_input_is_accepted():
    """A memory-mapped dataset slice is an ndarray subclass: the same library and dtype."""
    x = np.zeros((1, 3, 5, 5), np.float32).view(np.memmap)
    assert Conv2d(3, 4, 3)(x).shape == (1, 4, 3, 3)


@pytest.mark.parametrize("args, kwargs", [
    ((3, 8, 3), dict(padding=1)), ((3, 8, (3, 5)), dict(stride=2, bias=False)),
], ids=["conv_padded", "conv_rect_stride2_no_bias"])
def test_conv2d_prints_as_torch(args, kwargs):
    assert repr(Conv2d(*args, **kwargs)) == repr(nn.Conv2d(*args, **kwargs))


@pytest.mark.parametrize("ours, theirs", [
    (lambda: MaxPool2d((2, 3), stride=1, padding=1), lambda: nn.MaxPool2d((2, 3), stride=1, padding=1)),
    (lambda: AvgPool2d(3, stride=2, padding=1), lambda: nn.AvgPool2d(3, stride=2, padding=1)),
    (lambda: Linear(4, 5, bias=False), lambda: nn.Linear(4, 5, bias=False)),
    (lambda: BatchNorm2d(6, eps=1e-3, momentum=0.2), lambda: nn.BatchNorm2d(6, eps=1e-3, momentum=0.2)),
    (lambda: Dropout(0.25), lambda: nn.Dropout(0.25)),
], ids=["maxpool", "avgpool", "linear", "batchnorm", "dropout"])
def test_layers_print_as_torch(ours, theirs):
    assert printed_as_installed_torch(ours()) == repr(theirs())


def test_torch_factory_arguments_at_none_are_taken():
    """torch.nn's device=None, dtype=None: the layer is built where the engine builds it."""
    for ours, theirs in ((Conv2d(3, 4, 3, device=None, dtype=None), nn.Conv2d(3, 4, 3, device=None, dtype=None)),
                         (Linear(2, 3, device=None, dtype=None), nn.Linear(2, 3, device=None, dtype=None)),
                         (BatchNorm2d(3, device=None, dtype=None), nn.BatchNorm2d(3, device=None, dtype=None))):
        assert printed_as_installed_torch(ours) == repr(theirs)


@pytest.mark.parametrize("theirs", [
    nn.Conv2d(3, 8, (3, 5), stride=2, padding=1, bias=False), nn.Conv2d(3, 8, 3, dilation=1, groups=1),
    nn.BatchNorm2d(6, eps=1e-3), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2), nn.Dropout(0.25, inplace=True),
    nn.ReLU(inplace=True), nn.Linear(4, 5), nn.Flatten(),
], ids=repr)
def test_a_layer_printed_by_torch_builds_the_same_layer_here(theirs):
    """torch.nn code, and the layers' printed form, pass torch.nn's arguments at their
    defaults (dilation=1, ceil_mode=False, affine=True, ...): they are taken."""
    ours = eval(repr(theirs), vars(cnn.layers))
    assert type(ours).__module__ == "cnn.layers" and printed_as_installed_torch(ours) == repr(theirs)


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2d(3, 4, 3, dilation=2), r"Conv2d\(dilation=\(2, 2\)\) is not implemented here: only "
                                          r"dilation=\(1, 1\), torch.nn's default"),
    (lambda: Conv2d(3, 4, 3, groups=3), r"Conv2d\(groups=3\) is not implemented here"),
    (lambda: Conv2d(3, 4, 3, padding_mode="reflect"), r"Conv2d\(padding_mode='reflect'\) is not implemented"),
    (lambda: BatchNorm2d(3, affine=False), r"BatchNorm2d\(affine=False\) is not implemented here"),
    (lambda: BatchNorm2d(3, track_running_stats=0), r"BatchNorm2d\(track_running_stats=0\) is not implemented"),
    (lambda: BatchNorm2d(3, affine=1), r"BatchNorm2d\(affine=1\) is not implemented here: only affine=True"),
    (lambda: BatchNorm2d(3, bias=False), r"BatchNorm2d\(bias=False\) is not implemented here"),
    (lambda: Conv2d(3, 4, 3, groups=True), r"Conv2d\(groups=True\) is not implemented here: only groups=1"),
    (lambda: MaxPool2d(2, dilation=2), r"MaxPool2d\(dilation=\(2, 2\)\) is not implemented here"),
    (lambda: AvgPool2d(2, ceil_mode=True), r"AvgPool2d\(ceil_mode=True\) is not implemented here"),
    (lambda: Dropout(0.5, inplace=1), "inplace must be true or false; got 1"),
    (lambda: Linear(2, 2, device="cuda"), r"Linear\(device='cuda'\) is not implemented here: only device=None, "
                                          r"torch.nn's default: build the layer, then move it with \.to\("),
    (lambda: Conv2d(3, 4, 3, dtype=torch.float64), r"Conv2d\(dtype=torch.float64\) is not implemented"),
    (lambda: MaxPool2d(2, ceil_mode=True), r"MaxPool2d\(ceil_mode=True\) is not implemented here"),
    (lambda: MaxPool2d(2, return_indices=True), r"MaxPool2d\(return_indices=True\) is not implemented"),
    (lambda: AvgPool2d(2, count_include_pad=False), r"AvgPool2d\(count_include_pad=False\) is not implemented"),
    (lambda: AvgPool2d(2, divisor_override=3), r"AvgPool2d\(divisor_override=3\) is not implemented"),
])
def test_torch_arguments_away_from_their_default_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2d(3, 4, 3, stride=0), "stride must be an integer >= 1"),
    (lambda: Conv2d(3, 4, 0), "kernel_size must be an integer >= 1"),
    (lambda: Conv2d(3, 4, 3, padding=-1), "padding must be an integer >= 0"),
    (lambda: Conv2d(3, 4, (3, 3, 3)), "kernel_size must be an integer >= 1 \\(or a pair of them\\)"),
    (lambda: MaxPool2d(2, stride=0), "stride must be an integer >= 1"),
    (lambda: AvgPool2d(1.5), "kernel_size must be an integer >= 1"),
    (lambda: Conv2d(3, 0, 3), "out_channels must be a positive integer; got 0"),
    (lambda: Conv2d("3", 4, 3), "in_channels must be a positive integer; got '3'"),
    (lambda: Linear(0, 5), "in_features must be a positive integer; got 0"),
    (lambda: Linear(5, 2.0), "out_features must be a positive integer; got 2.0"),
    (lambda: BatchNorm2d(True), "num_features must be a positive integer; got True"),
    (lambda: Conv2d(3, 4, True), "kernel_size must be an integer >= 1"),
    (lambda: BatchNorm2d(3, momentum=None), r"momentum must be a number in \[0, 1\]; got None"),
    (lambda: BatchNorm2d(3, momentum=1.5), r"momentum must be a number in \[0, 1\]"),
    (lambda: BatchNorm2d(3, eps=0), "eps must be a positive number; got 0"),
])
def test_bad_layer_arguments_raise_naming_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_integers_are_integers_to_the_constructors():
    """Sizes computed with NumPy (np.int64) are accepted, as PyTorch accepts them."""
    conv = Conv2d(np.int64(3), np.int64(4), np.int64(3), stride=np.int32(2), padding=np.int64(1))
    assert conv.kernel_size == (3, 3) and type(conv.kernel_size[0]) is int and conv.stride == 2
    assert MaxPool2d(np.int64(2)).kernel_size == (2, 2)
    assert Conv2d(3, 4, 3, dilation=np.int64(1), groups=np.int32(1)).kernel_size == (3, 3)
    assert MaxPool2d(2, dilation=(1, 1)).kernel_size == (2, 2)  # a pair, as torch takes it
    assert conv(np.zeros((1, 3, 5, 5), np.float32)).shape == (1, 4, 3, 3)


def test_a_list_input_is_a_clear_error():
    with pytest.raises(TypeError, match=r"Conv2d expects an array \(NumPy, torch or CuPy\), got list"):
        Conv2d(1, 1, 1)([[[[0.0]]]])


def test_flatten_refuses_an_input_without_a_batch_axis(backend):
    with pytest.raises(ValueError, match=r"Flatten\(start_dim=1, end_dim=-1\) cannot flatten an input "
                                         r"of shape \(3,\): add a batch axis for one sample, x\[None\]"):
        Flatten()(backend.asarray(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"cannot flatten an input of shape \(2, 3\)$"):
        Flatten(2)(backend.asarray(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="start_dim must be an integer"):
        Flatten(1.0)


def test_too_small_input_raises():
    with pytest.raises(ValueError, match="too small"):
        Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3), np.float32))


def test_unequal_stride_raises():
    with pytest.raises(ValueError, match="stride"):
        Conv2d(1, 1, 3, stride=(1, 2))


LAYERS_WITH_A_CACHE = [
    (lambda: Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
    (lambda: Linear(5, 2), (2, 5)),
    (lambda: BatchNorm2d(3), (2, 3, 5, 5)),
    (lambda: ReLU(), (2, 3)),
    (lambda: MaxPool2d(2), (2, 3, 4, 4)),
    (lambda: AvgPool2d(2), (2, 3, 4, 4)),
    (lambda: GlobalAvgPool2d(), (2, 3, 4, 4)),
    (lambda: Flatten(), (2, 3, 4, 4)),
    (lambda: Dropout(0.5), (2, 3)),
    (lambda: Dropout(0.5).eval(), (2, 3)),
]


@pytest.mark.parametrize("make, shape", LAYERS_WITH_A_CACHE,
                         ids=lambda v: type(v()).__name__ if callable(v) else None)
def test_backward_without_its_own_forward_raises(backend, make, shape):
    """Before forward, and a second time after one forward: each forward allows one backward
    (the cache is released so that its buffers are not kept alive, or reused stale)."""
    layer = make().to(backend)
    x = backend.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    message = rf"{type(layer).__name__}\.backward\(\) has no forward pass to go back through"
    with pytest.raises(RuntimeError, match=message):
        layer.backward(x)
    out = layer(x)
    layer.backward(out)
    with pytest.raises(RuntimeError, match=message):
        layer.backward(out)


@pytest.mark.parametrize("make, shape", LAYERS_WITH_A_CACHE,
                         ids=lambda v: type(v()).__name__ if callable(v) else None)
def test_backward_refuses_a_gradient_unlike_the_output(backend, make, shape):
    """A gradient that would broadcast against the output (one sample's, for a batch's) once
    gave five of these layers a wrong input gradient without a word; one of another dtype
    gives float64 gradients to a float32 layer. Both are refused, and the forward pass is
    kept for a correct gradient."""
    layer = make().to(backend)
    x = backend.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    out = layer(x)
    grad = np.random.default_rng(1).standard_normal(tuple(out.shape)).astype(np.float32)
    one_sample = (1,) + tuple(out.shape[1:])
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}\.backward\(\) got a gradient of shape "
                                         rf"{re.escape(str(one_sample))} for an output of shape "
                                         rf"{re.escape(str(tuple(out.shape)))}"):
        layer.backward(backend.asarray(grad[:1]))
    with pytest.raises(TypeError, match=rf"{name}\.backward\(\) got a {backend.name} \(.*\) float64 "
                                        rf"gradient for a {backend.name} \(.*\) float32 output"):
        layer.backward(backend.asarray(grad.astype(np.float64), dtype="float64"))
    assert tuple(layer.backward(backend.asarray(grad)).shape) == shape


def test_pooling_a_non_square_kernel_needs_a_stride():
    with pytest.raises(ValueError, match=r"kernel_size \(2, 3\) is not square, so the stride cannot default"):
        MaxPool2d((2, 3))
    assert MaxPool2d((2, 3), stride=2)(np.zeros((1, 1, 4, 6), np.float32)).shape == (1, 1, 2, 2)


def test_max_pooling_over_more_than_256_offsets(backend):
    """17 x 17 = 289 offsets, more than a uint8 argmax holds: maxima placed at offsets
    288 and 258 get the gradient, and nothing else does."""
    x = np.random.default_rng(0).uniform(-1, 1, (1, 2, 17, 17)).astype(np.float32)
    x[0, 0, 16, 16] = x[0, 1, 15, 3] = 5.0
    layer = MaxPool2d(17)
    assert np.array_equal(to_numpy(layer(backend.asarray(x))).reshape(2), [5.0, 5.0])
    grad = to_numpy(layer.backward(backend.asarray(np.array([1.0, 2.0], np.float32).reshape(1, 2, 1, 1))))
    expected = np.zeros_like(x)
    expected[0, 0, 16, 16], expected[0, 1, 15, 3] = 1.0, 2.0
    assert np.array_equal(grad, expected)


# ---------------------------------------------------------------------------------------
# Found by mutation testing: boundaries, aliasing and mode switches
# ---------------------------------------------------------------------------------------

def test_max_pooling_over_257_offsets_is_past_what_uint8_holds(backend):
    """257 offsets (kernel 1 x 257): offset 256 no longer fits a uint8 argmax, so the
    gradient of a maximum there must still reach it and not wrap to offset 0."""
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 1, 257)).astype(np.float32)
    x[0, 0, 0, 256] = 5.0
    layer = MaxPool2d((1, 257), stride=1)
    assert to_numpy(layer(backend.asarray(x))).item() == 5.0
    grad = to_numpy(layer.backward(backend.asarray(np.ones((1, 1, 1, 1), np.float32))))
    expected = np.zeros_like(x)
    expected[0, 0, 0, 256] = 1.0
    assert np.array_equal(grad, expected)


def test_pool_padding_is_checked_against_the_smaller_kernel_side():
    """As torch: padding at most half of each side of the kernel, so the shorter one decides."""
    with pytest.raises(ValueError, match="padding"):
        MaxPool2d((4, 2), stride=1, padding=2)
    with pytest.raises(ValueError, match="padding"):
        AvgPool2d((2, 5), stride=1, padding=2)


@pytest.mark.parametrize("make", [lambda: AvgPool2d(2), lambda: MaxPool2d(2), GlobalAvgPool2d, ReLU,
                                  lambda: Conv2d(3, 2, 1), lambda: BatchNorm2d(3)],
                         ids=["avgpool", "maxpool", "gap", "relu", "conv1x1", "batchnorm"])
def test_forward_leaves_its_input_alone_and_outputs_are_not_reused(make, backend, rng):
    """A layer never writes into its input (the layer before keeps it for its backward),
    and an output stays what it was after the next call (torch returns a new tensor)."""
    layer = make().to(backend).train()
    x1, x2 = (rng.standard_normal((2, 3, 4, 4)).astype(np.float32) for _ in range(2))
    xb1 = backend.asarray(x1.copy())
    out1 = layer(xb1)
    kept = to_numpy(out1).copy()
    layer.backward(backend.asarray(np.ones(tuple(out1.shape), np.float32)))
    np.testing.assert_array_equal(to_numpy(xb1), x1)
    layer(backend.asarray(x2))
    np.testing.assert_array_equal(to_numpy(out1), kept)


def test_batchnorm2d_backward_follows_the_mode_of_its_forward_pass(backend, rng):
    """A forward pass in train mode normalised with the batch statistics; switching to eval
    before backward (as autograd's graph, fixed at forward) must not change its gradient."""
    ours = randomize_bn(BatchNorm2d(3), rng).to(backend, dtype="float64")
    theirs = load_into_torch(ours, nn.BatchNorm2d(3))
    x, g = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))
    ref = run_torch(theirs, x, g, train=True)
    ours.train()
    ours(backend.asarray(x))
    ours.eval()
    got = ours.backward(backend.asarray(g))
    assert_close(got, ref.grad_in, "float64", "input gradient")
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref.grads[name], "float64", f"grad of {name}")


@pytest.mark.parametrize("per_offset", [True, False], ids=["dcols_by_offset", "dcols_one_matmul"])
def test_conv2d_moved_to_another_dtype_gets_fresh_patch_gradient_views(per_offset, backend, rng, monkeypatch):
    """Same shapes, new dtype: the workspace's buffers are new arrays, and the kernel-offset
    views of the patch gradients must be made of the new buffer, not the old one."""
    monkeypatch.setattr(backend, "patch_grads_per_offset", per_offset)
    ours = randomize_bias(Conv2d(3, 4, 3, padding=1), rng)
    theirs = nn.Conv2d(3, 4, 3, padding=1)
    x = rng.standard_normal((2, 3, 5, 5))
    check_layer(ours, theirs, x, backend, "float32", rng=rng)
    check_layer(ours, theirs, x, backend, "float64", rng=rng)


@pytest.mark.parametrize("make, shape", [(lambda: Conv2d(1, 1, 4), (1, 1, 3, 3)),
                                         (lambda: MaxPool2d(3, stride=2), (1, 1, 2, 2)),
                                         (lambda: AvgPool2d((1, 3), stride=1), (1, 1, 4, 2))],
                         ids=["conv", "maxpool", "avgpool"])
def test_an_input_one_short_of_the_kernel_raises(make, shape):
    """The kernel overhangs the input by one: no output position at all (0, not negative),
    which must be refused as clearly as a larger overhang."""
    with pytest.raises(ValueError, match="too small"):
        make()(np.zeros(shape, np.float32))


@pytest.mark.parametrize("make, fan_in", [(lambda: Conv2d(4, 256, (3, 5)), 4 * 15), (lambda: Linear(100, 1000), 100)],
                         ids=["conv", "linear"])
def test_initial_weights_and_biases_span_torchs_default_bounds(make, fan_in):
    """As torch.nn: weight and bias uniform in +-1/sqrt(fan_in) (fan_in = C_in * kh * kw
    for a convolution), in float32: they fill that interval and stay within it."""
    manual_seed(0)
    layer = make()
    bound = 1 / np.sqrt(fan_in)
    for name, p in layer.named_parameters():
        values = to_numpy(p.data)
        assert values.dtype == np.float32, name
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound, name


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 3, 1, 2), (3, 3, 1, 1)], ids=str)
def test_batchnorm2d_running_var_of_the_smallest_batches_is_unbiased_as_torch(shape, backend, rng):
    """Two (or three) values per channel, the fewest train mode takes: running_var gets the
    unbiased variance, m / (m - 1) = 2 times the biased one, as in torch."""
    ours = randomize_bn(BatchNorm2d(3), rng, tracked=0).to(backend, dtype="float64")
    theirs = load_into_torch(ours, nn.BatchNorm2d(3))
    x = rng.standard_normal(shape)
    run_ours(ours, x, None, backend, "float64", move=False)
    run_torch(theirs, x, None)
    assert_close(ours.running_var, theirs.running_var, "float64", "running_var")
    assert_close(ours.running_mean, theirs.running_mean, "float64", "running_mean")


def test_max_pool_padding_never_wins_even_over_huge_negative_values(backend):
    """The padding is -inf, not merely a very negative number: a window of -1e35 values
    (float32 holds them) next to the padding still gives -1e35, as torch."""
    x = np.full((1, 2, 4, 4), -1e35, np.float32)
    got = to_numpy(MaxPool2d(3, 2, 1)(backend.asarray(x)))
    np.testing.assert_array_equal(got, nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x)).numpy())


def test_dropout_scales_in_the_dtype_of_its_input(backend, rng):
    """The mask (and 1 / (1 - p)) are in the input's dtype: in float64, 1 / 0.7 is not
    rounded to float32 first."""
    manual_seed(0)
    layer = Dropout(0.3).to(backend).train()
    x = 1.0 + rng.random((4, 50))
    out = to_numpy(layer(backend.asarray(x, dtype="float64")))
    assert backend.dtype_name(layer.cache[0]) == "float64"
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.7, rtol=1e-15)


def test_flatten_refuses_an_end_dim_past_the_last_axis(backend):
    with pytest.raises(ValueError, match=r"cannot flatten an input of shape \(2, 3, 4, 5\)"):
        Flatten(1, 4)(backend.asarray(np.zeros((2, 3, 4, 5), np.float32)))
