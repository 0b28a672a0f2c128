"""What psycopg2 (libpq underneath) relies on, as a transcript.

Run once against a node and once through the proxy with the same
arguments (host port user password dbname); tests/it/driver_compat.rs
asserts that the two transcripts are equal. Each line is `check<TAB>json`.
Values that legitimately differ between two sessions (PIDs, large object
OIDs, cancel keys) are printed as comparisons ("the pid equals
pg_backend_pid()"), never as themselves. An unexpected exception ends the
script with a non-zero status: only errors a check provokes on purpose are
part of the transcript.
"""

import io
import json
import re
import select
import sys
import threading
import time

try:
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions
except ImportError as e:
    sys.exit(f"psycopg2 is missing ({e}): run .ci/install (Debian package python3-psycopg2)")

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


def connect(**kwargs):
    return psycopg2.connect(
        host=HOST, port=PORT, user=USER, password=PASSWORD, dbname=DBNAME,
        connect_timeout=30, **kwargs)


def error_fields(e):
    d = e.diag
    return {
        "class": type(e).__name__,
        "pgcode": e.pgcode,
        "severity": d.severity,
        "severity_nonlocalized": d.severity_nonlocalized,
        "message": d.message_primary,
        "detail": d.message_detail,
        "hint": d.message_hint,
        "position": d.statement_position,
        "internal_position": d.internal_position,
        "internal_query": d.internal_query,
        "context": d.context,
        "schema": d.schema_name,
        "table": d.table_name,
        "column": d.column_name,
        "datatype": d.datatype_name,
        "constraint": d.constraint_name,
        "routine": d.source_function,
    }


def expect_error(cur, sql, args=None):
    try:
        cur.execute(sql, args)
    except psycopg2.Error as e:
        return error_fields(e)
    raise AssertionError(f"no error from {sql!r}")


def wait_for(what, cond):
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > DEADLINE:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


STARTUP_PARAMETERS = [
    "application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
    "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser",
    "server_encoding", "server_version", "session_authorization",
    "standard_conforming_strings", "TimeZone",
]


def parameters(conn):
    return {p: conn.get_parameter_status(p) for p in STARTUP_PARAMETERS}


def check_session(conn, cur):
    out("protocol_version", conn.protocol_version)
    out("server_version", conn.server_version)
    cur.execute("SELECT pg_backend_pid()")
    real = cur.fetchone()[0]
    out("backend_pid_is_pg_backend_pid",
        conn.get_backend_pid() == real and conn.info.backend_pid == real)
    out("startup_parameters", parameters(conn))
    return real


def check_parameter_status(conn, cur):
    cur.execute("SET application_name = 'compat psycopg2'")
    cur.execute("SET TimeZone = 'Asia/Tokyo'")
    cur.execute("SET DateStyle = 'SQL, DMY'")
    cur.execute("SET IntervalStyle = 'iso_8601'")
    out("parameters_after_set", parameters(conn))
    cur.execute("SELECT '2024-02-29 13:14:15+00'::timestamptz::text, '1 day 2 hours'::interval::text")
    out("values_after_set", cur.fetchone())
    conn.autocommit = False
    cur.execute("SET LOCAL TimeZone = 'America/New_York'")
    out("timezone_in_transaction", conn.get_parameter_status("TimeZone"))
    conn.rollback()
    out("timezone_after_rollback", conn.get_parameter_status("TimeZone"))
    conn.autocommit = True
    cur.execute("RESET ALL")
    out("parameters_after_reset", parameters(conn))


def check_notify(conn, cur, own_pid):
    other = connect()
    other.autocommit = True
    ocur = other.cursor()
    ocur.execute("SELECT pg_backend_pid()")
    other_pid = ocur.fetchone()[0]
    cur.execute("LISTEN compat_channel")
    cur.execute("LISTEN \"Quoted Channel\"")
    cur.execute("NOTIFY compat_channel, 'from myself'")
    ocur.execute("NOTIFY compat_channel, 'from another session'")
    ocur.execute("SELECT pg_notify('Quoted Channel', repeat('x', 7000))")
    other.autocommit = False
    ocur.execute("NOTIFY compat_channel, 'after commit 1'")
    ocur.execute("NOTIFY compat_channel, 'after commit 2'")
    ocur.execute("NOTIFY compat_channel, 'after commit 1'")  # folded into one
    other.commit()
    start = time.monotonic()
    while len(conn.notifies) < 5 and time.monotonic() - start < DEADLINE:
        select.select([conn], [], [], 1)
        conn.poll()
    out("notifications", [
        {"channel": n.channel, "payload": n.payload[:40], "payload_len": len(n.payload),
         "from": "self" if n.pid == own_pid else "other" if n.pid == other_pid else n.pid}
        for n in conn.notifies])
    cur.execute("UNLISTEN *")
    other.close()


def check_cancel(conn, cur, own_pid):
    watcher = connect()
    watcher.autocommit = True
    wcur = watcher.cursor()

    def active():
        wcur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active' "
                     "AND query LIKE 'SELECT pg_sleep(30)%%'", (own_pid,))
        return wcur.fetchone()[0] == 1

    def cancel_when_active():
        wait_for("the statement to run", active)
        conn.cancel()

    thread = threading.Thread(target=cancel_when_active)
    thread.start()
    out("cancel_running_statement", expect_error(cur, "SELECT pg_sleep(30)"))
    thread.join()
    watcher.close()
    cur.execute("SELECT 'usable after a cancel'")
    out("after_cancel", cur.fetchone()[0])
    hit = 0
    for _ in range(40):
        conn.cancel()  # nothing runs: the cancel must land nowhere
        try:
            cur.execute("SELECT pg_sleep(0.01)")
        except psycopg2.errors.QueryCanceled:
            hit += 1
    out("idle_cancels_that_hit_the_next_statement", hit)


def check_copy(conn, cur):
    cur.execute("CREATE TEMP TABLE copy_t (id int PRIMARY KEY, name text, note text, at date)")
    text_in = "1\tone\t\\N\t2024-01-01\n2\ttwo\ttab\\there\t2024-01-02\n3\tthree\t\xe9t\xe9\t2024-01-03\n"
    cur.copy_expert("COPY copy_t FROM STDIN", io.StringIO(text_in))
    out("copy_in_text_rowcount", cur.rowcount)
    csv_in = 'id,name,note,at\n4,"four, with comma","line\nbreak",2024-01-04\n'
    cur.copy_expert("COPY copy_t FROM STDIN WITH (FORMAT csv, HEADER true)", io.StringIO(csv_in))
    out("copy_in_csv_rowcount", cur.rowcount)
    text_out = io.StringIO()
    cur.copy_expert("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT", text_out)
    out("copy_out_text", text_out.getvalue())
    binary_out = io.BytesIO()
    cur.copy_expert("COPY copy_t TO STDOUT WITH (FORMAT binary)", binary_out)
    cur.execute("CREATE TEMP TABLE copy_b (LIKE copy_t)")
    binary_out.seek(0)
    cur.copy_expert("COPY copy_b FROM STDIN WITH (FORMAT binary)", binary_out)
    cur.execute("SELECT count(*), bool_and(a = b) FROM copy_t a JOIN copy_b b USING (id)")
    out("copy_binary_round_trip", cur.fetchone())
    out("copy_in_bad_row", copy_error(cur))
    # Large enough to fill socket buffers both ways (backpressure).
    rows = "".join(f"{i}\tname {i}\t{'n' * (i % 97)}\t2024-01-01\n" for i in range(10, 60_010))
    cur.copy_expert("COPY copy_t FROM STDIN", io.StringIO(rows))
    out("copy_in_large_rowcount", cur.rowcount)
    big_out = io.StringIO()
    cur.copy_expert("COPY copy_t TO STDOUT", big_out)
    out("copy_out_large_length", len(big_out.getvalue()))
    cur.execute("SELECT md5(string_agg(id || name || coalesce(note, ''), ',' ORDER BY id)) FROM copy_t")
    out("copy_table_md5", cur.fetchone()[0])


def copy_error(cur):
    bad = "100\thundred\tx\t2024-01-01\nnot a number\tx\tx\t2024-01-01\n"
    try:
        cur.copy_expert("COPY copy_t FROM STDIN", io.StringIO(bad))
    except psycopg2.Error as e:
        return error_fields(e)
    raise AssertionError("a bad COPY row was accepted")


def check_large_objects(conn):
    conn.autocommit = False
    lob = conn.lobject(0, "wb")  # lo_creat/lo_open/lowrite go through the fastpath
    data = bytes(range(256)) * 4096  # 1 MiB
    out("lo_write", lob.write(data))
    out("lo_tell", lob.tell())
    lob.seek(1000)
    out("lo_overwrite", lob.write(b"patched"))
    lob.truncate(500_000)
    lob.close()
    oid = lob.oid
    conn.commit()
    lob = conn.lobject(oid, "rb")
    content = lob.read()
    out("lo_read", {"length": len(content), "at_1000": content[1000:1007].decode(),
                    "same_prefix": content[:1000] == data[:1000]})
    lob.seek(-10, 2)
    out("lo_seek_end_read", list(lob.read(10)))
    lob.close()
    lob = conn.lobject(oid, "n")
    lob.unlink()
    conn.commit()
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM pg_largeobject_metadata WHERE oid = %s", (oid,))
    out("lo_unlinked", cur.fetchone()[0] == 0)
    try:
        conn.lobject(oid, "rb")
        raise AssertionError("opened an unlinked large object")
    except psycopg2.OperationalError as e:
        out("lo_open_unlinked", {"pgcode": e.pgcode,
                                 "message": str(e).replace(str(oid), "<oid>").strip()})
    conn.rollback()
    conn.autocommit = True


def check_errors(conn, cur):
    cur.execute("CREATE TEMP TABLE err_t (id int PRIMARY KEY, v int NOT NULL CHECK (v > 0))")
    cur.execute("INSERT INTO err_t VALUES (1, 1)")
    out("error_unique", expect_error(cur, "INSERT INTO err_t VALUES (1, 2)"))
    out("error_not_null", expect_error(cur, "INSERT INTO err_t VALUES (2, NULL)"))
    out("error_check", expect_error(cur, "INSERT INTO err_t VALUES (3, -1)"))
    out("error_syntax", expect_error(cur, "SELECT 1 FROM err_t WHERE id = = 1"))
    out("error_undefined_column", expect_error(cur, "SELECT nope FROM err_t"))
    out("error_division", expect_error(cur, "SELECT 1 / 0"))
    out("error_raise", expect_error(cur, """
        DO $$ BEGIN RAISE EXCEPTION 'custom failure %', 42
            USING ERRCODE = 'P0042', DETAIL = 'some detail', HINT = 'a hint',
                  COLUMN = 'col', CONSTRAINT = 'cons', DATATYPE = 'dt', TABLE = 'tab', SCHEMA = 'sch';
        END $$"""))
    out("error_internal_query", expect_error(
        cur, "DO $$ BEGIN PERFORM 1 FROM no_such_table; END $$"))
    conn.notices.clear()
    cur.execute("DO $$ BEGIN RAISE NOTICE 'notice %', 1 USING DETAIL = 'notice detail'; "
                "RAISE WARNING 'warning'; END $$")
    out("notices", list(conn.notices))
    conn.autocommit = False
    cur.execute("SELECT 1")
    out("status_in_transaction", conn.info.transaction_status)
    expect_error(cur, "SELECT 1 / 0")
    out("status_failed", conn.info.transaction_status)
    out("error_in_failed_transaction", expect_error(cur, "SELECT 1"))
    conn.rollback()
    out("status_after_rollback", conn.info.transaction_status)
    conn.autocommit = True


def check_prepared_and_types(cur):
    cur.execute("PREPARE add_one(int, numeric) AS SELECT $1 + 1, $2 * 2, pg_typeof($2)::text")
    results = []
    for i in range(3):
        cur.execute("EXECUTE add_one(%s, %s)", (i, f"{i}.5"))
        results.append(cur.fetchone())
    out("prepared_results", results)
    cur.execute("SELECT name, parameter_types::text[], from_sql FROM pg_prepared_statements")
    out("pg_prepared_statements", cur.fetchall())
    out("prepared_bad_arguments", expect_error(cur, "EXECUTE add_one('x', 1)"))
    cur.execute("DEALLOCATE add_one")
    cur.execute("""SELECT 1::int2, 2::int8, 1.5::float8, 12345.678::numeric, true, 'text',
                   '\\x00ff'::bytea, '2024-02-29'::date, '2024-02-29 13:14:15.123456+02'::timestamptz,
                   '1 day 02:03:04'::interval, ARRAY[1, 2, NULL], '{"a": [1, 2]}'::jsonb,
                   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL::text, repeat('y', 3)""")
    out("types", cur.fetchone())
    cur.execute("SELECT repeat('z', 5000000)")
    out("big_value_length", len(cur.fetchone()[0]))
    cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    rows = cur.fetchall()
    out("many_rows", [len(rows), rows[0], rows[-1]])


def main():
    conn = connect()
    conn.autocommit = True
    cur = conn.cursor()
    own_pid = check_session(conn, cur)
    check_parameter_status(conn, cur)
    check_notify(conn, cur, own_pid)
    check_cancel(conn, cur, own_pid)
    check_copy(conn, cur)
    check_large_objects(conn)
    check_errors(conn, cur)
    check_prepared_and_types(cur)
    conn.close()
    out("end", True)


main()
