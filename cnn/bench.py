"""Training-step benchmark: the hand-written engine against native PyTorch.

    python -m cnn.bench                                   # CPU: numpy, torch, native
    python -m cnn.bench --device cuda --engines torch torch-replay cupy native --batch-sizes 64 512
    python -m cnn.bench --busy 2                          # beside two processes that spin

One full SGD step (forward, loss, backward, update) on random data is timed for each
model, engine and batch size. ``native`` is the equivalent ``torch.nn`` model with autograd
and ``torch.optim.SGD``: the baseline, in full float32 like the engine (no TF32). Every
case runs in a fresh subprocess, one after the other, so its peak memory is its own and no
case warms caches for another. The figure per case is the best of ``--repeats`` blocks of
``--steps`` steps (mean time per step within a block), the usual way to measure on a
machine that other work may disturb.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cnn.atomic import atomic_path
from cnn.backend import CUPY_INSTALL, DeviceError, resolve_device

TRAIN_IMAGES = 50_000


def _time_case(model_name: str, engine: str, device: str, batch_size: int, steps: int,
               repeats: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, batch_size)
    run = None  # the engine's step runner (a StepReplay for torch-replay)
    if engine == "native":
        import torch

        from cnn.torch_twins import torch_twin

        torch.set_grad_enabled(True)
        # cuDNN runs float32 convolutions in TF32 by default on Ampere and newer GPUs; the
        # engine's float32 matrix products run in full float32 (PyTorch's default for
        # matmul), so the baseline does too: same precision, same arithmetic to compare.
        torch.backends.cudnn.allow_tf32 = False
        dev = resolve_device("torch", device)  # the device the engine gets for the same flag
        model = torch_twin(model_name).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        xb, yb = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

        def sync():
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
        where = f"torch.nn {dev}"
    else:
        from cnn import build_model, get_backend
        from cnn.functional import softmax_cross_entropy
        from cnn.optim import SGD
        from cnn.replay import StepReplay

        B = get_backend(engine.removesuffix("-replay"), device)
        model = build_model(model_name).to(B).train()
        opt = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        xb, yb = B.asarray(x), B.asarray(y)

        def train_step(xb, yb):
            _, grad = softmax_cross_entropy(model(xb), yb)
            model.backward(grad)
            opt.update()

        # As cnn.train runs it on CUDA: recorded once, then replayed (cnn.replay).
        run = StepReplay(train_step, B) if engine.endswith("-replay") else train_step

        def step():
            run(xb, yb)

        sync = B.synchronize
        where = repr(B)
    for _ in range(warmup):
        step()
    sync()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        blocks.append((time.perf_counter() - start) / steps)
    if getattr(run, "replays", 0):  # a recording was made and replayed (not the CPU's eager steps)
        where += " replayed"
    result = {"model": model_name, "engine": engine, "where": where, "batch_size": batch_size,
              "ms_per_step": 1000 * min(blocks), "ms_blocks": [1000 * b for b in blocks],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if engine in ("torch", "torch-replay", "native"):
        result["ops_per_step"] = _count_ops(step)
    if "cuda" in where:
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if engine == "cupy":
        import cupy

        # The pool keeps every block it got, so its size is the peak it reserved
        # (allocations rounded up to its block sizes), not a peak of live arrays.
        result["peak_gpu_mb"] = cupy.get_default_memory_pool().total_bytes() / 2**20
    return result


def machine() -> dict:
    """What the figures depend on besides the code: the CPU, its cores and the libraries
    (NumPy's BLAS, and the CPU kernels it picked at run time)."""
    import platform

    import threadpoolctl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = [f"{info['internal_api']} {info['version']}" + (f" ({info['architecture']} kernels)"
                                                            if info.get("architecture") else "")
            for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas" and "numpy" in info["filepath"]]
    try:  # torch's own version names its build (2.11.0+cu130); the package's may not
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numpy_blas": ", ".join(blas) or "unknown", "torch": torch_version}


def _count_ops(step) -> int:
    """Tensor operators one ``step()`` dispatches (torch engines): the ``aten::`` calls made
    from Python or by autograd, not those nested inside another operator. On a GPU each
    costs host time to issue whatever its size, so for small batches this count, not the
    arithmetic, sets the step time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def nested(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not nested(e))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["simple", "resnet"], choices=["simple", "resnet"],
                   help="SimpleCNN, SmallResNet")
    p.add_argument("--engines", nargs="+", default=["numpy", "torch", "native"],
                   choices=["numpy", "torch", "torch-replay", "cupy", "native"],
                   help="torch-replay: the torch engine as cnn.train runs it on CUDA, each step "
                        "replayed from one recording (a CUDA graph); the same as torch elsewhere")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (numpy always runs on the CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64], help="batch sizes to time")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; the best one counts")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="N processes that only spin, beside each case: a machine busier than its cores")
    p.add_argument("--json", help="also write the results to this file (its folder must exist)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    for flag in ("steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1; got {getattr(args, flag)}")
    for flag in ("warmup", "busy"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0; got {getattr(args, flag)}")
    if min(args.batch_sizes) < 1:
        p.error(f"every --batch-sizes value must be at least 1; got {min(args.batch_sizes)}")
    # Checked before any case runs: a GPU benchmark is too costly to lose at its end.
    try:
        if set(args.engines) & {"torch", "torch-replay", "native"}:
            resolve_device("torch", args.device)
        if "cupy" in args.engines:
            resolve_device("cupy", args.device)
            if importlib.util.find_spec("cupy") is None:
                raise DeviceError(f"--engines cupy needs CuPy: {CUPY_INSTALL}")
    except DeviceError as err:
        p.error(str(err))
    if args.json and not (Path(args.json).parent.is_dir() and os.access(Path(args.json).parent, os.W_OK)
                          and not Path(args.json).is_dir()):
        p.error(f"--json {args.json}: cannot write there (no such folder, not writable, or a folder)")

    if args.case:
        model, engine, bs = args.case.split(":")
        device = "cpu" if engine == "numpy" else args.device
        print(json.dumps(_time_case(model, engine, device, int(bs), args.steps, args.repeats, args.warmup)))
        return 0

    results, failed, here = [], [], machine()
    print("machine: {cpu}, {cores} cores; Python {python}, NumPy {numpy} with {numpy_blas}, "
          "PyTorch {torch}".format(**here))
    for bs in args.batch_sizes:
        for model in args.models:
            for engine in args.engines:
                cmd = [sys.executable, "-m", "cnn.bench", "--case", f"{model}:{engine}:{bs}",
                       "--engines", engine, "--device", args.device, "--steps", str(args.steps),
                       "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
                print(f"timing {model} on {engine}, batch {bs} ...", file=sys.stderr, flush=True)
                # Spinning while this process lives: a kill of the benchmark stops them too.
                spin = f"import os\nwhile os.getppid() == {os.getpid()}: pass"
                busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                finally:
                    for b in busy:
                        b.kill()
                        b.wait()
                if proc.returncode != 0:  # its last line: the exception (no CUDA here, say)
                    reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    print(f"{model} {engine} batch {bs}: failed: {reason}", file=sys.stderr)
                    failed.append(f"{model}:{engine}:{bs}")
                    continue
                results.append(dict(json.loads(proc.stdout.strip().splitlines()[-1]), busy=args.busy, machine=here))
    if args.busy:
        print(f"each case beside {args.busy} process(es) that only spin")
    print(f"{'model':7} {'batch':>5} {'engine':44} {'ms/step':>8} {'s/epoch':>8} "
          f"{'x native':>8} {'ops/step':>8} {'peak RSS MB':>11} {'peak GPU MB':>11}")
    for r in results:
        _print_row(r, results)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _print_row(r: dict, results: list[dict]) -> None:
    native = next((o for o in results if o["engine"] == "native" and o["model"] == r["model"]
                   and o["batch_size"] == r["batch_size"]), None)
    ratio = f"{r['ms_per_step'] / native['ms_per_step']:.2f}" if native else "-"
    epoch_s = r["ms_per_step"] / 1000 * TRAIN_IMAGES / r["batch_size"]
    gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
    ops = r.get("ops_per_step", "-")
    print(f"{r['model']:7} {r['batch_size']:5d} {r['engine'] + ': ' + r['where']:44.44} "
          f"{r['ms_per_step']:8.1f} {epoch_s:8.1f} {ratio:>8} {ops:>8} {r['peak_rss_mb']:11.0f} {gpu:>11}")


if __name__ == "__main__":
    sys.exit(main())
