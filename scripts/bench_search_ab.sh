#!/usr/bin/env bash
# The three searches of scripts/bench_search.sh, this tree against another build, in
# interleaved runs on one data directory (the VM's speed drifts within minutes, so only
# runs minutes apart compare):
#   scripts/bench_search_ab.sh OTHER_PHIVAULT_BINARY [PATIENTS] [WRK_CONNECTIONS] [SECONDS] [PAIRS]
# Imports `synth --patients N --seed 7` once with this tree, writes the query lists once,
# then each run: `phivault serve` on that directory with one build, a fresh token, and
# `wrk` over each search (after an unmeasured warm-up), with the server's CPU time per
# request (utime + stime over the run, from /proc). Needs wrk and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
OTHER=${1:?usage: bench_search_ab.sh OTHER_PHIVAULT_BINARY [PATIENTS] [CONNS] [SECONDS] [PAIRS]}
PATIENTS=${2:-1000}
CONNS=${3:-32}
SECS=${4:-10}
PAIRS=${5:-3}
WARMUP=${WARMUP:-5}
. scripts/bench_common.sh
HEAD_BIN=$BIN
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" 16 >/dev/null
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
python3 scripts/bench_search_queries.py "$ORIGIN" "$W/data/tls/ca.pem" "$W/token" "$W/bundles" "$W"
stop
run() {
  BIN=$1 start
  TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
  for name in obs pat date; do
    { printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$(cat "$W/token")"; cat "$W/$name.paths.lua"; } >"$W/$name.lua"
  done
  # unmeasured warm-up: the server's start-up scan of the previous run's audit events
  # (the snooping rules) runs beside the first seconds of load
  wrk -t2 -c"$CONNS" -d"${WARMUP}s" -s "$W/obs.lua" "$ORIGIN" >/dev/null
  for name in obs pat date; do
    local out c0 c1 reqs
    c0=$(awk '{print $14+$15}' "/proc/$SPID/stat")
    out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/$name.lua" "$ORIGIN")
    c1=$(awk '{print $14+$15}' "/proc/$SPID/stat")
    reqs=$(grep -Eo '[0-9]+ requests in' <<<"$out" | grep -Eo '^[0-9]+')
    echo "$2 $name: $(grep -E 'Requests/sec' <<<"$out" | tr -s ' '), p99 $(grep -E " 99%" <<<"$out" | tr -s " " | cut -d" " -f3-), server CPU $(python3 -c "print(round(($c1-$c0)*1e6/100/$reqs))") us/request, non-2xx $(grep -Eo 'Non-2xx or 3xx responses: [0-9]+' <<<"$out" | grep -Eo '[0-9]+$' || echo 0)"
  done
  stop
}
for _ in $(seq "$PAIRS"); do
  run "$OTHER" other
  run "$HEAD_BIN" head
done
