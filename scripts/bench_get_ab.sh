#!/usr/bin/env bash
# GET by id under sustained load, this tree against another build, in interleaved runs on one
# data directory (the VM's speed drifts within minutes, so only runs minutes apart compare):
#   scripts/bench_get_ab.sh OTHER_PHIVAULT_BINARY [PATIENTS] [WRK_CONNECTIONS] [SECONDS] [PAIRS]
# e.g. OTHER = a release build of e3ad20d (before the writer restarted the WAL). Imports
# `synth --patients N --seed 7` once with this tree, then each run: `phivault serve` on
# that directory, `wrk` against `GET /fhir/Observation/{id}` with a valid token, and the
# WAL's length at the end of the load (the data directory grows by every run's audit events).
set -euo pipefail
cd "$(dirname "$0")/.."
OTHER=${1:?usage: bench_get_ab.sh OTHER_PHIVAULT_BINARY [PATIENTS] [CONNS] [SECONDS] [PAIRS]}
PATIENTS=${2:-200}
CONNS=${3:-32}
SECS=${4:-16}
PAIRS=${5:-3}
. scripts/bench_common.sh
HEAD_BIN=$BIN
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" 16 >/dev/null
stop
OBS=$(sqlite3 "$W/data/phivault.db" "select lower(substr(hex(id),1,8)||'-'||substr(hex(id),9,4)||'-'||substr(hex(id),13,4)||'-'||substr(hex(id),17,4)||'-'||substr(hex(id),21)) from resource_version where rtype='Observation' limit 1 offset 17;")
run() {
  BIN=$1 start
  TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$(cat "$W/token")" >"$W/get.lua"
  local out
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/get.lua" "$ORIGIN/fhir/Observation/$OBS")
  echo "$2: $(grep -E 'Requests/sec' <<<"$out" | tr -s ' '), p99 $(grep -E " 99%" <<<"$out" | tr -s " " | cut -d" " -f3-), WAL $(stat -c %s "$W/data/phivault.db-wal") B"
  stop
}
for _ in $(seq "$PAIRS"); do
  run "$OTHER" other
  run "$HEAD_BIN" head
done
