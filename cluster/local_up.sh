#!/usr/bin/env bash
# Start a Ray head on this machine with token authentication (Ray 2.60's default) and the dashboard, which serves the
# jobs API, on loopback only. Stop it with cluster/local_down.sh.
#
#   cluster/local_up.sh [NUM_CPUS]                       # from anywhere; NUM_CPUS defaults to all cores
#   recforge submit rec_reasoning --config debug         # then submit from the repository root (logs stream back)
#
# The head is kept apart from other Ray instances on the machine, so it never captures a `ray.init()` of a local
# `recforge run` (or another user's tests) and local_down.sh stops this head only, never `ray stop` on everything:
# its processes run in their own session and its temp dir is $RECFORGE_RAY_DIR, not /tmp/ray.
#
# Environment (optional):
#   RAY               ray executable (default: .venv/bin/ray, else `ray` on PATH)
#   RAY_PORT          GCS port of the head (default 6379)
#   DASHBOARD_PORT    dashboard / jobs API port on 127.0.0.1 (default 8265); submit to http://127.0.0.1:$DASHBOARD_PORT
#   AGENT_PORT        the dashboard agent's HTTP port, which runs the jobs (default 52365)
#   CLIENT_PORT       Ray client server port (default 10001)
#   Set them when another Ray head already uses the defaults on this machine.
#   RECFORGE_RAY_DIR  state and temp dir of this head (default /tmp/recforge-ray-$USER)
#
# Token: generated once into ~/.ray/auth_token if there is none (never printed). Clients on this machine find it
# there; `ray job submit` also needs RAY_AUTH_MODE=token, which `recforge submit` sets.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-$( [[ -x .venv/bin/ray ]] && echo .venv/bin/ray || command -v ray )}"
NUM_CPUS="${1:-$(nproc)}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
AGENT_PORT="${AGENT_PORT:-52365}"
CLIENT_PORT="${CLIENT_PORT:-10001}"
STATE="${RECFORGE_RAY_DIR:-/tmp/recforge-ray-${USER:-$(id -un)}}"

if [[ -s "$STATE/head.sid" ]] && ps -eo sid= | grep -qx " *$(cat "$STATE/head.sid")"; then
    echo "local_up: a head started by this script is already running (session $(cat "$STATE/head.sid")," \
         "jobs API $(cat "$STATE/address" 2>/dev/null)). Stop it first: cluster/local_down.sh" >&2
    exit 1
fi
if (( ${#STATE} > 36 )); then  # Ray's socket paths under it must stay within the 107-byte AF_UNIX limit
    echo "local_up: RECFORGE_RAY_DIR=$STATE is too long (${#STATE} > 36 characters) for Ray's socket paths;" \
         "use a shorter directory, e.g. /tmp/recforge-ray." >&2
    exit 2
fi
mkdir -p "$STATE"
rm -f "$STATE/head.sid" "$STATE/address"

export RAY_AUTH_MODE=token
# A job's entrypoint (`python -m recipes...`) resolves `python` on the head's PATH: make it the python next to `ray`.
PATH="$(cd "$(dirname "$(command -v "$RAY")")" && pwd):$PATH"
export PATH
"$RAY" get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token if missing; keeps the token off the console

# `setsid` gives the head (GCS, raylet, dashboard, their workers) a session of its own: local_down.sh stops exactly
# that session and whatever it spawned. `--wait` returns once `ray start` has started everything and exited.
setsid --wait bash -c 'echo $$ > "$0/head.sid"; exec "$@"' "$STATE" \
    "$RAY" start --head --port "$RAY_PORT" --num-cpus "$NUM_CPUS" --temp-dir "$STATE/tmp" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --disable-usage-stats

ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
echo "$ADDRESS" > "$STATE/address"
# The jobs API may answer a few seconds after `ray start` returns (any HTTP status means it is listening).
python3 - "$ADDRESS/api/version" <<'PY' || echo "local_up: warning: $ADDRESS does not answer yet." >&2
import sys, time, urllib.error, urllib.request
for _ in range(60):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(1)
PY
echo "local_up: Ray head up (token auth on). Jobs API: $ADDRESS  GCS: $(hostname -I 2>/dev/null | awk '{print $1}'):$RAY_PORT"
echo "local_up: submit with:  RAY_ADDRESS=$ADDRESS recforge submit rec_reasoning --config debug"
