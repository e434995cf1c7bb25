#!/usr/bin/env bash
# Everything a GPU lease is for, as one command whose results land in one folder.
#
#   bash benchmarks/gpu_session.sh CARRY OUT [RUN ...]
#
# CARRY: a folder holding ../shared/cifar10/{cifar-10-jpeg.tar.xz,make-mirror} (the
#        offline copy; the device machine cannot download the official archive).
# OUT:   where the logs, the benchmark table and runs.tar come back ($OUT of a device run).
# RUN:   params.yaml runs to train there (default: none). Two SmallResNet rows at
#        ~8 min each do not fit one 15-minute lease with the rest: split them.
#
# With the device tool: copy the two files into a git-ignored folder of the checkout
# (mkdir .gpu && cp ../shared/cifar10/{cifar-10-jpeg.tar.xz,make-mirror} .gpu/; add .gpu/ to
# .git/info/exclude), then
#   run(command="bash benchmarks/gpu_session.sh .gpu $OUT resnet_50ep_step", carry=[".gpu"])
# The device image has torch, CuPy, numpy, Pillow, PyYAML, tqdm, matplotlib and pytest, but
# neither DVC nor MLflow.
# Each RUN executes its DVC stage commands (python -m pipeline.train / .evaluate) without
# DVC; MLflow is skipped with one warning. Back here: tar -xf runs.tar, then
# `dvc commit train@RUN evaluate@RUN` records them in dvc.lock (their deps are this
# checkout's), and `dvc repro -s report` rebuilds reports/.
set -uo pipefail
CARRY=${1:?usage: gpu_session.sh CARRY OUT [RUN ...]}
OUT=${2:?usage: gpu_session.sh CARRY OUT [RUN ...]}
shift 2
# Rehearsal on a machine without a GPU: GPU_SESSION_DEVICE=cpu, and a short benchmark with
# GPU_SESSION_BENCH="--models simple --steps 2 --repeats 1 --warmup 1 --batch-sizes 64".
DEVICE=${GPU_SESSION_DEVICE:-cuda}
BENCH=${GPU_SESSION_BENCH:---batch-sizes 64 512}
mkdir -p "$OUT"
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, note the time and exit status
    local name=$1 t0=$SECONDS
    shift
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    return $rc
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python -c "import torch; print('torch', torch.__version__)"; } \
    >"$OUT/device.txt" 2>&1
step mirror python "$CARRY/make-mirror" "$CARRY/mirror" || exit 1
export CIFAR10_SOURCE=$PWD/$CARRY/mirror/cifar-10-python.tar.gz CIFAR10_MD5=cdf7501182ebb3f902c966eaf0e06177
step data bash -c "python -m pipeline.download && python -m pipeline.normalize" || exit 1

# The engine's suite, CUDA and CuPy parametrisations included (the pipeline tests need DVC).
step tests python -m pytest -q -rs -p no:cacheprovider tests/test_layers.py tests/test_models.py \
    tests/test_optim.py tests/test_data.py tests/test_train.py
engines="torch native"
[ "$DEVICE" = cuda ] && engines="torch cupy native"
step bench python -m cnn.bench --device "$DEVICE" --engines $engines $BENCH --json "$OUT/bench.json"

for run in "$@"; do
    step "train_$run" python -m pipeline.train "$run" && step "evaluate_$run" python -m pipeline.evaluate "$run"
done
if [ $# -gt 0 ]; then  # checkpoints and outputs of the runs; resume files stay behind
    tar -cf "$OUT/runs.tar" --exclude=last.npz --exclude=last.engine $(printf 'runs/%s ' "$@")
fi
