#!/usr/bin/env bash
# Planned switchover pause and crash rejoin time of pgfailover, on the
# built-in demo cluster (`pgfailover demo`: node agents n1 (primary) and n2
# (standby), witness w1, proxy p1, all on 127.0.0.1), while a writer loops
# short autocommit INSERTs through the proxy.
#
#   1. SWITCHOVERS planned switchovers (n1 -> n2 -> n1 ...): the pause the
#      CLI reports (`Clients paused N ms`) and the longest gap between two
#      consecutive successful writes of the writer around each one.
#   2. REJOINS rounds of kill -9 of the current primary's postmaster: time
#      until the first write committed on the other node, and until the
#      killed node is a standby again (its agent's GET /replica returns 200).
#   Meanwhile IDLE psycopg2 and IDLE asyncpg connections (benches/idle_clients.py)
#   each run `SELECT 1` once a second: per event, how many of their
#   statements failed, how many connections had to be opened again, and the
#   longest gap any of them saw. The proxy authenticates clients itself
#   (CLIENT_AUTH=proxy, the default here), so idle sessions move to the new
#   primary; CLIENT_AUTH=passthrough measures the relayed authentication.
#
#   benches/switchover.sh        # as root; SWITCHOVERS=5 REJOINS=3
#
# Environment: SWITCHOVERS, REJOINS, IDLE (10), CLIENT_AUTH (proxy), BASE (first of six ports; the proxy
# listens on BASE+6), PGFAILOVER (a built binary; default: cargo build
# --release), KEEP_TMP=1 (keep the demo dir, logs and writer log),
# STEP_TIMEOUT (seconds per wait, default 180).
set -euo pipefail

SWITCHOVERS=${SWITCHOVERS:-5}
REJOINS=${REJOINS:-3}
IDLE=${IDLE:-10}
# Read by the demo's proxy (`--client-auth`); the other members ignore it.
export PGFAILOVER_CLIENT_AUTH=${CLIENT_AUTH:-proxy}
BASE=${BASE:-$((30000 + RANDOM % 20000))}
STEP_TIMEOUT=${STEP_TIMEOUT:-180}
KEEP_TMP=${KEEP_TMP:-0}
PY=/usr/bin/python3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "switchover: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }
now_ms() { date +%s%3N; }

[[ $(id -u) == 0 ]] || die "run as root (the demo runs PostgreSQL as user postgres)"
command -v curl >/dev/null || die "missing curl"
$PY -c 'import psycopg2' 2>/dev/null || die "$PY cannot import psycopg2 (apt-get install -y python3-psycopg2)"
((IDLE == 0)) || $PY -c 'import asyncpg' 2>/dev/null || die "$PY cannot import asyncpg (apt-get install -y python3-asyncpg)"

TMP=$(mktemp -d /tmp/pgfailover-switchover.XXXXXX)
chmod 755 "$TMP"
DIR=$TMP/demo
DEMO_PID='' WRITER_PID='' IDLE_PID=''

cleanup() {
  local rc=$? pid d
  set +e
  [[ -n $WRITER_PID ]] && kill -TERM "$WRITER_PID" 2>/dev/null
  [[ -n $IDLE_PID ]] && kill -KILL "$IDLE_PID" 2>/dev/null
  if [[ -n $DEMO_PID ]]; then
    kill -INT "$DEMO_PID" 2>/dev/null
    for _ in {1..100}; do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DEMO_PID" 2>/dev/null
  fi
  [[ -n $WRITER_PID ]] && kill -KILL "$WRITER_PID" 2>/dev/null
  # Postmasters the demo's agents may have left behind (only ours: our data dirs).
  for d in "$DIR"/n1-data "$DIR"/n2-data; do
    pid=$(head -n 1 "$d/postmaster.pid" 2>/dev/null) || continue
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == postgres ]] && kill -QUIT "$pid" 2>/dev/null
  done
  wait 2>/dev/null
  if [[ $KEEP_TMP == 1 || $rc != 0 ]]; then
    echo "switchover: logs kept in $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -z ${PGFAILOVER:-} ]]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --quiet) || die "build failed"
  PGFAILOVER=$ROOT/target/release/pgfailover
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
read -r LOAD_START _ </proc/loadavg

PROXY_PORT=$((BASE + 6))
declare -A ADMIN_PORT=([p1]=$((BASE + 2)) [n1]=$((BASE + 4)) [n2]=$((BASE + 5)))
log "demo in $DIR, ports $BASE..$PROXY_PORT"
"$PGFAILOVER" demo --dir "$DIR" --listen "127.0.0.1:$PROXY_PORT" --base-port "$BASE" \
  >"$TMP/demo.out" 2>"$TMP/demo.err" &
DEMO_PID=$!
deadline=$((SECONDS + STEP_TIMEOUT))
until grep -q 'Cluster ready' "$TMP/demo.out"; do
  kill -0 "$DEMO_PID" 2>/dev/null || { cat "$TMP/demo.out" "$TMP/demo.err" >&2; die "demo exited"; }
  ((SECONDS < deadline)) || die "demo not ready within ${STEP_TIMEOUT}s"
  sleep 0.5
done
DSN=$(grep -o 'postgresql://app:[^@]*@127.0.0.1:[0-9]*/app' "$TMP/demo.out" | head -1)
TOKEN=$(grep -o 'PGFAILOVER_CLUSTER_TOKEN=[^ ]*' "$TMP/demo.out" | head -1 | cut -d= -f2)
[[ -n $DSN && -n $TOKEN ]] || die "cannot parse the DSN or token from $TMP/demo.out"
export PGFAILOVER_ADMIN=http://127.0.0.1:${ADMIN_PORT[p1]} PGFAILOVER_CLUSTER_TOKEN=$TOKEN

# --- writer: one autocommit INSERT per ~5 ms, "epoch_ms node id" per commit -
cat >"$TMP/writer.py" <<'EOF'
import sys, time, psycopg2
dsn, out = sys.argv[1], open(sys.argv[2], "a", buffering=1)
conn = None
while True:
    try:
        if conn is None:
            conn = psycopg2.connect(dsn, connect_timeout=2)
            conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("INSERT INTO bench_writes(node) VALUES (current_setting('cluster_name')) RETURNING id, node")
            i, node = cur.fetchone()
        out.write("%d %s %d\n" % (time.time() * 1000, node, i))
    except Exception as e:
        out.write("%d ERR %s\n" % (time.time() * 1000, str(e).splitlines()[0] if str(e) else type(e).__name__))
        # A connection the proxy kept open (the statement's outcome is
        # unknown, the session moved) is used again; a closed one reopened.
        if conn is not None and conn.closed:
            out.write("%d REOPEN\n" % (time.time() * 1000))
            conn = None
        time.sleep(0.01)
    time.sleep(0.005)
EOF
$PY - "$DSN" <<'EOF'
import sys, psycopg2
c = psycopg2.connect(sys.argv[1]); c.autocommit = True
c.cursor().execute("CREATE TABLE IF NOT EXISTS bench_writes(id bigserial PRIMARY KEY, node text, at timestamptz DEFAULT clock_timestamp())")
EOF
WLOG=$TMP/writes.log
: >"$WLOG"
$PY "$TMP/writer.py" "$DSN" "$WLOG" &
WRITER_PID=$!
ILOG=$TMP/idle.log
: >"$ILOG"
if ((IDLE > 0)); then
  $PY "$ROOT/benches/idle_clients.py" "$DSN" "$IDLE" "$ILOG" &
  IDLE_PID=$!
fi

# wait_standby NODE PRIMARY: status shows NODE as "standby" and writes routed to PRIMARY.
wait_standby() {
  local deadline=$((SECONDS + STEP_TIMEOUT))
  until "$PGFAILOVER" status --json 2>/dev/null | $PY -c '
import json, sys
s = json.load(sys.stdin)
ok = s.get("routing_to") == sys.argv[2] and any(n["name"] == sys.argv[1] and n["state"] == "standby" for n in s["nodes"])
sys.exit(0 if ok else 1)' "$1" "$2"; do
    ((SECONDS < deadline)) || die "$1 not a standby behind $2 within ${STEP_TIMEOUT}s"
    sleep 0.2
  done
}
# writes_on NODE SINCE_MS: first commit time on NODE at or after SINCE_MS (empty if none).
first_write_on() { awk -v n="$1" -v t="$2" '$2 == n && $1 >= t { print $1; exit }' "$WLOG"; }
# max_gap FROM_MS TO_MS: longest gap between consecutive commits, from the last
# commit before FROM_MS through the first commit after TO_MS.
max_gap() {
  awk -v a="$1" -v b="$2" '$2 != "ERR" && $2 != "REOPEN" {
      if ($1 < a) { prev = $1; next }
      if (prev != "" && $1 - prev > g) g = $1 - prev
      prev = $1
      if ($1 > b) exit
    } END { print g + 0 }' "$WLOG"
}
wait_writes_on() { # NODE: until a commit on NODE is logged after now
  local t; t=$(now_ms) deadline=$((SECONDS + STEP_TIMEOUT))
  until [[ -n $(first_write_on "$1" "$t") ]]; do
    ((SECONDS < deadline)) || die "no write on $1 within ${STEP_TIMEOUT}s"
    sleep 0.1
  done
}

RESULTS=$TMP/results
: >"$RESULTS"
primary=n1 standby=n2
wait_standby n2 n1
wait_writes_on n1
sleep 1

# --- 1. planned switchovers -------------------------------------------------
for ((i = 1; i <= SWITCHOVERS; i++)); do
  wait_standby "$standby" "$primary"
  wait_writes_on "$primary"
  sleep 1
  log "switchover $i: $primary -> $standby"
  t0=$(now_ms)
  "$PGFAILOVER" switchover --to "$standby" >"$TMP/switchover$i.out" 2>&1 ||
    { cat "$TMP/switchover$i.out" >&2; die "switchover $i failed"; }
  t1=$(now_ms)
  wait_writes_on "$standby"
  sleep 0.5
  reported=$(grep -o 'Clients paused [0-9]* ms' "$TMP/switchover$i.out" | grep -o '[0-9]*' || echo NA)
  observed=$(max_gap "$t0" "$t1")
  echo "switchover $i $primary->$standby $reported $observed $((t1 - t0)) $t0 $t1" >>"$RESULTS"
  log "  reported ${reported} ms, writer saw a ${observed} ms gap, command took $((t1 - t0)) ms"
  tmp=$primary primary=$standby standby=$tmp
done

# --- 2. kill -9 of the primary and rejoin -----------------------------------
for ((i = 1; i <= REJOINS; i++)); do
  wait_standby "$standby" "$primary"
  wait_writes_on "$primary"
  sleep 1
  pid=$(head -n 1 "$DIR/$primary-data/postmaster.pid")
  log "rejoin $i: kill -9 $primary's postmaster ($pid)"
  t0=$(now_ms)
  kill -KILL "$pid"
  # Two outcomes race: the proxy fails over to the standby (the killed
  # node then rejoins as a standby), or the killed node's agent restarts
  # its postmaster (1 s later) before the failover is decided, and writes
  # resume on it in the same term.
  deadline=$((SECONDS + STEP_TIMEOUT)) first='' back='' outcome=''
  while [[ -z $first || -z $back ]]; do
    ((SECONDS < deadline)) || die "rejoin $i: no write on $standby or $primary not back within ${STEP_TIMEOUT}s"
    if [[ -z $first ]]; then
      first=$(first_write_on "$standby" "$t0") outcome=failover
      if [[ -z $first ]]; then
        # The agent restarts a killed postmaster after a second: a write
        # logged on it within 500 ms of the kill was committed before it.
        first=$(first_write_on "$primary" "$((t0 + 500))") outcome=restarted back=$first
      fi
    fi
    if [[ -z $back && $outcome == failover ]] && [[ $(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:${ADMIN_PORT[$primary]}/replica") == 200 ]]; then
      back=$(now_ms)
    fi
    sleep 0.1
  done
  echo "rejoin $i $primary $((first - t0)) $((back - t0)) $outcome $t0 $first" >>"$RESULTS"
  log "  $outcome: first write after $((first - t0)) ms, $primary back after $((back - t0)) ms"
  [[ $outcome == restarted ]] || { tmp=$primary primary=$standby standby=$tmp; }
done
read -r LOAD_END _ </proc/loadavg
ERRORS=$(grep -c ' ERR ' "$WLOG" || true)
REOPENS=$(grep -c ' REOPEN' "$WLOG" || true)
COMMITS=$(grep -vc ' ERR \| REOPEN' "$WLOG" || true)

# --- report -------------------------------------------------------------------
sleep 3  # the idle clients' next statements after the last event
$PY - "$RESULTS" "$LOAD_START" "$LOAD_END" "$COMMIT" "$ERRORS" "$COMMITS" "$ILOG" "$IDLE" "$PGFAILOVER_CLIENT_AUTH" "$REOPENS" <<'EOF'
import sys, statistics, subprocess, datetime, os
from collections import defaultdict
rows = [l.split() for l in open(sys.argv[1])]
sw = [r for r in rows if r[0] == "switchover"]
rj = [r for r in rows if r[0] == "rejoin"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print("pgfailover switchover benchmark, %s, load average %s at start, %s at end" % (
    datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"), sys.argv[2], sys.argv[3]))
print("pgfailover built from %s; %d CPUs, %s, kernel %s" % (sys.argv[4], os.cpu_count(), cpu, os.uname().release))
print("writer: %s commits, %s errors, %s connections opened again" % (sys.argv[6], sys.argv[5], sys.argv[10]))
print()
print("| switchover | direction | reported pause (ms) | writer's longest gap (ms) | command (ms) |")
print("|---:|---|---:|---:|---:|")
for r in sw:
    print("| %s | %s | %s | %s | %s |" % (r[1], r[2], r[3], r[4], r[5]))
print()
print("| rejoin | killed | outcome | kill -> first write (ms) | kill -> killed node back (ms) |")
print("|---:|---|---|---:|---:|")
for r in rj:
    print("| %s | %s | %s | %s | %s |" % (r[1], r[2], r[5], r[3], r[4]))
print()
def stat(name, xs):
    xs = [int(x) for x in xs if x != "NA"]
    if xs:
        print("| %s | %d | %d | %d |" % (name, len(xs), statistics.median(xs), max(xs)))
print("| measure | n | median (ms) | max (ms) |")
print("|---|---:|---:|---:|")
stat("switchover pause, reported", [r[3] for r in sw])
stat("switchover pause, writer-observed", [r[4] for r in sw])
fo = [r for r in rj if r[5] == "failover"]
rs = [r for r in rj if r[5] == "restarted"]
stat("kill -9 -> first write on the standby (failover)", [r[3] for r in fo])
stat("kill -9 -> rejoined as standby (failover)", [r[4] for r in fo])
stat("kill -9 -> first write, postmaster restarted in place", [r[3] for r in rs])

# Idle clients: per event, from its start to 3 s after it ended.
idle = int(sys.argv[8])
if idle:
    events = defaultdict(list)
    for line in open(sys.argv[7]):
        parts = line.split(" ", 4)
        events[(parts[1], parts[2])].append((int(parts[0]), parts[3]))
    print()
    print("%d psycopg2 and %d asyncpg idle connections (SELECT 1 every second), --client-auth %s" % (idle, idle, sys.argv[9]))
    print()
    print("| event | failed statements | connections opened again | longest gap a client saw (ms) |")
    print("|---|---:|---:|---:|")
    for r in sw + rj:
        start, end = int(r[6]), int(r[7]) + 3000
        failed = closed = gap = 0
        for log in events.values():
            failed += sum(1 for t, w in log if start <= t <= end and w == "err")
            closed += sum(1 for t, w in log if start <= t <= end and w == "closed")
            oks = [t for t, w in log if w == "ok"]
            before = [t for t in oks if t < start]
            after = [t for t in oks if t > start]
            if before and after:
                gap = max(gap, after[0] - before[-1])
        name = "switchover %s" % r[1] if r[0] == "switchover" else "kill -9 %s (%s)" % (r[1], r[5])
        print("| %s | %d | %d | %d |" % (name, failed, closed, gap))
EOF
