#!/usr/bin/env bash
# Benchmarks against the real server (release build) on 127.0.0.1; every request is
# authenticated, over TLS, and audited durably. Record the figures in BENCHMARKS.md.
#   scripts/bench.sh [PATIENTS] [IMPORT_CONCURRENCY] [WRK_CONNECTIONS] [SECONDS]
# Needs wrk and sqlite3 (apt-get install wrk sqlite3).
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-200}
CONC=${2:-32}
CONNS=${3:-64}
SECS=${4:-20}
. scripts/bench_common.sh

"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
echo "== import: $PATIENTS patients as transaction Bundles, $CONC concurrent clients"
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" "$CONC" | tee "$W/import.json"
stop
DB=$(du -cb "$W/data"/phivault.db* | tail -1 | cut -f1)
JSON=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["json_bytes"])' "$W/import.json")
python3 -c "import sys; db,js=int(sys.argv[1]),int(sys.argv[2]); print(f'== size after import: database {db} B / imported JSON {js} B = {db/js:.3f}')" "$DB" "$JSON"
sqlite3 "$W/data/phivault.db" "select '   ' || name || ': ' || sum(pgsize) from dbstat group by name order by sum(pgsize) desc;" 2>/dev/null || true

start
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
OBS=$(sqlite3 "$W/data/phivault.db" "select lower(substr(hex(id),1,8)||'-'||substr(hex(id),9,4)||'-'||substr(hex(id),13,4)||'-'||substr(hex(id),17,4)||'-'||substr(hex(id),21)) from resource_version where rtype='Observation' limit 1 offset 17;")
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$(cat "$W/token")" >"$W/get.lua"
echo "== GET Observation by id, HTTPS keep-alive, audited: wrk -t2 -c$CONNS -d${SECS}s"
wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/get.lua" "$ORIGIN/fhir/Observation/$OBS"
stop
"$BIN" audit verify --data-dir "$W/data"
