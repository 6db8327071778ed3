#!/usr/bin/env bash
# Online KEK rotation under load (issue 17): GET by id with wrk, first alone, then while
# `POST /admin/keys/rotate-kek` runs back to back for the whole window (each rotation makes a
# generation, rewraps every data key in writes of 256 through the writer, destroys the old
# generation and truncates the WAL), in interleaved pairs:
#   scripts/bench_rotation.sh [PATIENTS] [WRK_CONNECTIONS] [SECONDS] [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-2000}
CONNS=${2:-32}
SECS=${3:-15}
PAIRS=${4:-3}
. scripts/bench_common.sh
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
"$BIN" client add --data-dir "$W/data" --name keys --scope 'system/PhivaultKeys.u' --token-url "$ORIGIN/auth/token" --out "$W/admin.json" 2>/dev/null
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" 16 >/dev/null
OBS=$(sqlite3 "$W/data/phivault.db" "select lower(substr(hex(id),1,8)||'-'||substr(hex(id),9,4)||'-'||substr(hex(id),13,4)||'-'||substr(hex(id),17,4)||'-'||substr(hex(id),21)) from resource_version where rtype='Observation' limit 1 offset 17;")
KEYS=$(sqlite3 "$W/data/phivault.db" "select count(*) from data_key")
echo "$PATIENTS patients, $KEYS data keys; wrk -t2 -c$CONNS -d${SECS}s GET /fhir/Observation/{id}"
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$(cat "$W/token")" >"$W/get.lua"
load() {
  local out
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/get.lua" "$ORIGIN/fhir/Observation/$OBS")
  echo "$1: $(grep -E 'Requests/sec' <<<"$out" | tr -s ' '), p99 $(grep -E " 99%" <<<"$out" | tr -s " " | cut -d" " -f3-), non-2xx $(grep -c 'Non-2xx' <<<"$out" || true)"
}
rotate_until() {
  local admin n=0 t0 t1 times=()
  admin=$("$BIN" token --client "$W/admin.json" --scope system/PhivaultKeys.u --ca-file "$W/data/tls/ca.pem")
  while [ "$(date +%s%N)" -lt "$1" ]; do
    t0=$(date +%s%N)
    curl -sf --cacert "$W/data/tls/ca.pem" -X POST -H "Authorization: Bearer $admin" "$ORIGIN/admin/keys/rotate-kek" >"$W/rot.json"
    t1=$(date +%s%N)
    times+=("$(( (t1 - t0) / 1000000 ))")
    n=$((n + 1))
  done
  echo "  $n rotations, ms each: ${times[*]}; last: $(cat "$W/rot.json")"
}
for _ in $(seq "$PAIRS"); do
  load "before "
  end=$(( $(date +%s%N) + SECS * 1000000000 ))
  rotate_until "$end" >"$W/rotations" &
  RPID=$!
  load "during "
  wait "$RPID"
  cat "$W/rotations"
done
stop
"$BIN" audit verify --data-dir "$W/data" | tail -1
