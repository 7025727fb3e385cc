#!/usr/bin/env bash
# The GPU suite of issue 14 in one command (under 9 minutes on one H100 / H200): head step at JFT
# sizes, training throughput of ResNet-50 and ViT-B/16, CIFAR-10 DET vs HET-XL with 40% label
# noise, then clean, SOC and LLC; one markdown results file, written part by part in order of
# value. See benchmarks/gpu_suite.py for the parts and their budgets.
#
#   benchmarks/gpu_suite.sh --out=$OUT/gpu_suite.md     # on the GPU machine (BENCHMARKS.md, GPU suite)
#   benchmarks/gpu_suite.sh --smoke --out=/tmp/s.md     # CPU, seconds: checks the suite itself
#
# Wheels the GPU machine lacks (grain, array-record, ml-collections, ...) are installed from a
# carried .whl/ folder (made here by ../shared/tools/device-wheels.sh) when grain is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import grain, ml_collections' 2>/dev/null; then
  if ! compgen -G '.whl/*.whl' >/dev/null; then
    echo 'grain / ml_collections are missing and there is no .whl/ folder: run' \
         '../shared/tools/device-wheels.sh here and carry .whl' >&2
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec python3 benchmarks/gpu_suite.py "$@"
