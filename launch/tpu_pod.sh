#!/usr/bin/env bash
# Runs the batch generation job on every worker of a Cloud TPU VM (a pod slice), streaming their logs.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=PROJECT] --config=configs/gpt_oss_20b.py \
#       --config.checkpoint=gs://BUCKET/gpt-oss-20b-converted --config.input=gs://BUCKET/prompts.jsonl \
#       --config.output=gs://BUCKET/run-1 --config.mesh.tensor=4
#
# It copies this checkout to every worker, installs it with its tpu extra (jax[tpu]; --install replaces that command),
# and runs `python3 -m gptoss_dist.generate` there with the config file and every --config.* override;
# JAX finds the pod's hosts itself (config.distributed.tpu_pod). Needs gcloud, authenticated.
set -euo pipefail

usage() { sed -n '2,11p' "$0" >&2; exit 2; }

tpu= zone= project= config=
install="python3 -m pip install -q -e '.[tpu]'"
overrides=()
for arg in "$@"; do
  case "$arg" in
    --tpu=*) tpu=${arg#*=} ;;
    --zone=*) zone=${arg#*=} ;;
    --project=*) project=${arg#*=} ;;
    --config=*) config=${arg#*=} ;;
    --install=*) install=${arg#*=} ;;
    --config.*) overrides+=("$arg") ;;
    -h|--help) usage ;;
    *) echo "tpu_pod.sh: unknown argument $arg" >&2; usage ;;
  esac
done
[[ -n $tpu && -n $zone && -n $config ]] || usage

repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -f $repo/$config ]] || { echo "tpu_pod.sh: no config file $repo/$config" >&2; exit 2; }
where=(--zone="$zone" --worker=all)
[[ -n $project ]] && where+=(--project="$project")

archive=$(mktemp -d)/gptoss-dist.tar.gz
trap 'rm -rf "$(dirname "$archive")"' EXIT
tar -C "$repo" --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' --exclude=.venv -czf "$archive" .

job="python3 -m gptoss_dist.generate --config=$(printf %q "$config") --config.distributed.tpu_pod=true"
for override in "${overrides[@]}"; do job+=" $(printf %q "$override")"; done
remote="set -e; rm -rf ~/gptoss-dist && mkdir -p ~/gptoss-dist && tar -xzf ~/gptoss-dist.tar.gz -C ~/gptoss-dist"
remote+=" && cd ~/gptoss-dist && $install && $job"

echo "tpu_pod.sh: copying the code to every worker of $tpu" >&2
gcloud compute tpus tpu-vm scp "$archive" "$tpu":gptoss-dist.tar.gz "${where[@]}"
echo "tpu_pod.sh: running on every worker: $job" >&2
exec gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$remote"
