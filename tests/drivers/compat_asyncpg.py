"""What asyncpg (its own protocol implementation: extended protocol, binary
formats, pipelined executemany) relies on, as a transcript.

Run once against a node and once through the proxy with the same
arguments (host port user password dbname); tests/it/driver_compat.rs
asserts that the two transcripts are equal. Each line is `check<TAB>json`.
PIDs and large object OIDs are printed as comparisons, never as values.
An unexpected exception ends the script with a non-zero status.
"""

import asyncio
import io
import json
import re
import sys
import time

try:
    import asyncpg
except ImportError as e:
    sys.exit(f"asyncpg is missing ({e}): run .ci/install (Debian package python3-asyncpg)")

HOST, PORT, USER, PASSWORD, DBNAME = sys.argv[1:6]
DEADLINE = 60.0


def plain(value):
    if isinstance(value, (bytes, memoryview)):
        return "\\x" + bytes(value).hex()
    return repr(value)


def out(check, value):
    line = json.dumps(value, sort_keys=True, default=plain)
    # A session's temporary schema is numbered after its backend slot.
    line = re.sub(r"pg_temp_[0-9]+", "pg_temp_N", line)
    print(f"{check}\t{line}", flush=True)


async def connect():
    return await asyncpg.connect(host=HOST, port=int(PORT), user=USER, password=PASSWORD,
                                 database=DBNAME, timeout=30)


def error_fields(e):
    fields = e.as_dict()
    fields["class"] = type(e).__name__
    return fields


async def expect_error(call):
    try:
        await call
    except asyncpg.PostgresError as e:
        return error_fields(e)
    raise AssertionError("no error")


async def wait_for(what, cond):
    start = time.monotonic()
    while not await cond():
        if time.monotonic() - start > DEADLINE:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


PARAMETERS = ["application_name", "client_encoding", "DateStyle", "IntervalStyle",
              "is_superuser", "server_version", "session_authorization",
              "standard_conforming_strings", "TimeZone"]


def parameters(conn):
    settings = conn.get_settings()
    return {p: getattr(settings, p, None) for p in PARAMETERS}


async def check_session(conn):
    real = await conn.fetchval("SELECT pg_backend_pid()")
    out("backend_pid_is_pg_backend_pid", conn.get_server_pid() == real)
    out("server_version", list(conn.get_server_version()))
    out("startup_parameters", parameters(conn))
    return real


async def check_parameter_status(conn):
    await conn.execute("SET application_name = 'compat asyncpg'")
    await conn.execute("SET TimeZone = 'Asia/Tokyo'")
    await conn.execute("SET DateStyle = 'German'")
    out("parameters_after_set", parameters(conn))
    out("timestamptz_after_set",
        str(await conn.fetchval("SELECT '2024-02-29 13:14:15+00'::timestamptz")))
    async with conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'America/New_York'")
        out("timezone_in_transaction", conn.get_settings().TimeZone)
    out("timezone_after_commit_of_set_local", conn.get_settings().TimeZone)
    await conn.execute("RESET ALL")
    out("parameters_after_reset", parameters(conn))


async def check_notify(conn, own_pid):
    other = await connect()
    other_pid = await other.fetchval("SELECT pg_backend_pid()")
    received = []
    done = asyncio.Event()

    def on_notify(_conn, pid, channel, payload):
        sender = "self" if pid == own_pid else "other" if pid == other_pid else pid
        received.append({"channel": channel, "payload": payload[:40],
                         "payload_len": len(payload), "from": sender})
        if len(received) == 4:
            done.set()

    await conn.add_listener("compat_channel", on_notify)
    await conn.execute("NOTIFY compat_channel, 'from myself'")
    await other.execute("NOTIFY compat_channel, 'from another session'")
    await other.execute("SELECT pg_notify('compat_channel', repeat('x', 7000))")
    async with other.transaction():
        await other.execute("NOTIFY compat_channel, 'at commit'")
    await asyncio.wait_for(done.wait(), DEADLINE)
    out("notifications", received)
    await conn.remove_listener("compat_channel", on_notify)
    await other.close()


async def check_cancel(conn, own_pid):
    watcher = await connect()

    async def active():
        return await watcher.fetchval(
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' "
            "AND query LIKE 'SELECT pg_sleep(30)%'", own_pid)

    task = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
    await wait_for("the statement to run", active)
    task.cancel()  # asyncpg sends a CancelRequest and waits for it
    try:
        await task
        raise AssertionError("the statement was not cancelled")
    except asyncio.CancelledError:
        out("cancel_running_statement", "cancelled")
    out("after_cancel", await conn.fetchval("SELECT 'usable after a cancel'"))
    # A timeout whose cancel may reach a backend that already finished: the
    # next statement must not be the one it hits.
    hit = 0
    for _ in range(30):
        try:
            await conn.execute("SELECT pg_sleep(0.01)", timeout=0.01)
        except asyncio.TimeoutError:
            pass
        try:
            await conn.execute("SELECT pg_sleep(0.01)")
        except asyncpg.QueryCanceledError:
            hit += 1
    out("timeout_cancels_that_hit_the_next_statement", hit)
    await watcher.close()


async def check_copy(conn):
    await conn.execute("CREATE TEMP TABLE copy_t (id int PRIMARY KEY, name text, at date)")
    text_in = b"1\tone\t2024-01-01\n2\t\\N\t2024-01-02\n"
    out("copy_in_text", await conn.copy_to_table("copy_t", source=io.BytesIO(text_in)))
    csv_in = b'id,name,at\n3,"three, quoted",2024-01-03\n'
    out("copy_in_csv", await conn.copy_to_table(
        "copy_t", source=io.BytesIO(csv_in), format="csv", header=True))
    records = [(i, f"name {i}", None) for i in range(10, 50_010)]
    out("copy_in_binary_records", await conn.copy_records_to_table("copy_t", records=records))
    text_out = io.BytesIO()
    out("copy_out_text_status", await conn.copy_from_query(
        "SELECT * FROM copy_t WHERE id < 10 ORDER BY id", output=text_out))
    out("copy_out_text", text_out.getvalue().decode())
    binary_out = io.BytesIO()
    out("copy_out_binary_status", await conn.copy_from_table(
        "copy_t", output=binary_out, format="binary"))
    out("copy_out_binary_length", len(binary_out.getvalue()))
    await conn.execute("CREATE TEMP TABLE copy_b (LIKE copy_t)")
    binary_out.seek(0)
    out("copy_in_binary", await conn.copy_to_table("copy_b", source=binary_out, format="binary"))
    out("copy_bad_row", await expect_error(conn.copy_to_table(
        "copy_t", source=io.BytesIO(b"100\tx\t2024-01-01\nnope\tx\t2024-01-01\n"))))
    out("copy_table_md5", await conn.fetchval(
        "SELECT md5(string_agg(id || coalesce(name, ''), ',' ORDER BY id)) FROM copy_b"))


async def check_binary_and_pipelining(conn):
    row = await conn.fetchrow(
        """SELECT 1::int2 AS i2, 2::int4 AS i4, 3::int8 AS i8, 1.5::float8 AS f8,
           12345.678::numeric AS num, true AS b, 'text' AS t, '\\x00ff'::bytea AS ba,
           '2024-02-29'::date AS d, '2024-02-29 13:14:15.123456+02'::timestamptz AS tz,
           '1 day 02:03:04'::interval AS iv, ARRAY[1, 2, NULL] AS arr,
           ARRAY['a', 'b c'] AS tarr, '{"a": [1, 2]}'::jsonb AS js,
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '10.1.2.3/8'::inet AS ip,
           int4range(1, 10) AS r, NULL::text AS nothing""")
    out("binary_types", dict(row))
    echoed = await conn.fetchrow(
        "SELECT $1::int8, $2::numeric, $3::bytea, $4::text[], $5::timestamptz",
        2**62, "1.25", b"\x00\x01", ["x", None], row["tz"])
    out("binary_parameters", list(echoed))
    await conn.execute("CREATE TEMP TABLE pipe_t (id int PRIMARY KEY, v text)")
    await conn.executemany("INSERT INTO pipe_t VALUES ($1, $2)",
                           [(i, f"v{i}") for i in range(2000)])  # pipelined Bind/Execute
    out("executemany", await conn.fetchrow("SELECT count(*), sum(id), max(v) FROM pipe_t"))
    out("executemany_error", await expect_error(conn.executemany(
        "INSERT INTO pipe_t VALUES ($1, $2)", [(5000, "a"), (1, "duplicate"), (5001, "b")])))
    out("executemany_atomic", await conn.fetchval("SELECT count(*) FROM pipe_t WHERE id >= 5000"))
    async with conn.transaction():
        fetched = [r[0] async for r in conn.cursor(
            "SELECT id FROM pipe_t ORDER BY id", prefetch=100)]  # Execute with a row limit
    out("cursor_prefetch", [len(fetched), fetched[:3], fetched[-1]])
    out("big_value_length", len(await conn.fetchval("SELECT repeat('z', 5000000)")))


async def check_prepared(conn):
    stmt = await conn.prepare("SELECT $1::int + 1 AS next, $2::text || '!' AS shout")
    out("prepared_parameters", [t.name for t in stmt.get_parameters()])
    out("prepared_attributes", [(a.name, a.type.name) for a in stmt.get_attributes()])
    out("prepared_results", [list(await stmt.fetchrow(i, f"s{i}")) for i in range(3)])
    out("prepared_bad_argument", await expect_error(
        conn.fetchval("SELECT $1::int / $2::int", 1, 0)))
    stmts = await conn.fetch("SELECT count(*) > 0 AS named FROM pg_prepared_statements")
    out("named_statements_on_the_server", stmts[0]["named"])


async def check_large_objects(conn):
    async with conn.transaction():
        oid = await conn.fetchval("SELECT lo_from_bytea(0, $1)", bytes(range(256)) * 1024)
        fd = await conn.fetchval("SELECT lo_open($1, 131072 | 262144)", oid)
        out("lo_write", await conn.fetchval("SELECT lowrite($1, $2)", fd, b"patched"))
        out("lo_seek", await conn.fetchval("SELECT lo_lseek64($1, 0, 2)", fd))
        await conn.execute("SELECT lo_close($1)", fd)
        data = await conn.fetchval("SELECT lo_get($1)", oid)
        out("lo_read", [len(data), data[:10], data[-3:]])
        out("lo_unlink", await conn.fetchval("SELECT lo_unlink($1)", oid))


async def check_errors(conn):
    await conn.execute("CREATE TEMP TABLE err_t (id int PRIMARY KEY, v int NOT NULL)")
    await conn.execute("INSERT INTO err_t VALUES (1, 1)")
    out("error_unique", await expect_error(conn.execute("INSERT INTO err_t VALUES (1, 2)")))
    out("error_not_null", await expect_error(conn.execute("INSERT INTO err_t VALUES (2, NULL)")))
    out("error_syntax", await expect_error(conn.execute("SELECT 1 FROM err_t WHERE id = = 1")))
    out("error_raise", await expect_error(conn.execute("""
        DO $$ BEGIN RAISE EXCEPTION 'custom failure %', 42
            USING ERRCODE = 'P0042', DETAIL = 'some detail', HINT = 'a hint',
                  COLUMN = 'col', CONSTRAINT = 'cons', DATATYPE = 'dt', TABLE = 'tab', SCHEMA = 'sch';
        END $$""")))
    out("error_internal_query", await expect_error(
        conn.execute("DO $$ BEGIN PERFORM 1 FROM no_such_table; END $$")))
    notices = []
    conn.add_log_listener(lambda _c, m: notices.append(m.as_dict()))
    await conn.execute("DO $$ BEGIN RAISE NOTICE 'notice %', 1 USING DETAIL = 'notice detail', "
                       "HINT = 'notice hint'; RAISE WARNING 'warning'; END $$")
    out("notices", notices)
    tr = conn.transaction()
    await tr.start()
    await expect_error(conn.execute("SELECT 1 / 0"))
    out("error_in_failed_transaction", await expect_error(conn.execute("SELECT 1")))
    await tr.rollback()
    out("in_transaction_after_rollback", conn.is_in_transaction())


async def main():
    conn = await connect()
    own_pid = await check_session(conn)
    await check_parameter_status(conn)
    await check_notify(conn, own_pid)
    await check_cancel(conn, own_pid)
    await check_copy(conn)
    await check_binary_and_pipelining(conn)
    await check_prepared(conn)
    await check_large_objects(conn)
    await check_errors(conn)
    await conn.close()
    out("end", True)


asyncio.run(main())
