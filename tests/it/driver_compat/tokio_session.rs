//! tokio-postgres sessions for the transcript in `tokio_pg`: a connection
//! driven by a task that records what arrives outside query results
//! (notifications, notices, ParameterStatus), and the error fields.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::DbError;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::harness::DEADLINE;

/// Parameters whose ParameterStatus the transcript follows.
const PARAMETERS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

/// What the connection task saw outside of query results.
#[derive(Default)]
pub struct Seen {
    /// (channel, payload, sender pid)
    notifications: Vec<(String, String, i32)>,
    pub notices: Vec<String>,
    /// The connection's view of PARAMETERS after its last poll.
    parameters: BTreeMap<String, Option<String>>,
}

pub struct Session {
    pub client: Client,
    pub seen: Arc<Mutex<Seen>>,
}

impl Session {
    pub async fn open(dsn: &str) -> Self {
        let (client, mut connection) = tokio_postgres::connect(dsn, NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        tokio::spawn(async move {
            loop {
                let message = futures_util::future::poll_fn(|cx| {
                    let polled = connection.poll_message(cx);
                    let mut seen = shared.lock().unwrap();
                    for name in PARAMETERS {
                        let value = connection.parameter(name).map(str::to_string);
                        seen.parameters.insert(name.to_string(), value);
                    }
                    polled
                })
                .await;
                match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        shared.lock().unwrap().notifications.push((
                            n.channel().to_string(),
                            n.payload().to_string(),
                            n.process_id(),
                        ))
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        shared.lock().unwrap().notices.push(db_error(&notice))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("connection failed: {e}"),
                    None => return,
                }
            }
        });
        Self { client, seen }
    }

    pub async fn pid(&self) -> i32 {
        self.client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The parameters as last reported: one more round trip first, so that
    /// the connection task has polled past every earlier ParameterStatus.
    pub async fn parameters(&self) -> String {
        self.client.simple_query("").await.unwrap();
        format!("{:?}", self.seen.lock().unwrap().parameters)
    }

    pub async fn wait_for_notifications(&self, count: usize) -> Vec<(String, String, i32)> {
        let start = Instant::now();
        loop {
            let got = self.seen.lock().unwrap().notifications.clone();
            if got.len() >= count {
                return got;
            }
            assert!(start.elapsed() < DEADLINE, "got only {got:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Every field of a server error or notice, in a fixed order.
pub fn db_error(e: &DbError) -> String {
    format!(
        "{} {} {:?} detail={:?} hint={:?} position={:?} where={:?} schema={:?} table={:?} \
         column={:?} datatype={:?} constraint={:?} routine={:?}",
        e.severity(),
        e.code().code(),
        e.message(),
        e.detail(),
        e.hint(),
        e.position(),
        e.where_(),
        e.schema().map(|s| if s.starts_with("pg_temp_") {
            "pg_temp_N"
        } else {
            s
        }),
        e.table(),
        e.column(),
        e.datatype(),
        e.constraint(),
        e.routine()
    )
}

pub fn error_of<T: std::fmt::Debug>(result: Result<T, tokio_postgres::Error>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => match e.as_db_error() {
            Some(db) => db_error(db),
            None => panic!("not a server error: {e}"),
        },
    }
}
