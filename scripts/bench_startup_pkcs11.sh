#!/usr/bin/env bash
# Start-up time of `serve` with the pkcs11 key provider against SoftHSM2 (a token made for
# the run in a temporary directory), interleaved with the file provider: from spawn to its
# "listening on" line, on fresh empty data directories:
#   scripts/bench_startup_pkcs11.sh [PHIVAULT_BINARY] [RUNS]   (default: target/release/phivault, 7)
# Needs Debian's softhsm2 (PHIVAULT_PKCS11_MODULE, default /usr/lib/softhsm/libsofthsm2.so).
set -euo pipefail
BIN=${1:-$(dirname "$0")/../target/release/phivault}
RUNS=${2:-7}
MODULE=${PHIVAULT_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
[ -f "$MODULE" ] || { echo "no PKCS#11 module at $MODULE: apt-get install softhsm2" >&2; exit 1; }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
export XDG_CONFIG_HOME=$W/config SOFTHSM2_CONF=$W/softhsm2.conf
mkdir "$W/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\n' "$W/tokens" > "$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label bench --pin 20261206 --so-pin 99887766 >/dev/null
(umask 077; printf '20261206\n' > "$W/pin")
"$BIN" init --data-dir "$W/file" >/dev/null 2>&1
"$BIN" init --data-dir "$W/hsm" --key-provider pkcs11 --pkcs11-module "$MODULE" \
  --pkcs11-token bench --pkcs11-key wrap --pkcs11-pin-file "$W/pin" >/dev/null 2>&1
measure() {
  local dir=$1; shift
  rm -f "$W/out"; local t0; t0=$(date +%s%N)
  "$BIN" serve --data-dir "$dir" --listen 127.0.0.1:0 "$@" > "$W/out" 2>/dev/null &
  local pid=$!
  while ! grep -q "^listening" "$W/out" 2>/dev/null; do sleep 0.005; done
  local t1; t1=$(date +%s%N)
  kill $pid; wait $pid 2>/dev/null || true
  echo $(( (t1 - t0) / 1000000 ))
}
measure "$W/file" >/dev/null; measure "$W/hsm" --pkcs11-pin-file "$W/pin" >/dev/null # warm-up
for i in $(seq 1 "$RUNS"); do
  f=$(measure "$W/file"); p=$(measure "$W/hsm" --pkcs11-pin-file "$W/pin")
  echo "run $i: file ${f} ms, pkcs11 ${p} ms"
done
