"""An asyncpg session that sets state (a named prepared statement through
the extended protocol among it), waits for a switchover, and checks the
state is still in force on the new primary. Prints "ready", waits for a
line on stdin, prints "ok NODE" or fails."""
import asyncio
import sys

import asyncpg


async def main():
    conn = await asyncpg.connect(sys.argv[1], ssl=False)
    await conn.execute("SET search_path = pg_catalog, public")
    notified = asyncio.Queue()
    await conn.add_listener("survive_asyncpg", lambda *args: notified.put_nowait(args[3]))
    plus_one = await conn.prepare("SELECT $1::int + 1")
    before = await conn.fetchval("SELECT current_setting('cluster_name')")
    print("ready", before, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    node = await conn.fetchval("SELECT current_setting('cluster_name')")
    assert node != before, (node, before)
    assert await conn.fetchval("SHOW search_path") == "pg_catalog, public"
    assert await plus_one.fetchval(41) == 42
    await conn.execute("NOTIFY survive_asyncpg, 'after'")
    assert await asyncio.wait_for(notified.get(), 10) == "after"
    await conn.close()
    print("ok", node, flush=True)


asyncio.run(main())
