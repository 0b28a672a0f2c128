"""Idle clients for benches/switchover.sh: COUNT psycopg2 and COUNT asyncpg
connections through the proxy, each running `SELECT 1` once a second and
opening its connection again when the driver finds it closed, as
long-lived application connections do (an error on a connection that
stays open, such as a statement in flight when the primary died, is
logged and the connection used again).
One line per event in OUT: "epoch_ms driver index ok|err|closed [text]"
("closed": the connection had to be opened again)."""
import asyncio
import sys
import threading
import time

import asyncpg
import psycopg2

dsn, count, out = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
lock = threading.Lock()


def log(driver, index, what, text=""):
    with lock:
        out.write("%d %s %d %s %s\n" % (time.time() * 1000, driver, index, what, text))


def psycopg2_client(index):
    conn = None
    while True:
        try:
            if conn is None:
                conn = psycopg2.connect(dsn, connect_timeout=5)
                conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
            log("psycopg2", index, "ok")
        except Exception as e:
            log("psycopg2", index, "err", (str(e).splitlines() or [type(e).__name__])[0])
            if conn is not None and conn.closed:
                conn = None
                log("psycopg2", index, "closed")
        time.sleep(1)


async def asyncpg_client(index):
    conn = None
    while True:
        try:
            if conn is None or conn.is_closed():
                if conn is not None:
                    log("asyncpg", index, "closed")
                conn = await asyncpg.connect(dsn, ssl=False, timeout=5)
            await conn.fetchval("SELECT 1")
            log("asyncpg", index, "ok")
        except Exception as e:
            log("asyncpg", index, "err", (str(e).splitlines() or [type(e).__name__])[0])
        await asyncio.sleep(1)


async def main():
    for i in range(count):
        threading.Thread(target=psycopg2_client, args=(i,), daemon=True).start()
    await asyncio.gather(*(asyncpg_client(i) for i in range(count)))


asyncio.run(main())
