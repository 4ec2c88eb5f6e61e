#!/usr/bin/env bash
# The whole GPU check in one call of the device tool: the truth in under 300 s.
#
#   1 env        versions (driver, CUDA, CuPy, torch, numpy) and cupy_unavailable_reason()
#   2 launch     every CUDA kernel compiled for this GPU and launched once on tiny inputs,
#                float and double, against NumPy (benchmarks/compile_kernels.py --launch)
#   3 kernels    pytest tests/test_cuda_kernels.py -x: each CUDA kernel against its plain twin
#   4 cupy-tests pytest tests -k cupy -x: the xp fixture's CuPy half of every kernel test
#   5 parity     benchmarks/gpu_parity.py --config small: CuPy against NumPy, same weights and batch
#   6 train      python train.py --backend cupy, 100 steps of the book's model
#   7 resume     train.py --resume, 20 steps more
#   8 inference  inference.py --backend cupy on the checkpoint
#   9 bench      benchmarks/bench_gpu.py: a training step, CuPy against PyTorch CUDA (last)
#
#   bash benchmarks/gpu_check.sh          # results in $OUT, or ./gpu_out when OUT is unset
#
# Exit status: 0 when every phase passed, 1 when one failed, timed out or had no time left.
# GPU_CHECK_PHASES="env kernels" runs only the phases named (the tests use it).
# NANOGRAD_REQUIRE_CUPY=1 is set, so a test that cannot reach CuPy fails instead of
# skipping.  GPU_CHECK_REQUIRE_CUPY=0 is the dry run for a machine without a GPU: then
# a phase that finds CuPy unable to run (exit 2, or skipped tests) reads "no CuPy" and
# does not fail the check; everything else still must pass.
#
# Each phase runs under its own `timeout`; the caps below add up to 290 s, and no phase
# runs past GPU_CHECK_SECONDS (default 290) after the start.  BLAS and OpenMP get 4
# threads, pytest runs in one process.  Nothing is downloaded: the repository is put on
# PYTHONPATH.  Written to the output folder: gpu_check.log (everything), results.md (the
# summary table, then the benchmark and parity tables), and one <phase>.log per phase.
# The summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # checkpoints and scratch: too big to send back
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_SECONDS:-290}
REQUIRE=${GPU_CHECK_REQUIRE_CUPY:-1}
START=$(date +%s)
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_TF32=0
export NANOGRAD_REQUIRE_CUPY=$REQUIRE
export OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 MKL_NUM_THREADS=4
ROWS=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# run_phase NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout, records a row of the summary.
run_phase() {
    local name=$1 cap=$2
    shift 2
    [[ -n ${GPU_CHECK_PHASES:-} && " $GPU_CHECK_PHASES " != *" $name "* ]] && return
    local left=$(( START + TOTAL_S - $(date +%s) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        say "=== $name: not run, ${left}s left"
        ROWS+=("| $name | FAILED (no time left) | 0 | |")
        FAILED=1
        return
    fi
    say ""
    say "=== $name (timeout ${limit}s): $*"
    local t0
    t0=$(date +%s)
    timeout -k 3 "$limit" "$@" < /dev/null 2>&1 | tee "$OUT_DIR/$name.log" >> "$LOG"
    local rc=${PIPESTATUS[0]}
    local secs=$(( $(date +%s) - t0 ))
    tail -n 5 "$OUT_DIR/$name.log"
    local status=ok
    if (( rc == 124 || rc == 137 )); then
        status="FAILED (timeout after ${limit}s)"
    elif [[ $REQUIRE != 1 ]] && no_cupy "$name" "$rc"; then
        status="no CuPy (dry run)"
    elif (( rc != 0 )); then
        status="FAILED (exit $rc)"
    fi
    [[ $status == FAILED* ]] && FAILED=1
    say "=== $name: $status in ${secs}s"
    ROWS+=("| $name | $status | $secs | $(key_line "$name") |")
}

# Whether a phase's outcome only says that CuPy cannot run here (the dry run's expected outcome).
no_cupy() {
    local f=$OUT_DIR/$1.log
    case $1 in
        kernels|cupy-tests) (( $2 == 0 )) && grep -q -E '[0-9]+ skipped' "$f" ;;
        *) (( $2 == 2 )) && grep -q -E 'CuPy (is not installed|is installed but|could not run)' "$f" ;;
    esac
}

# The line that sums a phase up, from its log; else its first error.
key_line() {
    local line
    line=$(phase_line "$1")
    [[ -z $line ]] && line=$(grep -m1 -E '^(error:|FAIL|E  )' "$OUT_DIR/$1.log" 2>/dev/null)
    echo "$line" | cut -c1-300 | sed 's/|/\//g'
}

phase_line() {
    local f=$OUT_DIR/$1.log
    case $1 in
        env) grep -E '^(GPU|cupy_unavailable_reason):' "$f" | paste -sd ';' ;;
        launch) grep -E '^launch:' "$f" | tail -n 1 ;;
        kernels|cupy-tests) grep -E '[0-9]+ (passed|failed|skipped|error)' "$f" | tail -n 1 | tr -d '=' | sed 's/^ *//' ;;
        parity) grep -E '^parity: (PASS|FAIL)' "$f" | tail -n 1 ;;
        train|resume) { grep -E '^Step: ' "$f" | tail -n 1; grep -E '^Training complete' "$f"; } | paste -sd ';' ;;
        inference) grep -E '^Generated ' "$f" | tail -n 1 ;;
        bench) grep -E '^(loss check|bench):' "$f" | paste -sd ';' ;;
    esac 2>/dev/null
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs -x)

say "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), repo $REPO, output $OUT_DIR, deadline ${TOTAL_S}s," \
    "NANOGRAD_REQUIRE_CUPY=$NANOGRAD_REQUIRE_CUPY"

cat > "$WORK/env.py" <<'EOF'
import os, platform, sys
import numpy
print(f"python {platform.python_version()} ({sys.executable}), numpy {numpy.__version__}")
for mod in ("torch", "pytest", "hypothesis", "tiktoken", "tqdm"):
    try:
        print(mod, getattr(__import__(mod), "__version__", "(no version attribute)"))
    except ImportError:
        print(mod, "not installed")
import torch
print(f"torch built for CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
import train  # noqa: F401  its top-level imports must all be on this machine
from nanograd.backend import cupy_unavailable_reason
reason = cupy_unavailable_reason()
print(f"cupy_unavailable_reason: {reason}")
if reason is not None:
    sys.exit(2)
import cupy
dev = cupy.cuda.Device()
props = cupy.cuda.runtime.getDeviceProperties(dev.id)
name = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
print(f"GPU: {name}, compute capability {dev.compute_capability}, {props['multiProcessorCount']} SMs; "
      f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}; "
      f"cupy {cupy.__version__}; CUPY_TF32={os.environ.get('CUPY_TF32')}")
EOF
run_phase env 15 bash -c 'command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; "$0" "$1"' \
    "$PY" "$WORK/env.py"
run_phase launch 25 "$PY" benchmarks/compile_kernels.py --launch
run_phase kernels 55 "${PYTEST[@]}" tests/test_cuda_kernels.py
run_phase cupy-tests 60 env HYPOTHESIS_PROFILE=gpu "${PYTEST[@]}" tests -k cupy
run_phase parity 30 "$PY" benchmarks/gpu_parity.py --config small --out "$OUT_DIR/parity.md"
TRAIN=(--backend cupy --eval-interval 50 --eval-iters 5 --save-interval 0 --no-progress)
run_phase train 35 "$PY" train.py "${TRAIN[@]}" --max-iters 100 --out "$WORK/model.ckpt"
run_phase resume 20 "$PY" train.py "${TRAIN[@]}" --resume "$WORK/model.ckpt" --max-iters 120
run_phase inference 15 "$PY" inference.py --backend cupy --ckpt "$WORK/model.ckpt" --max-new-tokens 50 \
    --prompt "The module"
run_phase bench 35 "$PY" benchmarks/bench_gpu.py --configs book --steps 20 --warmup 5 --out "$OUT_DIR/bench_gpu.md"

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    grep -m1 -E '^GPU:' "$OUT_DIR/env.log" 2>/dev/null
    grep -m1 -E '^cupy_unavailable_reason:' "$OUT_DIR/env.log" 2>/dev/null
    echo
    echo "| phase | status | seconds | result |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "total $(( $(date +%s) - START )) s; $( (( FAILED )) && echo 'FAILED' || echo 'all phases passed')"
    if [[ -s $OUT_DIR/bench_gpu.md ]]; then echo; echo "## Training step, CuPy against PyTorch"; echo; cat "$OUT_DIR/bench_gpu.md"; fi
    if [[ -s $OUT_DIR/parity.md ]]; then echo; cat "$OUT_DIR/parity.md"; fi
} > "$OUT_DIR/results.md"
say ""
say "================ summary ================"
sed -n '/^| phase/,/^total/p' "$OUT_DIR/results.md" | tee -a "$LOG"
exit "$FAILED"
