//! psycopg2 (libpq underneath) through the proxy with a plain DSN, the way
//! the seed's Python applications connect.

use std::process::{Command, Output};

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER, python3};
use crate::util::{stderr, stdout};

/// Creates a table, commits one row, rolls another back, and reads back.
const TRANSACTIONS: &str = r#"
import sys, psycopg2
conn = psycopg2.connect(sys.argv[1])
cur = conn.cursor()
cur.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
conn.commit()
cur.execute("INSERT INTO items VALUES (%s, %s)", (1, "committed"))
conn.commit()
cur.execute("INSERT INTO items VALUES (%s, %s)", (2, "rolled back"))
conn.rollback()
cur.execute("SELECT id, name FROM items ORDER BY id")
rows = cur.fetchall()
assert rows == [(1, "committed")], rows
cur.execute("SELECT pg_is_in_recovery()")
assert cur.fetchone() == (False,)
conn.close()
print("ok", rows)
"#;

/// Runs a Python snippet with the DSN as its first argument.
pub fn run_python(script: &str, dsn: &str) -> Output {
    Command::new(python3())
        .arg("-c")
        .arg(script)
        .arg(dsn)
        .output()
        .expect("spawn python3")
}

#[test]
fn psycopg2_transactions() {
    let env = ProxiedCluster::start();
    // The plain DSN an application would use: no options beyond libpq's.
    let dsn = format!(
        "host=127.0.0.1 port={} dbname={APP_DB} user={} password={}",
        env.proxy.port(),
        SCRAM_USER.name,
        SCRAM_USER.password
    );
    let out = run_python(TRANSACTIONS, &dsn);
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).starts_with("ok"), "stdout: {}", stdout(&out));
    // The committed row is really on the primary, and only that one.
    let rows = env
        .cluster
        .primary
        .psql_db(APP_DB, "SELECT id || ':' || name FROM items ORDER BY id");
    assert_eq!(rows, "1:committed");
}
