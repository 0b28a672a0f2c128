//! Monitoring and control connections to a node: one tokio-postgres
//! configuration for the probes and the coordinator's SQL, over TLS when
//! `--backend-tls` asks for it (through the same rustls connector as the
//! sessions, so a node reachable only by `hostssl` is monitored too, and
//! the conninfo the coordinator writes to standbys never crosses in clear).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, NoTls, Socket};

use crate::config::{MonitorConfig, NodeSpec};

/// Opens a connection to `node` as the monitor user, driving it on its own
/// task. `limit` bounds the TCP connect only; callers bound the rest.
pub async fn connect(
    config: &MonitorConfig,
    node: &NodeSpec,
    application_name: &str,
    limit: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&node.host)
        .port(node.port)
        .user(&config.user)
        .dbname(&config.dbname)
        .application_name(application_name)
        .connect_timeout(limit);
    if let Some(password) = &config.password {
        pg.password(password.expose());
    }
    let name = node.name.clone();
    let log_close = move |result: Result<(), tokio_postgres::Error>| {
        if let Err(e) = result {
            tracing::debug!(node = %name, error = %e, "monitoring connection closed");
        }
    };
    match &config.tls {
        None => {
            let (client, connection) = pg.connect(NoTls).await?;
            tokio::spawn(async move { log_close(connection.await) });
            Ok(client)
        }
        Some(tls) => {
            pg.ssl_mode(SslMode::Require);
            let (client, connection) = pg.connect(Rustls(tls.connector.clone())).await?;
            tokio::spawn(async move { log_close(connection.await) });
            Ok(client)
        }
    }
}

/// tokio-postgres's TLS hooks over a rustls connector.
#[derive(Clone)]
struct Rustls(tokio_rustls::TlsConnector);

impl MakeTlsConnect<Socket> for Rustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = rustls_pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            connector: self.0.clone(),
            name: ServerName::try_from(host.to_owned())?,
        })
    }
}

struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl TlsStream for RustlsStream {
    /// No channel binding: with `--backend-tls require` the node is not
    /// verified, and binding adds nothing the monitor needs.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_shutdown(cx)
    }
}
