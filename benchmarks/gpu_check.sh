#!/usr/bin/env bash
# The whole GPU check in one call of the device tool, in under 8 minutes on an H100:
#
#   1 env       nvidia-smi; driver, CUDA, CuPy, torch, numpy versions; train.py imports
#   2 kernels   pytest tests/test_cuda_kernels.py (each fused CUDA kernel against its plain twin)
#   3 parity    benchmarks/gpu_parity.py: CuPy against NumPy, same weights and batch
#   4 train     python train.py --backend cupy, the book's config, 500 steps; then inference.py
#   5 bench     benchmarks/bench_gpu.py: training step, CuPy against PyTorch CUDA eager
#   6 tests     the whole test suite, the xp fixture running NumPy and CuPy
#
#   bash benchmarks/gpu_check.sh          # results in $OUT, or ./gpu_out when OUT is unset
#
# Each phase runs under its own `timeout`, never past a deadline GPU_CHECK_SECONDS
# (default 450) after the start, so one hang cannot eat the budget; a phase that
# finds under 15 s left is skipped.  Nothing is downloaded: the repository is put
# on PYTHONPATH.  Written to the output folder, at most 8 files: gpu_check.log
# (everything), results.md (the summary, the benchmark table, the parity table),
# pytest_cuda_kernels.log, pytest_all.log, parity.md, train.log, bench_gpu.md.
# The summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # checkpoints and scratch: too big to send back
PY=${PYTHON:-python3}
TOTAL_S=${GPU_CHECK_SECONDS:-450}
START=$(date +%s)
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_TF32=0
ROWS=()
LAST_STATUS=

say() { echo "$*" | tee -a "$LOG"; }

# run_phase NAME MAX_SECONDS COPY_TO COMMAND...  (COPY_TO: a file name in the output folder, or -)
# The phase's output is printed, appended to the log and kept in $WORK/NAME.out.
run_phase() {
    local name=$1 max=$2 copy_to=$3
    shift 3
    local left=$(( START + TOTAL_S - $(date +%s) ))
    local limit=$(( max < left ? max : left ))
    if (( limit < 15 )); then
        say "=== $name: skipped, ${left}s left"
        ROWS+=("| $name | skipped (no time left) | 0 | |")
        return
    fi
    say ""
    say "=== $name (timeout ${limit}s): $*"
    local t0
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.out" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local secs=$(( $(date +%s) - t0 ))
    local status="ok"
    if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${limit}s"; elif (( rc != 0 )); then status="FAILED (exit $rc)"; fi
    [[ $copy_to != - ]] && cp "$WORK/$name.out" "$OUT_DIR/$copy_to"
    say "=== $name: $status in ${secs}s"
    ROWS+=("| $name | $status | $secs | $(key_line "$name") |")
    LAST_STATUS=$status
}

# The line that sums a phase up, from its output.
key_line() {
    local f=$WORK/$1.out
    case $1 in
        env) grep -m1 -E '^GPU:' "$f" ;;
        kernels|tests) grep -E '[0-9]+ (passed|failed|error)' "$f" | tail -n 1 | tr -d '=' | sed 's/^ *//' ;;
        parity) grep -E '^parity: (PASS|FAIL)' "$f" | tail -n 1 ;;
        train) { grep -m1 -E '^Step: 0,' "$f"; grep -E '^Step: ' "$f" | tail -n 1; grep -E '^Training complete' "$f"; } | paste -sd ';' ;;
        inference) grep -E '^Generated ' "$f" | tail -n 1 ;;
        bench) awk -F'|' '$3 ~ /cupy-fused/ { split($2, c, ":"); printf "%s: cupy-fused %s ms, torch / cupy-fused %s; ", c[1], $4, $6 }' "$f" ;;
    esac 2>/dev/null | cut -c1-400 | sed 's/|/\//g'
}

PYTEST_OPTS=(-q -p no:cacheprovider -rfE)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS+=(--timeout=120)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)

say "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), repo $REPO, output $OUT_DIR, deadline ${TOTAL_S}s"

cat > "$WORK/env.py" <<'EOF'
import os, platform, sys
import numpy
print(f"python {platform.python_version()} ({sys.executable}), numpy {numpy.__version__}")
import cupy
dev = cupy.cuda.Device()
props = cupy.cuda.runtime.getDeviceProperties(dev.id)
name = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
print(f"GPU: {name}, compute capability {dev.compute_capability}, {props['multiProcessorCount']} SMs; "
      f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}; "
      f"cupy {cupy.__version__}, numpy {numpy.__version__}; CUPY_TF32={os.environ.get('CUPY_TF32')}")
import torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
for mod in ("pytest", "hypothesis", "tiktoken", "xdist", "pytest_timeout", "tqdm"):
    try:
        print(mod, getattr(__import__(mod), "__version__", "(no version attribute)"))
    except ImportError:
        print(mod, "not installed")
from nanograd.backend import cupy_unavailable_reason
print("nanograd's cupy backend:", cupy_unavailable_reason() or "available")
import train  # noqa: F401  its top-level imports must all be on this machine
print("train.py imports: ok")
EOF
run_phase env 40 - bash -c 'nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; "$0" "$1"' \
    "$PY" "$WORK/env.py"

run_phase kernels 100 pytest_cuda_kernels.log "$PY" -m pytest "${PYTEST_OPTS[@]}" tests/test_cuda_kernels.py
if [[ ${LAST_STATUS:-} != ok ]]; then
    # Parity and the benchmark still run both paths side by side; training and the
    # test suite then check the plain kernels, so that a broken fused one spoils less.
    export NANOGRAD_FUSED=0
    say "fused kernels failed their tests: train, inference and tests run with NANOGRAD_FUSED=0"
    ROWS+=("| (note) | train, inference and tests ran with NANOGRAD_FUSED=0 | | |")
fi

run_phase parity 120 - "$PY" benchmarks/gpu_parity.py --config book --out "$OUT_DIR/parity.md"

run_phase train 150 - "$PY" train.py --backend cupy --max-iters 500 --save-interval 0 --no-progress \
    --out "$WORK/model.ckpt"
run_phase inference 40 - "$PY" inference.py --backend cupy --ckpt "$WORK/model.ckpt" --max-new-tokens 50 \
    --prompt "The module"
cat "$WORK/train.out" "$WORK/inference.out" > "$OUT_DIR/train.log" 2>/dev/null
[[ -f $WORK/model.metrics.jsonl ]] && say "metrics: $(wc -l < "$WORK/model.metrics.jsonl") evaluations in model.metrics.jsonl"

run_phase bench 130 - "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR/bench_gpu.md"

run_phase tests 240 pytest_all.log "$PY" -m pytest "${PYTEST_OPTS[@]}" "${XDIST[@]}" tests

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    grep -m1 -E '^GPU:' "$WORK/env.out" 2>/dev/null
    grep -m1 -E '^torch ' "$WORK/env.out" 2>/dev/null
    echo
    echo "| phase | status | seconds | result |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "total $(( $(date +%s) - START )) s"
    if [[ -s $OUT_DIR/bench_gpu.md ]]; then echo; echo "## Training step, CuPy against PyTorch"; echo; cat "$OUT_DIR/bench_gpu.md"; fi
    if grep -q -E '^\|' "$WORK/parity.out" 2>/dev/null; then
        echo; echo "## CuPy against NumPy"; echo; grep -E '^\|' "$WORK/parity.out"
    fi
} > "$OUT_DIR/results.md"
say ""
say "================ summary ================"
cat "$OUT_DIR/results.md" | tee -a "$LOG"
rm -rf "$WORK"
