#!/usr/bin/env bash
# Start-up time of `serve` per key provider (file, passphrase): from spawn to its
# "listening on" line, on a fresh empty data directory, 5 interleaved runs:
#   scripts/bench_startup.sh [PHIVAULT_BINARY]   (default: target/release/phivault)
set -euo pipefail
BIN=${1:-$(dirname "$0")/../target/release/phivault}
W=$(mktemp -d); export XDG_CONFIG_HOME=$W/config
printf 'correct horse battery staple\n' > $W/pass; chmod 600 $W/pass
"$BIN" init --data-dir $W/file >/dev/null 2>&1
"$BIN" init --data-dir $W/pp --key-provider passphrase --passphrase-file $W/pass >/dev/null 2>&1
measure() {
  local dir=$1; shift
  rm -f $W/out; local t0=$(date +%s%N)
  "$BIN" serve --data-dir $dir --listen 127.0.0.1:0 "$@" > $W/out 2>/dev/null &
  local pid=$!
  while ! grep -q "^listening" $W/out 2>/dev/null; do sleep 0.005; done
  local t1=$(date +%s%N)
  kill $pid; wait $pid 2>/dev/null || true
  echo $(( (t1 - t0) / 1000000 ))
}
for i in 1 2 3 4 5; do
  f=$(measure $W/file); p=$(measure $W/pp --passphrase-file $W/pass)
  echo "run $i: file ${f} ms, passphrase ${p} ms"
done
rm -rf $W
