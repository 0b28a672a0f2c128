// What node-postgres (`pg`, pure JavaScript protocol) relies on, as a
// transcript.
//
// Run once against a node and once through the proxy with the same
// arguments (host port user password dbname); tests/it/driver_compat.rs
// asserts that the two transcripts are equal. Each line is
// `check<TAB>json`. PIDs and large object OIDs are printed as comparisons,
// never as values. An unexpected error ends the script with status 1.
'use strict'
// pg's own cancel() reads the deprecated Client.activeQuery.
process.noDeprecation = true

let pg, copyStreams
try {
  pg = require('pg')
  copyStreams = require('pg-copy-streams')
} catch (e) {
  console.error(`node-postgres is missing (${e.message}): run .ci/install (npm ci in tests/drivers/node)`)
  process.exit(2)
}
const { pipeline } = require('node:stream/promises')
const { Readable, Writable } = require('node:stream')

const [host, port, user, password, database] = process.argv.slice(2, 7)
const DEADLINE_MS = 60000

function plain(_key, value) {
  if (value && value.type === 'Buffer' && Array.isArray(value.data)) {
    return '\\x' + Buffer.from(value.data).toString('hex')
  }
  if (typeof value === 'bigint') return `${value}n`
  return value
}

// Keys sorted, so that the transcript does not depend on insertion order.
function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical)
  if (value && typeof value === 'object' && !Buffer.isBuffer(value) && !(value instanceof Date)) {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]))
  }
  return value
}

function out(check, value) {
  const line = JSON.stringify(canonical(value), plain).replace(/pg_temp_[0-9]+/g, 'pg_temp_N')
  process.stdout.write(`${check}\t${line}\n`)
}

function newClient(extra = {}) {
  return new pg.Client({ host, port: Number(port), user, password, database, connectionTimeoutMillis: 30000, ...extra })
}

async function connect(extra) {
  const client = newClient(extra)
  await client.connect()
  return client
}

const ERROR_FIELDS = ['severity', 'code', 'detail', 'hint', 'position', 'internalPosition', 'internalQuery',
  'where', 'schema', 'table', 'column', 'dataType', 'constraint', 'routine']

function errorFields(e) {
  if (!(e instanceof pg.DatabaseError)) throw e
  const fields = { message: e.message }
  for (const f of ERROR_FIELDS) fields[f] = e[f] === undefined ? null : e[f]
  return fields
}

async function expectError(promise) {
  try {
    await promise
  } catch (e) {
    return errorFields(e)
  }
  throw new Error('no error')
}

async function waitFor(what, cond) {
  const start = Date.now()
  while (!(await cond())) {
    if (Date.now() - start > DEADLINE_MS) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

async function checkSession() {
  const client = newClient()
  const statuses = []
  // Every ParameterStatus the server sends, in order, startup included.
  client.connection.on('parameterStatus', (m) => statuses.push([m.parameterName, m.parameterValue]))
  await client.connect()
  const { rows } = await client.query('SELECT pg_backend_pid() AS pid')
  out('backend_pid_is_pg_backend_pid', client.processID === rows[0].pid)
  out('startup_parameter_status', statuses.splice(0))
  await client.query("SET application_name = 'compat node-postgres'")
  await client.query("SET TimeZone = 'Asia/Tokyo'")
  await client.query('SET DateStyle = ISO, DMY')
  await client.query('BEGIN')
  await client.query("SET LOCAL TimeZone = 'America/New_York'")
  await client.query('ROLLBACK')
  await client.query('RESET ALL')
  out('parameter_status_after_set', statuses.splice(0))
  return { client, pid: rows[0].pid }
}

async function checkNotify(client, ownPid) {
  const other = await connect()
  const otherPid = (await other.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
  const received = []
  client.on('notification', (n) => {
    const from = n.processId === ownPid ? 'self' : n.processId === otherPid ? 'other' : n.processId
    received.push({ channel: n.channel, payload: n.payload.slice(0, 40), payload_len: n.payload.length, from })
  })
  await client.query('LISTEN compat_channel')
  await client.query("NOTIFY compat_channel, 'from myself'")
  await other.query("NOTIFY compat_channel, 'from another session'")
  await other.query("SELECT pg_notify('compat_channel', repeat('x', 7000))")
  await waitFor('three notifications', async () => received.length >= 3)
  out('notifications', received)
  await client.query('UNLISTEN *')
  await other.end()
}

// On a client of its own, used for nothing else: pg's cancel() does not
// wait for the node to close the cancel connection, and PostgreSQL may
// deliver its signal late enough to cancel the next statement too (seen
// directly with tokio-postgres, which does the same).
async function checkCancel() {
  const client = await connect()
  const ownPid = (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid
  const watcher = await connect()
  const query = new pg.Query('SELECT pg_sleep(30)')
  const result = new Promise((resolve) => {
    query.on('error', (e) => resolve(errorFields(e)))
    query.on('end', () => resolve('not cancelled'))
  })
  client.query(query)
  await waitFor('the statement to run', async () => {
    const r = await watcher.query(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1 AND state = 'active' " +
        "AND query LIKE 'SELECT pg_sleep(30)%'", [ownPid])
    return r.rows[0].n === 1
  })
  newClient().cancel(client, query) // a CancelRequest on a connection of its own
  out('cancel_running_statement', await result)
  await watcher.end()
  await client.end()
}

async function checkCopy(client) {
  await client.query('CREATE TEMP TABLE copy_t (id int PRIMARY KEY, name text, at date)')
  const textIn = client.query(copyStreams.from('COPY copy_t FROM STDIN'))
  await pipeline(Readable.from(['1\tone\t2024-01-01\n2\t\\N\t2024-01-02\n']), textIn)
  out('copy_in_text_rowcount', textIn.rowCount)
  const lines = []
  for (let i = 10; i < 50010; i++) lines.push(`${i}\tname ${i}\t2024-01-01\n`)
  const bigIn = client.query(copyStreams.from('COPY copy_t FROM STDIN'))
  await pipeline(Readable.from(lines), bigIn)
  out('copy_in_large_rowcount', bigIn.rowCount)
  const chunks = []
  const sink = new Writable({ write(chunk, _enc, done) { chunks.push(chunk); done() } })
  const textOut = client.query(copyStreams.to('COPY (SELECT * FROM copy_t WHERE id < 10 ORDER BY id) TO STDOUT'))
  await pipeline(textOut, sink)
  out('copy_out_text', Buffer.concat(chunks).toString())
  const binChunks = []
  const binSink = new Writable({ write(chunk, _enc, done) { binChunks.push(chunk); done() } })
  await pipeline(client.query(copyStreams.to('COPY copy_t TO STDOUT (FORMAT binary)')), binSink)
  const binary = Buffer.concat(binChunks)
  out('copy_out_binary_length', binary.length)
  await client.query('CREATE TEMP TABLE copy_b (LIKE copy_t)')
  const binIn = client.query(copyStreams.from('COPY copy_b FROM STDIN (FORMAT binary)'))
  await pipeline(Readable.from([binary]), binIn)
  out('copy_in_binary_rowcount', binIn.rowCount)
  out('copy_bad_row', await expectError(pipeline(
    Readable.from(['100\tx\t2024-01-01\nnope\tx\t2024-01-01\n']),
    client.query(copyStreams.from('COPY copy_t FROM STDIN')))))
  const md5 = await client.query("SELECT md5(string_agg(id || coalesce(name, ''), ',' ORDER BY id)) AS m FROM copy_b")
  out('copy_table_md5', md5.rows[0].m)
}

const TYPES_SQL = `SELECT 1::int2 AS i2, 2::int4 AS i4, 3::int8 AS i8, 1.5::float8 AS f8,
  12345.678::numeric AS num, true AS b, 'text' AS t, '\\x00ff'::bytea AS ba, '2024-02-29'::date AS d,
  '2024-02-29 13:14:15.123+02'::timestamptz AS tz, '1 day 02:03:04'::interval AS iv,
  ARRAY[1, 2, NULL] AS arr, '{"a": [1, 2]}'::jsonb AS js,
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, NULL::text AS nothing, $1::text AS param`

async function checkExtended(client) {
  out('text_types', (await client.query(TYPES_SQL, ['p'])).rows[0])
  // Results in binary format, printed as bytes. pg-protocol decodes every
  // DataRow field as UTF-8 first, so bytes that are not UTF-8 come out as
  // EF BF BD (U+FFFD): lossy, but the same directly and through the proxy.
  const raw = { getTypeParser: () => (value) => Buffer.isBuffer(value) ? value : Buffer.from(value, 'binary') }
  out('binary_types', (await client.query({ text: TYPES_SQL, values: ['p'], binary: true, types: raw })).rows[0])
  const named = []
  for (let i = 0; i < 3; i++) {
    const r = await client.query({ name: 'add_one', text: 'SELECT $1::int + 1 AS next, $2::text AS s', values: [i, `s${i}`] })
    named.push(r.rows[0])
  }
  out('prepared_results', named)
  const prepared = await client.query('SELECT name, parameter_types::text[] AS types FROM pg_prepared_statements')
  out('prepared_on_the_server', prepared.rows)
  out('prepared_bad_argument', await expectError(
    client.query({ name: 'add_one', text: 'SELECT $1::int + 1 AS next, $2::text AS s', values: ['x', 's'] })))
  const cursorRows = await client.query({ text: 'SELECT g FROM generate_series(1, 20000) g', rowMode: 'array' })
  out('many_rows', [cursorRows.rowCount, cursorRows.rows[0], cursorRows.rows[19999]])
  out('big_value_length', (await client.query("SELECT repeat('z', 5000000) AS z")).rows[0].z.length)
}

async function checkPipeline() {
  const client = await connect({ pipeline: true })
  await client.query('CREATE TEMP TABLE pipe_t (id int PRIMARY KEY)')
  const queries = []
  for (let i = 0; i < 200; i++) queries.push(client.query('INSERT INTO pipe_t VALUES ($1) RETURNING id', [i % 150]))
  queries.push(client.query('SELECT count(*)::int AS n FROM pipe_t'))
  const settled = await Promise.allSettled(queries)
  out('pipeline_outcomes', settled.map((s) => s.status === 'fulfilled' ? s.value.rows[0] : errorFields(s.reason).code))
  await client.end()
}

async function checkLargeObjects(client) {
  await client.query('BEGIN')
  const data = Buffer.alloc(262144).map((_v, i) => i % 256)
  const oid = (await client.query('SELECT lo_from_bytea(0, $1) AS oid', [data])).rows[0].oid
  const fd = (await client.query('SELECT lo_open($1, 131072 | 262144) AS fd', [oid])).rows[0].fd
  out('lo_write', (await client.query('SELECT lowrite($1, $2) AS n', [fd, Buffer.from('patched')])).rows[0].n)
  await client.query('SELECT lo_close($1)', [fd])
  const got = (await client.query('SELECT lo_get($1) AS data', [oid])).rows[0].data
  out('lo_read', [got.length, got.subarray(0, 10), got.subarray(-3)])
  out('lo_unlink', (await client.query('SELECT lo_unlink($1) AS r', [oid])).rows[0].r)
  await client.query('COMMIT')
}

async function checkErrors(client) {
  await client.query('CREATE TEMP TABLE err_t (id int PRIMARY KEY, v int NOT NULL)')
  await client.query('INSERT INTO err_t VALUES (1, 1)')
  out('error_unique', await expectError(client.query('INSERT INTO err_t VALUES (1, 2)')))
  out('error_not_null', await expectError(client.query('INSERT INTO err_t VALUES ($1, $2)', [2, null])))
  out('error_syntax', await expectError(client.query('SELECT 1 FROM err_t WHERE id = = 1')))
  out('error_raise', await expectError(client.query(`
    DO $$ BEGIN RAISE EXCEPTION 'custom failure %', 42
      USING ERRCODE = 'P0042', DETAIL = 'some detail', HINT = 'a hint',
            COLUMN = 'col', CONSTRAINT = 'cons', DATATYPE = 'dt', TABLE = 'tab', SCHEMA = 'sch';
    END $$`)))
  out('error_internal_query', await expectError(client.query('DO $$ BEGIN PERFORM 1 FROM no_such_table; END $$')))
  const notices = []
  client.on('notice', (n) => notices.push({ message: n.message, severity: n.severity, detail: n.detail, hint: n.hint, where: n.where }))
  await client.query("DO $$ BEGIN RAISE NOTICE 'notice %', 1 USING DETAIL = 'notice detail'; RAISE WARNING 'warning'; END $$")
  out('notices', notices)
  await client.query('BEGIN')
  await expectError(client.query('SELECT 1 / 0'))
  out('error_in_failed_transaction', await expectError(client.query('SELECT 1')))
  await client.query('ROLLBACK')
}

async function main() {
  const { client, pid } = await checkSession()
  await checkNotify(client, pid)
  await checkCancel()
  await checkCopy(client)
  await checkExtended(client)
  await checkPipeline()
  await checkLargeObjects(client)
  await checkErrors(client)
  await client.end()
  out('end', true)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
