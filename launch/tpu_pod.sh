#!/usr/bin/env bash
# Runs one experiment on every worker of a Cloud TPU pod slice (TPU VM).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh my-v4-64 us-central2-b configs/hetxl_jft.py gs://my-bucket/runs/hetxl_jft
#
# Every worker runs the same `python -m launch.main` command; JAX finds the pod's other hosts
# itself (jax.distributed.initialize() in launch.main). Put --workdir on a gs:// bucket that all
# workers reach: orbax writes checkpoints there and a preempted slice resumes from it when the
# same command is run again.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo" "$tpu":~/bigclass
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e; cd ~/bigclass
  pip install -q -e . 'jax[tpu]'
  python -m launch.main --config='$config' --workdir='$workdir' $*"
