"""The reference models against their torch.nn twins (cnn.torch_twins): parameter counts,
state_dict interop in both directions, eval/train outputs, full SGD training steps, and
the ability to overfit a small batch."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import cnn
from cnn.backend import manual_seed
from cnn.functional import softmax_cross_entropy
from cnn.layers import BatchNorm2d, Conv2d, Flatten, Linear, ReLU
from cnn.models import ResidualBlock, Sequential, build_model
from cnn.optim import SGD, Adam
from cnn.torch_twins import Block, torch_twin
from tests.oracle import assert_close, check_layer, printed_as_installed_torch, to_numpy

MODELS = ["simple", "resnet"]
DROPOUT_INDEX = 15  # position of Dropout in simple_cnn (and nn.Dropout in its twin)


def randomize_batchnorms(model, rng):
    """Random gamma/beta/running stats in every BatchNorm2d (defaults are nearly identity)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, BatchNorm2d):
            c, p = module.num_features, f"{name}."
            state[p + "weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            state[p + "bias"] = rng.normal(0, 0.2, c).astype(np.float32)
            state[p + "running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
            state[p + "running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    model.load_state_dict(state)
    return model


class FixedMaskDropout(nn.Module):
    """Multiplies by a given (already scaled) mask: replays our Dropout's mask in the twin."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, x):
        return x * self.mask if self.training else x


def images(rng, n=2):
    return rng.standard_normal((n, 3, 32, 32))


# ---------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("simple", 620_810), ("resnet", 175_818)])
def test_exact_parameter_counts(name, count):
    model = build_model(name)
    assert model.num_parameters() == count
    assert sum(p.numel() for p in torch_twin(name).parameters()) == count


def test_an_unknown_model_has_no_twin():
    with pytest.raises(ValueError, match="no torch.nn twin of model 'vgg': choose one of simple, resnet"):
        torch_twin("vgg")
    # A model in hand (as torch code passes modules around) gets a short message, not its repr.
    with pytest.raises(TypeError, match=r"^torch_twin takes a reference model's name \('simple', 'resnet'\), "
                                        r"got a Sequential: for a model in hand, torch_twin\(name, "
                                        r"model.state_dict\(\)\)$"):
        torch_twin(build_model("resnet"))


def test_a_state_dict_that_does_not_fit_the_twin_is_refused():
    """strict=True: a missing (or extra) key is an error, not a twin with its own random weights."""
    state = build_model("simple").state_dict()
    del state["0.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        torch_twin("simple", state)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        torch_twin("simple", {**build_model("simple").state_dict(), "extra.weight": np.zeros((10, 10), np.float32)})


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_shapes_and_order_equal_the_twin(name):
    ours = build_model(name).state_dict()
    theirs = torch_twin(name).state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert tuple(ours[k].shape) == tuple(theirs[k].shape), k
        assert ours[k].dtype == theirs[k].numpy().dtype, k  # float32, int64 counters


@pytest.mark.parametrize("name", MODELS)
def test_a_model_with_a_new_head_loads_into_its_twin(name, rng):
    """model[-1] = Linear(..., 5), as the README shows: the twin takes its class count
    from the state_dict, and computes the same logits."""
    model = build_model(name).eval()
    model[-1] = Linear(model[-1].in_features, 5)
    twin = torch_twin(name, model.state_dict()).eval()
    assert twin[-1].out_features == 5 and torch_twin(name, num_classes=3)[-1].out_features == 3
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(model(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_shapes_unchanged_by_a_backend_move(name, backend):
    """After .to(), state_dict() must still have the twin's shapes (0-d num_batches_tracked)."""
    ours = build_model(name).to(backend).state_dict()
    theirs = torch_twin(name).state_dict()
    bad = {k: (tuple(ours[k].shape), tuple(v.shape)) for k, v in theirs.items()
           if tuple(ours[k].shape) != tuple(v.shape)}
    assert not bad, f"(ours, torch) shapes differ after .to({backend.name!r}): {bad}"


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg")


def test_train_eval_reach_every_submodule():
    model = build_model("resnet")
    model.eval()
    assert not any(m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())


# ---------------------------------------------------------------------------------------
# The Module API, as torch.nn has it
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_traversal_equals_the_twin(name):
    """modules(), named_children(), named_buffers(), apply() and numel() as in torch.nn."""
    model, twin = build_model(name), torch_twin(name)
    # the twin's residual blocks call a functional relu where ours have ReLU modules
    assert ([type(m).__name__ for m in model.modules() if m._parameters]
            == [type(m).__name__ for m in twin.modules() if list(m.parameters(recurse=False))])
    assert [n for n, _ in model.named_children()] == [n for n, _ in twin.named_children()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in twin.named_buffers()]
    assert len(model.buffers()) == len(list(twin.buffers()))
    visited = []
    assert model.apply(lambda m: visited.append(type(m).__name__)) is model
    assert visited[-1] == type(model).__name__ and len(visited) == len(list(model.modules()))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in twin.parameters())


@pytest.mark.parametrize("args", [{}, {"prefix": "net"}, {"recurse": False}, {"prefix": "x", "recurse": False}],
                         ids=["default", "prefix", "own", "own_prefix"])
@pytest.mark.parametrize("name", MODELS)
def test_named_parameters_and_buffers_take_prefix_and_recurse_as_torch(name, args):
    model, twin = build_model(name), torch_twin(name)
    for path in ("", "0", "1", "4"):  # the model, a convolution, a batch norm, a residual block or pool
        ours, theirs = model.get_submodule(path), twin.get_submodule(path)
        assert [k for k, _ in ours.named_parameters(**args)] == [k for k, _ in theirs.named_parameters(**args)]
        assert [k for k, _ in ours.named_buffers(**args)] == [k for k, _ in theirs.named_buffers(**args)]
    recurse = args.get("recurse", True)
    assert len(model[1].parameters(recurse)) == len(list(twin[1].parameters(recurse))) == 2
    assert len(model.buffers(recurse)) == len(list(twin.buffers(recurse)))


@pytest.mark.parametrize("name", MODELS)
def test_parameters_describe_themselves_as_the_twins(name):
    """size(), size(d), dim(), ndim, numel() and dtype as torch's Parameter gives them."""
    model = build_model(name).to("torch", device="cpu")
    for ours, theirs in zip(model.parameters(), torch_twin(name).parameters(), strict=True):
        assert ours.size() == tuple(theirs.size()) and ours.size(0) == theirs.size(0)
        with pytest.raises(IndexError, match=f"dimension {ours.ndim} is out of range for a parameter of shape"):
            ours.size(ours.ndim)
        assert ours.size(-1) == theirs.size(-1)
        assert (ours.dim(), ours.ndim, ours.numel(), ours.dtype) == (theirs.dim(), theirs.ndim, theirs.numel(),
                                                                     theirs.dtype)


def test_a_shared_layer_is_one_set_of_parameters():
    """The optimizer must see a layer used twice once (as torch.nn lists it), or it would
    update its weights twice a step; state_dict keeps both paths, as torch.nn does."""
    lin, ref = Linear(3, 3), nn.Linear(3, 3)
    ours, theirs = cnn.Sequential(lin, cnn.ReLU(), lin), nn.Sequential(ref, nn.ReLU(), ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert len(list(ours.modules())) == len(list(theirs.modules()))


def test_zero_grad_clears_every_parameter_of_every_layer():
    model = cnn.simple_cnn()
    rng = np.random.default_rng(0)
    _, grad = softmax_cross_entropy(model(rng.standard_normal((2, 3, 32, 32)).astype(np.float32)),
                                    np.array([1, 2]))
    model.backward(grad)
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_assigning_none_removes_a_parameter_or_a_layer():
    conv = cnn.Conv2d(3, 8, 3)
    conv.bias = None
    assert conv.num_parameters() == 216 and list(conv.state_dict()) == ["weight"]
    nn.Conv2d(3, 8, 3, bias=False).load_state_dict(
        {k: torch.from_numpy(v) for k, v in conv.state_dict().items()}, strict=True)
    x = np.ones((1, 3, 4, 4), np.float32)
    conv.backward(conv(x))  # runs without the bias
    model = cnn.Sequential(Linear(4, 3), cnn.ReLU())
    model.head = Linear(3, 2)
    assert model(np.ones((1, 4), np.float32)).shape == (1, 2)
    model.head = None
    assert len(model) == 2 and model(np.ones((1, 4), np.float32)).shape == (1, 3)
    del model[0].weight
    assert [n for n, _ in model.named_parameters()] == ["0.bias"] and "weight" not in vars(model[0])


def test_an_emptied_slot_keeps_its_place_like_torch():
    """None empties a slot; what is assigned there later takes the same place in the order
    (a Sequential must not run its layers in another order), as in torch.nn."""
    ours = cnn.Sequential(Linear(4, 4), cnn.ReLU(), Linear(4, 2))
    theirs = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for model, relu in ((ours, cnn.ReLU), (theirs, nn.ReLU)):
        setattr(model, "1", None)
        setattr(model, "1", relu())
        model[0].weight, weight = None, model[0].weight
        model[0].weight = weight
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours[1], cnn.ReLU)


def test_a_buffer_set_to_none_is_left_out_like_torch():
    bn, ref = BatchNorm2d(3), nn.BatchNorm2d(3)
    bn.running_mean = ref.running_mean = None
    assert list(bn.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in bn.named_buffers()] == [n for n, _ in ref.named_buffers()]


def test_a_buffer_may_not_take_the_name_of_a_parameter_like_torch():
    lin = Linear(2, 2)
    with pytest.raises(KeyError, match="attribute 'weight' already exists in Linear"):
        lin.register_buffer("weight", np.zeros(2, np.float32))
    lin.bias = None  # an emptied slot is still the parameter's
    with pytest.raises(KeyError, match="attribute 'bias' already exists"):
        lin.register_buffer("bias", np.zeros(2, np.float32))


def test_a_buffer_that_is_no_array_is_refused_when_it_is_set():
    """Not later, in state_dict() or to(), without the buffer's name (torch refuses it too)."""
    bn = BatchNorm2d(3)
    with pytest.raises(TypeError, match=r"buffer 'scale' of BatchNorm2d must be an array \(NumPy, torch or "
                                        r"CuPy\) or None, got float: wrap it as np.asarray"):
        bn.register_buffer("scale", 2.0)
    with pytest.raises(TypeError, match="buffer 'running_mean' of BatchNorm2d must be an array"):
        bn.running_mean = [0.0, 0.0, 0.0]
    for value in (np.float32(2.0), torch.device("cpu")):  # a scalar cannot be loaded into; a device is no array
        with pytest.raises(TypeError, match="buffer 'scale' of BatchNorm2d must be an array"):
            bn.register_buffer("scale", value)
    assert "scale" not in bn.state_dict() and bn.running_mean.tolist() == [0.0, 0.0, 0.0]
    bn.register_buffer("scale", np.asarray(2.0, np.float32))  # a 0-d array, as num_batches_tracked
    bn.load_state_dict(bn.state_dict())


def test_assigning_an_array_where_a_parameter_belongs_is_a_clear_error():
    lin = Linear(2, 2)
    with pytest.raises(TypeError, match="cannot assign ndarray to 'weight' of Linear: assign a "
                                        "Parameter, or None to remove it"):
        lin.weight = np.zeros((2, 2), np.float32)
    assert isinstance(lin.weight, cnn.module.Parameter)


def test_a_module_that_skips_super_init_is_told_so():
    class Forgetful(cnn.module.Module):
        def __init__(self):
            self.fc = Linear(2, 2)

    with pytest.raises(AttributeError, match=r"before Module.__init__\(\): call super\(\).__init__\(\) first"):
        Forgetful()


@pytest.mark.parametrize("name", MODELS)
def test_a_slice_of_a_sequential_is_a_sequential_with_the_same_names(name, rng):
    model, twin = build_model(name).eval(), torch_twin(name).eval()
    part = model[2:5]
    assert isinstance(part, cnn.Sequential) and part[0] is model[2]
    assert list(part.state_dict()) == list(twin[2:5].state_dict())
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(part(model[:2](x)), model[:5](x))


def test_load_state_dict_returns_what_it_skipped_like_torch():
    model, twin = build_model("simple"), torch_twin("simple")
    state = {k: v for k, v in model.state_dict().items() if k != "0.bias"}
    state["extra"] = np.zeros(1, np.float32)
    ours = model.load_state_dict(state, strict=False)
    theirs = twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert ours.missing_keys == theirs.missing_keys and ours.unexpected_keys == theirs.unexpected_keys
    assert model.load_state_dict(model.state_dict()) == ([], [])


def test_train_takes_a_boolean():
    with pytest.raises(ValueError, match="training mode must be True or False, got 'no'"):
        build_model("simple").train("no")


def test_freezing_a_feature_extractor_trains_the_head_only(rng):
    """Fine-tuning as in PyTorch: requires_grad_(False) on the model, True on the last layer;
    a step updates the head alone, and the frozen flags survive a move and a state load."""
    model = build_model("simple")
    assert model.requires_grad_(False) is model
    model[-1].requires_grad_()
    model.to("numpy", dtype="float64").load_state_dict(model.state_dict())
    assert [k for k, p in model.named_parameters() if p.requires_grad] == ["16.weight", "16.bias"]
    before = model.state_dict()
    loss, dlogits = softmax_cross_entropy(model(images(rng, 4)), rng.integers(0, 10, 4))
    model.backward(dlogits)
    assert [k for k, p in model.named_parameters() if p.grad is not None] == ["16.weight", "16.bias"]
    SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2).step()
    changed = [k for k, v in model.state_dict().items() if not np.array_equal(v, before[k])]
    # train mode: the batch norms' running statistics move, as in PyTorch
    assert [k for k in changed if not k.split(".")[-1].startswith(("running_", "num_batches"))] \
        == ["16.weight", "16.bias"]


@pytest.mark.parametrize("head", ["last_layer", "last_block"])
@pytest.mark.parametrize("name", MODELS)
def test_backward_goes_no_further_back_than_the_first_layer_to_train(name, head, monkeypatch, rng):
    """As autograd: with the backbone frozen, its layers' backward passes never run (their
    activations are released), and the trained layers' gradients equal the twin's."""
    model = randomize_batchnorms(build_model(name), rng).to("numpy", dtype="float64").train()
    twin = torch_twin(name, model.state_dict()).double().train()
    first_trained = len(model) - 1 if head == "last_layer" else 8 if name == "resnet" else 13
    for m in (model, twin):
        m.requires_grad_(False)
        for layer in list(m)[first_trained:]:
            layer.requires_grad_(True)
    for layer in list(model)[:first_trained]:
        for module in layer.modules():
            monkeypatch.setattr(module, "backward", lambda g: pytest.fail("a frozen layer went backward"))
    if name == "simple":
        model.eval(), twin.eval()  # no dropout mask to share
    x, y = images(rng, 3), rng.integers(0, 10, 3)
    _, dlogits = softmax_cross_entropy(model(x), y)
    assert model.backward(dlogits) is None
    assert all(m.__dict__.get("cache") is None for layer in list(model)[:first_trained] for m in layer.modules())
    nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    theirs = dict(twin.named_parameters())
    trained = [k for k, p in model.named_parameters() if p.grad is not None]
    assert trained == [k for k, p in theirs.items() if p.grad is not None] and trained
    ours = dict(model.named_parameters())
    for k in trained:
        assert_close(ours[k].grad, theirs[k].grad, "float64", f"grad of {k}")


def test_frozen_layers_skipped_by_backward_keep_no_gradient_of_an_earlier_step(rng):
    """Frozen after a full step: the layers that backward now skips must not keep the
    earlier gradients, or the optimizer would go on stepping them."""
    model = build_model("simple")
    x, y = images(rng, 2).astype(np.float32), rng.integers(0, 10, 2)
    model.backward(softmax_cross_entropy(model(x), y)[1])
    model.requires_grad_(False)
    model[-1].requires_grad_()
    model.backward(softmax_cross_entropy(model(x), y)[1])
    assert [k for k, p in model.named_parameters() if p.grad is not None] == ["16.weight", "16.bias"]
    before = model[0].weight.data.copy()
    SGD(model.parameters(), lr=0.1).step()
    np.testing.assert_array_equal(model[0].weight.data, before)


def test_an_all_frozen_model_without_input_grad_runs_no_backward(monkeypatch, rng):
    model = build_model("simple").requires_grad_(False)
    for module in model.modules():
        if module is not model:
            monkeypatch.setattr(module, "backward", lambda g: pytest.fail("a frozen layer went backward"))
    out = model(images(rng, 2).astype(np.float32))
    assert model.backward(np.ones_like(out)) is None


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_model_that_ran_copies_and_its_copy_goes_backward(copy_with, rng):
    """best = copy.deepcopy(model) after a forward pass, as torch users write it."""
    import copy
    import pickle

    model = build_model("simple").train()
    x, y = images(rng, 2).astype(np.float32), rng.integers(0, 10, 2)
    _, dlogits = softmax_cross_entropy(model(x), y)
    twin = copy.deepcopy(model) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(model))
    twin.backward(dlogits)
    model.backward(dlogits)
    for (k, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=k)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["simple", "resnet"])
def test_a_copy_made_mid_training_trains_on_as_the_original(copy_with, name, backend, rng):
    """A copy of a model that has trained a step (its layers' workspaces filled) takes the
    next step exactly as the original does. Pickle once kept the torch backend's cached
    views of a convolution's patch gradients, no longer sharing their buffer's memory:
    every later input gradient was wrong, silently. Workspaces are scratch: copies start
    empty, and a pickle does not carry their megabytes."""
    import copy
    import pickle

    model = build_model(name).to(backend)
    model[0].input_grad = True  # the first convolution's input gradient goes through col2im too
    x = backend.asarray(images(rng, 4).astype(np.float32))
    y = backend.asarray(rng.integers(0, 10, 4))
    model.backward(softmax_cross_entropy(model(x), y)[1])
    twin = copy.deepcopy(model) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(model))
    grads = []
    for m in (model, twin):
        manual_seed(1)  # the same dropout mask
        grads.append(to_numpy(m.backward(softmax_cross_entropy(m(x), y)[1])))
    np.testing.assert_array_equal(grads[0], grads[1])
    for (k, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        np.testing.assert_array_equal(to_numpy(p.grad), to_numpy(q.grad), err_msg=k)
    assert len(pickle.dumps(twin)) < 2 * 4 * sum(p.numel() for p in model.parameters()) + 10**6


def test_a_layer_shared_by_the_frozen_part_and_the_trained_part_goes_backward_once(rng):
    """Backward skips the frozen part: a layer used there and again above it has the cache
    of its later use, and being used twice where no backward runs is no error."""
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    relu = ReLU()
    for model in (lambda first: Sequential(first, relu, Conv2d(4, 4, 3, padding=1), relu, Flatten(), Linear(100, 2)),
                  lambda first: Sequential(first, Sequential(relu), Flatten(), Linear(100, 100), Sequential(relu))):
        first = Conv2d(3, 4, 3, padding=1)
        first.input_grad = False
        model = model(first)
        model.requires_grad_(False)
        head = [layer for layer in model if isinstance(layer, Linear)][0].requires_grad_()
        out = model(x)
        assert model.backward(np.ones_like(out)) is None and head.weight.grad is not None


def test_a_model_whose_first_layer_has_no_input_grad_flag_gives_the_input_gradient():
    """Only a first layer that says input_grad = False stops backward early."""
    model = Sequential(ReLU(), Linear(4, 2))
    model[1].requires_grad_(False)
    out = model(np.ones((3, 4), np.float32))
    assert model.backward(np.ones_like(out)).shape == (3, 4)


@pytest.mark.parametrize("name", MODELS)
def test_a_frozen_model_gives_the_input_gradient_when_its_first_layer_asks(name, rng):
    """The README's saliency recipe: every parameter frozen, model[0].input_grad = True."""
    model = randomize_batchnorms(build_model(name), rng).to("numpy", dtype="float64").eval()
    twin = torch_twin(name, model.state_dict()).double().eval().requires_grad_(False)
    model.requires_grad_(False)
    model[0].input_grad = True
    x, y = images(rng, 2), rng.integers(0, 10, 2)
    _, dlogits = softmax_cross_entropy(model(x), y)
    xt = torch.from_numpy(x).requires_grad_()
    nn.functional.cross_entropy(twin(xt), torch.from_numpy(y)).backward()
    assert_close(model.backward(dlogits), xt.grad, "float64", "input gradient")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_layers_print_as_their_torch_twins(name):
    """Each layer of the model as built (SmallResNet's stride-2 and 1x1 shortcut convolutions
    included), where its twin's layer has the same class."""
    ours = dict(build_model(name).named_modules())
    theirs = dict(torch_twin(name).named_modules())
    compared = set()
    for path, module in ours.items():
        twin = theirs.get(path)
        if twin is not None and type(twin).__name__ == type(module).__name__ and not list(module.children()):
            assert printed_as_installed_torch(module) == repr(twin), path
            compared.add(type(module).__name__)
    expected = {"Conv2d", "BatchNorm2d", "ReLU", "Flatten", "Linear"}
    assert compared >= (expected | {"MaxPool2d", "Dropout"} if name == "simple" else expected)


def test_a_model_prints_as_its_torch_twin():
    """Containers too: children indented under their names, the closing parenthesis on a
    line of its own. SimpleCNN's twin is built of the same classes throughout."""
    assert printed_as_installed_torch(build_model("simple")) == repr(torch_twin("simple"))
    assert repr(cnn.Sequential()) == repr(torch.nn.Sequential()) == "Sequential()"


@pytest.mark.parametrize("make, shape", [(lambda: Conv2d(2, 3, 3), (2, 2, 5, 5)), (lambda: Linear(4, 3), (2, 4)),
                                         (lambda: BatchNorm2d(2), (2, 2, 3, 3))], ids=["conv", "linear", "batchnorm"])
def test_a_parameter_frozen_after_a_backward_pass_gets_no_stale_gradient(make, shape, rng):
    """The training loop never zeroes gradients (backward overwrites them), so freezing
    must also drop the gradient that the last backward pass left."""
    layer = make()
    x = rng.standard_normal(shape).astype(np.float32)

    def forward_backward():
        out = layer(x)
        layer.backward(np.ones_like(out))

    forward_backward()
    assert all(p.grad is not None for p in layer.parameters())
    layer.requires_grad_(False)
    forward_backward()
    assert all(p.grad is None for p in layer.parameters())
    before = {k: p.data.copy() for k, p in layer.named_parameters()}
    SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1).step()
    assert all(np.array_equal(p.data, before[k]) for k, p in layer.named_parameters())


@pytest.mark.parametrize("change", ["load_state_dict", "to torch", "to float64"])
def test_loading_or_moving_a_model_drops_its_gradients(change, rng):
    """A gradient of the old arrays (another backend, another dtype) must not be stepped
    into the new ones."""
    model = build_model("simple")
    _, dlogits = softmax_cross_entropy(model(images(rng).astype(np.float32)), rng.integers(0, 10, 2))
    model.backward(dlogits)
    assert all(p.grad is not None for p in model.parameters())
    if change == "load_state_dict":
        model.load_state_dict(model.state_dict())
    else:
        model.to("torch") if change == "to torch" else model.to(dtype="float64")
    assert all(p.grad is None for p in model.parameters())


def test_a_parameter_tied_between_two_layers_is_refused():
    """Tied weights: autograd adds the two layers' gradients; this engine's backward
    overwrites them, so the optimizer would get one layer's share. Listing the parameters
    (as an optimizer does) says so, rather than train a wrong model."""
    model = Sequential(Linear(3, 3), ReLU(), Linear(3, 3))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"2.weight is the same Parameter as 0.weight: tied weights are not "
                                         r"supported"):
        SGD(model.parameters(), lr=0.1)
    assert list(model.state_dict()) == list(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)).state_dict())


def test_requires_grad_takes_a_boolean_and_shows_in_the_repr():
    p = Linear(2, 3).weight
    with pytest.raises(TypeError, match="requires_grad must be True or False, got 0"):
        p.requires_grad = 0
    assert p.requires_grad and repr(p) == "Parameter(shape=(3, 2))"
    assert repr(p.requires_grad_(False)) == "Parameter(shape=(3, 2), requires_grad=False)"


def test_to_takes_a_torch_device_or_dtype_as_torch_code_passes_them():
    """model.to(torch.device(...)) and model.to(torch.float64): on the model's own backend."""
    model = build_model("simple").to("torch", device="cpu")
    assert model.to(torch.float64)[0].weight.dtype == torch.float64
    assert model.to(torch.device("cpu"))[0].weight.data.device == torch.device("cpu")
    assert build_model("simple").to(torch.float64)[0].weight.dtype == np.float64  # still NumPy


def test_to_a_device_moves_the_model_on_its_own_backend_as_torch():
    """model.to("cpu") / .to("cuda") as torch code writes it; a NumPy model has the CPU only."""
    model = build_model("simple").to("torch", device="cpu")
    assert model.to("cpu")[0].weight.data.device == torch.device("cpu")
    assert isinstance(build_model("simple").to("cpu")[0].weight.data, np.ndarray)
    for device, also in (("cuda", r" or model.to\('cupy'\)$"), ("cuda:1", " or model.to"), ("mps", "$")):
        with pytest.raises(cnn.backend.DeviceError, match=rf"this model is on the numpy backend, which runs on the "
                                                          rf"CPU only: move it to '{device}' with model.to\('torch', "
                                                          rf"device='{device}'\){also}"):
            build_model("simple").to(device)


def test_to_takes_a_numpy_dtype_as_a_torch_one_and_refuses_what_is_neither():
    assert build_model("simple").to(np.float64)[0].weight.dtype == np.float64
    assert build_model("simple").to(np.dtype("float64"))[0].weight.dtype == np.float64
    with pytest.raises(TypeError, match=r"Module.to\(\) takes a backend name .* model.to\(dtype='float64'\)"):
        build_model("simple").to(3)


def test_torch_shorthands_for_to():
    model = build_model("simple").to("torch", device="cpu")
    assert model.double()[0].weight.dtype == torch.float64 and model.float()[0].weight.dtype == torch.float32
    assert model.cpu()[0].weight.data.device == torch.device("cpu")
    assert build_model("simple").double()[0].weight.dtype == np.float64  # still NumPy
    with pytest.raises(cnn.backend.DeviceError, match="numpy backend, which runs on the CPU only: move it to 'cuda:1'"):
        build_model("simple").cuda(1)


def test_an_index_out_of_range_says_how_many_layers_there_are():
    with pytest.raises(IndexError, match="index 17 is out of range: this Sequential has 17 layers"):
        build_model("simple")[17]
    assert type(build_model("simple")[-17]).__name__ == "Conv2d"


def test_to_takes_a_device_then_a_dtype_as_torch():
    """torch's model.to(device, dtype): the dtype once went unnoticed in the second place."""
    model = build_model("simple").to("torch", device="cpu")
    assert model.to(torch.device("cpu"), torch.float64)[0].weight.dtype == torch.float64
    assert build_model("simple").to("cpu", torch.float64)[0].weight.dtype == np.float64
    with pytest.raises(TypeError, match=r"Module.to\(\) got 'cuda' where a dtype belongs"):
        build_model("simple").to("cpu", "cuda")
    with pytest.raises(TypeError, match=r"Module.to\(\) got a device twice \('cpu' and 'cpu'\)"):
        build_model("simple").to("cpu", "cpu", "float64")


# ---------------------------------------------------------------------------------------
# Our state_dict -> torch twin: same outputs
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_eval_outputs_equal_the_twin(name, backend, dtype, rng):
    manual_seed(0)
    model = randomize_batchnorms(build_model(name), rng).to(backend, dtype=dtype).eval()
    twin = torch_twin(name, model.state_dict()).double().eval()  # strict=True inside
    x = images(rng).astype(dtype)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x.astype(np.float64)))
    got = model(backend.asarray(x))
    assert_close(got, expected, dtype, f"{name} eval logits")


@pytest.mark.parametrize("frozen", [False, True], ids=["all_trained", "every_third_frozen"])
@pytest.mark.parametrize("name", MODELS)
def test_sgd_training_steps_equal_the_twin(name, frozen, backend, rng):
    """Three full steps in train mode (batch statistics; SimpleCNN's dropout masks replayed
    in the twin): forward, cross-entropy, backward, SGD(lr 0.01, momentum 0.9, weight decay
    1e-4) against torch.optim.SGD. Checks the logits and loss of every step, every parameter
    gradient of the first step, then every parameter and BN running statistic at the end.
    ``frozen``: every third parameter (weights and biases of convolutions, batch norms and
    linear layers among them) has requires_grad False in both."""
    steps, n = 3, 2
    manual_seed(0)
    model = randomize_batchnorms(build_model(name), rng).to(backend, dtype="float64").train()
    twin = torch_twin(name, model.state_dict()).double().train()
    if frozen:
        ref_params = dict(twin.named_parameters())
        for i, (k, p) in enumerate(model.named_parameters()):
            if i % 3 == 0:
                p.requires_grad = ref_params[k].requires_grad = False
    if name == "simple":
        twin[DROPOUT_INDEX] = FixedMaskDropout()
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        x, y = images(rng, n), rng.integers(0, 10, n)
        logits = model(backend.asarray(x))
        if name == "simple":
            mask = to_numpy(model[DROPOUT_INDEX].cache[0]).copy()
            assert set(np.unique(mask)) <= {0.0, 2.0}
            twin[DROPOUT_INDEX].mask = torch.from_numpy(mask)
        loss, dlogits = softmax_cross_entropy(logits, backend.asarray(y))
        model.backward(dlogits)
        with torch.enable_grad():
            ref_opt.zero_grad()
            ref_logits = twin(torch.from_numpy(x))
            ref_loss = nn.functional.cross_entropy(ref_logits, torch.from_numpy(y))
            ref_loss.backward()
        assert_close(logits, ref_logits.detach(), "float64", f"step {step} train logits")
        assert float(to_numpy(loss)) == pytest.approx(ref_loss.item(), rel=1e-10)
        if step == 0:
            ref_params = dict(twin.named_parameters())
            for k, p in model.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None and ref_params[k].grad is None, f"{k} is frozen"
                    continue
                assert p.grad is not None, f"{k}.grad not filled"
                assert_close(p.grad, ref_params[k].grad, "float64", f"grad of {k}")
        opt.step()
        ref_opt.step()
    ref_state = twin.state_dict()
    ours = model.state_dict()
    assert list(ours) == list(ref_state)
    for k, v in ours.items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == ref_state[k].item() == steps, k
        else:  # parameters after the updates, and BN running statistics
            assert_close(v, ref_state[k], "float64", f"{k} after {steps} steps")


# ---------------------------------------------------------------------------------------
# Residual block alone (identity and projection shortcut)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("c_in,c_out,stride", [(4, 4, 1), (3, 5, 2), (3, 5, 1)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_block_matches_torch(c_in, c_out, stride, train, backend, dtype, rng):
    manual_seed(1)
    ours = randomize_batchnorms(ResidualBlock(c_in, c_out, stride), rng)
    theirs = Block(c_in, c_out, stride)
    x = rng.standard_normal((2, c_in, 7, 9))
    # float32: the conv biases feeding a train-mode BN have a true gradient of exactly 0;
    # ours is the float32 cancellation noise of a sum of ~100 terms (~1e-5), hence atol 1e-4.
    atol = 1e-4 if dtype == "float32" and train else None
    check_layer(ours, theirs, x, backend, dtype, train=train, rng=rng, atol=atol)


# ---------------------------------------------------------------------------------------
# state_dict round trips and the reverse direction
# ---------------------------------------------------------------------------------------

def assert_same_state(got: dict, want: dict) -> None:
    """Same keys in the same order, and bit-identical arrays of the same dtype and shape."""
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("name", MODELS)
def test_load_state_dict_round_trip(name, backend):
    manual_seed(0)
    a = build_model(name)
    manual_seed(1)
    b = build_model(name).to(backend)
    sa = a.state_dict()
    b.load_state_dict(sa)
    assert_same_state(b.state_dict(), sa)


def _sgd_step(model, opt, rng, n=4):
    B = cnn.backend.backend_of(model.parameters()[0].data)
    x = B.asarray(images(rng, n), dtype="float32")
    _, grad = softmax_cross_entropy(model(x), B.asarray(rng.integers(0, 10, n)))
    model.backward(grad)
    opt.step()


@pytest.mark.parametrize("name", MODELS)
def test_loaded_state_is_copied_not_shared_with_the_caller(name, backend, rng):
    """Training updates in place, so a model and an optimizer must own what they loaded:
    training them leaves the state dicts they were given untouched."""
    state = build_model(name).state_dict()
    kept = {k: v.copy() for k, v in state.items()}
    model = build_model(name).to(backend)
    model.load_state_dict(state)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    _sgd_step(model, opt, rng)
    flat = opt.state_dict()
    flat_kept = {k: v.copy() for k, v in flat.items()}
    model2 = build_model(name).to(backend)
    model2.load_state_dict(model.state_dict())
    opt2 = SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(flat)
    _sgd_step(model, opt, rng)
    _sgd_step(model2, opt2, rng)
    assert_same_state(state, kept)
    assert_same_state(flat, flat_kept)


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_updates_every_state_array_in_place(name, backend, rng):
    """After the first step, parameters, batch-norm statistics and momentum buffers stay the
    same arrays (as in PyTorch): a reference to one sees training, and a recorded step (a
    CUDA graph replays fixed memory) would keep training the live state."""
    model = build_model(name).to(backend).train()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _sgd_step(model, opt, rng)

    def arrays():
        state = [(k, value) for k, _, _, _, value in model._named_state()]
        return state + [(f"momentum {i}", s["momentum_buffer"]) for i, s in enumerate(opt.state)]

    before = arrays()
    values = {k: to_numpy(v).copy() for k, v in before}
    _sgd_step(model, opt, rng)
    for (key, old), (_, new) in zip(before, arrays()):
        assert new is old, f"{key} was replaced by a new array instead of updated in place"
    changed = [k for k, v in arrays() if not np.array_equal(to_numpy(v), values[k])]
    assert len(changed) == len(before)  # and every one of them did change


def test_load_state_dict_strict_errors():
    model = build_model("simple")
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['0.bias'\]"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict({**state, "extra": np.zeros(1)})
    model.load_state_dict({**missing, "extra": np.zeros(1)}, strict=False)  # ignored
    with pytest.raises(ValueError, match=r"0.weight: checkpoint has shape \(32, 3, 5, 5\)"):
        model.load_state_dict({**state, "0.weight": np.zeros((32, 3, 5, 5), np.float32)})


def test_a_failed_load_state_dict_changes_nothing():
    """All or nothing: a mismatch in the last key leaves the earlier ones unloaded too."""
    model = build_model("simple")
    before = model.state_dict()
    bad = {k: np.full_like(v, 7) for k, v in before.items()}
    last = list(bad)[-1]
    bad[last] = np.zeros(bad[last].shape + (2,), bad[last].dtype)
    with pytest.raises(ValueError, match=f"{last}: checkpoint has shape"):
        model.load_state_dict(bad)
    assert_same_state(model.state_dict(), before)


@pytest.mark.parametrize("when", ["before_move", "after_move"])
@pytest.mark.parametrize("name", MODELS)
def test_twin_state_dict_loads_into_our_model(name, when, backend, rng):
    """Reverse direction: a torch twin's state_dict (tensors) -> our model, same outputs."""
    torch.manual_seed(3)
    twin = torch_twin(name)
    with torch.no_grad():  # non-trivial BN state
        for m in twin.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.num_batches_tracked.fill_(7)
    model = build_model(name)
    if when == "before_move":
        model.load_state_dict(twin.state_dict())
        model.to(backend, dtype="float64")
    else:
        model.to(backend, dtype="float64")
        model.load_state_dict(twin.state_dict())
    ours = model.state_dict()
    for k, v in twin.state_dict().items():
        assert tuple(ours[k].shape) == tuple(v.shape), k
        np.testing.assert_array_equal(ours[k], v.numpy().astype(ours[k].dtype), err_msg=k)
    x = images(rng)
    twin.double().eval()
    with torch.no_grad():
        expected = twin(torch.from_numpy(x))
    assert_close(model.eval()(backend.asarray(x)), expected, "float64", "eval logits")


# ---------------------------------------------------------------------------------------
# Moving between backends
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_backend_move_round_trip_keeps_state_and_outputs(name, rng):
    manual_seed(0)
    model = randomize_batchnorms(build_model(name), rng)
    before = model.state_dict()
    x = images(rng).astype(np.float32)
    out_numpy = to_numpy(model.eval()(x))
    model.to("torch", "cpu")
    p = model.parameters()[0].data
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float32
    out_torch = to_numpy(model(cnn.get_backend("torch", "cpu").asarray(x)))
    model.to("numpy")
    assert isinstance(model.parameters()[0].data, np.ndarray)
    assert_same_state(model.state_dict(), before)
    assert_close(out_torch, out_numpy, "float32", "torch vs numpy logits", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("move", ["to float64", "to torch"])
def test_a_model_moved_after_training_trains_like_a_fresh_copy(move, rng):
    """Layers reuse their scratch buffers from step to step: after a move to another dtype
    or backend, the next training step must not write into the old ones."""
    manual_seed(0)
    model, fresh = build_model("simple"), build_model("simple")
    model[DROPOUT_INDEX].p = fresh[DROPOUT_INDEX].p = 0.0  # no random masks to tell apart
    x, y = images(rng, 4).astype(np.float32), rng.integers(0, 10, 4)
    _, dlogits = softmax_cross_entropy(model(x), y)  # float32 NumPy buffers now exist
    model.backward(dlogits)
    fresh.load_state_dict(model.state_dict())
    target = dict(dtype="float64") if move == "to float64" else dict(backend="torch")
    model.to(**target)
    fresh.to(**target)
    B = cnn.backend.backend_of(model.parameters()[0].data)
    xs = B.asarray(x.astype(np.float64) if move == "to float64" else x)
    np.testing.assert_array_equal(to_numpy(model(xs)), to_numpy(fresh(xs)))


def test_to_float64_and_back_casts_floats_only():
    model = build_model("resnet").to("numpy", dtype="float64")
    state = model.state_dict()
    assert state["0.weight"].dtype == np.float64 and state["1.running_var"].dtype == np.float64
    assert state["1.num_batches_tracked"].dtype == np.int64
    state32 = model.to("numpy", dtype="float32").state_dict()
    assert state32["0.weight"].dtype == np.float32
    # a dtype given as torch's or NumPy's own object, as a torch user would write it
    assert model.to("torch", device="cpu", dtype=torch.float64)[0].weight.data.dtype == torch.float64
    assert model.to("numpy", dtype=np.float32)[0].weight.data.dtype == np.float32


@pytest.mark.parametrize("dtype", ["int32", "float16", torch.bfloat16])
def test_to_refuses_a_dtype_the_layers_cannot_compute_in(dtype):
    """int32 would truncate every weight; half precision has no dropout draws on NumPy."""
    model = build_model("simple")
    with pytest.raises(ValueError, match="casts to float32 or float64, got dtype"):
        model.to(dtype=dtype)
    assert model[0].weight.data.dtype == np.float32  # left as it was


@pytest.mark.parametrize("layers, message", [
    (([Linear(2, 2), cnn.ReLU()],), r"got list as layer 0 \(unpack a list of layers: Sequential\(\*layers\)\)"),
    ((Linear(2, 2), 3), "got int as layer 1"),
    ((nn.Linear(2, 2),), r"got torch.nn.modules.linear.Linear as layer 0 \(torch.nn layers do not run here"),
    (((Linear(2, 2), cnn.ReLU()),), r"got tuple as layer 0 \(unpack a list of layers: Sequential\(\*layers\)\)"),
    (({"fc": Linear(2, 2)},), "got dict as layer 0"),  # torch takes an OrderedDict only
    ((cnn.module.Parameter(np.zeros(2, np.float32)),), "got Parameter as layer 0$"),  # the engine's: short
])
def test_sequential_refuses_what_is_not_a_layer(layers, message):
    """Stored as a plain attribute, a list of layers would make a model that returns its input."""
    with pytest.raises(TypeError, match="Sequential takes layers \\(Modules\\), " + message):
        Sequential(*layers)


def test_sequential_takes_an_ordered_dict_of_named_layers_as_torch():
    from collections import OrderedDict
    ours = Sequential(OrderedDict(fc=Linear(2, 3), act=ReLU()))
    theirs = nn.Sequential(OrderedDict(fc=nn.Linear(2, 3), act=nn.ReLU()))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["fc.weight", "fc.bias"]
    assert repr(ours) == repr(theirs) and ours[1] is ours.act


@pytest.mark.parametrize("name", ["cache", "training", "forward", "a.b", ""])
def test_sequential_refuses_a_layer_name_that_would_hide_an_attribute_or_blur_a_key(name):
    """As torch's add_module: a layer named "cache" would be deleted by clear_caches(),
    "training" would replace the mode flag, "forward" the forward pass, "a.b" or "" would
    make state_dict keys ambiguous."""
    from collections import OrderedDict
    with pytest.raises(KeyError, match="Sequential cannot name a module"):
        Sequential(OrderedDict([(name, Linear(2, 2))]))
    model = Sequential(Linear(2, 3))
    with pytest.raises(KeyError, match="Sequential cannot name a module"):
        model.add_module(name, ReLU())
    assert model(np.ones((1, 2), np.float32)).shape == (1, 3) and model.training is True


def test_a_module_name_that_is_no_string_is_a_type_error_as_torch():
    from collections import OrderedDict

    for build in (lambda L: L.Sequential(OrderedDict([(1, L.ReLU())])), lambda L: L.Sequential().add_module(1, None)):
        with pytest.raises(TypeError):
            build(nn)
        with pytest.raises(TypeError, match="a module name is a string, got int 1"):
            build(SimpleNamespace(Sequential=Sequential, ReLU=ReLU))


def test_add_module_may_not_take_a_parameters_name():
    lin = Linear(2, 2)
    with pytest.raises(KeyError, match="Linear cannot name a module 'weight'"):
        lin.add_module("weight", ReLU())
    assert isinstance(lin.weight, cnn.module.Parameter) and [n for n, _ in lin.named_parameters()] == ["weight",
                                                                                                       "bias"]


def test_backward_through_a_layer_used_twice_says_so():
    """Its second forward pass replaced the first, so backward cannot go back through both."""
    lin = Linear(4, 4)
    model = Sequential(lin, ReLU(), lin)
    out = model(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="layers 0 and 2 are the same Linear: a module keeps one forward pass"):
        model.backward(out)
    # deeper down, the layer's own error says it
    model = Sequential(Sequential(lin, ReLU()), lin)
    out = model(np.ones((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="a module used twice in a model keeps its last forward pass only"):
        model.backward(out)
    # a layer without parameters too: its second pass also replaced its first
    relu = ReLU()
    model = Sequential(Linear(4, 4), relu, Linear(4, 4), relu)
    out = model(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="layers 1 and 3 are the same ReLU"):
        model.backward(out)


def test_backward_with_a_gradient_of_another_shape_says_so():
    model = Sequential(Linear(4, 3))
    model(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"got a gradient of shape \(3, 3\) for an output of shape \(4, 3\)"):
        model.backward(np.ones((3, 3), np.float32))
    assert model.backward(np.ones((4, 3), np.float32)).shape == (4, 4)  # the forward pass is still there


@pytest.mark.parametrize("grad, error, message", [
    (np.ones((4, 3)), TypeError, r"got a numpy \(cpu\) float64 gradient for a numpy \(cpu\) float32 output: "
                                 r"convert it with backend.asarray\(grad, dtype='float32'\)"),
    (torch.ones(4, 3), TypeError, r"got a torch \(cpu\) float32 gradient for a numpy \(cpu\) float32 output"),
    ([[1.0] * 3] * 4, TypeError, r"takes an array \(NumPy, torch or CuPy\) like the output of its forward pass, got list"),
])
def test_backward_with_a_gradient_of_another_dtype_or_backend_says_so(grad, error, message):
    """NumPy would silently give a float32 model float64 gradients (and optimizer state)."""
    model = Sequential(Linear(4, 3))
    model(np.ones((4, 4), np.float32))
    with pytest.raises(error, match=message):
        model.backward(grad)
    assert model.backward(np.ones((4, 3), np.float32)).dtype == np.float32


def test_a_last_module_may_return_what_is_not_one_array_as_in_torch():
    class Both(cnn.Module):
        def forward(self, x):
            return x, 2 * x

    first, second = Sequential(Linear(5, 4), Both())(np.ones((2, 5), np.float32))
    np.testing.assert_array_equal(second, 2 * first)


def test_a_gradient_or_parameter_that_autograd_tracks_is_refused_or_taken_as_data():
    """A tracked gradient once failed deep inside a layer (ReLU: "mul(): functions with
    out=... arguments don't support automatic differentiation") or, through Linear alone,
    gave the parameters an autograd graph that grew with every step."""
    model = Sequential(Linear(5, 3), ReLU()).to("torch", device="cpu")
    out = model(torch.randn(4, 5)).requires_grad_()
    tracked = torch.softmax(out, 1)
    for backward in (model.backward, model[-1].backward):
        with pytest.raises(TypeError, match=r"backward\(\) got a torch tensor that autograd tracks "
                                            r"\(requires_grad=True\): pass grad.detach\(\)"):
            backward(tracked)
    assert model.backward(tracked.detach()).shape == (4, 5)  # the forward pass was kept
    model[0].weight = cnn.Parameter(torch.randn(3, 5, requires_grad=True))
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.backward(torch.ones_like(model(torch.randn(4, 5))))
    opt.step()
    assert not model[0].weight.data.requires_grad and model[0].weight.data.grad_fn is None


def test_backward_checks_the_latest_forward_pass_also_when_it_ran_through_slices(rng):
    """The output shape is kept on the last layer, so a batch run through model[:1] and
    model[1:] is what model.backward checks against, not an earlier batch of the model's."""
    model = Sequential(Linear(4, 5), ReLU(), Linear(5, 3))
    model(np.ones((8, 4), np.float32))
    model[1:](model[:1](rng.standard_normal((2, 4)).astype(np.float32)))
    assert model.backward(np.ones((2, 3), np.float32)).shape == (2, 4)


def test_an_empty_sequential_returns_its_input_as_torch():
    x = np.ones((2, 3), np.float32)
    assert Sequential()(x) is x and Sequential().backward(x) is x
    assert torch.equal(nn.Sequential()(torch.ones(2, 3)), torch.ones(2, 3))


def test_append_after_an_emptied_slot_takes_a_new_name_as_torch():
    """The name is the count of slots, emptied ones included: counting the layers left
    would reuse the name of the last one and replace it."""
    ours = Sequential(Linear(4, 4), ReLU(), Linear(4, 2))
    theirs = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    setattr(ours, "1", None)
    setattr(theirs, "1", None)
    last = ours[-1]
    assert ours.append(ReLU()) is ours  # chainable, as torch's
    theirs.append(nn.ReLU())
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()] == ["0", "2", "3"]
    assert ours[1] is last and isinstance(ours[2], ReLU)


# (edit, whether torch can make it on named layers too: its insert assumes numbered ones)
@pytest.mark.parametrize("edit, on_named", [
    (lambda m, L: m.__delitem__(-1), True),  # del model[-1]: a headless model
    (lambda m, L: m.__delitem__(slice(1, 3)), True),
    (lambda m, L: m.pop(1), True),
    (lambda m, L: m.insert(0, L.ReLU()), False),
    (lambda m, L: m.insert(-1, L.ReLU()), False),
    (lambda m, L: m.insert(4, L.ReLU()), False),
    (lambda m, L: m.extend([L.ReLU(), L.Flatten()]), True),
    (lambda m, L: m.add_module("head", L.ReLU()), True),
], ids=["del_last", "del_slice", "pop", "insert_first", "insert_before_last", "insert_at_end", "extend",
        "add_module"])
def test_sequential_edits_name_the_layers_as_torch(edit, on_named):
    from collections import OrderedDict

    for named in (False, True) if on_named else (False,):  # torch renumbers named layers after a deletion
        layers = [("a", ("Linear", 4, 4)), ("b", ("ReLU",)), ("c", ("Linear", 4, 2)), ("d", ("Flatten",))]
        models = []
        for L in (cnn.layers, nn):
            made = [(name, getattr(L, kind)(*args)) for name, (kind, *args) in layers]
            models.append(Sequential(OrderedDict(made)) if L is cnn.layers and named else
                          nn.Sequential(OrderedDict(made)) if named else
                          (Sequential if L is cnn.layers else nn.Sequential)(*(layer for _, layer in made)))
        ours, theirs = models
        popped = edit(ours, cnn.layers), edit(theirs, nn)
        assert printed_as_installed_torch(ours) == repr(theirs)  # names, kinds and sizes
        assert printed_as_installed_torch(popped[0]) == repr(popped[1])


def test_an_index_out_of_range_is_an_index_error_as_torch():
    for index in (3, -3):
        with pytest.raises(IndexError, match=f"index {index} is out of range for a Sequential of 2 layers"):
            Sequential(ReLU(), ReLU()).insert(index, ReLU())
        with pytest.raises(IndexError):
            nn.Sequential(nn.ReLU(), nn.ReLU()).insert(index, nn.ReLU())
    assert isinstance(Sequential(ReLU(), ReLU()).insert(-2, Linear(2, 2))[0], Linear)  # -len is the front
    with pytest.raises(IndexError):
        del Sequential(ReLU())[3]


def test_editing_a_long_sequential_touches_the_layers_named_only():
    """Names compared as names: deleting layer "11" leaves layer "1"."""
    model = Sequential(*[Linear(2, 2) if i == 1 else ReLU() for i in range(12)])
    del model[11]
    assert len(model) == 11 and isinstance(model[1], Linear)


def test_insert_refuses_what_is_no_layer_and_changes_nothing():
    model = Sequential(ReLU())
    with pytest.raises(TypeError, match="Sequential takes layers"):
        model.insert(0, nn.Linear(2, 2))
    assert [(n, type(m).__name__) for n, m in model.named_children()] == [("0", "ReLU")]


def test_a_sequential_extended_by_itself_holds_its_layers_twice():
    model = Sequential(ReLU(), Linear(2, 2))
    assert len(model.extend(model)) == 4 and model[3] is model[1]


def test_a_module_without_a_forward_pass_says_so():
    class Empty(cnn.module.Module):
        pass

    with pytest.raises(NotImplementedError, match=r"Empty has no forward\(x\): a module defines its own"):
        Empty()(np.ones(2))


def test_a_module_without_a_backward_pass_says_it_must_write_one():
    class Scale(cnn.module.Module):
        def forward(self, x):
            return 2 * x

    model = Sequential(Linear(2, 2), Scale())
    out = model(np.ones((1, 2), np.float32))
    with pytest.raises(NotImplementedError, match=r"Scale has no backward\(grad_out\): there is no autograd "
                                                  "here, so a module with a forward pass of its own writes"):
        model.backward(out)


def test_get_submodule_and_add_module_follow_torch():
    model = cnn.small_resnet()
    assert model.get_submodule("5.shortcut.0") is model[5].shortcut[0] and model.get_submodule("") is model
    with pytest.raises(AttributeError, match=r"ResidualBlock has no submodule 'conv3' \(looking for '3.conv3'\)"):
        model.get_submodule("3.conv3")
    with pytest.raises(AttributeError, match="Conv2d has no submodule 'weight'"):  # a parameter is no module
        model.get_submodule("0.weight")
    with pytest.raises(AttributeError, match="has no submodule 'training'"):
        model.get_submodule("training")
    model.add_module("spare", None)  # an empty slot, as torch's
    assert "spare" in model._modules and "spare" not in dict(model.named_children())
    with pytest.raises(TypeError, match=r"add_module\('head', ...\) takes a Module or None, got Linear"):
        model.add_module("head", nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------
# Learning: memorise a small fixed batch
# ---------------------------------------------------------------------------------------

def test_simple_cnn_memorises_a_small_batch(tmp_path):
    """32 synthetic images with *random* labels (pure memorisation): Adam reaches 100%
    accuracy in eval mode within 45 steps (about 15 are needed at this seed)."""
    from cnn.data import channel_stats, load_cifar10, normalize
    from cnn.synthetic import write_synthetic_cifar10

    ds = load_cifar10(write_synthetic_cifar10(tmp_path / "c.tar.gz", n_train=50, n_test=10))
    mean, std = channel_stats(ds.train_x)
    x = normalize(ds.train_x[:32], mean, std)
    y = np.random.default_rng(1).integers(0, 10, 32)
    manual_seed(0)
    model = build_model("simple")
    opt = Adam(model.parameters(), lr=1e-3)
    losses, acc = [], 0.0
    for step in range(1, 46):
        model.train()
        loss, grad = softmax_cross_entropy(model(x), y)
        losses.append(float(loss))
        model.backward(grad)
        opt.step()
        if step >= 9 and step % 3 == 0:
            acc = float((model.eval()(x).argmax(1) == y).mean())
            if acc == 1.0:
                break
    assert acc == 1.0, f"eval accuracy {acc} after {step} steps"
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_the_torch_backend_leaves_autograd_to_the_user(rng):
    """The engine never records autograd, yet the user's own torch code keeps it: a torch
    twin trains by backward() in the same process, before and after engine steps."""
    B = cnn.get_backend("torch", "cpu")
    model = build_model("simple").to(B)
    twin = torch_twin("simple")
    x = torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32)).requires_grad_()
    logits = model(B.asarray(x))  # an input that requires grad is taken as plain numbers
    _, grad = softmax_cross_entropy(logits, B.asarray(np.array([1, 2])))
    model.backward(grad)
    assert torch.is_grad_enabled()
    assert logits.grad_fn is None and not logits.requires_grad
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())
    twin(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in twin.parameters())


def test_manual_seed_also_seeds_backends_made_after_it(monkeypatch):
    """README's order: cnn.manual_seed(0) first, the backend later (with model.to)."""
    import cnn.backend as backend_mod

    def first_draw(seed):
        monkeypatch.setattr(backend_mod, "_backends", {})  # a fresh process: no backend yet
        manual_seed(seed)
        return cnn.get_backend("numpy").uniform((4,))

    monkeypatch.setattr(backend_mod, "_seed", None)
    assert np.array_equal(first_draw(1), first_draw(1))
    assert not np.array_equal(first_draw(1), first_draw(2))


def test_evaluation_does_not_keep_a_batch_of_activations():
    from cnn.train import predict

    model = build_model("simple")
    predict(model, np.zeros((3, 3, 32, 32), np.float32))
    assert all(getattr(m, "cache", None) is None for _, m in model.named_modules())


# ---------------------------------------------------------------------------------------
# PyTorch habits (from an audit of the API by a PyTorch user)
# ---------------------------------------------------------------------------------------

def test_a_torch_input_that_requires_grad_is_taken_as_data(rng):
    """Autograd must not track the engine: before, BatchNorm's out= operations failed on
    such an input, and a model without them recorded its weights into a growing graph."""
    model = build_model("simple").to("torch", device="cpu")
    x = torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32)).requires_grad_()
    logits = model(x)
    assert not logits.requires_grad
    B = cnn.backend_of(logits)
    _, grad = softmax_cross_entropy(logits, B.asarray(np.array([1, 2])))
    model.backward(grad)
    assert all(p.grad is not None and not p.grad.requires_grad for p in model.parameters())


def test_to_with_a_dtype_or_a_device_only_keeps_the_backend():
    """As torch: model.to(dtype=...) casts where the model is (it went back to NumPy)."""
    model = build_model("simple").to("torch", device="cpu").to(dtype="float64")
    assert isinstance(model[0].weight.data, torch.Tensor) and model[0].weight.data.dtype == torch.float64
    assert isinstance(model.to(device="cpu")[0].weight.data, torch.Tensor)
    assert isinstance(build_model("simple").to(dtype="float64")[0].weight.data, np.ndarray)


def test_load_state_dict_copies_into_the_model_arrays(rng):
    """As torch's copy_: a reference to p.data sees the loaded values, and a model loaded
    under torch.inference_mode still trains (replaced arrays would be inference tensors)."""
    from cnn.optim import SGD

    model = build_model("simple").to("torch", device="cpu")
    weight = model[0].weight.data
    state = build_model("simple").state_dict()
    with torch.inference_mode():
        model.load_state_dict(state)
    assert model[0].weight.data is weight and np.array_equal(weight.numpy(), state["0.weight"])
    B = cnn.backend_of(weight)
    _, grad = softmax_cross_entropy(model(B.asarray(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))),
                                    B.asarray(np.array([1, 2])))
    model.backward(grad)
    SGD(model.parameters(), lr=0.1).step()
    assert not np.array_equal(weight.numpy(), state["0.weight"])


def test_a_new_head_as_torch_users_fit_one():
    """model[-1] = Linear(...), append, ReLU(inplace=True), zero_grad(set_to_none=False)."""
    ours, theirs = build_model("simple"), torch_twin("simple")
    ours[-1], theirs[-1] = Linear(256, 5), nn.Linear(256, 5)
    ours.append(ReLU(inplace=True))
    theirs.append(nn.ReLU(inplace=True))
    assert printed_as_installed_torch(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    out = ours(np.ones((2, 3, 32, 32), np.float32))
    assert out.shape == (2, 5)
    ours.backward(np.ones_like(out))
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())
    with pytest.raises(TypeError, match="got torch.nn.modules.linear.Linear as layer 16"):
        ours[-2] = nn.Linear(256, 5)


def test_zero_grad_without_set_to_none_fills_the_gradients_in_place_as_torch():
    """The arrays stay the same objects (a recorded step, or the caller, may hold them); a
    parameter that has no gradient yet keeps none, as torch's."""
    model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2))
    model[2].zero_grad(set_to_none=False)  # no backward yet: nothing to fill
    assert all(p.grad is None for p in model.parameters())
    out = model(np.ones((2, 4), np.float32))
    model.backward(np.ones_like(out))
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))


def test_to_a_device_alone_keeps_the_backend_and_checks_the_device():
    """As torch's model.to("cuda"): a NumPy model cannot go to a GPU, and says so, rather
    than staying on the CPU unnoticed."""
    from cnn.backend import DeviceError

    with pytest.raises(DeviceError, match="this model is on the numpy backend, which runs on the CPU only"):
        build_model("simple").to(device="cuda")


def test_to_a_backend_without_a_device_picks_one_as_documented(monkeypatch):
    """``auto`` when no device is given: the GPU when there is one."""
    import cnn.module

    asked, real = [], cnn.module.get_backend
    monkeypatch.setattr(cnn.module, "get_backend", lambda *a: asked.append(a) or real(*a))
    build_model("simple").to("torch")
    assert asked == [("torch", "auto")]


def test_a_2d_torch_input_that_requires_grad_is_taken_as_data(rng):
    model = Sequential(Linear(4, 3), ReLU(), Linear(3, 2)).to("torch", device="cpu")
    x = torch.from_numpy(rng.standard_normal((5, 4)).astype(np.float32)).requires_grad_()
    out = model(x)
    assert not out.requires_grad and out.grad_fn is None
