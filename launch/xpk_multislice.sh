#!/usr/bin/env bash
# Multi-slice TPU training on GKE with xpk (https://github.com/AI-Hypercomputer/xpk).
#
#   launch/xpk_multislice.sh CLUSTER TPU_TYPE NUM_SLICES -- \
#       --config=configs/bipe_rope_151m.py --workdir=/mnt/shared/runs/bipe_rope [--config.K=V ...]
#
# e.g. CLUSTER=my-xpk-cluster TPU_TYPE=v5litepod-256 NUM_SLICES=2. xpk builds an
# image from BASE_IMAGE plus this checkout, and runs the command on every VM of
# every slice. Slices talk over the data-center network (DCN), so they split
# the batch (mesh.dcn_shape=data=NUM_SLICES) while fsdp/tensor stay inside a
# slice on the fast ICI links. The work dir must be storage every VM mounts.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
cluster=$1 tpu_type=$2 slices=$3
shift 3
[[ "${1:-}" == "--" ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
args=$(printf '%q ' "$@")
xpk workload create \
  --cluster="$cluster" \
  --workload="bipe-$(date +%m%d-%H%M%S)" \
  --tpu-type="$tpu_type" \
  --num-slices="$slices" \
  --base-docker-image="${BASE_IMAGE:-python:3.11}" \
  --script-dir="$repo" \
  --command="pip install -q 'jax[tpu]' -e . && python3 -m bipe_jax.train --distributed=yes \
--config.mesh.dcn_shape=data=$slices $args"
