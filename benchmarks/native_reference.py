"""Accuracy baseline: the same recipe trained by native PyTorch (torch.nn + autograd).

    python benchmarks/native_reference.py --model resnet --epochs 50 --augment --schedule step --data data/prepared/cifar10.npz

Takes ``python -m cnn.train``'s flags and checks (not those of the engine's own runs:
``--backend``, ``--out``, ``--resume``, ``--no-progress``) and uses the engine's own data
pipeline (same normalisation, shuffling, augmentation and evaluation batches) with the
``torch.nn`` twin of the model and ``torch.optim.SGD`` or ``Adam``, so that a gap between
the hand-written engine and PyTorch on the same data shows up as a gap between the two
runs' accuracies, not as a difference in recipe. Prints one line per epoch in the
engine's format, and the best, final and train accuracy at the end.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import replace

import torch

from cnn.backend import resolve_device
from cnn.checks import counted
from cnn.data import DataLoader, load_cifar10, normalization_stats
from cnn.errors import UserError
from cnn.optim import lr_at
from cnn.torch_twins import torch_twin
from cnn.train import build_parser, check_settings, config_from_args


def main(argv=None) -> int:
    parser = build_parser(prog="python benchmarks/native_reference.py",
                          description=__doc__.splitlines()[0], engine=False)
    config = replace(config_from_args(parser.parse_args(argv)), backend="torch")  # for the device checks
    try:
        check_settings(config)
        device = resolve_device("torch", config.device)
        ds = load_cifar10(config.data)
        mean, std = normalization_stats(config.data, ds)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    torch.manual_seed(config.seed)
    train = DataLoader(ds.train_x, ds.train_y, config.batch_size, shuffle=True, augment=config.augment,
                       mean=mean, std=std, seed=config.seed)
    test = DataLoader(ds.test_x, ds.test_y, 500, mean=mean, std=std)
    model = torch_twin(config.model).to(device)
    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                               weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              nesterov=config.nesterov, weight_decay=config.weight_decay)
    best, best_epoch, bad_epochs = -1.0, 0, 0
    for epoch in range(config.epochs):
        lr = lr_at(epoch, config.lr, config.schedule, config.epochs, config.milestones, config.gamma)
        for group in opt.param_groups:
            group["lr"] = lr
        train.set_epoch(epoch)
        start = time.perf_counter()
        model.train()
        loss_sum, correct = 0.0, 0
        for xb, yb in train:
            xb, yb = torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        if not math.isfinite(loss_sum):
            print(f"error: the training loss became {loss_sum} in epoch {epoch + 1}: the run diverged; "
                  "lower --lr (or use --schedule)", file=sys.stderr)
            return 2  # as cnn.train's
        model.eval()
        hits = 0
        with torch.no_grad():
            for xb, yb in test:
                hits += (model(torch.from_numpy(xb).to(device)).argmax(1).cpu().numpy() == yb).sum()
        test_acc, train_acc = hits / test.num_samples, correct / train.num_samples
        if test_acc > best:
            best, best_epoch, bad_epochs = test_acc, epoch + 1, 0
        else:
            bad_epochs += 1
        print(f"Epoch {epoch + 1:3d}/{config.epochs} | Loss: {loss_sum / train.num_samples:.4f} | "
              f"Train: {train_acc:.4f} | Test: {test_acc:.4f} | LR: {lr:.6f} | "
              f"Time: {time.perf_counter() - start:.1f}s", flush=True)
        if config.early_stop and bad_epochs >= config.early_stop:
            print(f"Early stop: no better test accuracy for {counted(bad_epochs, 'epoch')}")
            break
    print(f"native torch.nn {config.model} on {device}: best test accuracy {best:.4f} at epoch {best_epoch}; "
          f"final test {test_acc:.4f}, train {train_acc:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
