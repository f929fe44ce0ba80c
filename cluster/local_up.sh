#!/usr/bin/env bash
# Start a Ray head on this machine with token authentication (Ray 2.60's default) and the dashboard on loopback only.
#   cluster/local_up.sh [NUM_CPUS]
# Then submit from the repository root:
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python -m recipes.rec_reasoning --config debug cluster.address=auto
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-.venv/bin/ray}"
NUM_CPUS="${1:-$(nproc)}"
export RAY_AUTH_MODE=token
"$RAY" start --head --dashboard-host 127.0.0.1 --dashboard-port 8265 --num-cpus "$NUM_CPUS" --disable-usage-stats
echo "Ray head up: jobs API at http://127.0.0.1:8265 (token in ~/.ray/auth_token; export RAY_AUTH_MODE=token)."
