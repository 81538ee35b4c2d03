#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_90, every template variant instantiated
# (-DMFC_INSTANTIATE_ALL), with the flags the NVRTC loader uses. Fails on any error.
# Usage: tools/check_csrc.sh [extra nvcc flags, e.g. -Xptxas -v]
set -euo pipefail
for arg in "$@"; do  # (nvcc's own --help exits 0: every job would say "ok")
  case $arg in
    -h|--help)
      echo "usage: tools/check_csrc.sh [extra nvcc flags, e.g. -Xptxas -v]: compiles every csrc/*.cu for sm_90"
      exit 0 ;;
  esac
done
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
compile() {  # compile <file> <name> [flags]
  local f=$1 name=$2; shift 2
  nvcc -arch=sm_90 -std=c++17 --fmad=false --ftz=false -DMFC_INSTANTIATE_ALL --Werror all-warnings "$@" \
    -c "$f" -o "$out/$name.o" >"$out/$name.log" 2>&1 &
  pids+=("$!:$f:$name")
}
# all at once; the encode kernels (most of the time) in halves of their shapes, and again
# as their dense-row copies (encode_int's DG = 128), so that no one job holds up the end
for half in 1 2; do
  compile csrc/codec_encode.cu "codec_encode_$half" -DMFC_INSTANTIATE_HALF=$half "$@"
done
for half in 1 2; do
  compile csrc/codec_encode.cu "codec_encode_dense_$half" -DMFC_INSTANTIATE_HALF=$half -DMFC_INSTANTIATE_DG=128 "$@"
done
for f in csrc/*.cu; do
  [ "$f" = csrc/codec_encode.cu ] || compile "$f" "$(basename "$f" .cu)" "$@"
done
echo "compiling csrc/*.cu for sm_90 in ${#pids[@]} nvcc jobs at once (minutes on a few cores)"
status=0
for entry in "${pids[@]}"; do
  IFS=: read -r pid f name <<<"$entry"
  if wait "$pid"; then
    echo "ok   $f ($name)"
  else
    echo "FAIL $f ($name)"
    status=1
  fi
  cat "$out/$name.log"
done
exit $status
