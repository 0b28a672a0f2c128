"""A session inside a transaction block whose statement is running when
its primary is killed: with pgfailover's --client-auth proxy the
statement fails with "the transaction is lost", the connection stays
open, the client rolls back and goes on on the new primary.
Usage: lost_transaction.py DSN psycopg2|asyncpg. Prints "ready NODE"
before the statement, then after a line on stdin "ok NODE"."""
import asyncio
import sys

DSN, DRIVER = sys.argv[1], sys.argv[2]
LOST = "the transaction block cannot go on"


def with_psycopg2():
    import psycopg2

    conn = psycopg2.connect(DSN)  # not autocommit: a transaction block
    cur = conn.cursor()
    cur.execute("SELECT current_setting('cluster_name')")
    print("ready", cur.fetchone()[0], flush=True)
    try:
        cur.execute("SELECT pg_sleep(34)")
        raise SystemExit("the statement outlived its primary")
    except psycopg2.OperationalError as e:
        assert LOST in str(e), e
    assert conn.closed == 0, "the connection stays open"
    conn.rollback()
    cur.execute("SELECT current_setting('cluster_name')")
    node = cur.fetchone()[0]
    conn.commit()
    return node


async def with_asyncpg():
    import asyncpg

    conn = await asyncpg.connect(DSN)
    print("ready", await conn.fetchval("SELECT current_setting('cluster_name')"), flush=True)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_sleep(35)")
        raise SystemExit("the statement outlived its primary")
    except asyncpg.PostgresError as e:
        assert LOST in str(e), e
    assert not conn.is_closed(), "the connection stays open"
    return await conn.fetchval("SELECT current_setting('cluster_name')")


node = with_psycopg2() if DRIVER == "psycopg2" else asyncio.run(with_asyncpg())
sys.stdin.readline()
print("ok", node, flush=True)
