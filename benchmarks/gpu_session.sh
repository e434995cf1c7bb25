#!/usr/bin/env bash
# Everything a GPU lease is for, in two calls whose results land in $OUT: `start` (or `runs`,
# for a lease that continues runs), then `collect`.
#
#   bash benchmarks/gpu_session.sh start   CARRY OUT [RUN ...]
#   bash benchmarks/gpu_session.sh runs    CARRY OUT [RUN ...]
#   bash benchmarks/gpu_session.sh collect CARRY OUT WAIT_S [RUN ...]
#
# start:   runs the benchmark on the quiet machine, builds the mirror and the prepared data,
#          starts the named params.yaml runs in the background (setsid, so they outlive the
#          command), and beside them re-trains epoch 1 of resnet_50ep_step to compare it with
#          the committed row (benchmarks/reproduce_epoch.py; meaningful on the kind of GPU
#          that produced the row, an H200) and runs every test file but the pipeline's.
#          Both start and runs stop at once if PyTorch sees no CUDA GPU.
# runs:    only the mirror, the data and the runs: for a lease that continues runs.
#          A run whose unfinished outputs an earlier lease brought back and CARRY/runs/RUN
#          holds (last.npz, best.npz, last.engine, last.devices) continues from there:
#          `resume: true`, same settings and the same cnn/ code, or it starts over (the
#          train stage says why). Both start and runs do that.
# collect: waits up to WAIT_S seconds for those runs, then brings back their logs (all in
#          run_logs.txt) and runs.tar (with the resume pair if a run is unfinished). Call
#          it right after `start` or `runs`, while the machine is still warm, with WAIT_S
#          about 90 s less than the device time left (status: budget_left_s) so that it
#          returns in time; a SIGTERM (the call's time limit) also ends the wait and collects.
# CARRY:   a git-ignored folder holding ../shared/cifar10/{cifar-10-jpeg.tar.xz,make-mirror}
#          (the device machine cannot download the official archive). The runs train in
#          a copy, CARRY/work, and log to CARRY/logs, which last between the two calls: so
#          call start (or runs) once per lease, and collect without carry, which would
#          replace CARRY there, runs and all.
# OUT:     $OUT of a device run.
#
# With the device tool (mkdir -p .cache/gpu && cp ../shared/cifar10/{cifar-10-jpeg.tar.xz,make-mirror} .cache/gpu/):
#   run(command="bash benchmarks/gpu_session.sh start .cache/gpu $OUT resnet_50ep_step resnet_50ep_cosine", carry=[".cache/gpu"])
#   run(command="bash benchmarks/gpu_session.sh collect .cache/gpu $OUT 450 resnet_50ep_step resnet_50ep_cosine")
# The device image has torch, CuPy, numpy, Pillow, PyYAML, tqdm, matplotlib and pytest, but
# neither DVC nor MLflow: each RUN executes its DVC stage commands (python3 -m pipeline.params
# --run RUN --out runs/RUN/settings.json, then pipeline.train and pipeline.evaluate) without
# DVC, and MLflow is skipped with one warning. Back here: tar -xf runs.tar, then
# `python -m pipeline.log_run RUN` logs each to MLflow from its outputs, `dvc commit -f
# settings@RUN train@RUN evaluate@RUN` records them in dvc.lock (their deps are this
# checkout's), `dvc repro -s report` rebuilds reports/, and git takes runs/RUN, reports/ and
# dvc.lock (stage outputs are kept in git, see dvc.yaml). An unfinished run goes to
# CARRY instead (tar -xf runs.tar -C .cache/gpu runs/RUN), for the next lease to continue.
#
# Rehearsal on a machine without a GPU: GPU_SESSION_DEVICE=cpu, a short benchmark with
# GPU_SESSION_BENCH="--models simple --steps 2 --repeats 1 --warmup 1 --batch-sizes 64", and
# GPU_SESSION_REPRODUCE=simple_5ep_torch (a run this machine produced).
set -uo pipefail
usage="usage: gpu_session.sh start|runs CARRY OUT [RUN ...] | collect CARRY OUT WAIT_S [RUN ...]"
PHASE=${1:?$usage}
CARRY=${2:?$usage}
OUT=${3:?$usage}
shift 3
DEVICE=${GPU_SESSION_DEVICE:-cuda}
BENCH=${GPU_SESSION_BENCH:---batch-sizes 64 512}
REPRODUCE=${GPU_SESSION_REPRODUCE:-resnet_50ep_step}
ROOT=$PWD
CARRY=$(cd "$CARRY" && pwd) || exit 2
LOGS=$CARRY/logs
WORK=$CARRY/work  # where the runs train (see launch)
# The device machine has a copy of the working tree, not this package installed: the repo
# root on the path lets benchmarks/*.py import it as `python -m` does for cnn and pipeline.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$LOGS"
# A device call brings back 8 files of $OUT at most: start writes exactly 8 (device.txt,
# summary.txt, bench.json and five step logs), collect 4.
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, note the time and exit status
    local name=$1 t0=$SECONDS
    shift
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    return $rc
}

# On a machine with 8 or more cores, the runs get cores 0-3 and the checks beside them the
# rest: the test suite would otherwise take every core (a NumPy thread pool per core in each
# of its workers) from the runs' host threads, and their s/epoch goes into the results table.
RUN_CPUS="" TEST_CPUS=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 8 ]; then
    RUN_CPUS="taskset -c 0-3" TEST_CPUS="taskset -c 4-$(($(nproc) - 1))"
fi

launch() {  # each run in the background, in WORK: train, then evaluate; exit status in LOGS/RUN.rc
    # The device tool re-sends this checkout's tracked files at each call, runs/RUN/* among
    # them, over whatever a run has written there: so the runs train in a copy of their own.
    rm -rf "$WORK" && mkdir -p "$WORK/runs" && cp -r cnn pipeline params.yaml "$WORK/" && ln -s "$ROOT/data" "$WORK/data"
    for run in "$@"; do
        local params=params.yaml
        rm -f "$LOGS/$run.rc"  # an earlier launch's: collect waits for this one's
        if [ -f "$CARRY/runs/$run/last.npz" ]; then  # brought back unfinished: continue it
            # Only the resume files: the rest (settings.json above all) is this checkout's.
            mkdir -p "$WORK/runs/$run"
            for f in last.npz best.npz last.engine last.devices; do
                if [ -f "$CARRY/runs/$run/$f" ]; then cp "$CARRY/runs/$run/$f" "$WORK/runs/$run/"; fi
            done
            params=params.resume.yaml
            python3 -c "import sys, yaml; p = yaml.safe_load(open('params.yaml')); p['resume'] = True
yaml.safe_dump(p, open(sys.argv[1], 'w'), sort_keys=False)" "$WORK/$params"
        fi
        (cd "$WORK" && setsid nohup $RUN_CPUS bash -c 't0=$SECONDS run=$1 logs=$2 params=$3
            python3 -m pipeline.params --run "$run" --out "runs/$run/settings.json" >"$logs/settings_$run.log" 2>&1 &&
            OMP_NUM_THREADS=2 python3 -m pipeline.train "$run" --params "$params" >"$logs/train_$run.log" 2>&1 &&
            python3 -m pipeline.evaluate "$run" >"$logs/evaluate_$run.log" 2>&1; rc=$?
            echo "$run: exit $rc, $((SECONDS - t0)) s" >"$logs/$run.rc"' _ "$run" "$LOGS" "$params" >/dev/null 2>&1 &)
    done
}

prepare() {  # the mirror and the prepared data (CPU work), in the background: PID in $data
    ( export CIFAR10_SOURCE=$CARRY/mirror/cifar-10-python.tar.gz CIFAR10_MD5=cdf7501182ebb3f902c966eaf0e06177
      step mirror python3 "$CARRY/make-mirror" "$CARRY/mirror" &&
      step data bash -c "python3 -m pipeline.download && python3 -m pipeline.normalize" ) &
    data=$!
}

need_gpu() {  # with no GPU, `device: auto` would quietly train on the CPU: stop instead
    [ "$DEVICE" != cuda ] || python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" ||
        { echo "PyTorch sees no CUDA GPU here: nothing started" | tee -a "$OUT/summary.txt"; exit 1; }
}

case $PHASE in
runs)
    need_gpu
    prepare
    wait $data || { echo "no data: see mirror.log / data.log"; exit 1; }
    launch "$@"
    ;;
start)
    { nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; nproc
      python3 -c "import torch; print('torch', torch.__version__)"; } >"$OUT/device.txt" 2>&1
    need_gpu
    # The benchmark first, with the machine to itself: its eager cases are bound by the host
    # CPU, and beside the mirror build (2026-11-27) batch 64 timed slower than batch 512.
    engines="torch torch-replay native"
    [ "$DEVICE" = cuda ] && engines="torch torch-replay cupy native"
    step bench python3 -m cnn.bench --device "$DEVICE" --engines $engines $BENCH --json "$OUT/bench.json"
    prepare
    wait $data || { echo "no data: see mirror.log / data.log"; exit 1; }
    launch "$@"
    # Beside the runs: whether it matches only needs the numbers, not a quiet GPU.
    step reproduce $TEST_CPUS python3 benchmarks/reproduce_epoch.py "$REPRODUCE" --device "$DEVICE"
    # Every test file but the pipeline's (it needs DVC and MLflow, and has no device cases),
    # CUDA and CuPy parametrisations included, beside the runs: its timing does not matter,
    # theirs is read from their metrics.
    workers=""
    python3 -c "import xdist" 2>/dev/null && workers="-n 4"
    step tests $TEST_CPUS python3 -m pytest -q -rs -p no:cacheprovider $workers tests \
        --ignore=tests/test_pipeline.py
    ;;
collect)
    WAIT_S=${1:?$usage}
    shift
    trap 'WAIT_S=0' TERM  # out of time: stop waiting, bring back what there is
    t0=$SECONDS
    for run in "$@"; do
        while [ ! -f "$LOGS/$run.rc" ] && [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do sleep 5; done
        cat "$LOGS/$run.rc" 2>/dev/null | tee -a "$OUT/summary.txt" || echo "$run: unfinished" | tee -a "$OUT/summary.txt"
    done
    # One file for all the logs (a device call brings back 8 files at most), without tqdm's
    # progress-bar updates (carriage returns), which make the raw logs large.
    shopt -s nullglob  # no logs when no run was named
    for log in "$LOGS"/*.log; do
        echo "==> $(basename "$log") <=="
        tr '\r' '\n' <"$log" | grep -v -e '^ *$' -e '%|'
    done >"$OUT/run_logs.txt"
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    if [ $# -gt 0 ]; then tar -cf "$OUT/runs.tar" -C "$WORK" $(printf 'runs/%s ' "$@"); fi
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
