#!/usr/bin/env bash
# Run the drivers' own upstream test suites (psycopg2's and asyncpg's, from
# their PyPI sdists, at the versions Debian installed) once directly against
# a throwaway PostgreSQL 15 server and once through pgfailover in front of
# it, and print pass/fail counts for both plus the tests whose outcome
# differs.
#
#   benches/driver_suites.sh                 # both suites
#   SUITES=psycopg2 benches/driver_suites.sh # one
#
# Environment: SUITES ("psycopg2 asyncpg"), ROUNDS (direct/proxy pairs per
# suite, 1), SUITE_TIMEOUT (seconds per run, 1800), ASYNCPG_TESTS and
# PSYCOPG2_TESTS (unittest names to run instead of the whole suite, e.g.
# tests.test_execute.TestExecuteMany), CACHE (where sdists are downloaded
# and unpacked, /tmp/pgfailover-driver-suites; each run's log is kept in
# $CACHE/logs), PGFAILOVER (the binary; default: built with `cargo build`),
# PGBIN (PostgreSQL server binaries).
# Must run as root: PostgreSQL is started as the `postgres` user. The
# suites run as the server's superuser over trust authentication; some of
# their tests start clusters of their own or need SSL and fail or skip the
# same way in both runs.
set -euo pipefail

SUITES=${SUITES:-psycopg2 asyncpg}
ROUNDS=${ROUNDS:-1}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-1800}
CACHE=${CACHE:-/tmp/pgfailover-driver-suites}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PYTHON=${PYTHON:-/usr/bin/python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "driver_suites: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL is started as user postgres)"
[[ -x $PGBIN/initdb ]] || die "missing $PGBIN/initdb (apt-get install -y postgresql-15)"
for cmd in cargo psql pip setpriv timeout; do
  command -v "$cmd" >/dev/null || die "missing '$cmd' on PATH"
done

TMP=$(mktemp -d /tmp/pgfailover-suites.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -f $TMP/pg/postmaster.pid ]]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$TMP/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
chown postgres: "$TMP"

read -r PG_PORT PGF_PORT ADMIN_PORT < <($PYTHON -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
AS_POSTGRES="setpriv --reuid=postgres --regid=postgres --init-groups --"

wait_ready() {
  local port=$1 name=$2 deadline=$((SECONDS + 60))
  until PGCONNECT_TIMEOUT=2 psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { tail -n 30 "$TMP/$name.log" >&2 || true; die "$name not answering on port $port after 60 s"; }
    sleep 0.2
  done
}

# --- the sdists, at the installed versions --------------------------------
mkdir -p "$CACHE"
sdist() { # sdist NAME VERSION -> unpacked directory
  local name=$1 version=$2 dir="$CACHE/$1-$2"
  if [[ ! -d $dir ]]; then
    pip download --quiet --no-binary :all: --no-deps -d "$CACHE" "$name==$version" >&2 \
      || die "pip download $name==$version failed"
    tar -xzf "$CACHE/$name-$version.tar.gz" -C "$CACHE"
  fi
  echo "$dir"
}

# --- server and proxy -----------------------------------------------------
if [[ -z ${PGFAILOVER:-} ]]; then
  log "building pgfailover"
  (cd "$ROOT" && cargo build --quiet) || die "cargo build failed"
  PGFAILOVER=${CARGO_TARGET_DIR:-$ROOT/target}/debug/pgfailover
fi
log "PostgreSQL on port $PG_PORT, pgfailover on port $PGF_PORT"
$AS_POSTGRES "$PGBIN/initdb" -D "$TMP/pg" -U postgres -A trust --no-sync >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
# asyncpg's suite uses prepared transactions and more connections than the default.
$AS_POSTGRES "$PGBIN/pg_ctl" -D "$TMP/pg" -l "$TMP/postgres.log" -w start \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $TMP -c max_connections=200 -c max_prepared_transactions=10" >/dev/null
wait_ready "$PG_PORT" postgres
PGFAILOVER_LOG=${PGFAILOVER_LOG:-warn} PGFAILOVER_MONITOR_PASSWORD=unused "$PGFAILOVER" proxy \
  --listen "127.0.0.1:$PGF_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --node "n1=127.0.0.1:$PG_PORT" \
  --state-dir "$TMP/pgfailover-state" --monitor-user postgres --monitor-interval 1s 2>"$TMP/pgfailover.log" &
PIDS+=("$!")
wait_ready "$PGF_PORT" pgfailover

# Each run prints unittest's verbose lines; the outcomes are summarised from
# "test (module.Class) ... ok|FAIL|ERROR|skipped ..." lines.
outcomes() { # outcomes LOG -> "test<TAB>outcome" lines, sorted
  $PYTHON - "$1" <<'EOF'
import re, sys
seen, name = {}, None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"^(\w+ \([\w.]+\))", line)
    if m:
        name = m.group(1)  # a docstring line may come before the outcome
    # The outcome may follow output the test printed, on a line of its own.
    r = re.search(r"(?:\.\.\. |^)(ok|FAIL|ERROR|skipped|expected failure|unexpected success)\b", line)
    if r and name:
        seen[name], name = r.group(1), None
for name in sorted(seen):
    print(f"{name}\t{seen[name]}")
EOF
}

summary() { # summary WHICH OUTCOMES
  printf '%-9s %-8s ran %4d: ok %4d, failed %3d, errors %3d, skipped %3d\n' "$1" "$2" \
    "$(wc -l <"$3")" "$(grep -c $'\tok$' "$3" || true)" "$(grep -c $'\tFAIL$' "$3" || true)" \
    "$(grep -c $'\tERROR$' "$3" || true)" "$(grep -c $'\tskipped' "$3" || true)"
}

run_psycopg2() { # run_psycopg2 PORT LOG
  local dir
  dir=$(sdist psycopg2 "$($PYTHON -c 'import psycopg2; print(psycopg2.__version__.split()[0])')")
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc 'DROP DATABASE IF EXISTS psycopg2_test' -c 'CREATE DATABASE psycopg2_test' >/dev/null
  # From the sdist's root, `tests` is its suite and `psycopg2` the installed module (the source is under lib/).
  (cd "$dir" && PSYCOPG2_TESTDB=psycopg2_test PSYCOPG2_TESTDB_HOST=127.0.0.1 PSYCOPG2_TESTDB_PORT=$1 \
    PSYCOPG2_TESTDB_USER=postgres timeout "$SUITE_TIMEOUT" \
    $PYTHON -c "import tests; tests.unittest.main(defaultTest='tests.test_suite')" --verbose ${PSYCOPG2_TESTS:-}) >"$2" 2>&1 || true
}

run_asyncpg() { # run_asyncpg PORT LOG
  local dir
  dir=$(sdist asyncpg "$($PYTHON -c 'import asyncpg; print(asyncpg.__version__)')")
  # Only its tests/: the sdist's asyncpg/ has no compiled extensions and would shadow the installed one.
  rm -rf "$TMP/asyncpg-suite" && mkdir "$TMP/asyncpg-suite" && cp -r "$dir/tests" "$TMP/asyncpg-suite/"
  (cd "$TMP/asyncpg-suite" && PGHOST=127.0.0.1 PGPORT=$1 PGUSER=postgres PGDATABASE=postgres \
    timeout "$SUITE_TIMEOUT" $PYTHON -m unittest ${ASYNCPG_TESTS:-discover -s tests -t .} -v) >"$2" 2>&1 || true
}

mkdir -p "$CACHE/logs"
for suite in $SUITES; do
  for round in $(seq "$ROUNDS"); do
    for where in direct proxy; do
      port=$PG_PORT; [[ $where == proxy ]] && port=$PGF_PORT
      run=$suite-$where-$round
      log "$suite: running its suite $where (port $port), round $round"
      start=$SECONDS
      "run_$suite" "$port" "$TMP/$run.log"
      outcomes "$TMP/$run.log" >"$TMP/$run.outcomes"
      cp "$TMP/$run.log" "$CACHE/logs/"
      log "$suite $where: $((SECONDS - start)) s, last lines: $(tail -n 3 "$TMP/$run.log" | tr '\n' ' ')"
    done
  done
done

echo
echo "# upstream driver suites, direct vs through pgfailover ($(date -u +%F), $(git -C "$ROOT" rev-parse --short HEAD))"
for suite in $SUITES; do
  for round in $(seq "$ROUNDS"); do
    for where in direct proxy; do
      summary "$suite" "$where" "$TMP/$suite-$where-$round.outcomes"
      echo "    unittest: $(grep -E '^(Ran [0-9]|OK|FAILED)' "$TMP/$suite-$where-$round.log" | tr '\n' ' ')"
    done
    if ! diff -q "$TMP/$suite-direct-$round.outcomes" "$TMP/$suite-proxy-$round.outcomes" >/dev/null; then
      echo "  outcomes that differ (< direct, > proxy):"
      diff "$TMP/$suite-direct-$round.outcomes" "$TMP/$suite-proxy-$round.outcomes" | grep '^[<>]' | sed 's/^/    /' || true
    fi
  done
done
cp "$TMP/pgfailover.log" "$TMP/postgres.log" "$CACHE/logs/"
warnings=$(grep -c ' WARN ' "$TMP/pgfailover.log" || true)
echo "pgfailover log: $warnings WARN lines"
grep ' WARN ' "$TMP/pgfailover.log" | sed 's/^.*WARN //' | sort | uniq -c | sort -rn | head -5 || true
