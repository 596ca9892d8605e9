#!/usr/bin/env bash
# The GPU benchmarks in one go (one lent GPU, JAX with CUDA): the expert kernel alone (at most 4 minutes,
# other tiles swept at 1 and 8 tokens), then decoding.
#
#   bash bench/gpu.sh OUT_DIR [extra bench/gpu_decode.py flags]
#
# Wheels under .whl/ (ml_collections; flax where the machine's is older than ours) are installed to a
# private target first, for machines that cannot reach a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUT_DIR [gpu_decode flags]}
shift
mkdir -p "$out"
wheels=$(ls .whl/ml_collections-*.whl 2>/dev/null)
if ! python3 -c 'import flax, sys; sys.exit(tuple(map(int, flax.__version__.split(".")[:3])) < (0, 12, 8))'; then
  wheels="$wheels $(ls .whl/flax-*.whl 2>/dev/null)"
fi
if [ -n "${wheels// }" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gptoss-site $wheels
  export PYTHONPATH=/tmp/gptoss-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$out/gpu.txt"
timeout 240 python3 bench/grouped_matmul.py --config=configs/gpt_oss_20b.py --tokens=1,8,64,256 --sweep=1,8 \
  --json="$out/grouped_matmul.json" 2>&1 | tee "$out/grouped_matmul.log"
python3 bench/gpu_decode.py --config=configs/gpt_oss_20b.py --json="$out/gpu_decode.json" \
  --markdown="$out/gpu_decode.md" "$@" 2>&1 | tee "$out/gpu_decode.log"
