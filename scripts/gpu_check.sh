#!/usr/bin/env bash
# The GPU verification in one command: the GPU-marked tests, then benchmarks/bench_gpu.py (time-mix against
# flash attention, RWKV-7 L12-D768 training throughput and MFU, decode tokens/s at batch 1 and 64).
#
#   bash scripts/gpu_check.sh --fetch-wheels        # here, with network: fla-core's wheel into .whl/ (~1 MB)
#   bash scripts/gpu_check.sh OUT_DIR               # on the GPU machine (no network needed); about 5 minutes
#                                                   # expected on an H200 (not yet run: no GPU so far)
#   bash scripts/gpu_check.sh --cpu-smoke OUT_DIR   # the same steps on a CPU, tiny shapes (tests/benchmarks)
#
# --parts LIST (before OUT_DIR) runs only some benchmark parts; arguments after OUT_DIR go to bench_gpu.py
# (e.g. --peak-tflops 989). OUT_DIR receives gpu_tests.log, gpu_tests.xml, bench_gpu.log, gpu_results.json and
# summary.md (the markdown table). Each step has its own time limit and a failing step does not stop the next; the
# exit code is that of the tests (0 when they pass).
#
# Needs on the GPU machine: python3 with a CUDA torch, Triton, pytest, numpy, safetensors, tokenizers, tqdm, pyyaml
# and einops (fla-core's one dependency). fla-core comes from .whl/ when it is not installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
FLA=fla-core==0.6.0

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: -d .whl "$FLA"
fi
SMOKE=()
PARTS=timemix,train,decode
while [[ "${1:-}" == --cpu-smoke || "${1:-}" == --parts ]]; do
    if [[ $1 == --cpu-smoke ]]; then SMOKE=(--cpu-smoke); shift; else PARTS=${2:-}; shift 2 || shift; fi
done
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash scripts/gpu_check.sh [--cpu-smoke] [--parts timemix,train,decode] OUT_DIR" \
        "[bench_gpu.py options] | --fetch-wheels" >&2
    exit 2
fi
OUT_DIR=$1
shift
mkdir -p "$OUT_DIR"
log() { echo "== gpu_check: $*" | tee -a "$OUT_DIR/summary.md" >&2; }
: > "$OUT_DIR/summary.md"

# 1. fla-core from the carried wheels (the GPU machine reaches no package index)
if [[ ${#SMOKE[@]} -eq 0 ]] && ! "$PY" -c "import fla" 2>/dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/aviary-gpu-site .whl/*.whl \
            && export PYTHONPATH=/tmp/aviary-gpu-site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "no fla and no .whl/ wheels: the fla tests and benchmarks will be skipped (run --fetch-wheels first)"
    fi
fi

# 2. Aviary from this checkout, as it is: nothing here needs its C extensions (built for another Python they do
# not load, and the CPU decode kernels and the World tokenizer's trie are then simply not used)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT_DIR/summary.md"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF

# 3. the GPU-marked tests (skipped without CUDA, or without fla where they need it)
mapfile -t FILES < <(grep -rl --include='*.py' 'mark\.gpu' tests | sort)
log "GPU-marked tests in ${#FILES[@]} files"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -rs \
    --junitxml "$OUT_DIR/gpu_tests.xml" "${FILES[@]}" 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -n 30
TESTS=${PIPESTATUS[0]}
log "tests exit code $TESTS"

# 4. the benchmark, one part a process with its own limit (each keeps the others' results in gpu_results.json)
for part in timemix:150 train:120 decode:60; do
    [[ ",$PARTS," == *",${part%%:*},"* ]] || continue
    timeout "${part#*:}" "$PY" benchmarks/bench_gpu.py "${SMOKE[@]}" --out "$OUT_DIR" --parts "${part%%:*}" "$@" \
        > "$OUT_DIR/table.tmp" 2>> "$OUT_DIR/bench_gpu.log"
    code=$?
    [[ $code -eq 0 ]] && mv "$OUT_DIR/table.tmp" "$OUT_DIR/table.md"  # each run's table covers the parts so far
    log "benchmark part ${part%%:*}: exit code $code"
done
rm -f "$OUT_DIR/table.tmp"
[[ -f "$OUT_DIR/table.md" ]] && cat "$OUT_DIR/table.md" >> "$OUT_DIR/summary.md" && rm -f "$OUT_DIR/table.md"
cat "$OUT_DIR/summary.md"
exit "$TESTS"
