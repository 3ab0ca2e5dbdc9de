#!/usr/bin/env bash
# GPU check, under 5 minutes on one GPU: the GPU-marked tests, then the trainer on CUDA in
# fp32, bf16 and fp16, as one process and under torchrun --nproc_per_node=1, printing
# images/s, seconds to 99% and test accuracy for each.
#
#   bash bench/gpu_check.sh [DATA_ROOT]
#
# MNIST must be in DATA_ROOT (default datasets/; `python -m data.prepare` writes it).
# On a machine without omegaconf/wandb, put their wheels in .whl/ first: they are installed
# into /tmp/site (see the README's GPU section).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-datasets}
if [ -d .whl ] && ! python3 -c "import omegaconf, wandb" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
MNIST_ROOT=$ROOT timeout 120 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider

OUT=${OUT:-$(mktemp -d)}
printf '%-9s %-9s %10s %9s %9s\n' precision launcher images/s "s to 99%" "test acc" | tee "$OUT/gpu_check.txt"
for prec in fp32 bf16 fp16; do
  for launch in python torchrun; do
    dir="$OUT/run-$prec-$launch"
    cmd=(python3 train_ddp.py)
    [ "$launch" = torchrun ] && cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_ddp.py)
    # a large global batch keeps the GPU busy; eval_every catches the moment 99% is reached
    timeout 120 "${cmd[@]}" data.root="$ROOT" run.dir="$dir" precision="$prec" train.batch_size=512 \
      optim.lr=4e-3 train.epochs=3 train.eval_every=20 train.log_every=20 > "$dir.log" 2>&1 \
      || { echo "$prec $launch FAILED"; tail -5 "$dir.log"; continue; }
    python3 - "$dir" "$prec" "$launch" <<'PY' | tee -a "$OUT/gpu_check.txt"
import sys
from cnn.rundir import read_summary
s = read_summary(sys.argv[1])
t99 = f"{s['seconds_to_99']:.2f}" if s["seconds_to_99"] else "-"
print(f"{sys.argv[2]:<9} {sys.argv[3]:<9} {s['images_per_sec']:>10.0f} {t99:>9} {s['test_accuracy']:>9.4f}")
PY
  done
done
# CUDA graphs through torch.compile's reduce-overhead mode. The first logged window holds the
# compilation, so the steady figure is the median of the later windows.
dir="$OUT/run-bf16-compiled"
timeout 180 python3 train_ddp.py data.root="$ROOT" run.dir="$dir" precision=bf16 train.batch_size=512 optim.lr=4e-3 \
  train.epochs=3 train.eval_every=20 train.log_every=20 train.compile=true train.compile_mode=reduce-overhead \
  > "$dir.log" 2>&1 && python3 - "$dir" <<'PY' | tee -a "$OUT/gpu_check.txt" || { echo "bf16 compiled FAILED"; tail -5 "$dir.log"; }
import statistics, sys
from cnn.rundir import read_metrics, read_summary
ips = [r["images_per_sec"] for r in read_metrics(sys.argv[1], "train")][1:]
s = read_summary(sys.argv[1])
print(f"bf16+reduce-overhead steady {statistics.median(ips):.0f} images/s, test acc {s['test_accuracy']:.4f}")
PY
echo "figures in $OUT/gpu_check.txt"
