#!/usr/bin/env bash
# One-shot GPU check of kernels/: the kernel tests on CUDA (compiled Triton, no interpreter), then the
# quick benchmark. Run from the repository root on a CUDA machine:
#     bash kernels/gpu_check.sh            # logs, bench.csv, bench.png go to $OUT (else ./bench_out)
# Expected wall time on an H100/H200: tests ~1-2 min (Triton compiles + autotuning), bench ~3 min;
# each step is cut off by timeout (180 s, 380 s) so that the whole script stays under 10 minutes.
# Optional: a folder .whl/ of wheels (liger-kernel, cut-cross-entropy, ...) is installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }

if ! $PY -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'" 2>>"$OUT/gpu_check.log"; then
    log "ERROR: need python with torch + triton and a CUDA GPU ($PY); see $OUT/gpu_check.log"
    exit 2
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/gpu_check.log"
if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing carried wheels from .whl/"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || log "WARNING: wheel install failed; going on"
fi

log "1/2 tests/test_kernels.py on CUDA"
timeout 180 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?
[ $tests_rc -eq 124 ] && log "ERROR: tests timed out after 180 s"

log "2/2 python -m kernels.bench (quick) -> $OUT"
timeout 380 $PY -m kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=$?
[ $bench_rc -eq 124 ] && log "ERROR: bench timed out after 380 s"

log "tests exit $tests_rc, bench exit $bench_rc"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
