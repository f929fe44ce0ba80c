#!/usr/bin/env bash
# Stop the Ray head started by cluster/local_up.sh, and only that one: every process of the session local_up.sh
# started it in, plus whatever they spawned into sessions of their own (job drivers, vLLM engine processes).
# Other Ray instances on the machine are left alone (this never runs `ray stop`, which stops all of them).
#
#   cluster/local_down.sh            # RECFORGE_RAY_DIR as for local_up.sh
set -euo pipefail
STATE="${RECFORGE_RAY_DIR:-/tmp/recforge-ray-${USER:-$(id -un)}}"
if [[ ! -s "$STATE/head.sid" ]]; then
    echo "local_down: no head started by cluster/local_up.sh ($STATE/head.sid missing); nothing to stop."
    exit 0
fi
SID="$(cat "$STATE/head.sid")"

# The head's session, then descendants of those processes (a job driver runs in a session of its own).
head_tree() {
    ps -eo pid=,ppid=,sid= | awk -v sid="$SID" '
        { pid[NR] = $1; parent[$1] = $2; if ($3 == sid) mine[$1] = 1 }
        END {
            do { grew = 0
                 for (i in pid) { p = pid[i]; if (!(p in mine) && (parent[p] in mine)) { mine[p] = 1; grew = 1 } }
            } while (grew)
            for (p in mine) print p
        }'
}

PIDS="$(head_tree)"
if [[ -z "$PIDS" ]]; then
    echo "local_down: the head (session $SID) is not running."
else
    echo "local_down: stopping the head (session $SID): $(echo $PIDS | wc -w) processes."
    kill -TERM $PIDS 2>/dev/null || true
    for _ in $(seq 20); do  # up to 10 s for a clean exit; the pids were collected before any parent died
        ALIVE="$(for p in $PIDS $(head_tree); do kill -0 "$p" 2>/dev/null && echo "$p"; done | sort -u)"
        [[ -z "$ALIVE" ]] && break
        sleep 0.5
    done
    ALIVE="$(for p in $PIDS $(head_tree); do kill -0 "$p" 2>/dev/null && echo "$p"; done | sort -u)"
    if [[ -n "$ALIVE" ]]; then
        echo "local_down: $(echo $ALIVE | wc -w) processes still up after SIGTERM; sending SIGKILL."
        kill -KILL $ALIVE 2>/dev/null || true
    fi
fi
rm -f "$STATE/head.sid" "$STATE/address"
echo "local_down: done."
