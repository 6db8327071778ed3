#!/usr/bin/env bash
# Benchmarks against the real server (release build) on 127.0.0.1. Figures go to BENCHMARKS.md by hand.
#   scripts/bench.sh [PATIENTS] [CONCURRENCY]
# Needs wrk (apt-get install wrk). Every request is authenticated, TLS, audited.
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-200}
CONC=${2:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p phivault --example load_import
BIN=$CARGO_TARGET_DIR/release/phivault
LOAD=$CARGO_TARGET_DIR/release/examples/load_import
W=$(mktemp -d)
trap 'kill $SPID 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"' EXIT
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
"$BIN" serve --data-dir "$W/data" --listen 127.0.0.1:0 >"$W/out" 2>"$W/err" &
SPID=$!
for _ in $(seq 100); do grep -q listening "$W/out" 2>/dev/null && break; sleep 0.1; done
ORIGIN=$(sed -n 's/^listening on //p' "$W/out")
"$BIN" client add --data-dir "$W/data" --name bench --scope 'system/*.cruds' --token-url "$ORIGIN/auth/token" --out "$W/creds.json" 2>/dev/null
echo "== import: $PATIENTS patients, concurrency $CONC"
TOKEN_OUT=$W/token "$LOAD" "$ORIGIN" "$W/data/tls/ca.pem" "$W/creds.json" "$W/bundles" "$CONC" | tee "$W/import.json"
# an Observation id to read
OBS=$(curl -s --cacert "$W/data/tls/ca.pem" -H "Authorization: Bearer $(cat "$W/token")" "$ORIGIN/fhir/Observation/_history?_count=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["entry"][0]["resource"]["id"])')
cat >"$W/get.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $(cat "$W/token")"
LUA
echo "== GET by id over HTTPS, keep-alive (wrk -t2 -c64 -d20s)"
wrk -t2 -c64 -d20s --latency -s "$W/get.lua" "$ORIGIN/fhir/Observation/$OBS" | tee "$W/wrk.txt"
kill -TERM $SPID; wait $SPID || true
DB=$(du -cb "$W/data"/phivault.db* | tail -1 | cut -f1)
JSON=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["json_bytes"])' "$W/import.json")
python3 - "$DB" "$JSON" <<'PY'
import sys
db, js = int(sys.argv[1]), int(sys.argv[2])
print(f"== size: database {db} bytes / imported JSON {js} bytes = {db/js:.3f}")
PY
"$BIN" audit verify --data-dir "$W/data"
