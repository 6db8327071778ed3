#!/usr/bin/env bash
# Issue 19, acceptance 5: continuous encrypted backups on vs off, one release build of this
# tree, in interleaved pairs (the VM's speed drifts ~2× between minutes: compare within a
# pair, and the median of the ratios):
#   scripts/bench_backup.sh [PATIENTS] [WRK_CONNECTIONS] [SECONDS] [PAIRS]
# "on" is `serve --backup-target file://…` (a directory on the same disk, --drill-every 0
# so no drill runs inside a measurement); "off" is plain `serve`. Each pair, in the order
# off,on (odd pairs) or on,off (even pairs):
#   - import: `synth --patients N --seed 7` with `phivault import --jobs $JOBS` (default 4)
#     into a fresh data directory, timed (resources/s, the server's CPU). The client is
#     registered and a token taken first; a `client add` from the command line makes the
#     server start a new backup epoch at its next commit, so the timed part waits for that
#     epoch's snapshot (epoch_snapshot_ms set, snapshot_running false, nothing waiting).
#     During the import (and until the target has caught up) DATA_DIR/backup/status.json is
#     sampled every 100 ms: "lag" = now − waiting_since_ms (0 when null), and, while the
#     import runs, "RPO" = now − max(last_point_ms, import start): the age of the oldest
#     commit not yet in a restore point can be no more (the file is rewritten once per
#     shipper tick, ~400 ms, and that staleness is counted). "drain" = from the import's
#     end until its last commit is in a point (0: shipped before the client had finished).
#     (Before each timed part, `sync`: what the runs before wrote — a GET run writes
#     ~100 MB of audit events — is not flushed during it.)
#   - GET: `serve` again on each store (the "on" server starts a new epoch: its snapshot is
#     awaited), a token, WARMUP s (default 3) then SECONDS of wrk, 2 threads, CONNECTIONS,
#     over up to 5,000 Observation ids, with the server's CPU per request.
# Then `phivault restore` of the last pair's on-store: its newest point (the snapshot taken
# at the GET run's start + the GET run's audit segments) and the point at the end of its
# import (the near-empty snapshot before the import + every import segment), each timed,
# and the restored store served (counts checked). Bytes: `du -sb` of the target vs the
# synth JSON vs the data directory. BACKUP_DIR=DIR puts the targets there instead of beside
# the data (another file system: no fsync shared with the data's disk). FIRST=K numbers the pairs from K (K even: on,off first),
# to rerun a disturbed pair alone. Needs wrk and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PATIENTS=${1:-1000}
CONNS=${2:-32}
SECS=${3:-10}
PAIRS=${4:-3}
WARMUP=${WARMUP:-3}
JOBS=${JOBS:-4}
FIRST=${FIRST:-1} # the first pair's number (its order follows it: to rerun one pair)
LAST=$((FIRST + PAIRS - 1))
. scripts/bench_common.sh
export XDG_CONFIG_HOME=$W/config XDG_STATE_HOME=$W/state
mkdir -p "$W/res"
"$BIN" synth --patients "$PATIENTS" --seed 7 --out "$W/bundles" >/dev/null
JSON_BYTES=$(find "$W/bundles" -name '*.json' -printf '%s\n' | awk '{s += $1} END {print s}')

cat >"$W/st.py" <<'PY'
import json, os, sys, time
def now(): return int(time.time() * 1000)
def read(d):
    try:
        return json.load(open(os.path.join(d, "backup/status.json")))
    except (OSError, ValueError):
        return None
cmd = sys.argv[1]
if cmd == "get":  # DIR FIELD
    s = read(sys.argv[2]) or {}
    print(s.get(sys.argv[3]))
elif cmd == "wait":  # DIR EPOCH0: the epoch after EPOCH0 has its snapshot and nothing waits
    d, e0, t0 = sys.argv[2], int(sys.argv[3]), time.time()
    while True:
        s = read(d) or {}
        new_epoch = (s.get("epoch") or 0) > e0 or time.time() - t0 > 10
        if new_epoch and s.get("epoch_snapshot_ms") and s.get("snapshot_running") is False \
                and s.get("waiting_since_ms") is None:
            print(f"epoch {s['epoch']}, snapshot ready after {time.time() - t0:.1f} s")
            break
        if time.time() - t0 > 120:
            sys.exit(f"backups did not settle in 120 s: {s}")
        time.sleep(0.1)
elif cmd == "sample":  # DIR T0_MS END_FILE OUT: every 100 ms until caught up after END_FILE
    d, t0, end_file, out = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    path = os.path.join(d, "backup/status.json")
    rows, end, drain, first_write = [], None, None, None
    while True:
        t = now()
        if end is None and os.path.exists(end_file):
            end = int(open(end_file).read())
        s = read(d)
        if s is not None:
            try:
                written = os.stat(path).st_mtime_ns // 1_000_000
            except OSError:
                written = 0
            w, p = s.get("waiting_since_ms"), s.get("last_point_ms") or 0
            lag = t - w if w is not None else 0
            if end is not None:
                # caught up: a point at or after the end, or the second status written after
                # it (by a tick that began after the end) with nothing waiting
                if written > end and first_write is None:
                    first_write = written
                if w is None and (p >= end or (first_write is not None and written > first_write)):
                    drain = max(0, p - end)
                    break
            # RPO bound while the import runs: the newest commit not in a point is at most
            # this old (commits began at t0)
            rpo = t - max(p, t0) if end is None else None
            rows.append((t, lag, rpo, s.get("snapshot_running"), s.get("last_error")))
        elif end is not None:
            break  # backups off: nothing to wait for
        if end is not None and t - end > 120_000:
            break  # never caught up: drain stays None
        time.sleep(0.1)
    json.dump({"rows": rows, "drain": drain, "end": end,
               "status": read(d)}, open(out, "w"))
elif cmd == "summary":  # OUT: max and p99 of lag and RPO
    r = json.load(open(sys.argv[2]))
    def p99(v):
        v = sorted(v)
        return v[max(0, -(-len(v) * 99 // 100) - 1)] if v else 0
    lag = [x[1] for x in r["rows"]]
    rpo = [x[2] for x in r["rows"] if x[2] is not None]
    errs = {x[4] for x in r["rows"] if x[4]}
    st = r["status"] or {}
    print(f"{len(rpo)}+{len(lag) - len(rpo)}", max(lag, default=0), p99(lag), max(rpo, default=0), p99(rpo),
          "none" if r["drain"] is None else r["drain"],
          st.get("segments_shipped", 0), st.get("bytes_shipped", 0),
          "|".join(sorted(errs)) or "-")
PY

# the ids of up to 5,000 Observations of the store behind ORIGIN -> a wrk script
get_lua() { # CA TOKEN_FILE OUT
  python3 - "$ORIGIN" "$1" "$2" "$3" <<'PY'
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
with open(out, "w") as f:
    f.write('wrk.headers["Authorization"] = "Bearer %s"\n' % token)
    f.write("paths = {" + ",".join(json.dumps("/fhir/Observation/" + i) for i in ids) + "}\n")
    f.write("i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n")
PY
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }
# where the targets go: beside the data (the default, one disk), or BACKUP_DIR (another
# file system: e.g. /dev/shm as a stand-in for another volume or S3, no fsync shared with
# the data's disk)
target_of() { if [ -n "${BACKUP_DIR:-}" ]; then echo "$BACKUP_DIR/$(basename "$1").target"; else echo "$1.target"; fi; }
[ -n "${BACKUP_DIR:-}" ] && mkdir -p "$BACKUP_DIR" && chmod 700 "$BACKUP_DIR"
cpu_ticks() { awk '{print $14+$15}' "/proc/$SPID/stat"; }

# serve MODE on DIR (on: shipping to DIR.target); sets SPID and ORIGIN
serve_on() {
  local mode=$1 dir=$2 extra=()
  [ "$mode" = on ] && extra=(--backup-target "file://$(target_of "$dir")" --drill-every 0)
  : >"$W/out"
  "$BIN" serve --data-dir "$dir" --listen 127.0.0.1:0 "${extra[@]}" >"$W/out" 2>>"$dir.log" &
  SPID=$!
  for _ in $(seq 400); do grep -q listening "$W/out" 2>/dev/null && break; sleep 0.05; done
  ORIGIN=$(sed -n 's/^listening on //p' "$W/out")
  [ -n "$ORIGIN" ] || { echo "serve $mode did not start: $(tail -5 "$dir.log")" >&2; exit 1; }
}
token() { # DIR -> DIR.token (a commit: the token is audited)
  TOKEN_OUT=$1.token "$LOAD" "$ORIGIN" "$1/tls/ca.pem" "$1.creds.json" - >/dev/null
}
settle() { # MODE DIR EPOCH0
  [ "$1" = on ] || return 0
  python3 "$W/st.py" wait "$2" "$3" >&2
}

# import into a fresh W/MODE-PAIR; writes W/res/import-MODE-PAIR: "res/s cpu_ms seconds"
import_run() {
  local mode=$1 p=$2 dir=$W/$1-$2 e0 t0 t1 c0 c1
  serve_on "$mode" "$dir"
  settle "$mode" "$dir" 0 # the first epoch's snapshot (of the empty store)
  e0=$(python3 "$W/st.py" get "$dir" epoch); [ "$e0" = None ] && e0=0
  "$BIN" client add --data-dir "$dir" --name bench --scope 'system/*.cruds' \
    --token-url "$ORIGIN/auth/token" --out "$dir.creds.json" 2>/dev/null
  token "$dir"
  settle "$mode" "$dir" "$e0"
  sync # (what the runs before wrote is not flushed during this one)
  rm -f "$W/end"
  t0=$(now_ms)
  python3 "$W/st.py" sample "$dir" "$t0" "$W/end" "$W/res/rpo-$mode-$p.json" &
  local sampler=$!
  c0=$(cpu_ticks)
  "$BIN" import --client "$dir.creds.json" --jobs "$JOBS" --resume "$dir.resume.json" "$W/bundles" 2>"$W/summary"
  t1=$(now_ms)
  c1=$(cpu_ticks)
  echo "$t1" >"$W/end"
  wait "$sampler"
  echo "$t1" >"$W/res/end-$mode-$p"
  [ "$mode" = on ] && du -sb "$(target_of "$dir")" | cut -f1 >"$W/res/target-after-import-$p"
  get_lua "$dir/tls/ca.pem" "$dir.token" "$dir.get.lua"
  stop
  du -sb "$dir" | cut -f1 >"$W/res/data-after-import-$mode-$p"
  python3 - "$W/summary" "$((t1 - t0))" "$(((c1 - c0) * 1000 / $(getconf CLK_TCK)))" >"$W/res/import-$mode-$p" <<'PY'
import re, sys
s = open(sys.argv[1]).read()
n = int(re.search(r"(\d+) resources \(", s)[1])
secs = int(sys.argv[2]) / 1000
print(f"{n / secs:.0f} {sys.argv[3]} {secs:.2f}")
PY
  echo "import $mode: $(cat "$W/res/import-$mode-$p") (res/s, server CPU ms, s)$([ "$mode" = on ] && python3 "$W/st.py" summary "$W/res/rpo-$mode-$p.json" |
    awk '{printf ", samples (import+drain) %s, lag max/p99 %s/%s ms, RPO max/p99 %s/%s ms, drain %s ms, %s segments, %s bytes shipped, errors %s", $1, $2, $3, $4, $5, $6, $7, $8, $9}')"
}

# GET on W/MODE-PAIR; writes W/res/get-MODE-PAIR: "req/s us_per_request non2xx p99"
get_run() {
  local mode=$1 p=$2 dir=$W/$1-$2 e0 out c0 c1 reqs
  e0=$(python3 "$W/st.py" get "$dir" epoch); [ "$e0" = None ] && e0=0
  serve_on "$mode" "$dir"
  token "$dir"
  sed -i "1s/.*/wrk.headers[\"Authorization\"] = \"Bearer $(cat "$dir.token")\"/" "$dir.get.lua"
  settle "$mode" "$dir" "$e0"
  sync
  wrk -t2 -c"$CONNS" -d"${WARMUP}s" -s "$dir.get.lua" "$ORIGIN" >/dev/null
  c0=$(cpu_ticks)
  out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency -s "$dir.get.lua" "$ORIGIN")
  c1=$(cpu_ticks)
  reqs=$(grep -Eo '[0-9]+ requests in' <<<"$out" | grep -Eo '^[0-9]+')
  echo "$(grep -E 'Requests/sec' <<<"$out" | grep -Eo '[0-9.]+$') \
$(python3 -c "print(round(($c1-$c0)*1e6/$(getconf CLK_TCK)/$reqs))") \
$(grep -Eo 'Non-2xx or 3xx responses: [0-9]+' <<<"$out" | grep -Eo '[0-9]+$' || echo 0) \
$(grep -E ' 99%' <<<"$out" | tr -s ' ' | cut -d' ' -f3)" >"$W/res/get-$mode-$p"
  stop
  echo "GET $mode: $(cat "$W/res/get-$mode-$p") (req/s, server CPU us/request, non-2xx, p99)"
}

echo "== backups on vs off: $PATIENTS patients (synth --seed 7, $(find "$W/bundles" -name '*.json' | wc -l) bundles, $JSON_BYTES bytes of JSON), import --jobs $JOBS, wrk $CONNS connections ${SECS}s, $PAIRS pairs, $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo '+changes'), $(date -u +%H:%M) UTC"
for p in $(seq "$FIRST" "$LAST"); do
  order="off on"; [ $((p % 2)) = 0 ] && order="on off"
  echo "== pair $p ($order), $(date -u +%H:%M:%S) UTC"
  for m in $order; do import_run "$m" "$p"; done
  for m in $order; do get_run "$m" "$p"; done
done

# restore the last pair's on-store: its newest point, then the point at its import's end
src=$W/on-$LAST
restore_run() { # NAME [--at TIME]
  local to=$W/restored-$1 t0 t1
  shift
  t0=$(now_ms)
  "$BIN" restore --target "file://$(target_of "$src")" --to "$to" "$@" >"$to.out" 2>"$to.err" ||
    { echo "restore FAILED:"; cat "$to.out" "$to.err"; return 0; }
  t1=$(now_ms)
  echo "restore $(basename "$to"): $(python3 -c "print(f'{($t1-$t0)/1000:.2f}')") s wall; $(head -1 "$to.out" | sed 's/^restored [^ ]* //')"
  grep -v '^restored\|^serve it' "$to.out" | sed 's/^/  /'
  serve_on off "$to"
  cp "$src.creds.json" "$to.creds.json"
  token "$to"
  local n obs
  n=$(curl -s --cacert "$to/tls/ca.pem" -H "Authorization: Bearer $(cat "$to.token")" "$ORIGIN/fhir/Patient?_summary=count" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
  obs=$(sed -n 's/^paths = {"\([^"]*\)".*/\1/p' "$src.get.lua")
  echo "  served: Patient total $n, GET $obs -> $(curl -s -o /dev/null -w '%{http_code}' --cacert "$to/tls/ca.pem" -H "Authorization: Bearer $(cat "$to.token")" "$ORIGIN$obs")"
  stop
  echo "  restored data directory: $(du -sb "$to" | cut -f1) bytes"
}
echo "== restore of $src ($(date -u +%H:%M:%S) UTC)"
restore_run newest
# (the first point at or after the import's end: end + drain)
restore_run at-import-end --at "$(python3 - "$W/res/rpo-on-$LAST.json" <<'PY'
import datetime, json, sys
r = json.load(open(sys.argv[1]))
ms = r["end"] + (r["drain"] if r["drain"] is not None else 1500)
t = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
print(t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z")
PY
)"

echo "== bytes (pair $LAST)"
echo "synth JSON bundles:                 $JSON_BYTES"
echo "on-store data directory after import: $(cat "$W/res/data-after-import-on-$LAST")   (off-store: $(cat "$W/res/data-after-import-off-$LAST"))"
echo "target after import (du -sb):        $(cat "$W/res/target-after-import-$LAST")"
echo "on-store data directory at the end:   $(du -sb "$src" | cut -f1)   (after its GET run's audit events)"
echo "target at the end (du -sb):           $(du -sb "$(target_of "$src")" | cut -f1)   ($(find "$(target_of "$src")" -type f | wc -l) objects)"

echo "== server logs: WARN/ERROR lines"
grep -h -E ' (WARN|ERROR) ' "$W"/*.log | cut -c1-300 | sort | uniq -c | sort -rn | head -20 || echo "none"

echo "== summary (ratio = on/off)"
python3 - "$W/res" "$FIRST" "$LAST" <<'PY'
import json, os, statistics, subprocess, sys
d, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rd = lambda n: open(os.path.join(d, n)).read().split()
imp, get = [], []
print(f"| pair | order | import off (res/s) | import on (res/s) | ratio | GET off (req/s) | GET on (req/s) | ratio | RPO max / p99 (ms) | lag max / p99 (ms) | drain (ms) | samples |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for p in range(first, last + 1):
    io, ion = rd(f"import-off-{p}"), rd(f"import-on-{p}")
    go, gon = rd(f"get-off-{p}"), rd(f"get-on-{p}")
    ri, rg = float(ion[0]) / float(io[0]), float(gon[0]) / float(go[0])
    imp.append(ri); get.append(rg)
    s = subprocess.run([sys.executable, os.path.join(os.path.dirname(d), "st.py"), "summary",
                        os.path.join(d, f"rpo-on-{p}.json")], capture_output=True, text=True).stdout.split()
    order = "off,on" if p % 2 else "on,off"
    print(f"| {p} | {order} | {float(io[0]):,.0f} | {float(ion[0]):,.0f} | {ri:.2f} | {float(go[0]):,.0f} | {float(gon[0]):,.0f} | {rg:.2f} | {s[3]} / {s[4]} | {s[1]} / {s[2]} | {s[5]} | {s[0]} |")
print(f"median ratio on/off: import {statistics.median(imp):.2f}, GET {statistics.median(get):.2f}")
PY
