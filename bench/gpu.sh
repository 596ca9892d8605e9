#!/usr/bin/env bash
# The GPU benchmarks in one go (one lent GPU, JAX with CUDA), about 10 minutes: decoding (at most 360 s), the
# expert kernel alone (at most 120 s; other tiles swept at 1 and 8 tokens), and a profile of a decode step (100 s).
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
# Most important first; each writes its JSON as it goes, so one cut short by its time limit keeps its figures.
timeout 360 python3 bench/gpu_decode.py --config=configs/gpt_oss_20b.py --json="$out/gpu_decode.json" \
  --markdown="$out/gpu_decode.md" "$@" 2>&1 | tee "$out/gpu_decode.log"
timeout 120 python3 bench/grouped_matmul.py --config=configs/gpt_oss_20b.py --tokens=1,64,256,8 --sweep=1,8 \
  --json="$out/grouped_matmul.json" 2>&1 | tee "$out/grouped_matmul.log"
timeout 100 python3 bench/gpu_profile.py --config=configs/gpt_oss_20b.py --batch=1 --json="$out/gpu_profile.json" \
  2>&1 | tee "$out/gpu_profile.log"
