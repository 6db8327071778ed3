#!/usr/bin/env bash
# A PostgreSQL cluster for one test run: Debian's server (installed when missing), a
# cluster made by initdb in a new temporary directory as an unprivileged user (`nobody`
# when this runs as root: PostgreSQL refuses root), SCRAM passwords, listening on
# 127.0.0.1 on a free port only.
#
#   eval "$(tests/postgres/cluster.sh start)"   # exports PHIVAULT_TEST_PG, PHIVAULT_TEST_PG_PASSFILE, PHIVAULT_TEST_PG_DIR
#   tests/postgres/cluster.sh stop "$PHIVAULT_TEST_PG_DIR"
set -euo pipefail

bin_dir() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

as_owner() {
    if [ "$(id -u)" -eq 0 ] || [ "$(stat -c %u /proc/self)" = 0 ]; then
        setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    if [ -z "$(bin_dir)" ] || [ ! -x "$(bin_dir)/initdb" ] || ! command -v psql >/dev/null ||
        ! command -v openssl >/dev/null; then
        # (openssl: the TLS test makes its CA and server certificate with it)
        SUDO=""
        [ "$(stat -c %u /proc/self)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq >&2
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql openssl >/dev/null
    fi
    BIN="$(bin_dir)"
    DIR="$(mktemp -d)"
    chmod 0755 "$DIR"
    PASSWORD="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
    printf '%s' "$PASSWORD" >"$DIR/pw"
    if [ "$(stat -c %u /proc/self)" = 0 ]; then chown -R 65534:65534 "$DIR"; fi
    as_owner "$BIN/initdb" -D "$DIR/data" -U phivault --auth=scram-sha-256 -E UTF8 \
        --locale=C.UTF-8 --pwfile="$DIR/pw" >/dev/null
    rm -f "$DIR/pw"
    PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/data/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$DIR -c max_connections=400" \
        start >/dev/null
    PASSFILE="$DIR/pgpass"
    printf '127.0.0.1:%s:*:phivault:%s\n' "$PORT" "$PASSWORD" >"$PASSFILE"
    chmod 0600 "$PASSFILE"
    echo "export PHIVAULT_TEST_PG='postgres://phivault@127.0.0.1:$PORT/postgres'"
    echo "export PHIVAULT_TEST_PG_PASSFILE='$PASSFILE'"
    echo "export PHIVAULT_TEST_PG_DIR='$DIR'"
    ;;
stop)
    DIR="${2:?the directory start printed}"
    if [ -d "$DIR/data" ]; then
        as_owner "$(bin_dir)/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null || true
    fi
    rm -rf "$DIR"
    ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
