//! TLS toward clients: certificates made at test time (rcgen), real psql
//! and libpq behaviour (sslmode=require, verify-full, channel binding),
//! and PostgreSQL 17's direct TLS through tokio-postgres (psql here is 15).

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};

use crate::harness::{APP_DB, DEADLINE, ProxiedCluster, SCRAM_USER, TempDir, wait_until};
use crate::rustls_connect::{ALPN_POSTGRESQL, RustlsConnect};
use crate::util::{describe, psql, stderr, stdout};
use crate::wire::{self, SSL_REQUEST_CODE, packet, read_to_close};

/// A test CA and a server certificate for `localhost` and 127.0.0.1.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = TempDir::new("pgf-pki");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf whose subject equals its issuer looks
        // self-signed to OpenSSL.
        ca_params.distinguished_name = distinguished_name("pgfailover test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        server_params.distinguished_name = distinguished_name("localhost");
        let server = server_params
            .signed_by(&server_key, &ca)
            .expect("server certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        std::fs::write(dir.path().join("server.pem"), server.pem()).expect("write cert");
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem())
            .expect("write key");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn proxy_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.pem").display().to_string(),
            "--tls-key".into(),
            self.path("server.key").display().to_string(),
        ]
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn start(pki: &Pki, extra: &[&str]) -> ProxiedCluster {
    let mut args = pki.proxy_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ProxiedCluster::start_with(&args)
}

#[test]
fn psql_connects_with_sslmode_require_and_verify_full() {
    let pki = Pki::new();
    let proxied = start(&pki, &[]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let sql = "SELECT 'ok'";
    let out = psql(&format!("{dsn} sslmode=require"), &["-c", sql]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "ok");

    let verify = format!(
        "{} host=localhost sslmode=verify-full sslrootcert={}",
        dsn,
        pki.path("ca.pem").display()
    );
    let out = psql(&verify, &["-c", "SELECT 1"]);
    assert!(out.status.success(), "verify-full: {}", stderr(&out));

    // A SCRAM user whose client prefers channel binding still logs in:
    // the proxy does not offer SCRAM-SHA-256-PLUS across its TLS end.
    let out = psql(
        &format!("{dsn} sslmode=require channel_binding=prefer"),
        &["-c", "SELECT 2"],
    );
    assert!(
        out.status.success(),
        "channel_binding=prefer: {}",
        stderr(&out)
    );
}

/// With authentication at the proxy, a client's TLS ends where its SCRAM
/// does: the proxy offers SCRAM-SHA-256-PLUS bound to its own certificate,
/// so libpq's `channel_binding=require` (which refuses anything else)
/// logs in. Pass-through cannot offer it (the test above).
#[test]
fn proxy_auth_binds_scram_to_the_proxys_tls() {
    let pki = Pki::new();
    let proxied = start(&pki, &["--client-auth", "proxy"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let out = psql(
        &format!("{dsn} sslmode=require channel_binding=require"),
        &["-c", "SELECT current_user"],
    );
    assert!(
        out.status.success(),
        "channel_binding=require: {}",
        stderr(&out)
    );
    assert_eq!(stdout(&out).trim(), SCRAM_USER.name);
    let wrong = proxied.dsn(SCRAM_USER.name, "wrong", APP_DB);
    let out = psql(
        &format!("{wrong} sslmode=require channel_binding=require"),
        &["-c", "SELECT 1"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("password authentication failed for user \"scram_user\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tls_mode_require_refuses_plaintext_clients() {
    let pki = Pki::new();
    let proxied = start(&pki, &["--tls-mode", "require"]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let out = psql(&format!("{dsn} sslmode=disable"), &["-c", "SELECT 1"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("SSL connection is required"), "{err}");
    let (code, _) = wire::error_for(
        proxied.proxy.port(),
        &wire::startup(SCRAM_USER.name, APP_DB),
    );
    assert_eq!(code, "28000");
    let out = psql(&format!("{dsn} sslmode=require"), &["-c", "SELECT 1"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn plaintext_pipelined_after_ssl_request_is_refused_before_the_handshake() {
    let pki = Pki::new();
    let proxied = start(&pki, &[]);
    let mut bytes = packet(SSL_REQUEST_CODE, b"");
    bytes.extend(wire::startup(SCRAM_USER.name, APP_DB));
    let mut stream = wire::connect(proxied.proxy.port());
    std::io::Write::write_all(&mut stream, &bytes).expect("send");
    let reply = read_to_close(&mut stream);
    assert_ne!(
        reply.first(),
        Some(&b'S'),
        "no TLS for a poisoned SSLRequest"
    );
    let (code, message) = wire::first_error(&reply).expect("an ErrorResponse");
    assert_eq!(code, "08P01");
    assert!(
        message.contains("unencrypted data after SSL request"),
        "{message}"
    );
}

/// Turns on TLS in a running node with the test PKI's server certificate.
fn enable_node_tls(node: &crate::harness::PgNode, pki: &Pki) {
    for (from, to) in [("server.pem", "tls.crt"), ("server.key", "tls.key")] {
        let dest = node.data_dir().join(to);
        std::fs::copy(pki.path(from), &dest).expect("copy TLS file");
        std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dest)
            .status()
            .expect("chown");
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    }
    node.psql("ALTER SYSTEM SET ssl_cert_file = 'tls.crt'");
    node.psql("ALTER SYSTEM SET ssl_key_file = 'tls.key'");
    node.psql("ALTER SYSTEM SET ssl = on");
    node.psql("SELECT pg_reload_conf()");
    crate::harness::wait_until("the node serves TLS", crate::harness::DEADLINE, || {
        node.try_psql("SHOW ssl").is_ok_and(|v| v == "on")
    });
}

#[test]
fn backend_tls_verify_full_encrypts_the_proxy_to_node_leg() {
    let pki = Pki::new();
    let cluster = crate::harness::PgCluster::primary_with_standby();
    enable_node_tls(&cluster.primary, &pki);
    enable_node_tls(&cluster.standby, &pki);
    let ca = pki.path("ca.pem").display().to_string();
    let mut args = pki.proxy_args();
    args.extend(["--backend-tls", "verify-full", "--backend-tls-ca", &ca].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = crate::harness::ProxyProcess::start(&cluster.nodes(), &args);
    let dsn = proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let out = psql(&format!("{dsn} sslmode=disable"), &["-c", sql]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "t",
        "the proxy's session to the node is encrypted"
    );
    // So are its monitoring connections (the probes and the control SQL).
    let monitors = "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
                    JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'pgfailover-monitor'";
    for node in [&cluster.primary, &cluster.standby] {
        assert_eq!(
            node.psql(monitors),
            "1|1",
            "{}'s monitoring connection",
            node.name
        );
    }

    // Client TLS ending at the proxy, node TLS starting at it. Channel
    // binding cannot cross the proxy, so such a client disables it (with
    // channel_binding=prefer the node would see a downgrade: see README).
    let out = psql(
        &format!("{dsn} sslmode=require channel_binding=disable"),
        &["-c", sql],
    );
    assert!(
        out.status.success(),
        "client and node TLS: {}",
        stderr(&out)
    );

    // A CA that did not sign the node's certificate: the proxy refuses it.
    let other = Pki::new();
    let wrong = other.path("ca.pem").display().to_string();
    let proxy = crate::harness::ProxyProcess::start(
        &cluster.nodes(),
        &[
            "--backend-tls",
            "verify-full",
            "--backend-tls-ca",
            &wrong,
            "--hold-timeout",
            "2s",
        ],
    );
    let dsn = proxy.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let out = psql(&dsn, &["-c", "SELECT 1"]);
    assert!(!out.status.success(), "an unverified node must not be used");
    // The monitor cannot verify the nodes either, and the client is told.
    assert!(
        stderr(&out).contains("n1: suspect (invalid peer certificate"),
        "{}",
        stderr(&out)
    );
}

/// Connects through tokio-postgres with `sslnegotiation=direct`: the TLS
/// ClientHello is the first thing on the connection, as from libpq 17.
async fn connect_direct(
    dsn: &str,
    tls: &RustlsConnect,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let dsn = format!("{dsn} sslmode=require sslnegotiation=direct");
    let (client, connection) = tokio_postgres::connect(&dsn, tls.clone()).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The error with its causes: tokio-postgres's own text for a TLS
/// failure ("error performing TLS handshake") leaves out rustls's reason.
fn with_causes(error: &tokio_postgres::Error) -> String {
    let mut text = describe(error);
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text.push_str(&format!(": {e}"));
        cause = e.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_postgresql_logs_in_and_runs_queries() {
    let pki = Pki::new();
    // --tls-mode require: a direct TLS session counts as encrypted.
    let proxied = start(&pki, &["--tls-mode", "require"]);
    let tls = RustlsConnect::new(&pki.path("ca.pem"), &[ALPN_POSTGRESQL]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let client = connect_direct(&dsn, &tls)
        .await
        .unwrap_or_else(|e| panic!("direct TLS through the proxy: {}", with_causes(&e)));
    assert_eq!(
        tls.chosen_alpn().as_deref(),
        Some(ALPN_POSTGRESQL),
        "libpq 17 refuses a direct TLS server that does not choose ALPN postgresql"
    );
    let row = client
        .query_one("SELECT current_user::text, 1 + 1", &[])
        .await
        .expect("a query over direct TLS");
    assert_eq!(row.get::<_, String>(0), SCRAM_USER.name);
    assert_eq!(row.get::<_, i32>(1), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_alpn_postgresql_is_refused() {
    let pki = Pki::new();
    let proxied = start(&pki, &[]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);

    // No ALPN at all: like PostgreSQL 17, refused after the handshake
    // (the client is told why, inside TLS).
    let no_alpn = RustlsConnect::new(&pki.path("ca.pem"), &[]);
    let Err(error) = connect_direct(&dsn, &no_alpn).await else {
        panic!("direct TLS without ALPN must be refused");
    };
    let text = with_causes(&error);
    assert!(text.starts_with("08P01"), "{text}");
    assert!(text.contains("ALPN"), "{text}");

    // Another protocol's ALPN (an HTTPS client, say): no handshake.
    let http = RustlsConnect::new(&pki.path("ca.pem"), &[b"http/1.1"]);
    let Err(error) = connect_direct(&dsn, &http).await else {
        panic!("direct TLS with ALPN http/1.1 must be refused");
    };
    let text = with_causes(&error);
    assert!(text.contains("NoApplicationProtocol"), "{text}");
    wait_until("the proxy logs the failed handshake", DEADLINE, || {
        proxied.proxy.log().contains("TLS handshake failed")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_to_a_proxy_without_tls_is_refused_with_a_clear_log_line() {
    let pki = Pki::new();
    let proxied = ProxiedCluster::start();
    let tls = RustlsConnect::new(&pki.path("ca.pem"), &[ALPN_POSTGRESQL]);
    let dsn = proxied.dsn(SCRAM_USER.name, SCRAM_USER.password, APP_DB);
    let Err(error) = connect_direct(&dsn, &tls).await else {
        panic!("a proxy without a certificate cannot accept direct TLS");
    };
    // The client speaks TLS, so it hears a TLS alert, not an ErrorResponse.
    let text = with_causes(&error);
    assert!(text.contains("HandshakeFailure"), "{text}");
    wait_until("the proxy logs why it refused", DEADLINE, || {
        proxied
            .proxy
            .log()
            .contains("sslnegotiation=direct) but TLS is not configured")
    });
}
