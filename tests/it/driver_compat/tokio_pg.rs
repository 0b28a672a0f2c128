//! What tokio-postgres (binary formats throughout, requests pipelined on
//! one connection) relies on, as a transcript compared directly and
//! through the proxy like the scripts' (see `mod.rs`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt, pin_mut};
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

use super::tokio_session::{Session, error_of};
use super::{SCRIPT_DEADLINE, assert_same_transcripts};
use crate::harness::{APP_DB, DEADLINE, ProxiedCluster, SCRAM_USER, tcp_dsn};

/// One run of every check against `dsn`.
async fn transcript(dsn: &str) -> Vec<String> {
    let mut t = Vec::new();
    let s = Session::open(dsn).await;
    session_and_parameters(&s, &mut t).await;
    notify(dsn, &s, &mut t).await;
    cancel(dsn, &mut t).await;
    copy(&s.client, &mut t).await;
    binary_and_pipelining(&s.client, &mut t).await;
    prepared_and_portals(&mut Session::open(dsn).await.client, &mut t).await;
    errors_and_large_objects(&s, &mut t).await;
    t.push("end\ttrue".to_string());
    t
}

async fn session_and_parameters(s: &Session, t: &mut Vec<String>) {
    t.push(format!("startup_parameters\t{}", s.parameters().await));
    for set in [
        "SET application_name = 'compat tokio-postgres'",
        "SET TimeZone = 'Asia/Tokyo'",
        "SET DateStyle = 'Postgres, DMY'",
    ] {
        s.client.batch_execute(set).await.unwrap();
    }
    t.push(format!("parameters_after_set\t{}", s.parameters().await));
    s.client
        .batch_execute("BEGIN; SET LOCAL TimeZone = 'America/New_York'")
        .await
        .unwrap();
    t.push(format!(
        "parameters_in_transaction\t{}",
        s.parameters().await
    ));
    s.client.batch_execute("ROLLBACK").await.unwrap();
    t.push(format!(
        "parameters_after_rollback\t{}",
        s.parameters().await
    ));
    let now: String = s
        .client
        .query_one("SELECT '2024-02-29 13:14:15+00'::timestamptz::text", &[])
        .await
        .unwrap()
        .get(0);
    t.push(format!("timestamptz_after_set\t{now:?}"));
    s.client.batch_execute("RESET ALL").await.unwrap();
    t.push(format!("parameters_after_reset\t{}", s.parameters().await));
}

async fn notify(dsn: &str, s: &Session, t: &mut Vec<String>) {
    let own = s.pid().await;
    let other = Session::open(dsn).await;
    let other_pid = other.pid().await;
    s.client
        .batch_execute("LISTEN compat_channel")
        .await
        .unwrap();
    s.client
        .batch_execute("NOTIFY compat_channel, 'from myself'")
        .await
        .unwrap();
    other
        .client
        .batch_execute("NOTIFY compat_channel, 'from another session'")
        .await
        .unwrap();
    other
        .client
        .execute(
            "SELECT pg_notify('compat_channel', $1)",
            &[&"x".repeat(7000)],
        )
        .await
        .unwrap();
    let got: Vec<String> = s
        .wait_for_notifications(3)
        .await
        .into_iter()
        .map(|(channel, payload, pid)| {
            let from = match pid {
                p if p == own => "self".to_string(),
                p if p == other_pid => "other".to_string(),
                p => p.to_string(),
            };
            format!(
                "{channel} {} ({} bytes) from {from}",
                &payload[..payload.len().min(40)],
                payload.len()
            )
        })
        .collect();
    t.push(format!("notifications\t{got:?}"));
    s.client.batch_execute("UNLISTEN *").await.unwrap();
}

/// Cancels a running statement on a session of its own, used for nothing
/// else. `cancel_query` returns once its request is written, and
/// PostgreSQL 15's cancel child signals the backend twice (`signal_child`:
/// the process, then its process group); a second signal that comes late
/// cancels whatever runs next. Seen directly: a COPY 26 ms after the
/// cancelled pg_sleep here, and 2 of 40 statements after a cancel that does
/// not wait for the close with asyncpg's key. libpq and asyncpg wait for
/// the cancel connection's close, which follows both signals.
async fn cancel(dsn: &str, t: &mut Vec<String>) {
    let s = Session::open(dsn).await;
    let own = s.pid().await;
    let watcher = Session::open(dsn).await;
    let token = s.client.cancel_token();
    let sleeping = s.client.simple_query("SELECT pg_sleep(30)");
    let cancelling = async {
        let start = Instant::now();
        loop {
            let active: bool = watcher
                .client
                .query_one(
                    "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1 \
                     AND state = 'active' AND query LIKE 'SELECT pg_sleep(30)%'",
                    &[&own],
                )
                .await
                .unwrap()
                .get(0);
            if active {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "the statement never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        token.cancel_query(NoTls).await.unwrap();
    };
    let (result, ()) = tokio::join!(sleeping, cancelling);
    t.push(format!(
        "cancel_running_statement\t{}",
        error_of(result.map(|_| ()))
    ));
}

async fn copy(client: &Client, t: &mut Vec<String>) {
    client
        .batch_execute("CREATE TEMP TABLE copy_t (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY copy_t FROM STDIN").await.unwrap();
    pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\tone\n2\t\\N\n"))
        .await
        .unwrap();
    for chunk in 0..50 {
        let rows: String = (0..1000)
            .map(|i| format!("{}\tname {i}\n", 10 + chunk * 1000 + i))
            .collect();
        sink.send(Bytes::from(rows)).await.unwrap();
    }
    t.push(format!("copy_in_text\t{}", sink.finish().await.unwrap()));
    let sink = client
        .copy_in("COPY copy_t FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
    pin_mut!(writer);
    for i in 100_000..100_100 {
        let row: [&(dyn ToSql + Sync); 2] = [&i, &format!("binary {i}")];
        writer.as_mut().write(&row).await.unwrap();
    }
    t.push(format!(
        "copy_in_binary\t{}",
        writer.finish().await.unwrap()
    ));
    let out: Vec<Bytes> = client
        .copy_out("COPY (SELECT * FROM copy_t WHERE id < 10 ORDER BY id) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    t.push(format!("copy_out_text\t{:?}", out.concat()));
    let stream = client
        .copy_out("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT (FORMAT binary)")
        .await
        .unwrap();
    let rows: Vec<_> = BinaryCopyOutStream::new(stream, &[Type::INT4, Type::TEXT])
        .try_collect()
        .await
        .unwrap();
    let last = rows.last().map(|r| (r.get::<i32>(0), r.get::<String>(1)));
    t.push(format!(
        "copy_out_binary\t{} rows, last {last:?}",
        rows.len()
    ));
    let md5: String = client
        .query_one(
            "SELECT md5(string_agg(id || coalesce(name, ''), ',' ORDER BY id)) FROM copy_t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    t.push(format!("copy_table_md5\t{md5}"));
    let sink = client.copy_in("COPY copy_t FROM STDIN").await.unwrap();
    pin_mut!(sink);
    let bad = sink.send(Bytes::from_static(b"7\tx\nnope\tx\n")).await;
    let finished = match bad {
        Ok(()) => sink.finish().await,
        Err(e) => Err(e),
    };
    t.push(format!("copy_bad_row\t{}", error_of(finished)));
}

async fn binary_and_pipelining(client: &Client, t: &mut Vec<String>) {
    let row = client
        .query_one(
            "SELECT $1::int2, $2::int4, $3::int8, $4::float8, $5::bool, $6::text, $7::bytea, \
             $8::int4[], $9::text, '2024-02-29 13:14:15.123456+02'::timestamptz::text",
            &[
                &7i16,
                &-8i32,
                &(1i64 << 62),
                &1.5f64,
                &true,
                &"t\u{e9}xt",
                &vec![0u8, 255, 10],
                &vec![Some(1i32), None, Some(3)],
                &None::<&str>,
            ],
        )
        .await
        .unwrap();
    let echoed = format!(
        "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
        row.get::<_, i16>(0),
        row.get::<_, i32>(1),
        row.get::<_, i64>(2),
        row.get::<_, f64>(3),
        row.get::<_, bool>(4),
        row.get::<_, String>(5),
        row.get::<_, Vec<u8>>(6),
        row.get::<_, Vec<Option<i32>>>(7),
        row.get::<_, Option<String>>(8),
        row.get::<_, String>(9),
    );
    t.push(format!("binary_round_trip\t{echoed}"));
    // Sent before any answer is read: tokio-postgres pipelines them.
    let statement = &client.prepare("SELECT 10 / $1::int").await.unwrap();
    let answers = futures_util::future::join_all(
        (-3..=3i32).map(|i| async move { (i, client.query_one(statement, &[&i]).await) }),
    )
    .await;
    let answers: Vec<String> = answers
        .into_iter()
        .map(|(i, r)| match r {
            Ok(row) => format!("{i}: {}", row.get::<_, i32>(0)),
            Err(e) => format!("{i}: {}", e.code().map_or("?", |c| c.code())),
        })
        .collect();
    t.push(format!("pipelined\t{answers:?}"));
    let big: String = client
        .query_one("SELECT repeat('z', 5000000)", &[])
        .await
        .unwrap()
        .get(0);
    t.push(format!("big_value_length\t{}", big.len()));
}

async fn prepared_and_portals(client: &mut Client, t: &mut Vec<String>) {
    let statement = client
        .prepare("SELECT $1::int + 1 AS next, $2::text || '!' AS shout")
        .await
        .unwrap();
    let columns: Vec<String> = statement
        .columns()
        .iter()
        .map(|c| format!("{} {}", c.name(), c.type_()))
        .collect();
    t.push(format!(
        "prepared_statement\t{:?} {columns:?}",
        statement.params()
    ));
    let mut results = Vec::new();
    for i in 0..3 {
        let row = client
            .query_one(&statement, &[&i, &format!("s{i}")])
            .await
            .unwrap();
        results.push(format!(
            "{} {}",
            row.get::<_, i32>(0),
            row.get::<_, String>(1)
        ));
    }
    t.push(format!("prepared_results\t{results:?}"));
    let typed = client
        .prepare_typed("SELECT $1 || ''", &[Type::VARCHAR])
        .await
        .unwrap();
    t.push(format!("prepared_typed\t{:?}", typed.params()));
    t.push(format!(
        "prepare_error\t{}",
        error_of(client.prepare("SELECT 1 FROM nowhere WHERE").await)
    ));
    let tx = client.transaction().await.unwrap();
    let portal = tx
        .bind("SELECT g FROM generate_series(1, 2500) g", &[])
        .await
        .unwrap();
    let mut batches = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 1000).await.unwrap();
        if rows.is_empty() {
            break;
        }
        batches.push(rows.len());
    }
    tx.commit().await.unwrap();
    t.push(format!("portal_batches\t{batches:?}"));
}

async fn errors_and_large_objects(s: &Session, t: &mut Vec<String>) {
    let client = &s.client;
    client
        .batch_execute(
            "CREATE TEMP TABLE err_t (id int PRIMARY KEY, v int NOT NULL); \
             INSERT INTO err_t VALUES (1, 1)",
        )
        .await
        .unwrap();
    for (name, sql) in [
        ("error_unique", "INSERT INTO err_t VALUES (1, 2)"),
        ("error_not_null", "INSERT INTO err_t VALUES (2, NULL)"),
        ("error_syntax", "SELECT 1 FROM err_t WHERE id = = 1"),
        (
            "error_raise",
            "DO $$ BEGIN RAISE EXCEPTION 'custom failure %', 42 USING ERRCODE = 'P0042', \
             DETAIL = 'some detail', HINT = 'a hint', COLUMN = 'col', CONSTRAINT = 'cons', \
             DATATYPE = 'dt', TABLE = 'tab', SCHEMA = 'sch'; END $$",
        ),
        (
            "error_internal_query",
            "DO $$ BEGIN PERFORM 1 FROM no_such_table; END $$",
        ),
    ] {
        t.push(format!(
            "{name}\t{}",
            error_of(client.execute(sql, &[]).await)
        ));
    }
    client
        .batch_execute(
            "DO $$ BEGIN RAISE NOTICE 'notice %', 1 USING DETAIL = 'notice detail'; \
             RAISE WARNING 'warning'; END $$",
        )
        .await
        .unwrap();
    client.simple_query("").await.unwrap();
    t.push(format!("notices\t{:?}", s.seen.lock().unwrap().notices));
    let data: Vec<u8> = (0..262_144u32).map(|i| (i % 256) as u8).collect();
    client.batch_execute("BEGIN").await.unwrap();
    let oid: u32 = client
        .query_one("SELECT lo_from_bytea(0, $1)", &[&data])
        .await
        .unwrap()
        .get(0);
    client
        .execute("SELECT lo_put($1, 1000, 'patched')", &[&oid])
        .await
        .unwrap();
    let back: Vec<u8> = client
        .query_one("SELECT lo_get($1)", &[&oid])
        .await
        .unwrap()
        .get(0);
    let unlinked: i32 = client
        .query_one("SELECT lo_unlink($1)", &[&oid])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    t.push(format!(
        "lo_round_trip\t{} {:?} {unlinked}",
        back.len(),
        String::from_utf8_lossy(&back[1000..1007])
    ));
}

const CHECKS: &[&str] = &[
    "startup_parameters",
    "parameters_after_set",
    "parameters_after_rollback",
    "notifications",
    "cancel_running_statement",
    "copy_in_text",
    "copy_in_binary",
    "copy_out_text",
    "copy_out_binary",
    "copy_table_md5",
    "copy_bad_row",
    "binary_round_trip",
    "pipelined",
    "prepared_statement",
    "prepared_results",
    "prepare_error",
    "portal_batches",
    "error_unique",
    "error_raise",
    "notices",
    "lo_round_trip",
    "end",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_sees_through_the_proxy_what_it_sees_directly() {
    let env = ProxiedCluster::start();
    let dsn = |port| tcp_dsn(port, SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let run =
        |port| tokio::time::timeout(SCRIPT_DEADLINE, async move { transcript(&dsn(port)).await });
    let direct = run(env.cluster.primary.port())
        .await
        .expect("the direct run ends in time");
    let proxied = run(env.proxy.port())
        .await
        .expect("the run through the proxy ends in time");
    assert_same_transcripts("tokio-postgres", CHECKS, &direct, &proxied);
}
