"""A psycopg2 session that sets state, waits for a switchover, and checks
the state is still in force on the new primary (pgfailover's
--client-auth proxy moves idle sessions). It runs as most psycopg2
applications do, outside autocommit: each statement inside a transaction
block that the application commits. Prints "ready", waits for a line on
stdin, prints "ok NODE" or fails."""
import select
import sys

import psycopg2

conn = psycopg2.connect(sys.argv[1])
cur = conn.cursor()
cur.execute("SET search_path = pg_catalog, public")
cur.execute("LISTEN survive_psycopg2")
conn.commit()  # SET and LISTEN take effect here
cur.execute("PREPARE answer AS SELECT 42")
cur.execute("SELECT current_setting('cluster_name')")
before = cur.fetchone()[0]
conn.commit()
print("ready", before, flush=True)
sys.stdin.readline()

cur.execute("SELECT current_setting('cluster_name'), current_setting('search_path')")
node, search_path = cur.fetchone()
assert node != before, (node, before)
assert search_path == "pg_catalog, public", search_path
cur.execute("EXECUTE answer")
assert cur.fetchone() == (42,)
cur.execute("NOTIFY survive_psycopg2, 'after'")
conn.commit()  # the notification is sent at commit
select.select([conn], [], [], 10)
conn.poll()
assert [n.payload for n in conn.notifies] == ["after"], conn.notifies
print("ok", node, flush=True)
