"""The README's Python examples run as printed (a README that no longer runs is untrue)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

import cnn
from cnn.checkpoint import save_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def example(containing: str) -> str:
    found = [code for code in EXAMPLES if containing in code]
    assert len(found) == 1, f"expected one ```python block of README.md with {containing!r}, found {len(found)}"
    return found[0]


def test_every_example_is_run_here():
    assert len(EXAMPLES) == 2, "a new ```python block in README.md needs a test in tests/test_readme.py"


def test_use_the_engine_from_python():
    """One training step of SmallResNet on the torch backend, with every gradient by hand."""
    names = {}
    exec(compile(example("model.backward(dlogits)"), "README.md", "exec"), names)
    model, loss = names["model"], names["loss"]
    assert np.isfinite(float(loss))
    assert all(p.grad is not None and tuple(p.grad.shape) == p.shape for p in model.parameters())


def test_take_a_trained_model_to_pytorch(tmp_path, monkeypatch):
    """The checkpoint of a run loads into its torch.nn twin, which is saved for PyTorch."""
    model = cnn.simple_cnn()
    (tmp_path / "runs" / "simple_5ep_numpy").mkdir(parents=True)
    save_checkpoint(tmp_path / "runs" / "simple_5ep_numpy" / "best.npz", model.state_dict(), {"model": "simple"})
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(example("torch_twin("), "README.md", "exec"), names)
    saved = torch.load(tmp_path / "simple_cnn.pt")
    assert saved.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert np.array_equal(saved[key].numpy(), value), key
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        twin_logits = names["model"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(twin_logits, model.eval()(x), rtol=1e-4, atol=1e-5)

