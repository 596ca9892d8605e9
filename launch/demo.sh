#!/usr/bin/env bash
# The main job end to end on the embedded tiny model (random weights, nothing to download):
# makes a checkpoint in the published Hugging Face layout, converts it to a sharded checkpoint, and runs
# batch generation over sample requests on 2 local processes x 4 CPU devices, mesh (data, tensor, expert)
# = (2, 2, 2). Installs the package first. Writes under $1 (default: a new temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .

work=${1:-$(mktemp -d -t gptoss-demo.XXXXXX)}
mkdir -p "$work"
python3 -m gptoss_dist.random_checkpoint --config=configs/tiny.py --out="$work/hf"
python3 -m gptoss_dist.convert --src="$work/hf" --dst="$work/converted" --overwrite

cat > "$work/requests.jsonl" <<'JSONL'
{"id": "plain-1", "prompt": "The quick brown fox", "max_new_tokens": 24}
{"id": "plain-2", "prompt": "Text such as <|start|> stays plain text.", "max_new_tokens": 16}
{"id": "chat-1", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "reasoning_effort": "low", "max_new_tokens": 32}
{"id": "chat-2", "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}], "max_new_tokens": 32, "temperature": 0.7, "seed": 7}
{"id": "tools-1", "messages": [{"role": "user", "content": "What time is it?"}], "tools": [{"type": "function", "name": "get_time", "description": "The current time."}], "reasoning_effort": "low", "max_new_tokens": 16}
{"id": "tokens-1", "prompt_tokens": [72, 101, 108, 108, 111], "max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 1}
{"id": "tokens-2", "prompt_tokens": [1, 2, 3], "max_new_tokens": 8, "stop": [" "], "logprobs": true, "top_logprobs": 3, "prompt_logprobs": true}
{"id": "sampled", "prompt": "Once upon a time", "max_new_tokens": 40, "temperature": 0.8, "top_k": 50, "seed": 42}
{"id": "long", "prompt": "A longer prompt that runs well past the sliding window of the tiny model's attention layers.", "max_new_tokens": 48}
JSONL

python3 launch/local.py --processes=2 --devices=4 -- \
  python3 -m gptoss_dist.generate --config=configs/tiny.py \
    --config.checkpoint="$work/converted" --config.input="$work/requests.jsonl" --config.output="$work/output" \
    --config.mesh.data=2 --config.mesh.tensor=2 --config.mesh.expert=2 \
  | grep -v -i gloo
echo "demo: the requests are in $work/requests.jsonl; the results in $work/output/results.jsonl" \
     "and the errors (none expected) in $work/output/errors.jsonl"
