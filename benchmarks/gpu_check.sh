#!/usr/bin/env bash
# One check of din_kernels on a GPU machine without a package registry (python3 there has torch and triton):
#   1. install the package in place, no dependencies; the compiled extension builds when csrc/ exists and the
#      machine can build it, else a pure-Python install (DIN_KERNELS_SKIP_CUDA_BUILD=1), else PYTHONPATH;
#      (the extension's CUDA kernels, csrc/cuda, compile for this GPU: about a minute and a half on 16 cores);
#   2. the GPU tests: pytest -m gpu in parallel groups (benchmarks/gpu_tests.sh: the kernels compile on several cores),
#      the CUDA kernels' (tests/test_cuda_kernels.py) against the float64 reference among them;
#   3. compute-sanitizer's memcheck and racecheck on one small call of every CUDA kernel (benchmarks/cuda_sanitize.py;
#      skipped when the extension has no CUDA kernels; fails where the machine's runtime refuses the tool);
#   4. the GPU benchmarks: benchmarks/run.py --device cuda --shapes gpu (attention up to B=4096 T=500 D=256 in
#      fp32 and bf16 with reference, reference_compile, torch, triton (and cuda when built), forward/backward/full,
#      peak memory and floor; Dice at N=4M C=200 with its achieved bandwidth against the measured copy bandwidth;
#      MBA at K=1e5 and 1e7 with the same batch; the DIN step).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu_check_out)
# Every stage runs under `timeout`, logs its status to OUT_DIR/stages.jsonl and never stops the others; the whole
# script stays under 9 minutes in the worst case, about 8 when every stage succeeds (stage limits below; override
# with GPU_CHECK_*_S). At most 8 files are written:
# stages.jsonl, gpu_check.log, gpu-latest.jsonl, gpu-latest.md and the two plots.
set -u

OUT_DIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_check.log"
STAGES="$OUT_DIR/stages.jsonl"
: > "$STAGES"
: > "$LOG"
START=$(date +%s)

INSTALL_S="${GPU_CHECK_INSTALL_S:-200}"
TESTS_S="${GPU_CHECK_TESTS_S:-170}"
SANITIZE_S="${GPU_CHECK_SANITIZE_S:-100}"
BENCH_S="${GPU_CHECK_BENCH_S:-280}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-500}"

# stage NAME LIMIT_S CMD...: runs CMD under timeout, appends its output to the log and one JSON line to stages.jsonl
stage() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc t1 tail_file
  t0=$(date +%s)
  tail_file="$(mktemp)"
  echo "=== [$name] $(date -u +%FT%TZ) limit ${limit}s: $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" > "$tail_file" 2>&1
  rc=$?
  cat "$tail_file" >> "$LOG"
  t1=$(date +%s)
  local status="ok"
  [ "$rc" -ne 0 ] && status="failed"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="timeout"
  "$PY" - "$name" "$status" "$rc" "$((t1 - t0))" "$tail_file" >> "$STAGES" <<'EOF'
import json, sys
name, status, rc, seconds, path = sys.argv[1:6]
with open(path, errors="replace") as f:
    tail = f.read()[-3000:]
print(json.dumps({"stage": name, "status": status, "rc": int(rc), "seconds": int(seconds), "tail": tail}))
EOF
  echo "=== [$name] $status (rc $rc, $((t1 - t0)) s)" | tee -a "$LOG"
  rm -f "$tail_file"
  return 0
}

stage env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA device\")'"

# 1. install: with the extension when it builds, else without it, else run from the source tree
# (GPU_CHECK_SKIP_INSTALL=1 leaves the environment as it is, e.g. to try the script where the package is installed)
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
  echo "install skipped (GPU_CHECK_SKIP_INSTALL=1)" | tee -a "$LOG"
else
stage install "$INSTALL_S" env -u DIN_KERNELS_SKIP_CUDA_BUILD "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
if grep -q '"stage": "install", "status": "\(failed\|timeout\)"' "$STAGES"; then
  stage install_pure 60 env DIN_KERNELS_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
fi
if ! (cd / && "$PY" -c "import din_kernels") > /dev/null 2>&1; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "din_kernels is not installed: running from the source tree (PYTHONPATH=$REPO)" | tee -a "$LOG"
fi
stage backends 60 "$PY" - <<'EOF'
import torch
import din_kernels
from din_kernels import backend
from benchmarks import cases
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for op in ("attention", "dice", "mba"):
    ok, skipped = cases.available_providers(op, dev)
    print(op, "runs:", ok, "skipped:", skipped)
EOF

# 2. the GPU tests (the Triton kernels compiled for the GPU: tests/conftest.py defaults TRITON_INTERPRET to 1)
stage tests "$TESTS_S" env TRITON_INTERPRET=0 PYTHON="$PY" bash benchmarks/gpu_tests.sh

# 3. compute-sanitizer on the CUDA kernels (when the extension has them)
if "$PY" -c "import torch, din_kernels._extension as e; assert e.has_kernel('target_attention_fwd', 'cuda')" \
    > /dev/null 2>&1; then
  stage sanitize "$SANITIZE_S" bash -c "rc=0; for tool in memcheck racecheck; do echo \"--- \$tool\"; \
    compute-sanitizer --tool \$tool --error-exitcode 3 $PY benchmarks/cuda_sanitize.py || rc=\$?; done; exit \$rc"
else
  echo "sanitize skipped: din_kernels._C has no CUDA kernels" | tee -a "$LOG"
fi

# 4. the GPU benchmarks (time left is shared: the stage gets what remains of TOTAL_S, at most BENCH_S)
ELAPSED=$(( $(date +%s) - START ))
LEFT=$(( TOTAL_S - ELAPSED ))
[ "$LEFT" -gt "$BENCH_S" ] && LEFT="$BENCH_S"
[ "$LEFT" -lt 30 ] && LEFT=30
stage bench "$LEFT" env TRITON_INTERPRET=0 "$PY" benchmarks/run.py --device cuda --shapes gpu --dtypes float32,bfloat16 \
  --providers reference,reference_compile,torch,triton,cuda,deepctr_torch --out "$OUT_DIR" --stem gpu --no-history \
  --time-budget "$(( LEFT > 90 ? LEFT - 45 : LEFT / 2 ))"

echo "total $(( $(date +%s) - START )) s; results in $OUT_DIR" | tee -a "$LOG"
exit 0
