#!/usr/bin/env bash
# bipe-train / bipe-eval on every worker of a Cloud TPU VM slice (single- or multi-host).
#
#   launch/tpu_pod.sh setup TPU_NAME ZONE
#       copy this checkout (tracked files) to ~/bipe_jax on every worker and install it
#   launch/tpu_pod.sh train TPU_NAME ZONE -- --config=configs/bipe_rope_151m.py \
#       --workdir=/mnt/shared/runs/bipe_rope [--config.mesh.shape=fsdp=-1 ...]
#   launch/tpu_pod.sh eval TPU_NAME ZONE -- --workdir=/mnt/shared/runs/bipe_rope
#
# Every worker runs the same command; jax.distributed.initialize() learns the
# coordinator and process ids from the TPU metadata. --workdir must be a
# directory all workers share (Filestore / NFS, or a gcsfuse mount): every
# worker writes its own shards of each checkpoint into it, and process 0 the
# logs. Env: PROJECT (gcloud project, optional), REMOTE_DIR (default bipe_jax).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0"; exit 2
fi
cmd=$1 name=$2 zone=$3
shift 3
[[ "${1:-}" == "--" ]] && shift
remote_dir=${REMOTE_DIR:-bipe_jax}
gcloud_args=(--zone="$zone")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all --command="$1"
}

# Arguments re-quoted for the remote shell, so values with spaces or globs survive.
remote_args=$(printf '%q ' "$@")

case "$cmd" in
  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp --suffix=.tgz)
    (cd "$repo" && git ls-files -z | xargs -0 tar czf "$tarball")
    gcloud compute tpus tpu-vm scp "$tarball" "$name:bipe_jax_src.tgz" "${gcloud_args[@]}" --worker=all
    rm -f "$tarball"
    on_all_workers "mkdir -p $remote_dir && tar xzf ~/bipe_jax_src.tgz -C $remote_dir \
      && cd $remote_dir && pip install -q -U 'jax[tpu]' && pip install -q -e ."
    ;;
  train)
    on_all_workers "cd $remote_dir && python3 -m bipe_jax.train --distributed=yes $remote_args"
    ;;
  eval)
    on_all_workers "cd $remote_dir && python3 -m bipe_jax.evaluate --distributed=yes $remote_args"
    ;;
  *)
    echo "unknown command '$cmd': use setup, train or eval" >&2; exit 2
    ;;
esac
