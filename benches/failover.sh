#!/usr/bin/env bash
# Failover timing of pgfailover (a proxy p1 and a witness w1 voting) over a
# PostgreSQL 15 primary n1 and its streaming standby n2, while a writer loops
# short INSERTs through the proxy. Two scenarios, ROUNDS rounds each, with a
# fresh two-node cluster every round:
#
#   kill9      kill -9 of n1's postmaster
#   partition  n1 runs in its own network namespace behind a veth pair and
#              the link goes silent: a `blackhole` qdisc on both veth ends
#              drops every packet (no RST, no ICMP; the standby streams
#              across that link, the proxy and witness probe across it)
#
# Per round: detection (fault -> the proxy's `primary_down` event), promotion
# (the `promote` event's pg_promote() duration), fault -> promoted (`promote`
# event time), fault -> first write committed on n2 (the writer's log), and
# per scenario the median and maximum of each.
#
#   benches/failover.sh            # ROUNDS=5 SCENARIOS="kill9 partition"
#   PROXIES=2 benches/failover.sh  # two proxies (p1, p2) and the witness
#                                  # voting, one writer through each proxy;
#                                  # routing leases are then in force
#
# Environment: ROUNDS, SCENARIOS, PGBIN (PostgreSQL 15 server binaries),
# PGFAILOVER (a built binary; default: cargo build --release), KEEP_TMP=1
# (keep every round's data dirs, logs, events and writer log; the path is
# printed at the end),
# ROUND_TIMEOUT (seconds to wait for the first write on n2, default 60).
# The proxy and witness keep their defaults (--monitor-interval 1s,
# --down-after 3s, --hold-timeout 30s).
#
# Must run as root: PostgreSQL runs as the `postgres` user, and everything
# runs in two network namespaces of its own (pgfb<pid>m: proxy, witness,
# writer, n2, and n1 in the kill9 scenario, on its loopback; pgfb<pid>n: n1
# in the partition scenario),
# joined by a veth pair with 198.18.0.1/30 and 198.18.0.2/30 (RFC 2544
# benchmarking range). Nothing is configured in the host's namespace.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
PROXIES=${PROXIES:-1}
SCENARIOS=${SCENARIOS:-kill9 partition}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROUND_TIMEOUT=${ROUND_TIMEOUT:-60}
KEEP_TMP=${KEEP_TMP:-0}
PY=/usr/bin/python3 # Debian's python3, with python3-psycopg2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "failover: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }
now_ms() { date +%s%3N; }

# --- preconditions ---------------------------------------------------------
[[ $(id -u) == 0 ]] || die "run as root (network namespaces; PostgreSQL runs as user postgres)"
id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (apt-get install -y postgresql-15)"
for bin in initdb pg_ctl pg_basebackup psql; do
  [[ -x $PGBIN/$bin ]] || die "missing $PGBIN/$bin (apt-get install -y postgresql-15)"
done
for cmd in ip tc nsenter curl runuser git; do command -v "$cmd" >/dev/null || die "missing '$cmd' on PATH"; done
$PY -c 'import psycopg2' 2>/dev/null || die "$PY cannot import psycopg2 (apt-get install -y python3-psycopg2)"
for s in $SCENARIOS; do [[ $s == kill9 || $s == partition ]] || die "unknown scenario '$s'"; done
[[ $PROXIES == 1 || $PROXIES == 2 ]] || die "PROXIES must be 1 or 2"
read -r LOAD_START _ </proc/loadavg

# --- cleanup: every process, data dir, namespace and the temp dir ---------
TMP=$(mktemp -d /tmp/pgfailover-failover.XXXXXX)
chmod 755 "$TMP"; chown postgres: "$TMP"
NS_MAIN=pgfb$$m NS_N1=pgfb$$n VETH_MAIN=pgfb$$a VETH_N1=pgfb$$b
PIDS=()     # pgfailover members and the writer of the current round
PGDATAS=()  # data dirs of the current round
NETNS=()

# postmaster_pid DATADIR: its pid if that postmaster is alive (postmaster.pid survives kill -9).
postmaster_pid() {
  local pid
  pid=$(head -n 1 "$1/postmaster.pid" 2>/dev/null) || return 1
  [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == postgres ]] || return 1
  echo "$pid"
}
stop_round_processes() {
  local pid d
  # SIGINT: pgfailover exits at once. SIGTERM: the writer (background jobs of a
  # non-interactive shell inherit SIGINT ignored).
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in {1..100}; do # up to 10 s, then SIGKILL
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && break; done || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  PIDS=()
  for d in "${PGDATAS[@]}"; do
    if postmaster_pid "$d" >/dev/null; then
      runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d" -m immediate -w -t 30 stop >/dev/null 2>&1 \
        || { pid=$(postmaster_pid "$d") && kill -9 "$pid" 2>/dev/null; } || true
    fi
  done
  PGDATAS=()
}
cleanup() {
  local rc=$? ns
  trap - EXIT INT TERM
  stop_round_processes
  for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build ----------------------------------------------------------------
if [[ -z ${PGFAILOVER:-} ]]; then
  log "building pgfailover (release)"
  (cd "$ROOT" && cargo build --release --quiet --bin pgfailover) || die "cargo build --release failed"
  PGFAILOVER=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgfailover BUILT=1
fi
PGFAILOVER=$(realpath "$PGFAILOVER") && [[ -x $PGFAILOVER ]] || die "no pgfailover binary at $PGFAILOVER"
if [[ -n ${BUILT:-} ]]; then # what was built, as of the build
  BUILT_FROM="pgfailover built from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' plus uncommitted changes')"
else
  BUILT_FROM="pgfailover binary $PGFAILOVER (given, not built)"
fi

# --- network namespaces ---------------------------------------------------
ADDR_MAIN=198.18.0.1 ADDR_N1=198.18.0.2
ip netns add "$NS_MAIN"; NETNS+=("$NS_MAIN")
ip netns add "$NS_N1"; NETNS+=("$NS_N1")
ip link add "$VETH_MAIN" netns "$NS_MAIN" type veth peer name "$VETH_N1" netns "$NS_N1"
ip -n "$NS_MAIN" addr add "$ADDR_MAIN/30" dev "$VETH_MAIN"
ip -n "$NS_N1" addr add "$ADDR_N1/30" dev "$VETH_N1"
for ns in "$NS_MAIN" "$NS_N1"; do ip -n "$ns" link set lo up; done
ip -n "$NS_MAIN" link set "$VETH_MAIN" up
ip -n "$NS_N1" link set "$VETH_N1" up
# nsenter execs (`ip netns exec` forks and waits), so `"${IN_MAIN[@]}" daemon &`
# leaves the daemon's own pid in $! (checked in setup).
IN_MAIN=(nsenter "--net=/run/netns/$NS_MAIN" --)
in_main() { "${IN_MAIN[@]}" "$@"; }
# partition_on / partition_off: every packet leaving either veth end is dropped silently.
partition_on() {
  tc -n "$NS_MAIN" qdisc add dev "$VETH_MAIN" root blackhole
  tc -n "$NS_N1" qdisc add dev "$VETH_N1" root blackhole
}
partition_off() {
  tc -n "$NS_MAIN" qdisc del dev "$VETH_MAIN" root 2>/dev/null || true
  tc -n "$NS_N1" qdisc del dev "$VETH_N1" root 2>/dev/null || true
}
partition_on || die "the kernel has no 'blackhole' qdisc (CONFIG_NET_SCH_BLACKHOLE)"
partition_off

# --- the template data directory (initdb once, copied per node and round) --
MONITOR_PASSWORD=monitor-secret REPL_PASSWORD=repl-secret BENCH_PASSWORD=bench-secret
CLUSTER_TOKEN=bench-token
PG_PORT_N1=5432 PG_PORT_N2=5433 PROXY_PORT=6432 ADMIN_P1=8008 ADMIN_W1=8009
PROXY_PORT_2=6433 ADMIN_P2=8010
as_pg() { runuser -u postgres -- "$@"; }

log "initdb (template)"
TEMPLATE=$TMP/template
as_pg "$PGBIN/initdb" -D "$TEMPLATE" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  --encoding=UTF8 --locale=C --no-sync --no-instructions >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$TEMPLATE/postgresql.conf" <<'EOF'
# benches/failover.sh
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
shared_buffers = 32MB
max_connections = 50
log_line_prefix = '%m [%p] %q%u@%d '
include_if_exists = 'node.conf'
EOF
cat >"$TEMPLATE/pg_hba.conf" <<EOF
local all         all        trust
local replication all        trust
host  all         all        127.0.0.1/32 scram-sha-256
host  all         all        $ADDR_MAIN/32 scram-sha-256
host  replication replicator 127.0.0.1/32 scram-sha-256
host  replication replicator $ADDR_MAIN/32 scram-sha-256
EOF
as_pg "$PGBIN/pg_ctl" -D "$TEMPLATE" -l "$TMP/template.log" -w -t 60 \
  -o "-p $PG_PORT_N1 -k $TMP -c listen_addresses=" start >/dev/null
as_pg "$PGBIN/psql" -h "$TMP" -p "$PG_PORT_N1" -U postgres -d postgres -Xq -v ON_ERROR_STOP=1 <<EOF
CREATE ROLE pgfailover LOGIN SUPERUSER PASSWORD '$MONITOR_PASSWORD';
CREATE ROLE replicator LOGIN REPLICATION PASSWORD '$REPL_PASSWORD';
CREATE ROLE bench LOGIN PASSWORD '$BENCH_PASSWORD';
CREATE TABLE writes (id bigserial PRIMARY KEY, node text NOT NULL, at timestamptz NOT NULL DEFAULT now());
ALTER TABLE writes OWNER TO bench;
EOF
as_pg "$PGBIN/pg_ctl" -D "$TEMPLATE" -m fast -w stop >/dev/null

# --- the writer: short INSERTs through the proxy, reconnecting on any error --
cat >"$TMP/writer.py" <<'EOF'
import sys, time, psycopg2
dsn, out = sys.argv[1], sys.argv[2]
log = open(out, "w", buffering=1)
ms = lambda: int(time.time() * 1000)
conn = None
while True:
    try:
        if conn is None:
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            cur = conn.cursor()
        cur.execute("INSERT INTO writes (node) VALUES (current_setting('cluster_name')) RETURNING node")
        log.write(f"ok {ms()} {cur.fetchone()[0]}\n")
    except psycopg2.Error as e:
        text = " / ".join(l.strip() for l in str(e).splitlines() if l.strip())
        log.write(f"err {ms()} {type(e).__name__} sqlstate={e.pgcode}: {text}\n")
        try:
            conn.close()
        except Exception:
            pass
        conn = None
    time.sleep(0.01)
EOF
writer_dsn() { echo "host=127.0.0.1 port=$1 dbname=postgres user=bench password=$BENCH_PASSWORD sslmode=disable application_name=failover-bench"; }

# --- one round ---------------------------------------------------------------
# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 100 ms.
wait_for() {
  local secs=$1 what=$2 deadline; shift 2
  deadline=$(($(now_ms) + secs * 1000))
  until "$@"; do
    (($(now_ms) < deadline)) || { log "timed out after ${secs} s waiting for $what"; return 1; }
    sleep 0.1
  done
}
admin() { in_main curl -sf --max-time 5 "http://127.0.0.1:$1$2"; }
# member_ready PORT [ROUTING_TO]: the member sees n1 as primary and n2 as standby, every voter
# answers, and (the proxy) routes to ROUTING_TO (in the first term: two proxies may
# bootstrap in term 2 when both asked for term 1 at once).
member_ready() {
  admin "$1" /cluster 2>/dev/null | $PY -c '
import json, sys
c = json.load(sys.stdin)
states = {n["name"]: n["state"] for n in c["nodes"]}
ok = states == {"n1": "primary", "n2": "standby"} and all(v["reachable"] for v in c["voters"])
if len(sys.argv) > 1:
    ok = ok and c["term"] >= 1 and c["routing_to"] == sys.argv[1]
sys.exit(not ok)' "${@:2}" 2>/dev/null
}
streaming() {
  [[ $(as_pg "$PGBIN/psql" -h "$R" -p "$PG_PORT_N1" -U postgres -d postgres -XAtqc \
    "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'n2' AND state = 'streaming'" 2>/dev/null) == 1 ]]
}
# writes_on NODE N [LOG]: LOG (default: every writer's) has N writes on NODE.
writes_on() { [[ $(cat "${3:-$R/writer.log}" "$R"/writer-*.log 2>/dev/null | grep -c " $1\$") -ge $2 ]]; }
proxy_admins() { echo "$ADMIN_P1"; ((PROXIES == 2)) && echo "$ADMIN_P2"; return 0; }
has_event() {
  local e port
  for port in $(proxy_admins); do
    e=$(admin "$port" /events 2>/dev/null) && grep -Eq "\"kind\": *\"$1\"" <<<"$e" && return 0
  done
  return 1
}
# node_conf DATADIR NAME PORT ADDR
node_conf() {
  printf "port = %s\nlisten_addresses = '%s'\nunix_socket_directories = '%s'\ncluster_name = '%s'\n" \
    "$3" "$4" "$R" "$2" >"$1/node.conf"
  chown postgres: "$1/node.conf"
}
show_logs() {
  local f
  for f in proxy.log proxy-2.log witness.log n1.log n2.log writer.log writer-2.log; do
    [[ -f $R/$f ]] || continue
    echo "--- $R/$f (last 25 lines) ---" >&2
    tail -n 25 "$R/$f" >&2
  done
}

# setup SCENARIO ROUND: n1 (+ n2 cloned from it, streaming), witness, proxy, writer.
setup() {
  local scen=$1 ns_n1 n1_addr
  R=$TMP/$1-$2
  mkdir -p "$R"; chown postgres: "$R"
  if [[ $scen == partition ]]; then ns_n1=$NS_N1 n1_addr=$ADDR_N1; else ns_n1=$NS_MAIN n1_addr=127.0.0.1; fi
  N1_HOSTPORT=$n1_addr:$PG_PORT_N1

  cp -a "$TEMPLATE" "$R/n1"; PGDATAS+=("$R/n1")
  node_conf "$R/n1" n1 "$PG_PORT_N1" "$n1_addr"
  nsenter "--net=/run/netns/$ns_n1" -- runuser -u postgres -- "$PGBIN/pg_ctl" -D "$R/n1" -l "$R/n1.log" -w -t 60 start >/dev/null \
    || { show_logs; die "n1 did not start"; }
  in_main runuser -u postgres -- "$PGBIN/pg_basebackup" -D "$R/n2" \
    -d "host=$n1_addr port=$PG_PORT_N1 user=replicator password=$REPL_PASSWORD" \
    -C -S n2 -R --checkpoint=fast -X stream --no-sync >"$R/basebackup.log" 2>&1 \
    || { cat "$R/basebackup.log" >&2; die "pg_basebackup failed"; }
  PGDATAS+=("$R/n2")
  node_conf "$R/n2" n2 "$PG_PORT_N2" 127.0.0.1
  in_main runuser -u postgres -- "$PGBIN/pg_ctl" -D "$R/n2" -l "$R/n2.log" -w -t 60 start >/dev/null \
    || { show_logs; die "n2 did not start"; }
  wait_for 30 "n2 streaming from n1" streaming || { show_logs; die "n2 does not stream"; }

  local common=(--voter "p1=http://127.0.0.1:$ADMIN_P1" --voter "w1=http://127.0.0.1:$ADMIN_W1"
    --node "n1=$N1_HOSTPORT" --node "n2=127.0.0.1:$PG_PORT_N2" --monitor-user pgfailover)
  ((PROXIES == 2)) && common+=(--voter "p2=http://127.0.0.1:$ADMIN_P2")
  "${IN_MAIN[@]}" env PGFAILOVER_MONITOR_PASSWORD="$MONITOR_PASSWORD" PGFAILOVER_CLUSTER_TOKEN="$CLUSTER_TOKEN" \
    "$PGFAILOVER" witness --name w1 --admin-listen "127.0.0.1:$ADMIN_W1" --state-dir "$R/w1" "${common[@]}" \
    >"$R/witness.log" 2>&1 &
  PIDS+=($!)
  "${IN_MAIN[@]}" env PGFAILOVER_MONITOR_PASSWORD="$MONITOR_PASSWORD" PGFAILOVER_CLUSTER_TOKEN="$CLUSTER_TOKEN" \
    "$PGFAILOVER" proxy --name p1 --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$ADMIN_P1" \
    --state-dir "$R/p1" "${common[@]}" >"$R/proxy.log" 2>&1 &
  PIDS+=($!)
  if ((PROXIES == 2)); then
    "${IN_MAIN[@]}" env PGFAILOVER_MONITOR_PASSWORD="$MONITOR_PASSWORD" PGFAILOVER_CLUSTER_TOKEN="$CLUSTER_TOKEN" \
      "$PGFAILOVER" proxy --name p2 --listen "127.0.0.1:$PROXY_PORT_2" --admin-listen "127.0.0.1:$ADMIN_P2" \
      --state-dir "$R/p2" "${common[@]}" >"$R/proxy-2.log" 2>&1 &
    PIDS+=($!)
    wait_for 30 "p2 routing to n1 in term 1" member_ready "$ADMIN_P2" n1 || { show_logs; die "p2 never routed to n1"; }
  fi
  wait_for 30 "the proxy routing to n1 in term 1" member_ready "$ADMIN_P1" n1 || { show_logs; die "the proxy never routed to n1"; }
  wait_for 30 "the witness seeing n1 and n2" member_ready "$ADMIN_W1" || { show_logs; die "the witness never saw the pair"; }

  "${IN_MAIN[@]}" "$PY" "$TMP/writer.py" "$(writer_dsn "$PROXY_PORT")" "$R/writer.log" &
  PIDS+=($!)
  wait_for 30 "50 writes on n1" writes_on n1 50 "$R/writer.log" || { show_logs; die "the writer cannot write through the proxy"; }
  if ((PROXIES == 2)); then
    "${IN_MAIN[@]}" "$PY" "$TMP/writer.py" "$(writer_dsn "$PROXY_PORT_2")" "$R/writer-2.log" &
    PIDS+=($!)
    wait_for 30 "50 writes on n1 through p2" writes_on n1 50 "$R/writer-2.log" || { show_logs; die "the writer cannot write through p2"; }
  fi
  local pid
  for pid in "${PIDS[@]}"; do # each recorded pid must be the process itself, not a wrapper
    [[ $(cat "/proc/$pid/cmdline" 2>/dev/null | tr '\0' ' ') =~ (pgfailover|writer\.py) ]] \
      || die "pid $pid is not a member or the writer: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
  done
  sleep 1 # a second of steady state (monitor probes, replication) before the fault
}

# measure SCENARIO ROUND: fault, wait, append one line to results.tsv.
measure() {
  local scen=$1 round=$2 t0 pid
  if [[ $scen == kill9 ]]; then
    pid=$(postmaster_pid "$R/n1") || die "n1 is not running"
    t0=$(now_ms)
    kill -9 "$pid"
  else
    t0=$(now_ms)
    partition_on
  fi
  echo "$t0" >"$R/fault_ms"
  local ok=1
  # Both writers, with two proxies: the round ends when each wrote on n2.
  wait_for "$ROUND_TIMEOUT" "a write on n2" writes_on n2 1 "$R/writer.log" || ok=0
  if ((PROXIES == 2)); then
    wait_for "$ROUND_TIMEOUT" "a write on n2 through p2" writes_on n2 1 "$R/writer-2.log" || ok=0
  fi
  ((ok)) && { wait_for 30 "the proxy's failover event" has_event failover || ok=0; }
  local port i=0
  for port in $(proxy_admins); do
    i=$((i + 1))
    admin "$port" /events >"$R/events-$i.json" 2>/dev/null || echo '[]' >"$R/events-$i.json"
  done
  ((ok)) || { log "round $round of $scen FAILED"; show_logs; }
  $PY - "$scen" "$round" "$t0" "$R" >>"$TMP/results.tsv" <<'EOF'
import glob, json, sys
scen, rnd, t0, r = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
# Every proxy's events, in time order (with two, either may promote).
ev = sorted((e for f in glob.glob(f"{r}/events-*.json") for e in json.load(open(f))), key=lambda e: e["at_ms"])
def first(kind):
    return next((e for e in ev if e["kind"] == kind and e["at_ms"] >= t0), None)
down, promote = first("primary_down"), first("promote")
# With two writers: when both have written on n2 (the later first write).
writers = [f"{r}/writer.log"] + sorted(glob.glob(f"{r}/writer-*.log"))
firsts = [next((int(l.split()[1]) for l in open(w) if l.startswith("ok ") and l.split()[2] == "n2"), None) for w in writers]
write = None if None in firsts else max(firsts)
errors = sum(1 for w in writers for l in open(w) if l.startswith("err ") and int(l.split()[1]) >= t0)
lost = sum(1 for e in ev if e["kind"] == "election_lost" and e["at_ms"] >= t0)
cell = lambda v: "-" if v is None else str(v)
print("\t".join([scen, rnd, cell(down and down["at_ms"] - t0), cell(promote and promote["duration_ms"]),
                 cell(promote and promote["at_ms"] - t0), cell(write and write - t0), str(lost), str(errors)]))
EOF
  log "$(tail -n 1 "$TMP/results.tsv" | awk -F'\t' '{printf "%s round %s: detection %s ms, promotion %s ms, fault->promoted %s ms, fault->first write %s ms, elections lost %s, writer errors %s", $1, $2, $3, $4, $5, $6, $7, $8}')"
}

teardown() {
  stop_round_processes
  partition_off
  [[ $KEEP_TMP == 1 ]] || rm -rf "$R"
}

# --- the rounds --------------------------------------------------------------
: >"$TMP/results.tsv"
STARTED=$(date -u +%FT%TZ)
for scen in $SCENARIOS; do
  for ((round = 1; round <= ROUNDS; round++)); do
    log "$scen round $round/$ROUNDS: setting up"
    setup "$scen" "$round"
    measure "$scen" "$round"
    teardown
  done
done
read -r LOAD_END _ </proc/loadavg

# --- summary -----------------------------------------------------------------
echo
echo "pgfailover failover benchmark, $STARTED, $ROUNDS rounds per scenario, $PROXIES proxy/proxies; load average $LOAD_START at start, $LOAD_END at end"
echo "$BUILT_FROM"
echo "$(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), kernel $(uname -r)"
$PY - "$TMP/results.tsv" "$PROXIES" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
num = lambda v: None if v == "-" else int(v)
print("\nPer round (ms; detection = fault -> proxy's primary_down event, promotion = pg_promote() duration):\n")
print("| scenario | round | detection | promotion | fault -> promoted | fault -> first write on n2 | elections lost | writer errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(r) + " |")
targets = {"kill9": 2000, "partition": 5000} if sys.argv[2] == "1" else {"kill9": 5000, "partition": 5000}
print("\nSummary (ms, median / max over rounds):\n")
print("| scenario | rounds ok | detection | promotion | fault -> promoted | fault -> first write | target (first write, median) |")
print("|---|---:|---:|---:|---:|---:|---|")
for scen in dict.fromkeys(r[0] for r in rows):
    mine = [r for r in rows if r[0] == scen]
    cols = []
    for i in (2, 3, 4, 5):
        vals = [num(r[i]) for r in mine if num(r[i]) is not None]
        cols.append(f"{statistics.median(vals):.0f} / {max(vals)}" if vals else "-")
    writes = [num(r[5]) for r in mine if num(r[5]) is not None]
    ok = len(writes)
    med = statistics.median(writes) if writes else None
    verdict = "-" if med is None else ("met" if med <= targets[scen] and ok == len(mine) else "MISSED")
    print(f"| {scen} | {ok}/{len(mine)} | " + " | ".join(cols) + f" | <= {targets[scen]}: {verdict} |")
EOF
