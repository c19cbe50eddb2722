#!/usr/bin/env bash
# The GPU tests (pytest -m gpu) in parallel groups, one process each, so that the Triton kernels of the groups compile
# on several CPU cores at once (a cold backward kernel takes seconds to compile; the GPU run is short). Every group's
# output is printed after all have finished; the exit status is the first non-zero one of the groups (0 if none).
# Called by benchmarks/gpu_check.sh; usage: bash benchmarks/gpu_tests.sh  (PYTHON picks the interpreter)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY="${PYTHON:-python3}"
ATT=tests/test_triton_attention.py
CU=tests/test_cuda_kernels.py  # the compiled CUDA kernels (csrc/cuda): their GPU tests skip unless the build has them
GROUPS_K=(
  "$ATT|test_gpu_realistic_sizes and float32 and sigmoid"
  "$ATT|test_gpu_realistic_sizes and float32 and dice"
  "$ATT|test_gpu_realistic_sizes and float32 and prelu"
  "$ATT|test_gpu_realistic_sizes and bfloat16 and sigmoid"
  "$ATT|test_gpu_realistic_sizes and bfloat16 and dice"
  "$ATT|test_gpu_realistic_sizes and bfloat16 and prelu"
  "$ATT|not test_gpu_realistic_sizes"
  "tests/test_dice.py tests/test_mba.py|"
  "$CU|test_gpu_matches_reference"
  "$CU|not test_gpu_matches_reference"
)
TMP="$(mktemp -d)"
pids=()
for i in "${!GROUPS_K[@]}"; do
  files="${GROUPS_K[$i]%%|*}"
  sel="${GROUPS_K[$i]#*|}"
  # shellcheck disable=SC2086
  ( if [ -n "$sel" ]; then
      TRITON_INTERPRET=0 "$PY" -m pytest -m gpu $files -k "$sel" -q --no-header -p no:cacheprovider
    else
      TRITON_INTERPRET=0 "$PY" -m pytest -m gpu $files -q --no-header -p no:cacheprovider
    fi ) > "$TMP/$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  # pytest exit 5: the group selected no test (e.g. a file without GPU tests)
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  echo "--- group $i (${GROUPS_K[$i]}): exit $rc"
  tail -n 60 "$TMP/$i.log"
done
rm -rf "$TMP"
exit "$status"
