#!/usr/bin/env bash
# Stop the local Ray head started by cluster/local_up.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
"${RAY:-.venv/bin/ray}" stop --force
