#!/usr/bin/env bash
# SASS instructions on the common path of one encode_int instance (docs/kernel-notes.md "v5"):
# builds a copy of csrc/ with the partial-chunk, slow-division, unaligned-load and padding
# branches removed, compiles the instance with the loader's flags for sm_90, and walks the SASS
# (tools/sass_common_path.py). Needs nvcc and cuobjdump (e.g. pip install --target /tmp/cuobj
# nvidia-cuda-cuobjdump; CUOBJDUMP=/tmp/cuobj/nvidia/cu13/bin/cuobjdump).
#   bash tools/sass_common_path.sh __nv_bfloat16 4 true false [V=32] [extra nvcc flags, e.g. -DMFC_ENC_V4]
# Walk options for other group sizes: WALK="--first-not --skip=10" (v5 generic copy, 8 lanes).
set -euo pipefail
cd "$(dirname "$0")/.."
T=$1 B=$2 S=$3 R=$4 V=${5:-32}
shift 4; [ $# -gt 0 ] && shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r csrc "$tmp/"
sed -i 's/const bool full = nv == V;/const bool full = true;/; s/if (div_fast_ok(scf))/if (true)/; s/if (vec \&\& p + 8 <= H)/if (true)/; s/if (P.g == 0 \&\& P.lane == 0) zero_gaps(out, a.gap);//' "$tmp/csrc/codec_encode.cu"
sed -i 's/p.live = item < total;/p.live = true;/' "$tmp/csrc/codec_common.cuh"
cat > "$tmp/inst.cu" <<EOT
#include "csrc/codec_encode.cu"
template __global__ void mfc::encode_int<$T, $B, $S, $R, $V, 1>(const $T* __restrict__, mfc::u8* __restrict__, const mfc::EncArgs);
EOT
nvcc -arch=sm_90 -std=c++17 --fmad=false --ftz=false -prec-div=true "$@" -cubin -o "$tmp/inst.cubin" "$tmp/inst.cu"
${CUOBJDUMP:-cuobjdump} -sass "$tmp/inst.cubin" > "$tmp/inst.sass"
first=""
grep -q "MFC_ENC_V4" <<<"$* " && first="--no-first"
[ "$T" = float ] && first="--no-first"
python3 tools/sass_common_path.py "$tmp/inst.sass" $first ${WALK:-}
