#!/usr/bin/env python3
"""gestor_almacenamiento: the seed's example application, minus its failover code.

The repmgr version knew both database hosts (DB_HOST, DB_STANDBY_HOST),
tried one then the other, checked that the connection was writable and
re-checked every ten requests. With pgfailover none of that is needed: the
only database setting is DATABASE_URL, which names the pgfailover proxy,
and the proxy sends every new session to whichever node is the primary
right now.

What the application still does is what any database client does: when
its connection breaks (the proxy closes sessions of a failed primary with
SQLSTATE 57P01 "primary changed ...; reconnect"), it logs the error,
connects again to the same DATABASE_URL and carries on. The reconnection
is held by the proxy until the new primary is writable, so it lands there.

It writes one row per WRITE_INTERVAL seconds into the table `registros`
and logs one line per attempt:

    ... write ok seq=12 id=12 server=<node> ms=3
    ... write failed seq=13 error=OperationalError: ...; reconnecting
    ... connected to the database

`server` is the PostgreSQL setting cluster_name of the node that took the
row (pgfailover's node agent sets it to the node's name): it shows the
writes moving to the new primary, it takes no part in any decision.

Environment:
    DATABASE_URL    libpq DSN or URL, e.g. postgresql://app:app@pgfailover:6432/library
    WRITE_INTERVAL  seconds between writes (default 1)
    RETRY_DELAY     seconds before reconnecting after an error (default 1)
    WRITE_LIMIT     stop after this many attempts; 0 = never (default 0)
"""

import os
import signal
import sys
import time
from datetime import datetime, timezone

import psycopg2

DATABASE_URL = os.environ["DATABASE_URL"]
WRITE_INTERVAL = float(os.environ.get("WRITE_INTERVAL", "1"))
RETRY_DELAY = float(os.environ.get("RETRY_DELAY", "1"))
WRITE_LIMIT = int(os.environ.get("WRITE_LIMIT", "0"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS registros (
    id         bigserial PRIMARY KEY,
    seq        bigint NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
)
"""
INSERT = """
INSERT INTO registros (seq) VALUES (%s)
RETURNING id, current_setting('cluster_name')
"""


def log(message):
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    print(f"{now} gestor_almacenamiento {message}", flush=True)


def one_line(error):
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}"


def connect():
    conn = psycopg2.connect(DATABASE_URL)
    with conn.cursor() as cur:
        cur.execute(SCHEMA)
    conn.commit()
    log("connected to the database")
    return conn


def close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass


def stop(signum, _frame):
    # As PID 1 in a container the process gets no default action for
    # SIGTERM: exit explicitly so `docker compose stop` is quick.
    log(f"stopping on signal {signum}")
    sys.exit(0)


def main():
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log("starting; writing through DATABASE_URL")
    conn = None
    seq = 0
    while WRITE_LIMIT == 0 or seq < WRITE_LIMIT:
        seq += 1
        started = time.monotonic()
        try:
            if conn is None:
                conn = connect()
            with conn.cursor() as cur:
                cur.execute(INSERT, (seq,))
                row_id, server = cur.fetchone()
            conn.commit()
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            # The connection is gone (or never came): connect again.
            log(f"write failed seq={seq} error={one_line(e)}; reconnecting")
            close_quietly(conn)
            conn = None
            time.sleep(RETRY_DELAY)
            continue
        except psycopg2.Error as e:
            # Any other database error: the connection is still good.
            log(f"write failed seq={seq} error={one_line(e)}")
            conn.rollback()
            time.sleep(RETRY_DELAY)
            continue
        took = (time.monotonic() - started) * 1000
        log(f"write ok seq={seq} id={row_id} server={server} ms={took:.0f}")
        time.sleep(WRITE_INTERVAL)
    close_quietly(conn)
    log(f"done after {seq} attempts")


if __name__ == "__main__":
    main()
