#!/usr/bin/env bash
# GPU validation that fits a lent H100: two device calls of <= 5 minutes, <= 8 minutes with start-up.
#
#   bash scripts/gpu_validate.sh --plan     # on any machine: what each call runs and its time budget
#   bash scripts/gpu_validate.sh check      # device call 1: Triton cache warmed on 16 cores, then parity tests
#   bash scripts/gpu_validate.sh measure    # device call 2 (same warm machine): generation ratios, kernel benchmarks
#   bash scripts/gpu_validate.sh full       # outside the budget: python -m bench at full sizes
#
# Every phase runs under `timeout` with its own budget, unbuffered (python -u) and tee'd to $OUT, so a
# phase cut short still leaves its log and the next phase still runs. The checkout is run from its
# root (no install needed for the Triton paths); fastes._C (C++/CUDA) builds in the background during
# call 1 and only its own tests wait for it. The GPU image has torch, triton, transformers, nvcc,
# pytest-xdist and no internet. GPU_VALIDATE_DRY=1 echoes each phase's command instead of running it
# (the tests check the phases, logs and summary that way on a CPU). Exit status: 0 when every phase passed, 1 otherwise, 2 on a bad argument.
set -uo pipefail
cd "$(dirname "$0")/.."

START_S=75                     # a fresh machine's start-up, counted once in the device time
CHECK_PHASES=(                 # name:seconds, in order (call 1)
    "device:5" "warm:80" "parity:95" "extension-tests:15"
)
MEASURE_PHASES=(               # call 2, on the machine call 1 left warm (its Triton cache is reused)
    "predicted:5" "generate-0.5b:60" "generate-1.5b:80" "kernels:35"
)

usage() { echo "usage: $0 --plan | check | measure | full" >&2; exit 2; }
[ $# -eq 1 ] || usage
what="$1"
case "$what" in --plan | check | measure | full) ;; *) usage ;; esac

sum() { local s=0 p; for p in "$@"; do s=$((s + ${p##*:})); done; echo "$s"; }
check_s=$(sum "${CHECK_PHASES[@]}")
measure_s=$(sum "${MEASURE_PHASES[@]}")

# phase commands (the plan prints these same strings)
declare -A CMD=(
    [device]="nvidia-smi; python -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
    [warm]="python -u -m bench.compile --jobs 16 --cache-dir \$TRITON_CACHE_DIR --json \$OUT/compile-sm90-device.json"
    [parity]="python -u -m pytest -m gpu -v -p no:cacheprovider -rf \$XDIST tests/test_perturbed_linear.py tests/test_lora_linear.py tests/test_lora_linear_group.py tests/test_perturbed_embedding.py tests/test_attention.py tests/test_es_update.py tests/test_noise_triton.py tests/test_engine_gpu.py"
    [extension-tests]="wait for the background build of fastes._C, then python -u -m pytest -m gpu -q -p no:cacheprovider tests/test_noise_cpp.py"
    [predicted]="python -u -m bench.gpu_model --json \$OUT/results/predicted.json"
    [generate-0.5b]="python -u -m bench.generate --quick --model qwen2.5-0.5b-shape --members 32 --prompts 16 --max-tokens 64 --loop-members 2"
    [generate-1.5b]="python -u -m bench.generate --quick --model qwen2.5-1.5b-shape --members 32 --prompts 16 --max-tokens 64 --loop-members 2"
    [kernels]="python -u -m bench --quick --only noise ops_linear ops_update attention"
)

if [ "$what" = --plan ]; then
    echo "call 1: bash scripts/gpu_validate.sh check   (budget ${check_s} s; fastes._C builds in the background)"
    for p in "${CHECK_PHASES[@]}"; do printf '  %-16s %4d s  %s\n' "${p%%:*}" "${p##*:}" "${CMD[${p%%:*}]}"; done
    echo "call 2: bash scripts/gpu_validate.sh measure (budget ${measure_s} s; results JSON under \$OUT/results.tar.gz)"
    for p in "${MEASURE_PHASES[@]}"; do printf '  %-16s %4d s  %s\n' "${p%%:*}" "${p##*:}" "${CMD[${p%%:*}]}"; done
    total=$((START_S + check_s + measure_s))
    echo "total: ${START_S} s start-up + ${check_s} s + ${measure_s} s = ${total} s (limit 480 s; each call <= 300 s)"
    if [ "$total" -gt 480 ] || [ "$check_s" -gt 270 ] || [ "$measure_s" -gt 270 ]; then
        echo "plan over budget" >&2; exit 1
    fi
    echo "device tool: run(command='bash scripts/gpu_validate.sh check', timeout_s=$((check_s + 30))), then at once"
    echo "             run(command='bash scripts/gpu_validate.sh measure', timeout_s=$((measure_s + 30))), then give_back"
    exit 0
fi

export OUT="${OUT:-/tmp/fastes-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$HOME/.triton/cache}" FASTES_BENCH_RESULTS="$OUT/results"
mkdir -p "$TRITON_CACHE_DIR" "$FASTES_BENCH_RESULTS"
XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n 8"
export XDIST
status=0

phase() {  # phase NAME SECONDS: run CMD[NAME] under its budget, log to $OUT/NAME.log
    local name="$1" secs="$2" start rc
    start=$(date +%s)
    echo "=== $name (budget ${secs} s)"
    local cmd="${CMD[$name]}"
    [ -n "${GPU_VALIDATE_DRY:-}" ] && cmd="echo would run: ${cmd@Q}"  # tests: the phase machinery only
    timeout --kill-after=5 "$secs" bash -c "$cmd" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${secs} s"
    echo "=== $name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

case "$what" in
    check)
        : > "$OUT/summary.txt"
        # fastes._C with its CUDA sources, on 8 of the 16 cores, while the Triton kernels compile
        build_cmd=(pip install --no-deps --no-build-isolation -e .)
        [ -n "${GPU_VALIDATE_DRY:-}" ] && build_cmd=(echo would run: "${build_cmd[@]}")
        ( MAX_JOBS=8 timeout $((check_s - 15)) "${build_cmd[@]}" > "$OUT/install.log" 2>&1;
          echo "exit $?" >> "$OUT/install.log" ) &
        build=$!
        for p in "${CHECK_PHASES[@]}"; do
            name="${p%%:*}"
            if [ "$name" = extension-tests ]; then
                wait "$build"
                if [ -n "${GPU_VALIDATE_DRY:-}" ] || python -c "import fastes._C as c; assert c.has_cuda()" 2>/dev/null; then
                    CMD[$name]="python -u -m pytest -m gpu -q -p no:cacheprovider tests/test_noise_cpp.py"
                else
                    echo "=== fastes._C not built with CUDA (see install.log):"; tail -5 "$OUT/install.log"
                    status=1; continue
                fi
            fi
            phase "$name" "${p##*:}"
        done
        rmdir "$FASTES_BENCH_RESULTS" 2>/dev/null  # call 1 writes no results; keep $OUT to the logs
        ;;
    measure)
        for p in "${MEASURE_PHASES[@]}"; do phase "${p%%:*}" "${p##*:}"; done
        tar -czf "$OUT/results.tar.gz" -C "$FASTES_BENCH_RESULTS" . && rm -rf "$FASTES_BENCH_RESULTS"
        ;;
    full)
        CMD[full]="python -u -m bench"
        phase full 3600
        tar -czf "$OUT/results.tar.gz" -C "$FASTES_BENCH_RESULTS" . && rm -rf "$FASTES_BENCH_RESULTS"
        ;;
esac
cat "$OUT/summary.txt" 2>/dev/null
exit "$status"
