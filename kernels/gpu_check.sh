#!/usr/bin/env bash
# One-shot GPU check of kernels/: the kernel tests on CUDA (compiled Triton, no interpreter), then the
# quick benchmark. Run from the repository root on a CUDA machine:
#     bash kernels/gpu_check.sh            # logs, bench.csv, bench.png go to $OUT (else ./bench_out)
# Then the whole-model step benchmark (kernels/bench_step.py) and a short training run of opd.py on the GPU
# (embedded default, HF sampler: the vLLM CUDA wheel does not travel there).
# Then eval.py on the GPU (embedded student and opd.py's checkpoint, HF sampler, 32 questions, KL to the teacher).
# Each step is cut off by its own timeout (150 + 540 + 100 + 70 + 90 s): with a 10-minute limit per call, pick steps
# with ONLY.
# Optional: ONLY="tests bench step opd eval" (any subset) runs only those steps.
# Optional: a folder .whl/ of wheels (liger-kernel, cut-cross-entropy, pytest-xdist + execnet, ...) is installed first.
# Optional: VS=path/to/an/older/fused.py times that version too (bench method "vs"), e.g. prepared with
#     mkdir -p .gpu_prev && git show 340c492:kernels/fused.py > .gpu_prev/fused.py   (then carry .gpu_prev)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
log() { echo "[gpu_check] $*" | tee -a "$OUT/gpu_check.log"; }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }  # ONLY="tests bench" runs just those steps

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

tests_rc=0 bench_rc=0 step_rc=0 opd_rc=0 eval_rc=0
if want tests; then
    log "1/5 tests/test_kernels.py on CUDA"
    # minus the CPU-side checks (the sm_90 / sm_100 builds read from SASS, the tiny bench): CI runs those, the bench runs below
    # Triton compiles (every tile config of every kernel variant, on 1-2 cores each) take most of the time: with
    # pytest-xdist (carried in .whl/, or installed) 8 workers compile side by side
    XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout 150 $PY -m pytest -q -p no:cacheprovider ${XDIST:-} --durations 8 tests/test_kernels.py \
        -k "not compile_lean and not narrow_stores and not bench_tiny" 2>&1 | tee "$OUT/gpu_tests.log"
    tests_rc=$?
    [ $tests_rc -eq 124 ] && log "ERROR: tests timed out after 150 s"
fi

if want bench; then
    log "2/5 python -m kernels.bench (quick) -> $OUT"
    VS="${VS:-$(ls .gpu_prev/fused.py 2>/dev/null)}"
    timeout 540 $PY -m kernels.bench --out "$OUT" ${VS:+--vs "$VS"} 2>&1 | tee "$OUT/bench.log"
    bench_rc=$?
    [ $bench_rc -eq 124 ] && log "ERROR: bench timed out after 540 s"
fi

if want step; then
    log "3/5 python -m kernels.bench_step (Qwen3-1.7B / 8B shapes, 16384 tokens)"
    timeout 100 $PY -m kernels.bench_step --out "$OUT" 2>&1 | tee "$OUT/bench_step.log"
    step_rc=$?
fi

if want opd; then
    log "4/5 opd.py on the GPU: embedded default, 4 steps, HF sampler, Triton kernels"
    # OPD_ARGS: optional model flags, e.g. "--student S --teacher T --data D --heldout H" (default: embedded)
    timeout 70 $PY -m torch.distributed.run --nproc_per_node 1 opd.py --sampler hf --impl triton --steps 4 \
        --eval-n 64 ${OPD_ARGS:-} --out /tmp/opd_gpu 2>&1 | grep -v Warning | tee "$OUT/opd_gpu.log"
    opd_rc=$?
fi

if want eval; then
    # the checkpoint of step 4 when the opd step ran: its training FLOPs, compute.png; --kl-teacher scores every
    # sample on the GPU with the fused kernels
    MODELS="student teacher$(ls -d /tmp/opd_gpu/step_000004 2>/dev/null | sed 's/^/ /')"
    log "5/5 eval.py on the GPU: $MODELS, HF sampler, 32 held-out questions x 4 samples, KL to the teacher"
    timeout 90 $PY eval.py --model $MODELS --sampler hf --limit 32 --kl-teacher teacher --kl-bin 8 \
        --out "$OUT/eval_gpu" 2>&1 | grep -v Warning | tee "$OUT/eval_gpu.log"
    eval_rc=$?
    # the teacher against itself: bf16 scoring in other batch shapes may differ in the last bits, not by more
    [ $eval_rc -eq 0 ] && { $PY -c "import json, sys; k = json.load(open('$OUT/eval_gpu/eval.json'))['kl']
print('[gpu_check] KL to the teacher:', {r: v['kl'] for r, v in k.items()}); sys.exit(abs(k['teacher']['kl']) > 0.02)" \
        2>&1 | tee -a "$OUT/gpu_check.log"; eval_rc=$?; }
fi

log "exit codes: tests $tests_rc, bench $bench_rc, bench_step $step_rc, opd $opd_rc, eval $eval_rc"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $step_rc -eq 0 ] && [ $opd_rc -eq 0 ] && [ $eval_rc -eq 0 ]
