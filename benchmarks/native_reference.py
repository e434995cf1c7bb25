"""Accuracy baseline: the same recipe trained by native PyTorch (torch.nn + autograd).

    python benchmarks/native_reference.py --model simple --epochs 5 --data data/prepared/cifar10.npz

Uses the engine's own data pipeline (same normalisation, shuffling, augmentation and
evaluation batches) and the ``torch.nn`` twin of the model with ``torch.optim.SGD`` (the
default recipe: momentum 0.9, weight decay 1e-4, the step schedule's gamma 0.1; only what
its flags set can differ), so that a gap between the hand-written engine and PyTorch on the
same data shows up as a gap between the two runs' accuracies, not as a difference in recipe.
Prints one line per epoch in the engine's format.
"""
from __future__ import annotations

import argparse
import time

import torch

from cnn.data import DataLoader, load_cifar10, normalization_stats
from cnn.optim import lr_at
from cnn.torch_twins import torch_twin


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["simple", "resnet"], default="simple")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--schedule", choices=["none", "step", "cosine"], default="none")
    p.add_argument("--milestones", type=int, nargs="+", default=[30, 40])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="data/prepared/cifar10.npz")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    ds = load_cifar10(args.data)
    mean, std = normalization_stats(args.data, ds)
    train = DataLoader(ds.train_x, ds.train_y, args.batch_size, shuffle=True, augment=args.augment,
                       mean=mean, std=std, seed=args.seed)
    test = DataLoader(ds.test_x, ds.test_y, 500, mean=mean, std=std)
    model = torch_twin(args.model).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    best = 0.0
    for epoch in range(args.epochs):
        lr = lr_at(epoch, args.lr, args.schedule, args.epochs, args.milestones)
        for group in opt.param_groups:
            group["lr"] = lr
        train.set_epoch(epoch)
        start = time.perf_counter()
        model.train()
        loss_sum, correct = 0.0, 0
        for xb, yb in train:
            xb, yb = torch.from_numpy(xb).to(args.device), torch.from_numpy(yb).to(args.device)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        model.eval()
        hits = 0
        with torch.no_grad():
            for xb, yb in test:
                hits += (model(torch.from_numpy(xb).to(args.device)).argmax(1).cpu().numpy() == yb).sum()
        test_acc = hits / test.num_samples
        best = max(best, test_acc)
        print(f"Epoch {epoch + 1:3d}/{args.epochs} | Loss: {loss_sum / train.num_samples:.4f} | "
              f"Train: {correct / train.num_samples:.4f} | Test: {test_acc:.4f} | LR: {lr:.6f} | "
              f"Time: {time.perf_counter() - start:.1f}s", flush=True)
    print(f"native torch.nn {args.model}: best test accuracy {best:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
