#!/usr/bin/env bash
# Memory per idle session: pgfailover and PgBouncer (session pooling) in
# front of one throwaway PostgreSQL 15 server, each holding SESSIONS idle
# psycopg2 connections. Reports the growth of each proxy's resident memory
# (VmRSS in /proc/PID/status, before the sessions open and once all are
# open) divided by the number of sessions, and the ratio between the two.
#
#   benches/idle_memory.sh              # SESSIONS=1000
#
# Environment: SESSIONS (idle sessions per proxy, 1000), PGFAILOVER (a built
# binary; default: cargo build --release), PGBIN (PostgreSQL server
# binaries), KEEP_TMP=1 (keep the logs).
# Must run as root: PostgreSQL and PgBouncer are started as the `postgres` user.
set -euo pipefail

SESSIONS=${SESSIONS:-1000}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=/usr/bin/python3 # Debian's python3, with python3-psycopg2

die() { echo "idle_memory: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

# --- preconditions ---------------------------------------------------------
[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL and PgBouncer are started as user postgres)"
id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (apt-get install -y postgresql-15)"
for bin in "$PGBIN/initdb" "$PGBIN/pg_ctl" "$PGBOUNCER"; do
  [[ -x $bin ]] || die "missing $bin (apt-get install -y postgresql-15 pgbouncer)"
done
for cmd in cargo psql python3 setpriv; do
  command -v "$cmd" >/dev/null || die "missing '$cmd' on PATH"
done
$PY -c 'import psycopg2' 2>/dev/null || die "$PY cannot import psycopg2 (apt-get install -y python3-psycopg2)"

# Each proxy holds two sockets per session (client and server) and the
# client script one: the usual soft limit of 1024 open files is too low.
# PostgreSQL's backends need no more (max_files_per_process is per backend).
FILES=$((2 * SESSIONS + 1000))
(($(ulimit -Hn) >= FILES)) || ulimit -Hn "$FILES" || die "cannot raise the open-files limit to $FILES"
(($(ulimit -n) >= FILES)) || ulimit -n "$FILES"

# --- cleanup: every process we start is recorded here and stopped by pid ---
TMP=$(mktemp -d /tmp/pgfailover-idle.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  exec 3>&- 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -f $TMP/pg/postmaster.pid ]]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$TMP/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [[ ${KEEP_TMP:-} == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
chown postgres: "$TMP"

# Free loopback ports: bind all four at once so they are distinct, then release.
read -r PG_PORT PGF_PORT PGB_PORT ADMIN_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

# setpriv execs (runuser forks and waits), so `$AS_POSTGRES daemon &` gives the daemon's own pid in $!.
AS_POSTGRES="setpriv --reuid=postgres --regid=postgres --init-groups --"

# wait_ready PORT NAME [PID]: deadline loop until `SELECT 1` succeeds through PORT.
wait_ready() {
  local port=$1 name=$2 pid=${3:-} deadline=$((SECONDS + 30))
  until PGCONNECT_TIMEOUT=2 psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; do
    [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || { tail -n 30 "$TMP/$name.log" >&2 || true; die "$name exited during startup"; }
    ((SECONDS < deadline)) || { tail -n 30 "$TMP/$name.log" >&2 || true; die "$name not answering on port $port after 30 s"; }
    sleep 0.2
  done
}

# --- build and PostgreSQL --------------------------------------------------
if [[ -z ${PGFAILOVER:-} ]]; then
  log "building pgfailover (release)"
  (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
  PGFAILOVER=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgfailover
  BUILT_FROM="pgfailover built from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' plus uncommitted changes')"
else
  BUILT_FROM="pgfailover binary $PGFAILOVER (given, not built)"
fi
[[ -x $PGFAILOVER ]] || die "no pgfailover binary at $PGFAILOVER"

MAX_CONNECTIONS=$((SESSIONS + 50))
log "initdb (PostgreSQL on port $PG_PORT, max_connections=$MAX_CONNECTIONS)"
$AS_POSTGRES "$PGBIN/initdb" -D "$TMP/pg" -U postgres -A trust --no-sync >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
# A thousand backends start in a few seconds here; -t 120 leaves room for
# a busy machine, and a failure shows the server's own log.
$AS_POSTGRES "$PGBIN/pg_ctl" -D "$TMP/pg" -l "$TMP/postgres.log" -w -t 120 start \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $TMP -c max_connections=$MAX_CONNECTIONS" >/dev/null \
  || { tail -n 40 "$TMP/postgres.log" >&2; die "PostgreSQL did not start"; }
wait_ready "$PG_PORT" postgres

# --- the two proxies -------------------------------------------------------
log "starting pgfailover :$PGF_PORT, pgbouncer :$PGB_PORT"
PGFAILOVER_LOG=warn PGFAILOVER_MONITOR_PASSWORD=unused "$PGFAILOVER" proxy \
  --listen "127.0.0.1:$PGF_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --node "n1=127.0.0.1:$PG_PORT" \
  --state-dir "$TMP/pgfailover-state" --monitor-user postgres --monitor-interval 1s 2>"$TMP/pgfailover.log" &
PGF_PID=$!; PIDS+=("$PGF_PID")

# PgBouncer in trust mode still looks the user up in auth_file. Session
# pooling: one server connection per client, as through pgfailover.
echo '"postgres" ""' >"$TMP/userlist.txt"
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $TMP/userlist.txt
pool_mode = session
default_pool_size = $((SESSIONS + 10))
max_client_conn = $((SESSIONS + 10))
EOF
chown postgres: "$TMP"/pgbouncer.ini "$TMP"/userlist.txt
$AS_POSTGRES "$PGBOUNCER" "$TMP/pgbouncer.ini" 2>"$TMP/pgbouncer.log" &
PGB_PID=$!; PIDS+=("$PGB_PID")

wait_ready "$PGF_PORT" pgfailover "$PGF_PID"
wait_ready "$PGB_PORT" pgbouncer "$PGB_PID"
for t in pgfailover pgbouncer; do
  pid=PGF_PID; [[ $t == pgbouncer ]] && pid=PGB_PID
  [[ $(<"/proc/${!pid}/comm") == "$t"* ]] || die "pid ${!pid} is $(<"/proc/${!pid}/comm"), not $t"
done

# --- the measurement -------------------------------------------------------
cat >"$TMP/idle_clients.py" <<'EOF'
# Opens N psycopg2 sessions to PORT, runs one query in each (an idle
# session of a pool has been used), says "open", holds them until stdin closes.
import sys, psycopg2
port, n = int(sys.argv[1]), int(sys.argv[2])
sessions = []
for _ in range(n):
    s = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    s.autocommit = True
    with s.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchall()
    sessions.append(s)
print("open", flush=True)
sys.stdin.read()
for s in sessions:
    s.close()
EOF

rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
client_backends() {
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
}
# wait_backends_below N: the sessions of the previous proxy are gone from PostgreSQL.
wait_backends_below() {
  local deadline=$((SECONDS + 60))
  until (($(client_backends) < $1)); do
    ((SECONDS < deadline)) || die "PostgreSQL still has $(client_backends) client backends after 60 s"
    sleep 0.2
  done
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"
# measure NAME PORT PID: RSS before and with SESSIONS idle sessions open.
measure() {
  local name=$1 port=$2 pid=$3 before after deadline
  # One session opened and closed first, so lazily built state (thread
  # stacks, allocator arenas, the first session's tables) is in "before".
  psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null
  before=$(rss_kib "$pid")
  mkfifo "$TMP/$name.hold"
  $PY "$TMP/idle_clients.py" "$port" "$SESSIONS" <"$TMP/$name.hold" >"$TMP/$name.clients" 2>&1 &
  local py=$!; PIDS+=("$py")
  exec 3>"$TMP/$name.hold"
  deadline=$((SECONDS + 300))
  until grep -q '^open$' "$TMP/$name.clients"; do
    kill -0 "$py" 2>/dev/null || { cat "$TMP/$name.clients" >&2; die "the client script failed through $name"; }
    ((SECONDS < deadline)) || die "$SESSIONS sessions through $name not open after 300 s"
    sleep 0.2
  done
  after=$(rss_kib "$pid")
  local backends; backends=$(client_backends)
  ((backends >= SESSIONS)) || die "only $backends client backends with $SESSIONS sessions open through $name"
  exec 3>&-
  wait "$py" || die "the client script failed closing its sessions through $name"
  printf '%s\t%s\t%s\n' "$name" "$before" "$after" >>"$RESULTS"
  log "$(printf '%-10s VmRSS %6s kB -> %7s kB with %s idle sessions (%s client backends)' "$name" "$before" "$after" "$SESSIONS" "$backends")"
}

measure pgfailover "$PGF_PORT" "$PGF_PID"
wait_backends_below "$SESSIONS"
measure pgbouncer "$PGB_PORT" "$PGB_PID"
for t in PGF_PID PGB_PID; do kill -0 "${!t}" 2>/dev/null || die "${t%_PID} exited during the benchmark"; done

# --- summary ---------------------------------------------------------------
echo "$BUILT_FROM; PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $("$PGBOUNCER" --version | head -n 1)"
python3 - "$RESULTS" "$SESSIONS" <<'EOF'
import sys
path, n = sys.argv[1], int(sys.argv[2])
rows = {}
for line in open(path):
    name, before, after = line.split()
    rows[name] = (int(before), int(after))
per = {k: (a - b) * 1024 / n for k, (b, a) in rows.items()}
print(f"{n} idle psycopg2 sessions per proxy; VmRSS in kB, growth per session in bytes")
ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
print("| proxy | VmRSS before | VmRSS with sessions | per session | / pgbouncer |")
print("|---|---:|---:|---:|---:|")
for k, (b, a) in rows.items():
    print(f"| {k} | {b} | {a} | {per[k]:.0f} | {ratio(per[k], per['pgbouncer'])} |")
EOF
