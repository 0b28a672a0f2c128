#!/usr/bin/env bash
# Compare pgfailover with a direct connection, PgBouncer and HAProxy in front
# of one throwaway PostgreSQL 15 server, using pgbench's read-only workload.
# pgfailover runs twice: relaying authentication (the default), and as
# `pgfailover-pool`, authenticating at the proxy with its server connection
# pool (`--client-auth proxy`), which is what `-C` measures.
#
#   benches/proxy_compare.sh            # ROUNDS=3 DURATION=10 CONNECT_DURATION=5
#
# Environment: ROUNDS (rounds of interleaved runs), DURATION (seconds per
# persistent-connection run), CONNECT_DURATION (seconds per `-C` run, 0 skips
# them), SCALE (pgbench scale, 10), NOISE_PCT and RETRIES (a run during which
# other processes used over NOISE_PCT=5 % of all CPUs is repeated, up to
# RETRIES=3 times), PGBIN (PostgreSQL server binaries), PGFAILOVER (a built
# binary to measure; default: cargo build --release).
# Must run as root: PostgreSQL and PgBouncer are started as the `postgres` user.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECT_DURATION=${CONNECT_DURATION:-5}
SCALE=${SCALE:-10}
NOISE_PCT=${NOISE_PCT:-5}
RETRIES=${RETRIES:-3}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGBOUNCER=${PGBOUNCER:-/usr/sbin/pgbouncer}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "proxy_compare: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

# --- preconditions ---------------------------------------------------------
[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL and PgBouncer are started as user postgres)"
id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (apt-get install -y postgresql-15)"
for bin in "$PGBIN/initdb" "$PGBIN/pg_ctl" "$PGBOUNCER" "$HAPROXY"; do
  [[ -x $bin ]] || die "missing $bin (apt-get install -y postgresql-15 pgbouncer haproxy)"
done
for cmd in cargo pgbench psql python3 setpriv getconf pgrep nproc; do
  command -v "$cmd" >/dev/null || die "missing '$cmd' on PATH"
done

# The proxies, PostgreSQL and pgbench share the CPUs: anything else running skews the ratios.
read -r load1 _ </proc/loadavg
python3 -c "import sys; sys.exit(float('$load1') < 1.0)" && log "WARNING: load average $load1 at start: figures will be noisy"

# --- cleanup: every process we start is recorded here and stopped by pid ---
TMP=$(mktemp -d /tmp/pgfailover-bench.XXXXXX)
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

# Free loopback ports: bind them all at once so they are distinct, then release.
read -r PG_PORT PGF_PORT PGB_PORT HAP_PORT PGP_PORT ADMIN_PGF ADMIN_PGP < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(7)]
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
fi
[[ -x $PGFAILOVER ]] || die "no pgfailover binary at $PGFAILOVER"

log "initdb + pgbench -i -s $SCALE (PostgreSQL on port $PG_PORT)"
# trust over loopback: the one authentication all three proxies handle with no extra setup
$AS_POSTGRES "$PGBIN/initdb" -D "$TMP/pg" -U postgres -A trust --no-sync >"$TMP/initdb.log" 2>&1 \
  || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
$AS_POSTGRES "$PGBIN/pg_ctl" -D "$TMP/pg" -l "$TMP/postgres.log" -w start \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $TMP -c max_connections=100" >/dev/null
wait_ready "$PG_PORT" postgres
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s "$SCALE" -q postgres >"$TMP/pgbench-init.log" 2>&1 \
  || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }

# --- the three proxies -----------------------------------------------------
log "starting pgfailover :$PGF_PORT, pgfailover-pool :$PGP_PORT, pgbouncer :$PGB_PORT, haproxy :$HAP_PORT"
PGFAILOVER_LOG=warn PGFAILOVER_MONITOR_PASSWORD=unused "$PGFAILOVER" proxy \
  --listen "127.0.0.1:$PGF_PORT" --admin-listen "127.0.0.1:$ADMIN_PGF" --node "n1=127.0.0.1:$PG_PORT" \
  --state-dir "$TMP/pgfailover-state" --monitor-user postgres --monitor-interval 1s 2>"$TMP/pgfailover.log" &
PGF_PID=$!; PIDS+=("$PGF_PID")

# PgBouncer in trust mode still looks the user up in auth_file; pgfailover's
# own authentication (which enables its server connection pool) reads the same
# file, where "" means trust.
echo '"postgres" ""' >"$TMP/userlist.txt"
PGFAILOVER_LOG=warn PGFAILOVER_MONITOR_PASSWORD=unused "$PGFAILOVER" proxy \
  --listen "127.0.0.1:$PGP_PORT" --admin-listen "127.0.0.1:$ADMIN_PGP" --node "n1=127.0.0.1:$PG_PORT" \
  --state-dir "$TMP/pgfailover-pool-state" --monitor-user postgres --monitor-interval 1s \
  --client-auth proxy --auth-file "$TMP/userlist.txt" 2>"$TMP/pgfailover-pool.log" &
PGP_PID=$!; PIDS+=("$PGP_PID")
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
default_pool_size = 20
max_client_conn = 200
EOF
chown postgres: "$TMP"/pgbouncer.ini "$TMP"/userlist.txt
$AS_POSTGRES "$PGBOUNCER" "$TMP/pgbouncer.ini" 2>"$TMP/pgbouncer.log" &
PGB_PID=$!; PIDS+=("$PGB_PID")

cat >"$TMP/haproxy.cfg" <<EOF
global
  maxconn 1000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend pg
  bind 127.0.0.1:$HAP_PORT
  default_backend pg
backend pg
  server pg1 127.0.0.1:$PG_PORT
EOF
# -db: stay in the foreground as a single process, so $! is the one to measure.
"$HAPROXY" -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
HAP_PID=$!; PIDS+=("$HAP_PID")

wait_ready "$PGF_PORT" pgfailover "$PGF_PID"
wait_ready "$PGP_PORT" pgfailover-pool "$PGP_PID"
wait_ready "$PGB_PORT" pgbouncer "$PGB_PID"
wait_ready "$HAP_PORT" haproxy "$HAP_PID"

# --- the runs --------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
# ticks PID I...: sum of /proc/PID/stat fields, counted from the state field (0) after "pid (comm) "
# (comm may hold spaces): 11 utime, 12 stime, 13 cutime, 14 cstime (reaped children). 0 if gone.
ticks() {
  local s f i n=0
  { s=$(<"/proc/$1/stat"); } 2>/dev/null || { echo 0; return; }
  s=${s##*') '}; read -ra f <<<"$s"; shift
  for i; do n=$((n + f[i])); done; echo "$n"
}
# Noise gauge: CPU ticks used machine-wide (/proc/stat) minus those of this benchmark, i.e.
# pgbench (reaped children of this shell), PostgreSQL (live processes + reaped backends) and
# the three proxies. Another workload on the machine shows up as "other CPU s".
busy_ticks() { local _ u n s i w q sq st; read -r _ u n s i w q sq st _ </proc/stat; echo $((u + n + s + q + sq + st)); }
PM_PID=$(head -n 1 "$TMP/pg/postmaster.pid")
own_ticks() {
  local n pid
  n=$(($(ticks $$ 13 14) + $(ticks "$PM_PID" 11 12 13 14)))
  for pid in $(pgrep -P "$PM_PID") "$PGF_PID" "$PGP_PID" "$PGB_PID" "$HAP_PID"; do n=$((n + $(ticks "$pid" 11 12))); done
  echo "$n"
}
# A backend that has exited but is not yet reaped (a zombie) shows its CPU nowhere: before a
# snapshot, wait until the postmaster's children stop changing and none is a zombie.
settle() {
  local prev="" cur deadline=$((SECONDS + 5))
  while ((SECONDS < deadline)); do
    cur=$(pgrep -P "$PM_PID" | wc -l)
    [[ $cur == "$prev" ]] && ! pgrep -P "$PM_PID" -r Z >/dev/null && return
    prev=$cur; sleep 0.2
  done
}

declare -A PORT=([direct]=$PG_PORT [pgfailover]=$PGF_PORT [pgfailover-pool]=$PGP_PORT [pgbouncer]=$PGB_PORT [haproxy]=$HAP_PORT)
declare -A PID=([direct]="" [pgfailover]=$PGF_PID [pgfailover-pool]=$PGP_PID [pgbouncer]=$PGB_PID [haproxy]=$HAP_PID)
TARGETS=(direct pgfailover pgfailover-pool pgbouncer haproxy)
RESULTS=$TMP/results.tsv
# Guard the CPU accounting: each recorded pid must be the proxy itself, not a wrapper.
for t in pgfailover pgfailover-pool pgbouncer haproxy; do
  [[ $(<"/proc/${PID[$t]}/comm") == "${t%-pool}" ]] || die "pid ${PID[$t]} is $(<"/proc/${PID[$t]}/comm"), not ${t%-pool}"
done

# run_one WORKLOAD TARGET CLIENTS SECONDS [pgbench flags...]: one pgbench run, one TSV line.
# A run during which other processes used more than NOISE_PCT % of the machine is repeated
# (up to RETRIES times; the last attempt is kept, its "other CPU s" shows in the table).
run_one() {
  local workload=$1 target=$2 c=$3 secs=$4; shift 4
  local j=$((c < 2 ? c : 2)) pid=${PID[$target]} before=0 after=0 out busy0 own0 other attempt
  local limit=$((secs * NCPU * CLK_TCK * NOISE_PCT / 100))
  for ((attempt = 0; ; attempt++)); do
    [[ -z $pid ]] || before=$(ticks "$pid" 11 12)
    busy0=$(busy_ticks); own0=$(own_ticks)
    if ! out=$(pgbench -h 127.0.0.1 -p "${PORT[$target]}" -U postgres -S -n -T "$secs" -c "$c" -j "$j" "$@" postgres 2>&1) \
       || ! grep -q '^tps = ' <<<"$out"; then
      echo "$out" >&2
      [[ -z $pid ]] || { echo "--- $target stderr (last 40 lines) ---" >&2; tail -n 40 "$TMP/$target.log" >&2; }
      die "pgbench through $target failed ($workload, $c clients)"
    fi
    [[ -z $pid ]] || after=$(ticks "$pid" 11 12)
    settle; other=$(($(busy_ticks) - busy0 - $(own_ticks) + own0))
    ((other > limit && attempt < RETRIES)) || break
    log "noisy: other processes used $((other / CLK_TCK)) CPU s during $workload c=$c $target; repeating it"
  done
  local tps lat tx cpu=""
  other=$(python3 -c "print(max(0, $other) / $CLK_TCK)")
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out")
  tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  [[ -z $pid ]] || cpu=$(python3 -c "print(($after - $before) / $CLK_TCK)")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$workload" "$c" "$target" "$tps" "$lat" "$tx" "${cpu:--}" "$other" >>"$RESULTS"
  log "$(printf '%-10s c=%-2s %-10s tps=%-9.0f lat=%-6s ms tx=%-7s cpu=%-5s s other CPU=%s s' \
    "$workload" "$c" "$target" "$tps" "$lat" "$tx" "${cpu:--}" "$other")"
}

log "warm-up: 3 s direct"
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -S -n -T 3 -c 8 -j 2 postgres >/dev/null 2>&1
: >"$RESULTS"
for ((round = 1; round <= ROUNDS; round++)); do
  log "round $round/$ROUNDS"
  for c in 1 8; do
    for t in "${TARGETS[@]}"; do run_one persistent "$t" "$c" "$DURATION"; done
  done
  # -C: a new connection per transaction, exercising the startup/auth relay path.
  if ((CONNECT_DURATION > 0)); then
    for t in "${TARGETS[@]}"; do run_one connect "$t" 8 "$CONNECT_DURATION" -C; done
  fi
done
for t in pgfailover pgfailover-pool pgbouncer haproxy; do
  kill -0 "${PID[$t]}" 2>/dev/null || die "$t exited during the benchmark"
done
if [[ -s $TMP/pgfailover.log ]]; then  # at PGFAILOVER_LOG=warn it should be silent
  echo "--- pgfailover stderr: $(wc -l <"$TMP/pgfailover.log") lines, first 20 ---" >&2
  head -n 20 "$TMP/pgfailover.log" >&2
fi

# --- summary: medians over rounds, ratios against direct and PgBouncer ------
python3 - "$RESULTS" "$ROUNDS" "$DURATION" "$CONNECT_DURATION" <<'EOF'
import sys, statistics as st
from collections import defaultdict
path, rounds, dur, cdur = sys.argv[1:]
runs = defaultdict(list)
for line in open(path):
    w, c, t, tps, lat, tx, cpu, other = line.rstrip("\n").split("\t")
    runs[(w, int(c), t)].append((float(tps), float(lat), int(tx), None if cpu == "-" else float(cpu), float(other)))
med = {}
for k, v in runs.items():
    cpu = [r[3] * 1e6 / r[2] for r in v if r[3] is not None]  # CPU ms per 1,000 tx
    med[k] = (st.median(r[0] for r in v), st.median(r[1] for r in v), st.median(cpu) if cpu else None,
              max(r[4] for r in v))
ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "-"
print(f"pgbench -S, {rounds} rounds; persistent runs {dur} s, -C runs {cdur} s; medians over rounds")
print(f"| workload | clients | target | TPS | latency ms | TPS / direct | TPS / pgbouncer | CPU ms / 1k tx | CPU / pgbouncer | other CPU s (max) |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for (w, c, t) in sorted(med, key=lambda k: (k[0] != "persistent", k[1], ["direct", "pgfailover", "pgfailover-pool", "pgbouncer", "haproxy"].index(k[2]))):
    tps, lat, cpu, other = med[(w, c, t)]
    d, b = med[(w, c, "direct")], med[(w, c, "pgbouncer")]
    print(f"| {w} | {c} | {t} | {tps:.0f} | {lat:.3f} | {ratio(tps, d[0])} | {ratio(tps, b[0])} | "
          f"{'-' if cpu is None else f'{cpu:.1f}'} | {ratio(cpu, b[2])} | {other:.1f} |")
EOF
