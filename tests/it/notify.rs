//! LISTEN/NOTIFY between two sessions that both go through the proxy: the
//! NotificationResponse arrives asynchronously, outside any query, so the
//! relay must forward backend bytes even when the client sent nothing.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

use crate::harness::{APP_DB, ProxiedCluster, SCRAM_USER};
use crate::util::{connect, describe};

/// Connects and forwards the connection's notifications into a channel.
async fn connect_listening(dsn: &str) -> (Client, mpsc::UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {}", describe(&e)));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("listener connection error: {}", describe(&e));
                    break;
                }
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_between_proxied_sessions() {
    let env = ProxiedCluster::start();
    let dsn = env.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let (listener, mut notifications) = connect_listening(&dsn).await;
    listener.batch_execute("LISTEN jobs").await.unwrap();

    let notifier = connect(&dsn).await;
    for i in 0..3 {
        notifier
            .batch_execute(&format!("NOTIFY jobs, 'job {i}'"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let n = tokio::time::timeout(Duration::from_secs(30), notifications.recv())
            .await
            .unwrap_or_else(|_| panic!("notification {i} not received within 30 s"))
            .expect("listener connection closed");
        assert_eq!(
            (n.channel(), n.payload()),
            ("jobs", format!("job {i}").as_str())
        );
    }
    // The listening session still answers queries after the notifications.
    listener.simple_query("SELECT 1").await.unwrap();
}
