#!/usr/bin/env bash
# The whole GPU check in one call of the device tool, on a cold machine: everything back in about 6 minutes.
#
#   1 env        versions: GPU, driver, CUDA runtime, NVRTC, NCCL, the CuPy wheel, torch, numpy,
#                whether mpiexec exists (benchmarks/gpu_env.py)
#   2 warmup     one training step of FastModel and Model in float32 and float64 at a small size,
#                against torch on CUDA (gpu_step.py --config small): CuPy compiles its kernels
#                here, so the phases after it find the kernel cache warm
#   3 launch     every CUDA kernel compiled for this GPU and launched once on tiny inputs,
#                float and double, against NumPy (benchmarks/compile_kernels.py --launch)
#   4 kernels    pytest tests/test_cuda_kernels.py: each CUDA kernel against its plain twin
#   5 cupy-tests pytest tests -k cupy: the xp fixture's CuPy half of every kernel test
#   6 nccl       pytest tests/test_fast_nccl.py: NCCL's all-reduce and broadcast, and GradientSync,
#                through one rank on this GPU (no mpiexec needed)
#   7 step       benchmarks/gpu_step.py: one training step at the book's config and vocabulary,
#                float32 and float64, CuPy against the book's PyTorch model on CUDA: the loss,
#                every gradient, every parameter after AdamW
#   8 parity     benchmarks/gpu_parity.py --config small: CuPy against NumPy, same weights and batch
#   9 train      python train.py --backend cupy, 100 steps of the book's model
#  10 resume     train.py --resume, 20 steps more
#  11 inference  inference.py --backend cupy on the checkpoint
#  12 bench      benchmarks/bench_gpu.py: a training step, CuPy against PyTorch CUDA (last)
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
# Time.  Each phase runs under its own `timeout`, its cap sized for a cold machine (the
# first import of torch with CUDA, CuPy compiling each of its kernels with NVRTC in two
# dtypes), and no phase runs past GPU_CHECK_SECONDS (default 360) after the start; a
# phase that finds under 5 s left is not run.  pytest runs to --maxfail=5, not to the
# first failure, and lists its slowest tests (--durations).  CuPy's kernel cache starts
# empty in a folder of its own, and its size is logged after every phase, so the run
# measures what the cold compiles cost.  BLAS and OpenMP get 4 threads, pytest runs in
# one process.  Nothing is downloaded: the repository is put on PYTHONPATH.
#
# Files.  The device returns at most 8 files, so at most four are written to the output
# folder: gpu_check.log (every phase's output, in order), results.md (the summary table,
# then the benchmark and the worst of each check), parity.md (the one-step check's and
# gpu_parity's tables) and bench_gpu.md.  The summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # phase logs, checkpoints, kernel cache: not sent back
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs"
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_SECONDS:-360}
REQUIRE=${GPU_CHECK_REQUIRE_CUPY:-1}
START=$(date +%s)
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
rm -f "$OUT_DIR/results.md" "$OUT_DIR/parity.md" "$OUT_DIR/bench_gpu.md"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_TF32=0
export CUPY_CACHE_DIR=$WORK/cupy_kernel_cache
export NANOGRAD_REQUIRE_CUPY=$REQUIRE
export OMP_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 MKL_NUM_THREADS=4
ROWS=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# The size of CuPy's kernel cache: "N files, M kB".
cache_size() {
    local files=0 kb=0
    if [[ -d $CUPY_CACHE_DIR ]]; then
        files=$(find "$CUPY_CACHE_DIR" -type f | wc -l)
        kb=$(du -sk "$CUPY_CACHE_DIR" | cut -f1)
    fi
    echo "$files files, $kb kB"
}

# run_phase NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout, records a row of the summary.
run_phase() {
    local name=$1 cap=$2
    shift 2
    [[ -n ${GPU_CHECK_PHASES:-} && " $GPU_CHECK_PHASES " != *" $name "* ]] && return
    local left=$(( START + TOTAL_S - $(date +%s) ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 5 )); then
        say "=== $name: not run, ${left}s left"
        ROWS+=("| $name | FAILED (no time left) | 0 | | |")
        FAILED=1
        return
    fi
    say ""
    say "=== $name (timeout ${limit}s): $*"
    local t0
    t0=$(date +%s)
    timeout -k 3 "$limit" "$@" < /dev/null 2>&1 | tee "$WORK/logs/$name.log" >> "$LOG"
    local rc=${PIPESTATUS[0]}
    local secs=$(( $(date +%s) - t0 ))
    tail -n 3 "$WORK/logs/$name.log"
    local status=ok
    if (( rc == 124 || rc == 137 )); then
        status="FAILED (timeout after ${limit}s)"
    elif [[ $REQUIRE != 1 ]] && no_cupy "$name" "$rc"; then
        status="no CuPy (dry run)"
    elif (( rc != 0 )); then
        status="FAILED (exit $rc)"
    fi
    [[ $status == FAILED* ]] && FAILED=1
    local cache
    cache=$(cache_size)
    say "=== $name: $status in ${secs}s; CuPy kernel cache $cache"
    ROWS+=("| $name | $status | $secs | $cache | $(key_line "$name") |")
}

# Whether a phase's outcome only says that CuPy cannot run here (the dry run's expected outcome).
no_cupy() {
    local f=$WORK/logs/$1.log
    case $1 in
        kernels|cupy-tests|nccl) (( $2 == 0 )) && grep -q -E '[0-9]+ skipped' "$f" ;;
        *) (( $2 == 2 )) && grep -q -E 'CuPy (is not installed|is installed but|could not run)' "$f" ;;
    esac
}

# The line that sums a phase up, from its log; else its first error.
key_line() {
    local line
    line=$(phase_line "$1")
    [[ -z $line ]] && line=$(grep -m1 -E '^(error:|FAIL|E  )' "$WORK/logs/$1.log" 2>/dev/null)
    echo "$line" | cut -c1-300 | sed 's/|/\//g'
}

phase_line() {
    local f=$WORK/logs/$1.log
    case $1 in
        env) grep -E '^(GPU|CuPy package|NVRTC|NCCL|cupy_unavailable_reason):' "$f" | paste -sd ';' ;;
        launch) grep -E '^launch:' "$f" | tail -n 1 ;;
        kernels|cupy-tests|nccl) grep -E '[0-9]+ (passed|failed|skipped|error)' "$f" | tail -n 1 | tr -d '=' | sed 's/^ *//' ;;
        warmup|step) grep -E '^step: (PASS|FAIL)' "$f" | tail -n 1 ;;
        parity) grep -E '^parity: (PASS|FAIL)' "$f" | tail -n 1 ;;
        train|resume) { grep -E '^Step: ' "$f" | tail -n 1; grep -E '^Training complete' "$f"; } | paste -sd ';' ;;
        inference) grep -E '^Generated ' "$f" | tail -n 1 ;;
        bench) grep -E '^(loss check|bench):' "$f" | paste -sd ';' ;;
    esac 2>/dev/null
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs --maxfail=5 --durations=10)

say "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), repo $REPO, output $OUT_DIR, deadline ${TOTAL_S}s," \
    "NANOGRAD_REQUIRE_CUPY=$NANOGRAD_REQUIRE_CUPY"

run_phase env 40 bash -c 'command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; "$0" benchmarks/gpu_env.py' "$PY"
run_phase warmup 75 "$PY" benchmarks/gpu_step.py --config small
run_phase launch 30 "$PY" benchmarks/compile_kernels.py --launch
run_phase kernels 60 "${PYTEST[@]}" tests/test_cuda_kernels.py
run_phase cupy-tests 90 env HYPOTHESIS_PROFILE=gpu "${PYTEST[@]}" tests -k cupy
run_phase nccl 30 "${PYTEST[@]}" tests/test_fast_nccl.py
run_phase step 45 "$PY" benchmarks/gpu_step.py --config book --out "$WORK/step.md"
run_phase parity 30 "$PY" benchmarks/gpu_parity.py --config small --out "$WORK/parity.md"
TRAIN=(--backend cupy --eval-interval 50 --eval-iters 5 --save-interval 0 --no-progress)
run_phase train 40 "$PY" train.py "${TRAIN[@]}" --max-iters 100 --out "$WORK/model.ckpt"
run_phase resume 25 "$PY" train.py "${TRAIN[@]}" --resume "$WORK/model.ckpt" --max-iters 120
run_phase inference 20 "$PY" inference.py --backend cupy --ckpt "$WORK/model.ckpt" --max-new-tokens 50 \
    --prompt "The module"
run_phase bench 45 "$PY" benchmarks/bench_gpu.py --configs book --steps 20 --warmup 5 --out "$OUT_DIR/bench_gpu.md"

for table in step parity; do
    if [[ -s $WORK/$table.md ]]; then cat "$WORK/$table.md"; echo; fi
done > "$OUT_DIR/parity.md"
[[ -s $OUT_DIR/parity.md ]] || rm -f "$OUT_DIR/parity.md"
{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    grep -E '^(GPU|driver|CUDA runtime|NVRTC|NCCL|CuPy package|python|numpy|torch|mpiexec|cupy_unavailable_reason)' \
        "$WORK/logs/env.log" 2>/dev/null | sed 's/^/    /'
    echo
    echo "| phase | status | seconds | CuPy kernel cache after | result |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "total $(( $(date +%s) - START )) s; $( (( FAILED )) && echo 'FAILED' || echo 'all phases passed')"
    for phase in warmup step; do
        if grep -q -E '^  (ok|FAIL): ' "$WORK/logs/$phase.log" 2>/dev/null; then
            echo; echo "## One training step against torch ($phase), worst of each kind (parity.md has every tensor)"; echo
            grep -E '^(One training step|  (ok|FAIL): )' "$WORK/logs/$phase.log"
        fi
    done
    if [[ -s $OUT_DIR/bench_gpu.md ]]; then echo; echo "## Training step, CuPy against PyTorch"; echo; cat "$OUT_DIR/bench_gpu.md"; fi
    if grep -q '^| dtype | kernels | worst' "$WORK/logs/parity.log" 2>/dev/null; then
        echo; echo "## CuPy against NumPy (gpu_parity.py --config small)"; echo
        sed -n '/^| dtype | kernels | worst/,/^$/p' "$WORK/logs/parity.log"
    fi
} > "$OUT_DIR/results.md"
say ""
say "================ summary ================"
sed -n '/^| phase/,/^total/p' "$OUT_DIR/results.md" | tee -a "$LOG"
exit "$FAILED"
