#!/bin/bash
# pgfailover-healthcheck [--port PORT] PATH...
#
# Docker health check for every pgfailover member: GETs each PATH of the
# member's admin API on 127.0.0.1 (port 8008 unless --port) and exits 0 as
# soon as one answers 200, else 1. Pure bash (/dev/tcp): the postgres:16
# and Debian slim images have no curl or wget.
#
#   proxy:   pgfailover-healthcheck /primary            (it can route writes)
#   witness: pgfailover-healthcheck /health             (it is up and votes)
#   node:    pgfailover-healthcheck /primary /replica   (its server serves
#            as the term's primary, or as a streaming standby)
set -u
port=8008
if [ "${1:-}" = "--port" ]; then
    port=${2:?--port needs a value}
    shift 2
fi
if [ $# -eq 0 ]; then
    echo "usage: pgfailover-healthcheck [--port PORT] PATH..." >&2
    exit 2
fi
for path in "$@"; do
    if ! { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
        echo "$path: admin API not listening on port $port"
        continue
    fi
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
    status=""
    IFS= read -r -t 5 status <&3
    exec 3<&- 3>&-
    status=${status%$'\r'}
    echo "$path: ${status:-no answer}"
    case $status in
    "HTTP/1."?" 200"*) exit 0 ;;
    esac
done
exit 1
