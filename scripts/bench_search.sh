#!/usr/bin/env bash
# Search benchmarks against the real server (release build) on 127.0.0.1; every request
# is authenticated, over TLS, and audited durably (one event per search, listing every
# resource returned). Record the figures in BENCHMARKS.md.
#   scripts/bench_search.sh [PATIENTS] [IMPORT_CONCURRENCY] [WRK_CONNECTIONS] [SECONDS]
# Needs wrk and python3 (apt-get install wrk).
#
# Three searches, each with its values rotated over many patients so no single query is
# hot: Observation?patient=X&code=Y, Patient?family=F&birthdate=D, and
# Observation?date=geA&date=ltB (a one-month window, _count=10).
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-1000}
CONC=${2:-16}
CONNS=${3:-32}
SECS=${4:-20}
. scripts/bench_common.sh

"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
start
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
echo "== import: $PATIENTS patients as transaction Bundles, $CONC concurrent clients (indexing every R4 search parameter)"
"$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" "$CONC" | tee "$W/import.json"
stop
DB=$(du -cb "$W/data"/phivault.db* | tail -1 | cut -f1)
JSON=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["json_bytes"])' "$W/import.json")
python3 -c "import sys; db,js=int(sys.argv[1]),int(sys.argv[2]); print(f'== size after import: database {db} B / imported JSON {js} B = {db/js:.3f}')" "$DB" "$JSON"

start
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" - >/dev/null
python3 scripts/bench_search_queries.py "$ORIGIN" "$W/data/tls/ca.pem" "$W/token" "$W/bundles" "$W"
for name in obs pat date; do
  { printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$(cat "$W/token")"; cat "$W/$name.paths.lua"; } >"$W/$name.lua"
done
for name in obs pat date; do
  echo "== search $name: wrk -t2 -c$CONNS -d${SECS}s"
  wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$W/$name.lua" "$ORIGIN"
done
stop
"$BIN" audit verify --data-dir "$W/data"
"$BIN" index check --data-dir "$W/data" | tail -1 || true
