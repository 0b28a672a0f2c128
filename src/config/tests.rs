use std::time::Duration;

use super::*;

fn options(nodes: &[&str]) -> ProxyOptions {
    let mut o = ProxyOptions::default();
    o.monitor.node = nodes.iter().map(|s| s.to_string()).collect();
    o.member.state_dir = Some("/var/lib/pgfailover".into());
    o
}

fn resolve(o: ProxyOptions) -> Result<ProxyConfig, ConfigError> {
    ProxyConfig::resolve(o, EnvSecrets::default())
}

#[test]
fn defaults_follow_the_documentation() {
    let c = resolve(options(&["n1=db1:5432"])).expect("valid");
    assert_eq!(c.listen.to_string(), "0.0.0.0:6432");
    assert_eq!(c.monitor.user, "pgfailover");
    assert_eq!(c.monitor.interval, Duration::from_secs(1));
    assert_eq!(c.monitor.down_after, Duration::from_secs(3));
    assert_eq!(c.hold_timeout, Duration::from_secs(30));
    assert_eq!(c.startup_timeout, Duration::from_secs(15));
    assert_eq!(c.max_client_connections, 10_000);
    assert_eq!(c.nodes[0].address(), "db1:5432");
    assert_eq!(c.failover.mode, FailoverMode::Auto);
    assert_eq!(c.failover.max_lag, 1 << 20);
    assert_eq!(c.member.voters.len(), 1, "a lone proxy is its own voter");
    assert_eq!(
        c.member.admin_listen.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:8008")
    );
}

#[test]
fn refuses_bad_values_with_the_flag_named() {
    let cases = [
        (options(&[]), "no node"),
        (options(&["n1"]), "NAME=HOST:PORT"),
        (options(&["n1=h:0"]), "port"),
        (options(&["n1=h:1", "n1=h:2"]), "twice"),
        (options(&["bad name=h:1"]), "a name must be"),
    ];
    for (o, wanted) in cases {
        let e = resolve(o).expect_err("invalid").to_string();
        assert!(e.contains(wanted), "{e:?} should mention {wanted:?}");
    }
    let mut o = options(&["n1=h:1"]);
    o.hold_timeout = Some("soon".into());
    let e = resolve(o).expect_err("invalid").to_string();
    assert!(e.contains("--hold-timeout"), "{e}");
    let mut o = options(&["n1=h:1"]);
    o.member.lease_duration = Some("2s".into());
    let e = resolve(o)
        .expect_err("a lease too short to renew")
        .to_string();
    assert!(
        e.contains("--lease-duration") && e.contains("too short"),
        "{e}"
    );
}

/// A lone proxy that forgot its term would bootstrap again after a
/// restart, on whatever node is writable then (defect 8 of issue 10).
#[test]
fn every_member_needs_a_state_dir_a_lone_proxy_too() {
    let mut o = options(&["n1=h:1"]);
    o.member.state_dir = None;
    let e = resolve(o).expect_err("state dir missing").to_string();
    assert!(e.contains("--state-dir is required"), "{e}");
}

#[test]
fn voters_need_a_token_and_this_member() {
    let mut o = options(&["n1=h:1"]);
    o.member.voter = vec![
        "p1=http://127.0.0.1:8008".into(),
        "w1=http://127.0.0.1:8009".into(),
    ];
    let e = resolve(o.clone()).expect_err("name missing").to_string();
    assert!(e.contains("--name"), "{e}");
    o.member.name = Some("p1".into());
    let e = resolve(o.clone()).expect_err("token missing").to_string();
    assert!(e.contains(CLUSTER_TOKEN_ENV), "{e}");
    let env = EnvSecrets {
        cluster_token: Some("t".into()),
        ..Default::default()
    };
    let c = ProxyConfig::resolve(o, env).expect("valid");
    assert_eq!(c.member.voters.len(), 2);
    assert_eq!(format!("{:?}", c.member.token), "Some(Secret(***))");
}

#[test]
fn flags_win_over_the_file_and_unknown_keys_are_errors() {
    let dir = std::env::temp_dir().join(format!("pgf-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:7000\"\nnode = [\"a=h:1\", \"b=h:2\"]\nhold-timeout = \"5s\"\ndown-after = \"2s\"\n",
    )
    .expect("write config");
    let mut o = options(&[]);
    o.config = Some(path.clone());
    o.hold_timeout = Some("2s".into());
    let env = EnvSecrets {
        monitor_password: Some("pw".into()),
        ..Default::default()
    };
    let c = ProxyConfig::resolve(o.clone(), env).expect("valid");
    assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.hold_timeout, Duration::from_secs(2));
    assert_eq!(c.monitor.down_after, Duration::from_secs(2));
    assert_eq!(c.monitor.password.as_ref().map(Secret::expose), Some("pw"));
    assert_eq!(format!("{:?}", c.monitor.password), "Some(Secret(***))");

    std::fs::write(&path, "lisen = \"x\"\n").expect("write config");
    let e = resolve(o).expect_err("unknown key").to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(e.contains("lisen"), "{e}");
}

#[test]
fn client_auth_is_passthrough_unless_asked_and_its_sources_are_checked() {
    let c = resolve(options(&["n1=h:1"])).expect("valid");
    assert_eq!(c.client_auth, ClientAuth::PassThrough);
    let mut o = options(&["n1=h:1"]);
    o.auth_query = Some("SELECT 1, 2".into());
    let e = resolve(o.clone())
        .expect_err("query without proxy auth")
        .to_string();
    assert!(e.contains("--client-auth proxy"), "{e}");
    o.client_auth = Some("proxy".into());
    assert!(matches!(
        resolve(o.clone()).expect("valid").client_auth,
        ClientAuth::Proxy {
            auth_query: Some(_),
            ..
        }
    ));
    o.auth_file = Some("/nonexistent/userlist.txt".into());
    let e = resolve(o.clone()).expect_err("both").to_string();
    assert!(e.contains("give one"), "{e}");
    o.auth_query = None;
    let e = resolve(o.clone()).expect_err("missing file").to_string();
    assert!(e.contains("/nonexistent/userlist.txt"), "{e}");
    o.client_auth = Some("scram".into());
    let e = resolve(o).expect_err("unknown mode").to_string();
    assert!(e.contains("expected passthrough or proxy"), "{e}");
}
