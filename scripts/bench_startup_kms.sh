#!/usr/bin/env bash
# Start-up time of `serve` with the aws-kms key provider against moto's KMS server on
# 127.0.0.1 (one Decrypt per start), interleaved with the file provider: from spawn to its
# "listening on" line, on fresh empty data directories, 5 runs each:
#   scripts/bench_startup_kms.sh [PHIVAULT_BINARY]   (default: target/release/phivault)
# moto: PHIVAULT_MOTO_SERVER, else target/pyenv/bin/moto_server (tests/python/venv.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN=${1:-$HERE/../target/release/phivault}
MOTO=${PHIVAULT_MOTO_SERVER:-$HERE/../target/pyenv/bin/moto_server}
[ -x "$MOTO" ] || { echo "no moto_server at $MOTO: run tests/python/venv.sh" >&2; exit 1; }
PY="$(dirname "$MOTO")/python"
W=$(mktemp -d); export XDG_CONFIG_HOME=$W/config HOME=$W
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null; rm -rf $W' EXIT
until "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/moto-api/')" 2>/dev/null; do sleep 0.1; done
export AWS_ACCESS_KEY_ID=AKIAMOTOBENCH0000000 AWS_SECRET_ACCESS_KEY=bench-secret
KEY=$("$PY" -c "import boto3; print(boto3.client('kms', region_name='us-east-1', endpoint_url='http://127.0.0.1:$PORT').create_key()['KeyMetadata']['KeyId'])")
"$BIN" init --data-dir $W/file >/dev/null 2>&1
"$BIN" init --data-dir $W/kms --key-provider aws-kms --kms-key-id "$KEY" --kms-region us-east-1 \
    --kms-endpoint "http://127.0.0.1:$PORT" >/dev/null 2>&1
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
  f=$(measure $W/file); k=$(measure $W/kms)
  echo "run $i: file ${f} ms, aws-kms ${k} ms"
done
