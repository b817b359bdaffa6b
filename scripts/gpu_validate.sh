#!/usr/bin/env bash
# GPU validation in one call of a lent device (see BENCHMARKS.md, "GPU figures still missing"):
#
#   bash scripts/gpu_validate.sh tests   # pytest -m gpu (engine, CUDA graphs, kernels at real shapes)
#   bash scripts/gpu_validate.sh bench   # python -m bench --quick (every benchmark, JSON results)
#   bash scripts/gpu_validate.sh full    # python -m bench (full sizes; the generate case alone takes minutes)
#
# Installs the checkout without touching the machine's torch (pip --no-deps: the GPU image has torch,
# triton, transformers, pybind11 and nvcc, and no internet), then writes logs and one results archive
# under $OUT (at most a few files, as the device tool brings back).
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-tests}"
case "$what" in
    tests | bench | full) ;;
    *) echo "usage: $0 tests|bench|full" >&2; exit 2 ;;
esac
OUT="${OUT:-/tmp/fastes-gpu}"
mkdir -p "$OUT"
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/device.txt" 2>&1
if ! pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    tail -40 "$OUT/install.log"
    exit 1
fi
python -c "import fastes._C" 2>/dev/null && echo "fastes._C built" || echo "fastes._C NOT built (see install.log)"
case "$what" in
    tests)
        python -m pytest -m gpu -q -p no:cacheprovider -rf > "$OUT/pytest-gpu.log" 2>&1
        rc=$?
        tail -30 "$OUT/pytest-gpu.log"
        ;;
    bench | full)
        results="$OUT/results"
        mkdir -p "$results"
        flag=$([ "$what" = bench ] && echo --quick)
        FASTES_BENCH_RESULTS="$results" python -m bench $flag > "$OUT/bench.log" 2>&1
        rc=$?
        tail -60 "$OUT/bench.log"
        tar -czf "$OUT/results.tar.gz" -C "$results" . && rm -rf "$results"
        ;;
esac
exit "$rc"
