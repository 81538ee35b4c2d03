#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_90, every template variant instantiated
# (-DMFC_INSTANTIATE_ALL), with the flags the NVRTC loader uses. Fails on any error.
# Usage: tools/check_csrc.sh [extra nvcc flags, e.g. -Xptxas -v]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for f in csrc/*.cu; do
  name=$(basename "$f" .cu)
  nvcc -arch=sm_90 -std=c++17 --fmad=false --ftz=false -DMFC_INSTANTIATE_ALL --Werror all-warnings "$@" \
    -c "$f" -o "$out/$name.o" >"$out/$name.log" 2>&1 &
  pids+=("$!:$f:$name")
done
status=0
for entry in "${pids[@]}"; do
  IFS=: read -r pid f name <<<"$entry"
  if wait "$pid"; then
    echo "ok   $f"
  else
    echo "FAIL $f"
    status=1
  fi
  cat "$out/$name.log"
done
exit $status
