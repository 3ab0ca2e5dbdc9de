#!/usr/bin/env bash
# The GPU check, in one command on a GPU machine without network (under 5 minutes on one H200):
#
#   bash bench/gpu_bundle.sh DIR                     # first, on a machine with PyPI access
#   bash bench/gpu_check.sh --bundle DIR             # on the GPU machine
#   bash bench/gpu_check.sh --bundle DIR --dry-run   # anywhere: stops where CUDA is required
#   bash bench/gpu_check.sh                          # omegaconf installed and MNIST in datasets/ already
#   bash bench/gpu_check.sh --bundle DIR --gap       # steps 1-4, then the host-time measurements
#
# 1. installs the bundle's wheels with the package index disabled (into a scratch folder on
#    PYTHONPATH; nothing is installed into the system) and checks, one line each, every import the
#    check needs, the C compiler and Python.h (Triton builds its launcher: without them the
#    compiled rows are left out), 2. imports the trainer (wandb must not be needed), 3. unpacks
#    MNIST (MD5-verified), 4. runs the GPU tests and the pure-function tests of the CUDA decisions
#    (GPU choice, precision=auto, datasheet peaks) in one process, with or without pytest-xdist,
#    then 5. the trainer on CUDA (bench/gpu_runs.py): fp32, bf16, fp16, eager and
#    compile_mode=reduce-overhead, one process and (with >= 2 GPUs) torchrun on all GPUs, as many
#    rows as the time left fits (what is left out is printed, with why), as one table (images/s
#    whole-run and steady, warm-up, seconds to 99%, MFU against the measured and the datasheet
#    peak, peak GPU memory, CUDA-graph replays). No completed row is a failure.
#    With --gap, step 5 is instead where a host-bound step's time goes: the trainer against the bare
#    loop (bench/bare_loop.py, bf16, one process; last, again with train.rank_stats=false), the
#    trainer's own per-step work call by call (bench/loop_cost.py) and the bare step's parts
#    (bench/step_parts.py: the reseeding rows, Muon's graph), in that order, each
#    while the budget (GPU_CHECK_BUDGET_S; --gap's default 450 s) has its estimate left (else a line
#    saying it is left out), into gap.txt.
# Without CUDA (or with --dry-run) it prints the plan and stops after step 4 with a line saying
# so; --dry-run exits 0.
# Output: preflight.txt, env.txt, tests.txt, table.txt, results.jsonl, failures.log (--gap: gap.txt,
# gap-errors.log) in $OUT (or a temp folder);
# run folders and checkpoints stay in a scratch folder that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_CHECK_BUDGET_S:-}  # all of it; step 5 gets what the tests leave (default 285 s, --gap 450 s)
BUNDLE="" DRY=0 GAP=0
while [ $# -gt 0 ]; do
  case $1 in
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
    --bundle=*) BUNDLE=${1#--bundle=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --gap) GAP=1; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (usage: bash bench/gpu_check.sh [--bundle DIR] [--gap] [--dry-run])" >&2; exit 2 ;;
  esac
done
[ -n "$BUDGET_S" ] || BUDGET_S=$([ "$GAP" = 1 ] && echo 450 || echo 285)
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t gpu-check-out.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d -t gpu-check-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INDEX=1
step() { echo "== $(date +%T) [${SECONDS}s] $*"; }

step "1/5 install and preflight"
DATA=${DATA_ROOT:-datasets}
if [ -n "$BUNDLE" ]; then
  [ -d "$BUNDLE/wheels" ] && [ -d "$BUNDLE/mnist" ] || { echo "error: --bundle $BUNDLE has no wheels/ and mnist/ (make it with bench/gpu_bundle.sh)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  DATA=$WORK/data
fi
"$PY" bench/gpu_runs.py --preflight | tee "$OUT/preflight.txt"

step "2/5 imports"
"$PY" - <<'PY' | tee "$OUT/env.txt"
import sys
import torch, torchvision, omegaconf
import train_ddp  # noqa: F401  the trainer and everything it imports at start-up
from cnn import perf, precision
assert "wandb" not in sys.modules, "wandb was imported at start-up; the GPU machines do not have it"
caps = precision.detect()
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, omegaconf {omegaconf.__version__}")
print(f"capabilities: {caps}")
for i in range(torch.cuda.device_count()):
    name = torch.cuda.get_device_name(i)
    print(f"cuda:{i} {name}, capability {torch.cuda.get_device_capability(i)}, datasheet bf16 "
          f"{perf.datasheet_peak_tflops(name, 'bf16')} TFLOP/s")
print(f"precision=auto -> {precision.resolve('auto', 'cuda' if caps.cuda_available else 'cpu', caps)}")
print(f"TF32 (matmul, cuDNN): {perf.tf32_flags()}")
PY

step "3/5 MNIST into $DATA"
if [ -n "$BUNDLE" ]; then
  "$PY" -m data.prepare --root "$DATA" --packed "$BUNDLE/mnist" | tail -1
else
  "$PY" -c "import sys; from data import mnist; m = mnist.verify(sys.argv[1]); sys.exit(f'error: {sys.argv[1]} lacks {m}: pass --bundle DIR or set DATA_ROOT' if m else 0)" "$DATA"
fi

# --gap's measurements in order: the seconds each needs, then its command line (estimates: ~35 s each
# on a 2-core CPU, doubled and more for CUDA's start-up in each of a comparator's 4 processes)
GAP_RUNS=(
  "100|$PY bench/bare_loop.py --nprocs 1 --precisions bf16 --rounds 2 --steps 234 --root $DATA"
  "40|$PY bench/loop_cost.py"
  "60|$PY bench/step_parts.py --rounds 2 --only 'bare bf16,opt.step only (Adam + Muon'"
  "100|$PY bench/bare_loop.py --nprocs 1 --precisions bf16 --rounds 2 --steps 234 --root $DATA -- train.rank_stats=false"
)

step "4/5 tests (GPU tests skip without CUDA)"
# one process, with or without pytest-xdist: pyproject's addopts less xdist's options, xdist blocked
mapfile -t PYTEST_ARGS < <("$PY" bench/gpu_runs.py --pytest-args)
[ ${#PYTEST_ARGS[@]} -gt 0 ] || { echo "error: bench/gpu_runs.py --pytest-args printed nothing" >&2; exit 1; }
MNIST_ROOT=$DATA timeout 150 "$PY" -m pytest -q "${PYTEST_ARGS[@]}" \
  tests/test_gpu.py tests/test_distributed.py \
  tests/test_precision.py tests/test_perf.py tests/test_gpu_check.py > "$OUT/tests.txt" 2>&1 \
  || { tail -30 "$OUT/tests.txt"; echo "error: tests failed (all of it in $OUT/tests.txt)" >&2; exit 1; }
tail -1 "$OUT/tests.txt"

if [ "$DRY" = 1 ] || ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  # the plan that step 5 would run with this much time left on one GPU (and the runner's imports)
  if [ "$GAP" = 1 ]; then
    echo "step 5 (--gap) would run, each while its estimate is left:"
    for run in "${GAP_RUNS[@]}"; do echo "  ~${run%%|*}s: ${run#*|}"; done
  else
    "$PY" bench/gpu_runs.py --plan --gpus 1 --deadline-s="$((BUDGET_S - SECONDS))" --data "$DATA"
  fi
  reason=$([ "$DRY" = 1 ] && echo "--dry-run" || echo "torch.cuda.is_available() is False")
  echo "stopping before 5/5: the trainer runs need CUDA ($reason); install, imports, MNIST and tests passed. Output: $OUT"
  [ "$DRY" = 1 ] && exit 0 || exit 1
fi

if [ "$GAP" = 1 ]; then
  step "5/5 host time per step: the trainer against the bare loop, the step's parts"
  status=0 ran=0
  for run in "${GAP_RUNS[@]}"; do
    need=${run%%|*} cmd=${run#*|} left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt "$need" ]; then
      echo "left out (needs ~${need}s, ${left}s left): $cmd" | tee -a "$OUT/gap.txt"
      continue
    fi
    echo "\$ $cmd" | tee -a "$OUT/gap.txt"
    ran=$((ran + 1))
    eval "timeout -k 15 $left $cmd" 2>>"$OUT/gap-errors.log" | tee -a "$OUT/gap.txt" \
      || { status=1; echo "failed, or cut at the budget: $cmd (stderr: $OUT/gap-errors.log)" | tee -a "$OUT/gap.txt"; }
  done
  if [ "$ran" = 0 ]; then
    echo "error: no measurement fitted the time left; raise GPU_CHECK_BUDGET_S (now $BUDGET_S)" >&2
    exit 1
  fi
  echo "done in ${SECONDS}s; figures in $OUT/gap.txt"
  exit $status
fi

step "5/5 trainer on CUDA"
left=$((BUDGET_S - SECONDS))
status=0
"$PY" bench/gpu_runs.py --data "$DATA" --work "$WORK/runs" --out "$OUT" --deadline-s="$left" || status=$?
echo "done in ${SECONDS}s; figures in $OUT/table.txt (failed runs' logs: $OUT/failures.log)"
exit $status
