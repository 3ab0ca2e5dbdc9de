#!/usr/bin/env bash
# Gather what an offline GPU machine lacks for bench/gpu_check.sh into one folder (<= 20 MiB).
# Run it where PyPI is reachable, from a checkout with the project installed, then carry DIR over:
#
#   bash bench/gpu_bundle.sh DIR            # DIR/wheels/*.whl, DIR/mnist/*.gz, DIR/MANIFEST.txt
#   bash bench/gpu_check.sh --bundle DIR    # on the GPU machine (no network needed)
#
# The GPU machines have torch, torchvision, numpy, pytest, tqdm, filelock and pyyaml. They lack
# omegaconf: its wheel, plus wheels for those of its requirements they lack (omegaconf 2.3 needs
# antlr4-python3-runtime 4.9.*, published only as a source archive: built here with `pip wheel`;
# 2.4 needs only PyYAML). wandb is not needed: the check runs with wandb.mode=disabled and nothing
# imports wandb then. MNIST goes in as its four IDX files gzip-compressed (~11 MB), MD5-verified
# when gpu_check.sh unpacks them (data/mnist.py write_packed / from_packed).
#
# Environment: PYTHON (default python3), OMEGACONF (version, default 2.4.0), MNIST_ROOT (a prepared
# data.root to pack; default datasets, fetched there first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: bash bench/gpu_bundle.sh DIR}
PY=${PYTHON:-python3}
OMEGACONF=${OMEGACONF:-2.4.0}
MAX_BYTES=$((20 * 1024 * 1024))
mkdir -p "$DIR/wheels"

"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" "omegaconf==$OMEGACONF"
# omegaconf's own requirements (markers evaluated for this Python), minus what the GPU machines have
mapfile -t NEEDED < <("$PY" - "$DIR/wheels/omegaconf-$OMEGACONF-py3-none-any.whl" <<'PY'
import email, re, sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries its own copy
    from pip._vendor.packaging.requirements import Requirement
PRESENT = {"torch", "torchvision", "numpy", "pytest", "tqdm", "filelock", "pyyaml"}
wheel = zipfile.ZipFile(sys.argv[1])
meta = email.message_from_bytes(wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))))
for line in meta.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if re.sub(r"[-_.]+", "-", req.name).lower() not in PRESENT:
        print(f"{req.name}{req.specifier}")
PY
)
for req in "${NEEDED[@]}"; do
  # a wheel when PyPI has one, else built from the source archive (antlr4-python3-runtime 4.9.3)
  "$PY" -m pip wheel -q --no-deps -w "$DIR/wheels" "$req"
done

ROOT=${MNIST_ROOT:-datasets}
"$PY" -m data.prepare --root "$ROOT" --pack "$DIR/mnist" | grep -E "^packed|ready"

bytes=$(du -sb "$DIR" | cut -f1)
{
  echo "bundle for bench/gpu_check.sh, made $(date -u +%FT%TZ) from commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  (cd "$DIR" && find wheels mnist -type f -printf '%s\t%p\n' | sort -k2)
  echo "total $bytes bytes"
} > "$DIR/MANIFEST.txt"
cat "$DIR/MANIFEST.txt"
if [ "$bytes" -gt "$MAX_BYTES" ]; then
  echo "error: the bundle is $bytes bytes, more than 20 MiB" >&2
  exit 1
fi
