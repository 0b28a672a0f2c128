//! A tokio-postgres TLS connector over rustls. tokio-postgres can open
//! PostgreSQL 17's direct TLS (`sslnegotiation=direct`), which the
//! machine's psql 15 cannot, but it leaves ALPN to the connector: the
//! tests choose what to offer, including nothing.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// ALPN protocol name PostgreSQL 17 requires for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Makes connectors that verify the server against one CA and offer the
/// given ALPN protocols.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    /// The ALPN protocol the server chose in the last handshake, kept
    /// because tokio-postgres does not hand its stream back (libpq 17
    /// refuses a direct TLS server that chose none).
    chosen_alpn: Arc<Mutex<Option<Vec<u8>>>>,
}

impl RustlsConnect {
    pub fn new(ca: &Path, alpn: &[&[u8]]) -> Self {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("read the CA") {
            roots.add(cert.expect("a CA certificate")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Self {
            config: Arc::new(config),
            chosen_alpn: Arc::default(),
        }
    }

    pub fn chosen_alpn(&self) -> Option<Vec<u8>> {
        self.chosen_alpn.lock().expect("ALPN slot").clone()
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnector> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| io::Error::other(format!("{domain}: {e}")))?;
        Ok(RustlsConnector {
            config: Arc::clone(&self.config),
            name,
            chosen_alpn: Arc::clone(&self.chosen_alpn),
        })
    }
}

pub struct RustlsConnector {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    chosen_alpn: Arc<Mutex<Option<Vec<u8>>>>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            let tls = connector.connect(self.name, stream).await?;
            let chosen = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            *self.chosen_alpn.lock().expect("ALPN slot") = chosen;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// The TLS stream tokio-postgres drives (a local type, so it can carry
/// tokio-postgres's trait).
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // The proxy ends TLS, so channel binding cannot reach the node.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
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
