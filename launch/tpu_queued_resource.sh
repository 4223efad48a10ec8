#!/usr/bin/env bash
# Requests a TPU slice as a queued resource, waits until it is granted, installs
# this checkout on it and trains (launch/tpu_pod.sh does the last two steps).
#
#   launch/tpu_queued_resource.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION -- \
#       --config=configs/bipe_rope_151m.py --workdir=/mnt/shared/runs/bipe_rope [--config.K=V ...]
#
# e.g. NAME=bipe-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-32
#      RUNTIME_VERSION=v2-alpha-tpuv5-lite. Env: PROJECT, SPOT=1 for spot capacity,
# NETWORK to attach the VMs to the network of your shared file system.
# Delete afterwards: gcloud compute tpus queued-resources delete NAME --zone=ZONE --force
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
name=$1 zone=$2 accelerator=$3 runtime=$4
shift 4
[[ "${1:-}" == "--" ]] && shift
args=(--zone="$zone")
[[ -n "${PROJECT:-}" ]] && args+=(--project="$PROJECT")
create=(--node-id="$name" --accelerator-type="$accelerator" --runtime-version="$runtime")
[[ -n "${SPOT:-}" ]] && create+=(--spot)
[[ -n "${NETWORK:-}" ]] && create+=(--network="$NETWORK")

gcloud compute tpus queued-resources create "$name" "${args[@]}" "${create[@]}"
echo "waiting for queued resource $name to become ACTIVE ..."
while true; do
  state=$(gcloud compute tpus queued-resources describe "$name" "${args[@]}" \
          --format='value(state.state)')
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) echo "queued resource $name is $state" >&2; exit 1 ;;
  esac
  sleep 30
done
here=$(dirname "$0")
"$here/tpu_pod.sh" setup "$name" "$zone"
"$here/tpu_pod.sh" train "$name" "$zone" -- "$@"
