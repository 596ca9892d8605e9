#!/usr/bin/env bash
# The paged cache at the 20B shape on one GPU, at the issue's realistic lengths:
#
#   bash bench/gpu_paged.sh OUT_DIR [PARTS]
#
# PARTS (default "transformers lengths prefix"), in turn, each in a process of its own:
# - transformers: transformers' generate on the first 64 requests, outputs cut to 128 (at most 100 s);
# - lengths: our engine, random lengths at 64 and then 256 concurrent sequences, paged beside the default
#   cache, and the paged engine on the peer's requests (at most 420 s);
# - prefix: 1,000 requests of a shared 1,024-token system prompt, prefix caching on beside off (at most 150 s).
# Unless EXPERTS names the experts' implementation, a check on the tiny config runs first: if the Pallas
# expert kernel fails on this GPU, XLA's grouped matmul (`ragged`) runs the experts instead; the rows say which. Rows go to OUT_DIR/paged_batch.jsonl as they are
# measured, so a part cut short keeps what it measured.
#
# The ml_collections wheel under .whl/ is installed to a private target first (the GPU machines cannot reach
# a package index).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_paged.sh OUT_DIR [PARTS]}
parts=${2:-transformers lengths prefix}
mkdir -p "$out"
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gptoss-site .whl/ml_collections-*.whl
  export PYTHONPATH=/tmp/gptoss-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
experts=${EXPERTS:-auto}
if [ -z "${EXPERTS:-}" ] && ! timeout 90 python3 bench/paged_batch.py lengths --config=configs/tiny.py --dtype=bfloat16 --concurrency=4 \
    --max_len=256 --prompt_range=16,64 --max_output=8 --waves=1 >"$out/check.log" 2>&1; then
  tail -5 "$out/check.log"
  experts=ragged
fi
common=(--config=configs/gpt_oss_20b.py --dtype=bfloat16 --experts=$experts --json="$out/paged_batch.jsonl"
  --max_len=8192 --prompt_range=128,2049 --max_output=2048 --waves=1 --capped_output=128)
for part in $parts; do
  case $part in
    transformers)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 python3 bench/paged_batch.py transformers "${common[@]}" \
        --concurrency=64 --peer_batch=16 ;;
    lengths)  # the 256-sequence default cache holds 51.5 GB beside 41.8 GB of weights: JAX takes 92% of the card
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 420 python3 bench/paged_batch.py lengths "${common[@]}" \
        --concurrency=64,256 --warmup=64 ;;
    prefix)
      timeout 150 python3 bench/paged_batch.py prefix "${common[@]}" --requests=1000 --slots=64 --max_len=2048 \
        --warmup=64 ;;
  esac 2>&1 | tee -a "$out/$part.log"
done
