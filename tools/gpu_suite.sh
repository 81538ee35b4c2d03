#!/usr/bin/env bash
# Everything that needs GPUs, for one call of a GPU machine with 2+ GPUs:
#   bash tools/gpu_suite.sh [tests] [host] [allreduce] [inference] [all2all] [small]   (default: all)
# Logs, JSON and plots go under $OUT (default out/gpu). On a machine without a package index,
# put the wheels it needs (DeepSpeed and its dependencies) in .whl/: they are installed first.
# Link emulation (docs/design.md): nvlink (default NCCL), host-memory, network.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
echo "GPUs: $ngpu"

path_env() {  # the link class's NCCL variables: moe_flashcomm.tune_gate.LINK_EMULATION
  python3 -c "import sys; from moe_flashcomm.tune_gate import LINK_EMULATION, LINK_ALIASES
name = LINK_ALIASES.get(sys.argv[1], sys.argv[1])
print(' '.join(f'{k}={v}' for k, v in LINK_EMULATION[name].items()))" "$1"
}

status=0
for step in ${*:-tests host allreduce inference all2all small}; do
  echo "=== $step"
  case $step in
    tests)
      python3 -m pytest -q ${TEST_ARGS:--m "cuda or multigpu" tests} 2>&1 | tee "$OUT/tests.log" || status=1 ;;
    host)
      python3 tools/bench_host.py --launchers both --out "$OUT/bench_host.json" || status=1 ;;
    allreduce)
      python3 tools/bench_allreduce.py --out "$OUT" --budget "${AR_BUDGET:-150}" || status=1 ;;
    all2all)
      python3 tools/bench_all2all.py --out "$OUT" ${A2A_ARGS:---quick} || status=1 ;;
    small)
      python3 tools/bench_small.py --out "$OUT/small" --no-progress || status=1 ;;
    inference)
      for path in ${INF_PATHS:-nvlink host-memory network}; do
        tokens=${INF_TOKENS:-1024 4096 16384}
        [ "$path" = network ] && tokens=${INF_TOKENS_NETWORK:-1024 4096}
        env $(path_env "$path") python3 -m torch.distributed.run --standalone --nproc_per_node "$ngpu" \
          recipes/bench_moe_inference.py --path "$path" --out "$OUT" --tokens $tokens \
          --reps "${INF_REPS:-5}" --codecs int8 int4 int2 || status=1
      done ;;
    *) echo "unknown step $step (tests, host, allreduce, inference, all2all, small)"; status=2 ;;
  esac
done
exit $status
