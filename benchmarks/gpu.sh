#!/usr/bin/env bash
# On a CUDA machine: the GPU tests, then train_step.py's GPU configs, each within its share of a time limit.
#
#   OUT=gpu-out benchmarks/gpu.sh [TEST_SECONDS] [BENCH_SECONDS] [CONFIGS] [VARIANTS]   # defaults: 150 400
#
# The defaults fit a 15-minute lease of a machine that starts in a minute or two (an H200: the tests took
# 55 s with four workers, and large's float32 torch.compile(module) a 24-31 s cold compile).
#
# Logs and each config's RESULTS section go to $OUT (one file per config, so a run cut short keeps the
# configs it finished). Wheels in .whl/ (packages the machine's Python lacks, e.g. optree and
# mistral-common) are installed first, without network, into a temporary folder.
set -u
out=${OUT:-gpu-out}
tests_s=${1:-150}
bench_s=${2:-400}
configs=${3:-large,bench,seed}
variants=${4:-a,a_fused,b,c,d,a_bf16,b_bf16,d_bf16}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log=$out/tests.log
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$log"

start=$SECONDS
timeout "$tests_s" python3 -m pytest tests/test_cuda.py -q -n 4 -p no:cacheprovider -rA >> "$log" 2>&1
echo "tests: exit $? after $((SECONDS - start)) s"; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$log"

deadline=$((SECONDS + bench_s))
for config in ${configs//,/ }; do
  left=$((deadline - SECONDS))
  [ "$left" -gt 60 ] || { echo "no time left for $config"; break; }
  timeout "$left" python3 benchmarks/train_step.py --device cuda --quick --jobs 4 --configs "$config" \
    --variants "$variants" --output "$out/train_step-$config.md" > "$out/bench-$config.log" 2>&1
  echo "$config: exit $? after $((SECONDS - start)) s"; grep -E "^\| \(" "$out/train_step-$config.md" 2>/dev/null
done
