//! `compose/`: the docker compose deployment, checked without a Docker
//! engine (the machines that build and test pgfailover have none).
//!
//! The compose file is read the way `docker compose` reads it: `${VAR}`
//! references resolved from `compose/.env`, each service's command put
//! after its image's ENTRYPOINT (from `compose/Dockerfile`, the target the
//! service builds) and its environment over the image's ENV. Then:
//!
//! - every service that runs pgfailover passes `pgfailover check-config`
//!   with exactly that command line and environment;
//! - every `PGFAILOVER_*` variable is one its subcommand reads, the seed's
//!   variables go to the node agents only, and no secret is on a command
//!   line;
//! - the members agree on the voters and the nodes, state and data live
//!   on named volumes, health checks call the admin API, Prometheus
//!   scrapes every member;
//! - the example application's only database setting is the proxy's DSN,
//!   and the application itself, unchanged, keeps writing through a kill -9
//!   failover of a local cluster (proxy + witness over a primary and a
//!   standby), reconnecting on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_yaml_ng::Value;

use crate::failover::VotingCluster;
use crate::harness::{APP_DB, DEADLINE, SCRAM_USER, admin_get, python3};
use crate::util::signal;

const PGFAILOVER: &str = env!("CARGO_BIN_EXE_pgfailover");

/// The subcommands that run a cluster member.
const MEMBER_SUBCOMMANDS: [&str; 3] = ["proxy", "witness", "node"];
/// The seed's variables, which `pgfailover node` reads.
const SEED_VARS: [&str; 8] = [
    "NODE_ID",
    "NODE_NAME",
    "REPMGR_ROLE",
    "PRIMARY_HOST",
    "REPMGR_PASSWORD",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
];
/// Secrets pgfailover reads from the environment only (never a flag).
const SECRET_VARS: [&str; 3] = [
    "PGFAILOVER_MONITOR_PASSWORD",
    "PGFAILOVER_CLUSTER_TOKEN",
    "PGFAILOVER_REPLICATION_PASSWORD",
];
/// Variables whose values are secrets, wherever they appear.
const SECRET_VALUED: [&str; 6] = [
    "PGFAILOVER_MONITOR_PASSWORD",
    "PGFAILOVER_CLUSTER_TOKEN",
    "PGFAILOVER_REPLICATION_PASSWORD",
    "PGFAILOVER_APP_PASSWORD",
    "REPMGR_PASSWORD",
    "POSTGRES_PASSWORD",
];
/// The settings the example application reads.
const APP_SETTINGS: [&str; 4] = [
    "DATABASE_URL",
    "WRITE_INTERVAL",
    "RETRY_DELAY",
    "WRITE_LIMIT",
];
/// The health check program in both images (compose/healthcheck.sh).
const HEALTHCHECK: &str = "pgfailover-healthcheck";

fn compose_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compose")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Reading compose/ the way docker compose does.

/// `KEY=VALUE` lines of a .env file (comments and blank lines skipped,
/// optional quotes removed).
fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("compose/.env: {l:?} is not KEY=VALUE"));
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

/// Compose's interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`,
/// `${VAR+alt}`. A plain reference to an unset variable is an error here
/// (compose would warn and substitute nothing).
fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (name, op, next) = if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            let inner = &body[..end];
            let n = inner.find(|c| !ident(c)).unwrap_or(inner.len());
            (&inner[..n], &inner[n..], &body[end + 1..])
        } else {
            let n = after.find(|c| !ident(c)).unwrap_or(after.len());
            (&after[..n], "", &after[n..])
        };
        if name.is_empty() {
            return Err(format!("bad variable reference in {text:?}"));
        }
        let value = vars.get(name).map(String::as_str);
        let set_non_empty = value.filter(|v| !v.is_empty());
        let resolved = if op.is_empty() {
            value
                .ok_or_else(|| format!("${{{name}}} is not set (compose/.env)"))?
                .to_owned()
        } else if let Some(default) = op.strip_prefix(":-") {
            set_non_empty.unwrap_or(default).to_owned()
        } else if let Some(default) = op.strip_prefix('-') {
            value.unwrap_or(default).to_owned()
        } else if let Some(message) = op.strip_prefix(":?") {
            set_non_empty
                .ok_or_else(|| format!("{name} is required: {message}"))?
                .to_owned()
        } else if let Some(message) = op.strip_prefix('?') {
            value
                .ok_or_else(|| format!("{name} is required: {message}"))?
                .to_owned()
        } else if let Some(alt) = op.strip_prefix(":+") {
            set_non_empty.map(|_| alt).unwrap_or_default().to_owned()
        } else if let Some(alt) = op.strip_prefix('+') {
            value.map(|_| alt).unwrap_or_default().to_owned()
        } else {
            return Err(format!("unsupported interpolation ${{{name}{op}}}"));
        };
        out.push_str(&resolved);
        rest = next;
    }
    out.push_str(rest);
    Ok(out)
}

/// Interpolates every string scalar of a YAML tree, in place.
fn interpolate_tree(value: &mut Value, vars: &BTreeMap<String, String>) {
    match value {
        Value::String(s) => *s = interpolate(s, vars).unwrap_or_else(|e| panic!("{e}")),
        Value::Sequence(items) => items.iter_mut().for_each(|v| interpolate_tree(v, vars)),
        Value::Mapping(map) => map.values_mut().for_each(|v| interpolate_tree(v, vars)),
        Value::Tagged(tagged) => interpolate_tree(&mut tagged.value, vars),
        _ => {}
    }
}

/// Every `${NAME...}` / `$NAME` reference in `text`.
fn references(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            rest = r;
            continue;
        }
        let body = after.strip_prefix('{').unwrap_or(after);
        let n = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        if n > 0 {
            names.insert(body[..n].to_owned());
        }
        rest = &body[n..];
    }
    names
}

/// One stage of a Dockerfile, with what it inherits from an earlier stage.
#[derive(Debug, Clone, Default)]
struct Stage {
    name: String,
    /// The FROM image, ARG defaults substituted.
    base: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: BTreeMap<String, String>,
    /// The stage's own instructions, one logical line each.
    instructions: Vec<String>,
}

/// The logical lines of a Dockerfile: comments dropped, `\` continuations
/// joined.
fn dockerfile_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        // Docker drops comment and empty lines, also inside a continuation.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines
}

/// An exec-form (JSON array) ENTRYPOINT or CMD.
fn exec_form(instruction: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("{instruction} {args}: use the JSON (exec) form: {e}"))
}

/// The stages of a Dockerfile, in order, with Docker's inheritance:
/// a stage FROM an earlier stage starts with its ENTRYPOINT, CMD and ENV;
/// setting ENTRYPOINT clears an inherited CMD.
fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for line in dockerfile_lines(text) {
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let rest = rest.trim();
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let base = interpolate(words[0], &args).unwrap_or_else(|e| panic!("FROM: {e}"));
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => stages.len().to_string(),
            };
            let mut stage = stages
                .iter()
                .find(|s| s.name == base)
                .cloned()
                .unwrap_or_default();
            stage.name = name;
            stage.base = base;
            stage.instructions.clear();
            stages.push(stage);
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            if keyword == "ARG" {
                let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                args.insert(k.to_owned(), v.to_owned());
            }
            continue;
        };
        stage.instructions.push(line.clone());
        match keyword.as_str() {
            "ENTRYPOINT" => {
                stage.entrypoint = exec_form("ENTRYPOINT", rest);
                stage.cmd.clear();
            }
            "CMD" => stage.cmd = exec_form("CMD", rest),
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("ENV {rest}: write KEY=VALUE pairs"));
                    assert!(
                        !v.contains(['"', '\'', '$']),
                        "ENV {rest}: keep values unquoted and literal"
                    );
                    stage.env.insert(k.to_owned(), v.to_owned());
                }
            }
            _ => {}
        }
    }
    stages
}

/// compose/docker-compose.yml, interpolated, with compose/Dockerfile.
struct Compose {
    doc: Value,
    dotenv: BTreeMap<String, String>,
    stages: Vec<Stage>,
}

/// One service as it would run.
#[derive(Debug, Clone)]
struct Service {
    name: String,
    def: Value,
    /// The image's ENTRYPOINT + CMD as the service overrides them; empty
    /// for an image not built from compose/Dockerfile without a command.
    argv: Vec<String>,
    /// The environment the service sets (interpolated).
    compose_env: BTreeMap<String, String>,
    /// What the process sees: the image's ENV, then the service's.
    env: BTreeMap<String, String>,
    /// The compose/Dockerfile stage it builds, if any.
    stage: Option<Stage>,
}

fn strings(value: &Value, what: &str) -> Vec<String> {
    match value {
        Value::Sequence(items) => items.iter().map(|v| scalar(v, what)).collect(),
        Value::String(s) => {
            assert!(
                !s.contains(['"', '\'']),
                "{what}: use the list form rather than a quoted string"
            );
            s.split_whitespace().map(str::to_owned).collect()
        }
        other => panic!("{what}: unexpected {other:?}"),
    }
}

fn scalar(value: &Value, what: &str) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("{what}: expected a scalar, got {other:?}"),
    }
}

impl Compose {
    fn load() -> Self {
        let dir = compose_dir();
        let dotenv = parse_dotenv(&read(&dir.join(".env")));
        let mut doc: Value = serde_yaml_ng::from_str(&read(&dir.join("docker-compose.yml")))
            .expect("compose/docker-compose.yml is valid YAML");
        doc.apply_merge().expect("YAML merge keys");
        interpolate_tree(&mut doc, &dotenv);
        let stages = parse_dockerfile(&read(&dir.join("Dockerfile")));
        Self {
            doc,
            dotenv,
            stages,
        }
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("compose/Dockerfile has no stage {name:?}"))
    }

    fn service_names(&self) -> Vec<String> {
        self.doc["services"]
            .as_mapping()
            .expect("services")
            .keys()
            .map(|k| scalar(k, "service name"))
            .collect()
    }

    /// The compose/Dockerfile stage a service builds, if it builds one.
    fn built_stage(&self, def: &Value) -> Option<Stage> {
        let build = def.get("build")?;
        let (context, dockerfile, target) = match build {
            Value::String(context) => (context.clone(), "Dockerfile".to_owned(), None),
            map => (
                map.get("context").map(|v| scalar(v, "context"))?,
                map.get("dockerfile")
                    .map(|v| scalar(v, "dockerfile"))
                    .unwrap_or_else(|| "Dockerfile".into()),
                map.get("target").map(|v| scalar(v, "target")),
            ),
        };
        let path = compose_dir().join(&context).join(&dockerfile);
        let ours =
            path.canonicalize().ok()? == compose_dir().join("Dockerfile").canonicalize().ok()?;
        if !ours {
            return None;
        }
        Some(match target {
            Some(target) => self.stage(&target).clone(),
            None => self.stages.last().expect("stages").clone(),
        })
    }

    fn service(&self, name: &str) -> Service {
        let def = self.doc["services"]
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"))
            .clone();
        let stage = self.built_stage(&def);
        let what = |key: &str| format!("service {name}: {key}");
        let entrypoint = match def.get("entrypoint") {
            Some(e) => Some(strings(e, &what("entrypoint"))),
            None => stage.as_ref().map(|s| s.entrypoint.clone()),
        };
        let overridden = def.get("entrypoint").is_some();
        let command = match def.get("command") {
            Some(c) => strings(c, &what("command")),
            None if overridden => Vec::new(),
            None => stage.as_ref().map(|s| s.cmd.clone()).unwrap_or_default(),
        };
        let mut argv = entrypoint.unwrap_or_default();
        argv.extend(command);
        let compose_env: BTreeMap<String, String> = match def.get("environment") {
            None => BTreeMap::new(),
            Some(Value::Mapping(map)) => map
                .iter()
                .map(|(k, v)| (scalar(k, "variable"), scalar(v, &what("environment"))))
                .collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| {
                    let item = scalar(item, &what("environment"));
                    let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
            Some(other) => panic!("{}: {other:?}", what("environment")),
        };
        let mut env = stage.as_ref().map(|s| s.env.clone()).unwrap_or_default();
        env.extend(compose_env.clone());
        Service {
            name: name.to_owned(),
            def,
            argv,
            compose_env,
            env,
            stage,
        }
    }

    fn services(&self) -> Vec<Service> {
        self.service_names()
            .iter()
            .map(|n| self.service(n))
            .collect()
    }

    /// The services that run a pgfailover member (proxy, witness, node).
    fn members(&self) -> Vec<Service> {
        self.services()
            .into_iter()
            .filter(|s| s.subcommand().is_some())
            .collect()
    }

    fn declared_volumes(&self) -> BTreeSet<String> {
        self.doc
            .get("volumes")
            .and_then(Value::as_mapping)
            .map(|m| m.keys().map(|k| scalar(k, "volume")).collect())
            .unwrap_or_default()
    }
}

impl Service {
    /// `proxy`, `witness` or `node` when the service runs pgfailover.
    fn subcommand(&self) -> Option<&str> {
        let program = self.argv.first()?;
        if program != "pgfailover" && !program.ends_with("/pgfailover") {
            return None;
        }
        let sub = self.argv.get(1).unwrap_or_else(|| {
            panic!("service {} runs pgfailover without a subcommand", self.name)
        });
        assert!(
            MEMBER_SUBCOMMANDS.contains(&sub.as_str()),
            "service {} runs `pgfailover {sub}`, not a member",
            self.name
        );
        Some(sub)
    }

    fn is_node(&self) -> bool {
        self.subcommand() == Some("node")
    }

    /// The member's flags (after the subcommand).
    fn flags(&self) -> &[String] {
        &self.argv[2..]
    }

    /// Values of `--flag V` / `--flag=V` on the command line.
    fn flag_values(&self, flag: &str) -> Vec<String> {
        let mut values = Vec::new();
        let mut args = self.flags().iter();
        while let Some(arg) = args.next() {
            if arg == flag {
                values.push(args.next().cloned().unwrap_or_default());
            } else if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                values.push(v.to_owned());
            }
        }
        values
    }

    /// A list setting as clap sees it: the flags, else the comma-separated
    /// variable.
    fn list_setting(&self, flag: &str, var: &str) -> Vec<String> {
        let flags = self.flag_values(flag);
        if !flags.is_empty() {
            return flags;
        }
        self.env
            .get(var)
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn setting(&self, flag: &str, var: &str) -> Option<String> {
        self.flag_values(flag)
            .pop()
            .or_else(|| self.env.get(var).cloned())
    }

    /// The member's name: --name, PGFAILOVER_NAME, NODE_NAME (node), or
    /// the subcommand's default.
    fn member_name(&self) -> String {
        self.setting("--name", "PGFAILOVER_NAME")
            .or_else(|| {
                self.is_node()
                    .then(|| self.env.get("NODE_NAME").cloned())
                    .flatten()
            })
            .unwrap_or_else(|| self.subcommand().unwrap_or_default().to_owned())
    }

    /// `NAME=VALUE` pairs of a list setting, as a map.
    fn pairs(&self, flag: &str, var: &str) -> BTreeMap<String, String> {
        self.list_setting(flag, var)
            .iter()
            .map(|p| {
                let (k, v) = p
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: {flag} {p:?}", self.name));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// (source, target) of each volume entry.
    fn volumes(&self) -> Vec<(String, String)> {
        let Some(Value::Sequence(items)) = self.def.get("volumes") else {
            return Vec::new();
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => {
                    let mut parts = s.split(':');
                    let source = parts.next().unwrap_or_default().to_owned();
                    let target = parts.next().unwrap_or_default().to_owned();
                    (source, target)
                }
                map => (
                    map.get("source")
                        .map(|v| scalar(v, "source"))
                        .unwrap_or_default(),
                    map.get("target")
                        .map(|v| scalar(v, "target"))
                        .unwrap_or_default(),
                ),
            })
            .collect()
    }

    fn healthcheck(&self) -> Vec<String> {
        let test = self
            .def
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .unwrap_or_else(|| panic!("service {} has no health check", self.name));
        strings(test, "healthcheck.test")
    }
}

/// `pgfailover ARGS` with exactly `env` (and PATH) as its environment.
fn run_pgfailover(args: &[String], env: &BTreeMap<String, String>) -> Output {
    Command::new(PGFAILOVER)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("spawn pgfailover")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `name` appears in `text` as a whole variable name.
fn mentions(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        let part = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !part(before) && !part(after)
    })
}

/// `HOST:PORT` of an `http://HOST:PORT` URL.
fn url_authority(url: &str) -> &str {
    url.strip_prefix("http://")
        .unwrap_or_else(|| panic!("{url:?} is not http://"))
        .trim_end_matches('/')
}

/// The port of a `HOST:PORT` address.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

// ---------------------------------------------------------------------------
// The compose file, statically.

#[test]
fn the_compose_file_has_the_seeds_services_and_variables() {
    let compose = Compose::load();
    let names: BTreeSet<String> = compose.service_names().into_iter().collect();
    for wanted in [
        "postgres_primary",
        "postgres_standby",
        "postgres_witness",
        "pgfailover",
        "gestor_almacenamiento",
        "prometheus",
    ] {
        assert!(names.contains(wanted), "no service {wanted}: {names:?}");
    }
    let sub = |name: &str| compose.service(name).subcommand().map(str::to_owned);
    assert_eq!(sub("postgres_primary").as_deref(), Some("node"));
    assert_eq!(sub("postgres_standby").as_deref(), Some("node"));
    assert_eq!(sub("postgres_witness").as_deref(), Some("witness"));
    assert_eq!(sub("pgfailover").as_deref(), Some("proxy"));
    assert_eq!(sub("gestor_almacenamiento"), None);

    for (name, id, role) in [
        ("postgres_primary", "1", "primary"),
        ("postgres_standby", "2", "standby"),
    ] {
        let s = compose.service(name);
        for var in SEED_VARS {
            assert!(
                s.compose_env.contains_key(var),
                "{name} lacks the seed's {var}"
            );
        }
        let env = &s.compose_env;
        assert_eq!(env["NODE_ID"], id);
        assert_eq!(env["NODE_NAME"], name);
        assert_eq!(env["REPMGR_ROLE"], role);
        assert_eq!(env["PRIMARY_HOST"], "postgres_primary");
        assert_eq!(env["POSTGRES_DB"], "library");
        assert_eq!(env["POSTGRES_USER"], "app");
        assert_eq!(env["POSTGRES_PASSWORD"], "app");
    }

    // The optional Prometheus runs only under a profile.
    let profiles = strings(
        compose
            .service("prometheus")
            .def
            .get("profiles")
            .expect("profiles"),
        "profiles",
    );
    assert!(!profiles.is_empty(), "prometheus should be under a profile");
    for service in compose.services() {
        if service.name != "prometheus" {
            assert!(
                service.def.get("profiles").is_none(),
                "{} should start by default",
                service.name
            );
        }
    }
}

#[test]
fn every_pgfailover_service_passes_check_config() {
    let compose = Compose::load();
    let members = compose.members();
    assert_eq!(members.len(), 4, "proxy, witness and two node agents");
    // `check-config node` arrived with the node agent; skip nodes, saying
    // so, on a binary without it.
    let node_check = run_pgfailover(
        &["check-config".into(), "node".into(), "--help".into()],
        &BTreeMap::new(),
    )
    .status
    .success();
    let mut checked = 0;
    for s in &members {
        let sub = s.subcommand().expect("member");
        if sub == "node" && !node_check {
            println!(
                "SKIPPED: {}: this pgfailover has no `check-config node` yet",
                s.name
            );
            continue;
        }
        let mut args = vec!["check-config".to_owned(), sub.to_owned()];
        args.extend(s.flags().iter().cloned());
        let out = run_pgfailover(&args, &s.env);
        assert!(
            out.status.success(),
            "service {}: `pgfailover {}` is refused ({}):\n{}",
            s.name,
            args.join(" "),
            out.status,
            text(&out)
        );
        println!("{}: {}", s.name, text(&out).trim());
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn every_pgfailover_variable_is_one_the_binary_reads() {
    let compose = Compose::load();
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    for s in compose.members() {
        let sub = s.subcommand().expect("member").to_owned();
        let help = helps.entry(sub.clone()).or_insert_with(|| {
            let out = run_pgfailover(&[sub.clone(), "--help".into()], &BTreeMap::new());
            assert!(
                out.status.success(),
                "pgfailover {sub} --help: {}",
                text(&out)
            );
            text(&out)
        });
        for var in s.env.keys() {
            if var.starts_with("PGFAILOVER_") {
                assert!(
                    mentions(help, var) || SECRET_VARS.contains(&var.as_str()),
                    "service {}: `pgfailover {sub}` does not read {var} (not in its --help)",
                    s.name
                );
            }
        }
        for var in s.compose_env.keys() {
            if SEED_VARS.contains(&var.as_str()) {
                assert!(
                    s.is_node(),
                    "service {}: {var} is read by `pgfailover node` only",
                    s.name
                );
            } else {
                assert!(
                    var.starts_with("PGFAILOVER_"),
                    "service {}: {var} is neither a PGFAILOVER_* nor a seed variable",
                    s.name
                );
            }
        }
    }
    // .env defines what the compose file references, and nothing else.
    let yaml = read(&compose_dir().join("docker-compose.yml"));
    let referenced = references(&yaml);
    let defined: BTreeSet<String> = compose.dotenv.keys().cloned().collect();
    assert_eq!(referenced, defined, "${{VAR}} references vs compose/.env");
}

#[test]
fn secrets_are_never_on_a_command_line() {
    let compose = Compose::load();
    let yaml = read(&compose_dir().join("docker-compose.yml"));
    let mut secrets: BTreeSet<String> = BTreeSet::new();
    for s in compose.services() {
        for (var, value) in &s.compose_env {
            if SECRET_VALUED.contains(&var.as_str()) {
                assert!(!value.is_empty(), "{}: {var} is empty", s.name);
                secrets.insert(value.clone());
            }
        }
    }
    for s in compose.services() {
        for arg in &s.argv {
            let tokens: Vec<&str> = arg.split(['=', ',', ':', '@', '/', ' ']).collect();
            for secret in &secrets {
                assert!(
                    !tokens.contains(&secret.as_str()),
                    "service {}: a secret is on the command line: {arg:?}",
                    s.name
                );
            }
            let lower = arg.to_ascii_lowercase();
            assert!(
                !(lower.starts_with("--")
                    && (lower.contains("password") || lower.contains("token")))
                    || lower.contains("-file"),
                "service {}: {arg:?} passes a secret as a flag",
                s.name
            );
        }
    }
    // In the compose file itself the secrets are references to .env.
    for line in yaml.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        if SECRET_VALUED.contains(&key.trim()) {
            assert!(
                value.trim().starts_with("${"),
                "{line:?}: take the secret from .env (${{VAR}})"
            );
        }
    }
}

#[test]
fn the_members_agree_on_voters_nodes_and_names() {
    let compose = Compose::load();
    let members = compose.members();
    let names: BTreeSet<String> = compose.service_names().into_iter().collect();
    let voters = members[0].pairs("--voter", "PGFAILOVER_VOTER");
    let nodes = members[0].pairs("--node", "PGFAILOVER_NODE");
    assert_eq!(voters.len(), 4, "four voters: {voters:?}");
    for s in &members {
        assert_eq!(
            s.pairs("--voter", "PGFAILOVER_VOTER"),
            voters,
            "{}: another voter list",
            s.name
        );
        assert_eq!(
            s.pairs("--node", "PGFAILOVER_NODE"),
            nodes,
            "{}: another node list",
            s.name
        );
        // Each member is a voter under its service's name.
        assert_eq!(s.member_name(), s.name, "member name of service {}", s.name);
        assert!(voters.contains_key(&s.name), "{} is not a voter", s.name);
        // Its URL reaches it: the service's host name and admin port.
        let admin = s
            .setting("--admin-listen", "PGFAILOVER_ADMIN_LISTEN")
            .unwrap_or_else(|| "0.0.0.0:8008".into());
        assert_eq!(
            url_authority(&voters[&s.name]),
            format!("{}:{}", s.name, port_of(&admin)),
            "voter URL of {}",
            s.name
        );
        if s.is_node() {
            assert_eq!(
                s.env["NODE_NAME"], s.name,
                "a node agent's name is its node's"
            );
            assert_eq!(
                nodes.get(&s.name).map(String::as_str),
                Some(format!("{}:5432", s.name).as_str()),
                "{} in the node list",
                s.name
            );
        }
    }
    let voter_names: BTreeSet<String> = voters.keys().cloned().collect();
    let member_names: BTreeSet<String> = members.iter().map(|m| m.name.clone()).collect();
    assert_eq!(
        voter_names, member_names,
        "the voters are exactly the members"
    );
    let node_names: BTreeSet<String> = nodes.keys().cloned().collect();
    let node_services: BTreeSet<String> = members
        .iter()
        .filter(|m| m.is_node())
        .map(|m| m.name.clone())
        .collect();
    assert_eq!(
        node_names, node_services,
        "the nodes are the node agents' services"
    );
    for (node, addr) in &nodes {
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
        assert!(
            names.contains(host),
            "node {node} at {addr}: no such service"
        );
    }
    let standby = compose.service("postgres_standby");
    assert!(
        nodes.contains_key(&standby.env["PRIMARY_HOST"]),
        "PRIMARY_HOST names a node"
    );

    // Prometheus scrapes every member's admin API.
    let prom: Value =
        serde_yaml_ng::from_str(&read(&compose_dir().join("prometheus.yml"))).expect("YAML");
    let mut targets = BTreeSet::new();
    for job in prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
    {
        let path = job
            .get("metrics_path")
            .and_then(Value::as_str)
            .unwrap_or("/metrics");
        assert_eq!(path, "/metrics");
        for sc in job["static_configs"].as_sequence().expect("static_configs") {
            for t in sc["targets"].as_sequence().expect("targets") {
                targets.insert(scalar(t, "target"));
            }
        }
    }
    let voter_addrs: BTreeSet<String> = voters
        .values()
        .map(|u| url_authority(u).to_owned())
        .collect();
    assert_eq!(targets, voter_addrs, "prometheus targets vs members");
    let prometheus = compose.service("prometheus");
    assert!(
        prometheus
            .volumes()
            .iter()
            .any(|(src, dst)| src == "./prometheus.yml" && dst == "/etc/prometheus/prometheus.yml"),
        "prometheus mounts compose/prometheus.yml"
    );
}

#[test]
fn state_and_data_live_on_named_volumes() {
    let compose = Compose::load();
    let declared = compose.declared_volumes();
    for s in compose.members() {
        let mut dirs = vec![
            s.setting("--state-dir", "PGFAILOVER_STATE_DIR")
                .unwrap_or_else(|| panic!("{}: no state dir", s.name)),
        ];
        if s.is_node() {
            dirs.push(
                s.setting("--data-dir", "PGFAILOVER_DATA_DIR")
                    .unwrap_or_else(|| panic!("{}: no data dir", s.name)),
            );
        }
        let volumes = s.volumes();
        for dir in dirs {
            let (source, _) = volumes
                .iter()
                .find(|(_, target)| *target == dir)
                .unwrap_or_else(|| panic!("{}: {dir} is not on a volume", s.name));
            assert!(
                declared.contains(source),
                "{}: {dir} is on {source:?}, not a named volume",
                s.name
            );
        }
    }
    // No two services share a volume.
    let mut seen = BTreeMap::new();
    for s in compose.services() {
        for (source, _) in s.volumes() {
            if declared.contains(&source) {
                let other = seen.insert(source.clone(), s.name.clone());
                assert!(
                    other.is_none(),
                    "{source} is shared by {other:?} and {}",
                    s.name
                );
            }
        }
    }
}

#[test]
fn health_checks_call_the_admin_api() {
    let compose = Compose::load();
    let wanted = [
        ("pgfailover", vec!["/primary"]),
        ("postgres_witness", vec!["/health"]),
        ("postgres_primary", vec!["/primary", "/replica"]),
        ("postgres_standby", vec!["/primary", "/replica"]),
    ];
    for (name, paths) in wanted {
        let s = compose.service(name);
        let test = s.healthcheck();
        assert_eq!(test[0], "CMD", "{name}: exec form, no shell needed");
        assert_eq!(test[1], HEALTHCHECK, "{name}");
        assert_eq!(test[2..].to_vec(), paths, "{name}: health check paths");
        let stage = s.stage.as_ref().expect("built from compose/Dockerfile");
        assert!(
            stage
                .instructions
                .iter()
                .any(|i| i == &format!("COPY compose/healthcheck.sh /usr/local/bin/{HEALTHCHECK}")),
            "{name}: its image ({}) lacks {HEALTHCHECK}",
            stage.name
        );
    }
    // The app waits for the proxy to route writes.
    let app = compose.service("gestor_almacenamiento");
    let condition = app.def["depends_on"]["pgfailover"]["condition"].as_str();
    assert_eq!(condition, Some("service_healthy"));
}

#[test]
fn the_dockerfile_builds_with_the_official_images() {
    let compose = Compose::load();
    let build = compose.stage("build");
    assert!(
        build.base.starts_with("rust:"),
        "official rust image: {}",
        build.base
    );
    assert!(
        build
            .instructions
            .iter()
            .any(|i| i.contains("cargo build --release --locked")),
        "cargo build --release --locked"
    );
    let node = compose.stage("node");
    assert_eq!(
        node.base, "postgres:16",
        "node images FROM the official postgres:16"
    );
    assert_eq!(node.entrypoint, ["pgfailover", "node"]);
    assert!(node.cmd.is_empty());
    let runtime = compose.stage("pgfailover");
    assert_eq!(runtime.entrypoint, ["pgfailover"]);
    for stage in [node, runtime] {
        assert!(
            stage
                .instructions
                .iter()
                .any(|i| i
                    == "COPY --from=build /usr/local/bin/pgfailover /usr/local/bin/pgfailover"),
            "{}: the binary from the build stage",
            stage.name
        );
    }
    // What the build stage copies is in the build context (the repository
    // root, minus what Dockerfile.dockerignore leaves out).
    let ignore = read(&compose_dir().join("Dockerfile.dockerignore"));
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for stage in &compose.stages {
        for i in &stage.instructions {
            let Some(rest) = i.strip_prefix("COPY ") else {
                continue;
            };
            if rest.starts_with("--from") {
                continue;
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            for source in &words[..words.len() - 1] {
                assert!(root.join(source).exists(), "COPY {source}: missing");
                assert!(
                    allowed.contains(source),
                    "COPY {source}: not let through by Dockerfile.dockerignore"
                );
            }
        }
    }
    // The health check script is executable and valid bash.
    let script = compose_dir().join("healthcheck.sh");
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(out.status.success(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&script)
        .expect("stat")
        .permissions()
        .mode();
    assert!(mode & 0o111 != 0, "healthcheck.sh is not executable");
}

#[test]
fn the_apps_only_database_setting_is_the_proxy_dsn() {
    let compose = Compose::load();
    let app = compose.service("gestor_almacenamiento");
    let proxy = compose.service("pgfailover");
    let primary = compose.service("postgres_primary");
    for var in app.compose_env.keys() {
        assert!(
            APP_SETTINGS.contains(&var.as_str()),
            "the app's {var}: its only database setting is DATABASE_URL"
        );
    }
    let url = &app.compose_env["DATABASE_URL"];
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .unwrap_or_else(|| panic!("DATABASE_URL {url:?} is not a postgresql:// URL"));
    let (userinfo, rest) = rest.split_once('@').expect("user@host");
    let (user, password) = userinfo.split_once(':').expect("user:password");
    let (host_port, db) = rest.split_once('/').expect("host/db");
    let db = db.split('?').next().unwrap_or_default();
    let (host, port) = host_port.split_once(':').expect("host:port");
    assert_eq!(host, "pgfailover", "the DSN names the proxy service");
    let listen = proxy
        .setting("--listen", "PGFAILOVER_LISTEN")
        .unwrap_or_else(|| "0.0.0.0:6432".into());
    assert_eq!(
        port.parse::<u16>().ok(),
        Some(port_of(&listen)),
        "the proxy's port"
    );
    assert_eq!(port, "6432");
    assert_eq!(user, primary.env["POSTGRES_USER"]);
    assert_eq!(password, primary.env["POSTGRES_PASSWORD"]);
    assert_eq!(db, primary.env["POSTGRES_DB"]);

    // The program reads no other setting and knows no node.
    let source = read(&compose_dir().join("app/gestor_almacenamiento.py"));
    let mut rest = source.as_str();
    while let Some(i) = rest.find("os.environ") {
        let after = &rest[i..];
        let quoted = after.split('"').nth(1).unwrap_or_default();
        assert!(
            APP_SETTINGS.contains(&quoted),
            "the app reads {quoted:?} from its environment"
        );
        rest = &after["os.environ".len()..];
    }
    for s in compose.members() {
        if s.is_node() {
            assert!(
                !source.contains(&s.name),
                "the app names the node {}",
                s.name
            );
        }
    }
    assert!(
        !source.contains("getenv"),
        "settings come through os.environ[...]"
    );
    let dockerfile = read(&compose_dir().join("app/Dockerfile"));
    assert!(dockerfile.contains("FROM python:3") && dockerfile.contains("slim"));
    let requirements = read(&compose_dir().join("app/requirements.txt"));
    assert!(requirements.contains("psycopg2-binary"));
}

#[test]
fn interpolation_follows_compose() {
    let vars: BTreeMap<String, String> = [("A", "x"), ("E", "")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let ok = |t: &str| interpolate(t, &vars).expect(t);
    assert_eq!(ok("$A-${A}"), "x-x");
    assert_eq!(ok("${B:-d}|${E:-d}|${E-d}|${B-d}"), "d|d||d");
    assert_eq!(ok("${A:?m}|${E?m}|${A:+y}|${E:+y}|${E+y}"), "x||y||y");
    assert_eq!(ok("$$A costs $$5"), "$A costs $5");
    assert!(interpolate("${B}", &vars).is_err());
    assert!(interpolate("${E:?needed}", &vars).is_err());
    let refs = references("a ${A:?x} $B $$C ${D}");
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["A", "B", "D"]);
}

// ---------------------------------------------------------------------------
// The example application, run for real.

/// The example application as a child process, its stdout and stderr
/// collected line by line; killed on drop.
struct App {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl App {
    fn start(database_url: &str) -> Self {
        let script = compose_dir().join("app/gestor_almacenamiento.py");
        // Nothing but the settings the container gets: no PG* variable
        // leaks in from the test's environment.
        let mut child = Command::new(python3())
            .arg(&script)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("WRITE_INTERVAL", "0.05")
            .env("RETRY_DELAY", "0.2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the example app");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Self { child, lines }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn dump(&self) -> String {
        let log = self.log();
        log[log.len().saturating_sub(60)..].join("\n")
    }

    /// Waits until `cond` holds for the parsed log; the app must keep
    /// running meanwhile.
    fn wait_for(&mut self, what: &str, cond: impl Fn(&[Attempt]) -> bool) {
        let start = Instant::now();
        loop {
            if cond(&attempts(&self.log())) {
                return;
            }
            let exited = self.child.try_wait().expect("try_wait");
            assert!(
                exited.is_none(),
                "the app exited ({exited:?}) before {what}:\n{}",
                self.dump()
            );
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; app log:\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One logged write attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    /// Index of the log line.
    line: usize,
    seq: u64,
    /// `Some(server)` for `write ok`, `None` for `write failed`.
    server: Option<String>,
}

fn attempts(log: &[String]) -> Vec<Attempt> {
    log.iter()
        .enumerate()
        .filter_map(|(line, text)| {
            let ok = text.contains(" write ok ");
            if !ok && !text.contains(" write failed ") {
                return None;
            }
            let field = |key: &str| {
                text.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_owned)
            };
            let seq = field("seq=")?.parse().ok()?;
            Some(Attempt {
                line,
                seq,
                server: if ok { field("server=") } else { None },
            })
        })
        .collect()
}

fn oks_on(attempts: &[Attempt], server: &str) -> usize {
    attempts
        .iter()
        .filter(|a| a.server.as_deref() == Some(server))
        .count()
}

/// compose/healthcheck.sh against a member's admin API on loopback.
fn healthcheck(port: u16, paths: &[&str]) -> bool {
    let out = Command::new("bash")
        .arg(compose_dir().join("healthcheck.sh"))
        .args(["--port", &port.to_string()])
        .args(paths)
        .output()
        .expect("run healthcheck.sh");
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "healthcheck.sh: {}",
        text(&out)
    );
    code == Some(0)
}

#[test]
fn the_example_app_keeps_writing_through_a_kill9_failover() {
    let c = VotingCluster::start(&[]);
    c.wait_for_term(1, "n1");
    let proxy_admin = c.voters.admin_port("p1");
    let witness_admin = c.voters.admin_port("w1");

    // The health checks the compose file runs, against the real API.
    assert!(healthcheck(proxy_admin, &["/primary"]), "proxy /primary");
    assert!(
        !healthcheck(proxy_admin, &["/replica"]),
        "a proxy is no replica"
    );
    assert!(healthcheck(witness_admin, &["/health"]), "witness /health");
    assert!(
        healthcheck(proxy_admin, &["/nope", "/health"]),
        "any path may answer"
    );

    // The same kind of DSN as in the compose file: a URL naming the proxy.
    let url = format!(
        "postgresql://{}:{}@127.0.0.1:{}/{APP_DB}",
        SCRAM_USER.name,
        SCRAM_USER.password,
        c.proxy.port()
    );
    let mut app = App::start(&url);
    app.wait_for("5 writes on n1", |a| oks_on(a, "n1") >= 5);

    let killed_at_line = app.log().len();
    let killed = Instant::now();
    c.cluster.primary.kill9();
    app.wait_for("5 writes on n2 after the kill", |a| oks_on(a, "n2") >= 5);
    let log = app.log();
    let all = attempts(&log);
    let first_on_n2 = all
        .iter()
        .find(|a| a.server.as_deref() == Some("n2"))
        .expect("a write on n2")
        .line;
    println!(
        "kill -9 of the primary to the app's first write on the new primary: {:?} ({} attempts failed)",
        killed.elapsed(),
        all.iter().filter(|a| a.server.is_none()).count()
    );
    let (code, _) = admin_get(proxy_admin, "/primary");
    assert_eq!(code, 200, "the proxy routes writes again");
    assert!(healthcheck(proxy_admin, &["/primary"]));

    // Stop it the way `docker compose stop` does.
    signal(app.child.id(), "TERM");
    let status = crate::util::wait_child(&mut app.child, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the app did not stop cleanly on SIGTERM ({status:?}):\n{}",
        app.dump()
    );
    let log = app.log();
    let all = attempts(&log);

    // Every attempt got a new sequence number, in order: the app went on.
    assert!(
        all.windows(2).all(|w| w[0].seq < w[1].seq),
        "sequence numbers not increasing:\n{}",
        log.join("\n")
    );
    // Before the kill every write went to n1; after the first write on n2,
    // none went anywhere else.
    for a in &all {
        if a.line < killed_at_line {
            assert_eq!(a.server.as_deref().unwrap_or("n1"), "n1", "{a:?}");
        }
        if a.line > first_on_n2 {
            assert_eq!(a.server.as_deref(), Some("n2"), "after the failover: {a:?}");
        }
    }
    // The failover reached the app as a connection error, and the app
    // reconnected to the same DSN on its own.
    let failed = all
        .iter()
        .filter(|a| a.server.is_none() && a.line >= killed_at_line)
        .count();
    assert!(
        failed >= 1,
        "no failed write after the kill:\n{}",
        log.join("\n")
    );
    let reconnects = log[killed_at_line..]
        .iter()
        .filter(|l| l.contains("connected to the database"))
        .count();
    assert!(reconnects >= 1, "no reconnection:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("stopping on signal")));

    // Every write acknowledged by n2 is there.
    let on_n2: BTreeSet<u64> = c
        .cluster
        .standby
        .psql_db(APP_DB, "SELECT seq FROM registros ORDER BY seq")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for a in all.iter().filter(|a| a.server.as_deref() == Some("n2")) {
        assert!(
            on_n2.contains(&a.seq),
            "write seq={} acknowledged by n2 is missing",
            a.seq
        );
    }
    let acked_on_n1: Vec<u64> = all
        .iter()
        .filter(|a| a.server.as_deref() == Some("n1"))
        .map(|a| a.seq)
        .collect();
    let kept = acked_on_n1.iter().filter(|s| on_n2.contains(s)).count();
    println!(
        "writes acknowledged by n1 found on n2: {kept} of {} (asynchronous replication)",
        acked_on_n1.len()
    );
}
