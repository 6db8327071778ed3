#!/usr/bin/env bash
# Issue 20, acceptance 4: the embedded SQLite engine vs PostgreSQL with one node vs two
# nodes on one database — import, GET and search — on this machine, one release build,
# the database's CPU counted:
#   scripts/bench_postgres.sh [PATIENTS] [WRK_CONNECTIONS] [SECONDS]
# For each setup, in the order sqlite, pg1, pg2:
#   - import: `synth --patients N --seed 7` as transaction Bundles through the load_import
#     example (16 concurrent clients; with two nodes, the bundles split in halves, one half
#     to each node at once), resources/s;
#   - GET: WARMUP s (default 3) then SECONDS of wrk (2 threads, CONNECTIONS; with two nodes
#     one wrk per node with half the connections each) over up to 5,000 Observation ids;
#   - search: the same, over Observation?patient=X&code=Y (bench_search_queries.py).
# Every request authenticated over TLS and durably audited. CPU: the phivault servers' and
# every PostgreSQL process's user+system time during each run (from /proc), so each figure
# is also given per CPU-second the service used (server + database), beside requests/s per
# vCPU of this 2-vCPU machine (where the load generator also runs). PostgreSQL: Debian's,
# a cluster of this run's own (tests/postgres/cluster.sh: defaults, synchronous_commit on).
# Needs wrk and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-500}
CONNS=${2:-32}
SECS=${3:-10}
WARMUP=${WARMUP:-3}
. scripts/bench_common.sh
eval "$(tests/postgres/cluster.sh start)"
export PGPASSFILE=$PHIVAULT_TEST_PG_PASSFILE
trap 'for p in ${PIDS:-}; do kill $p 2>/dev/null; done; wait 2>/dev/null; tests/postgres/cluster.sh stop "$PHIVAULT_TEST_PG_DIR"; rm -rf "$W"' EXIT
export XDG_CONFIG_HOME=$W/config
export TOKEN_AUD=https://phivault.bench/auth/token
VCPUS=$(nproc)
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
mkdir -p "$W/half1" "$W/half2"
i=0
for f in "$W/bundles"/*.json; do
  if [ $((i % 2)) -eq 0 ]; then cp "$f" "$W/half1/"; else cp "$f" "$W/half2/"; fi
  i=$((i + 1))
done

PIDS=
pg_ticks() { # every process of the cluster (postmaster and backends)
  local pids
  pids=$(pgrep -f "postgres" | while read -r p; do
    grep -qs "$PHIVAULT_TEST_PG_DIR" "/proc/$p/cmdline" /proc/"$(awk '{print $4}' /proc/$p/stat 2>/dev/null)"/cmdline 2>/dev/null && echo "$p"
  done)
  local s=0
  for p in $pids; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  echo $s
}
srv_ticks() { local s=0; for p in $PIDS; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $s; }
all_ticks() { echo $(($(srv_ticks) + $(pg_ticks))); }
HZ=$(getconf CLK_TCK)

serve() { # DIR: start a node; its origin in ORIGIN, its pid appended to PIDS
  : >"$1.out"
  "$BIN" serve --data-dir "$1" --listen 127.0.0.1:0 --public-url https://phivault.bench \
    >"$1.out" 2>>"$1.log" &
  PIDS="$PIDS $!"
  for _ in $(seq 400); do grep -q listening "$1.out" 2>/dev/null && break; sleep 0.05; done
  ORIGIN=$(sed -n 's/^listening on //p' "$1.out")
}
stop_all() { for p in $PIDS; do kill -TERM "$p"; wait "$p" || true; done; PIDS=; }

setup() { # NAME -> data directories (node A, node B for pg2)
  local name=$1
  case $name in
  sqlite) echo "$W/$name-a" ;;
  pg*)
    local db="b_$name"
    PGPASSFILE=$PHIVAULT_TEST_PG_PASSFILE psql -X -q -d "$PHIVAULT_TEST_PG" -c "CREATE DATABASE $db"
    "$BIN" init --data-dir "$W/$name-a" --database "${PHIVAULT_TEST_PG%/postgres}/$db" >/dev/null 2>&1
    [ "$name" = pg2 ] && cp -a "$W/$name-a" "$W/$name-b"
    echo "$W/$name-a"
    ;;
  esac
}

wrk_run() { # OUT LUA ORIGIN... : wrk on each origin (connections split), summed requests/s
  local out=$1 lua=$2
  shift 2
  local n=$# c=$((CONNS / $#)) t0 t1 k0 k1 i=0 ws=()
  for o in "$@"; do wrk -t1 -c"$c" -d"${WARMUP}s" -s "$lua" "$o" >/dev/null & ws+=($!); done
  wait "${ws[@]}"
  ws=()
  k0=$(all_ticks)
  t0=$(date +%s%N)
  for o in "$@"; do
    i=$((i + 1))
    wrk -t$((n == 1 ? 2 : 1)) -c"$c" -d"${SECS}s" -s "$lua" "$o" >"$out.$i" &
    ws+=($!)
  done
  wait "${ws[@]}"
  t1=$(date +%s%N)
  k1=$(all_ticks)
  python3 - "$out" "$i" "$(((t1 - t0) / 1000000))" "$(((k1 - k0) * 1000 / HZ))" <<'PY'
import re, sys
out, n, ms, cpu_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rps = 0.0
non2xx = 0
for i in range(1, n + 1):
    t = open(f"{out}.{i}").read()
    rps += float(re.search(r"Requests/sec:\s+([\d.]+)", t)[1])
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    non2xx += int(m[1]) if m else 0
print(f"{rps:.0f} {cpu_ms / ms:.2f} {non2xx}")
PY
}

run() { # NAME
  local name=$1 a b oa ob origins
  a=$(setup "$name")
  b="$W/$name-b"
  serve "$a"
  oa=$ORIGIN
  origins="$oa"
  if [ "$name" = pg2 ]; then
    serve "$b"
    ob=$ORIGIN
    origins="$oa $ob"
  fi
  "$BIN" client add --data-dir "$a" --name bench --scope 'system/*.cruds' \
    --token-url "$oa/auth/token" --out "$W/$name.creds.json" 2>/dev/null
  local k0 k1 t0 t1
  k0=$(all_ticks)
  t0=$(date +%s%N)
  if [ "$name" = pg2 ]; then
    "$BIN" client add --data-dir "$a" --name bench-b --scope 'system/*.cruds' \
      --token-url "$ob/auth/token" --out "$W/$name.creds-b.json" 2>/dev/null
    k0=$(all_ticks)
    t0=$(date +%s%N)
    "$LOAD" "$oa" "$a/tls/ca.pem" "$W/$name.creds.json" "$W/half1" 8 >"$W/$name.import1.json" &
    local l1=$!
    "$LOAD" "$ob" "$a/tls/ca.pem" "$W/$name.creds-b.json" "$W/half2" 8 >"$W/$name.import2.json"
    wait $l1
  else
    "$LOAD" "$oa" "$a/tls/ca.pem" "$W/$name.creds.json" "$W/bundles" 16 >"$W/$name.import1.json"
  fi
  t1=$(date +%s%N)
  k1=$(all_ticks)
  local resources
  resources=$(cat "$W/$name".import*.json | python3 -c 'import json,sys; print(sum(json.loads(l)["resources"] for l in sys.stdin if l.strip()))')
  local ms=$(((t1 - t0) / 1000000)) cpu=$(((k1 - k0) * 1000 / HZ))
  echo "import $name $(python3 -c "print(f'{$resources / ($ms / 1000):.0f} {$cpu / $ms:.2f} 0')")" >>"$W/results"
  TOKEN_OUT=$W/$name.token "$LOAD" "$oa" "$a/tls/ca.pem" "$W/$name.creds.json" - >/dev/null
  local tok
  tok=$(cat "$W/$name.token")
  # GET over Observation ids, search over Observation?patient&code
  python3 - "$oa" "$a/tls/ca.pem" "$W/$name.token" "$W/$name.get.lua" <<'PY'
import json, ssl, sys, urllib.request
origin, ca, tok, out = sys.argv[1:5]
token = open(tok).read().strip()
ctx = ssl.create_default_context(cafile=ca)
ids, url = [], origin + "/fhir/Observation?_count=1000"
while url and len(ids) < 5000:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    b = json.load(urllib.request.urlopen(req, context=ctx))
    ids += [e["resource"]["id"] for e in b.get("entry", [])]
    url = next((l["url"] for l in b.get("link", []) if l["relation"] == "next"), None)
    if url:
        url = origin + url[url.index("/fhir/"):]
with open(out, "w") as f:
    f.write('wrk.headers["Authorization"] = "Bearer %s"\n' % token)
    f.write("paths = {" + ",".join(json.dumps("/fhir/Observation/" + i) for i in ids) + "}\n")
    f.write("i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n")
PY
  python3 scripts/bench_search_queries.py "$oa" "$a/tls/ca.pem" "$W/$name.token" "$W/bundles" "$W" >/dev/null
  { printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$tok"; cat "$W/obs.paths.lua"; } >"$W/$name.search.lua"
  echo "get $name $(wrk_run "$W/$name.get" "$W/$name.get.lua" $origins)" >>"$W/results"
  echo "search $name $(wrk_run "$W/$name.search" "$W/$name.search.lua" $origins)" >>"$W/results"
  stop_all
  "$BIN" audit verify --data-dir "$a" | tail -1
}

: >"$W/results"
for s in sqlite pg1 pg2; do
  echo "== $s" >&2
  run "$s"
done
echo
echo "$PATIENTS patients, wrk $CONNS connections, ${SECS} s, $VCPUS vCPUs (load generator on the same machine)"
python3 - "$W/results" "$VCPUS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
vcpus = int(sys.argv[2])
print(f"{'run':8} {'setup':7} {'req/s':>8} {'per vCPU':>9} {'CPU used':>9} {'per CPU-s':>10} {'non-2xx':>8}")
for kind, setup, rps, cpu, non2xx in rows:
    rps, cpu = float(rps), float(cpu)
    per_cpu = rps / cpu if cpu else 0
    print(f"{kind:8} {setup:7} {rps:8.0f} {rps / vcpus:9.0f} {cpu:9.2f} {per_cpu:10.0f} {non2xx:>8}")
PY
