//! Silent network partitions: a node runs in a Linux network namespace of
//! its own (its "host"), joined to the root namespace by veth pairs
//! (`Link`s). Cutting a link puts a `blackhole` qdisc on both of its ends:
//! every packet is dropped, nobody gets a reset or an ICMP error, and
//! connections across it just stop answering, as across a real partition.
//!
//! Needs root, iproute2 (`ip`, `tc`) and util-linux (`nsenter`). Every
//! namespace, veth pair and qdisc is removed on drop (also when a test
//! panics); what a killed test process left behind (its pid is dead) is
//! removed by the next one.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::run_ok;

/// Where `ip netns add` mounts its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of the namespaces the harness creates: `pgf-<pid>-<n>`.
const NS_PREFIX: &str = "pgf-";
/// The links' /30 subnets are carved from 198.19.0.0/16 (the upper half of
/// RFC 2544's 198.18.0.0/15, away from the 198.18.0.x that
/// benches/failover.sh uses inside its own namespaces).
const SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
/// How many links may exist at once, across all test processes.
const SLOTS: u32 = 1024;

/// A network namespace, deleted on drop. Its loopback is up.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        reap_stale_namespaces();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NS_PREFIX}{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        quiet(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Deletes `pgf-<pid>-<n>` namespaces whose creating process is gone
/// (a test killed by nextest's timeout runs no destructors).
fn reap_stale_namespaces() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let pid = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            quiet(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

/// A veth pair between the root namespace and a `NetNs`, with a /30 of its
/// own: `root_ip` on `root_if` in the root namespace, `ns_ip` on `ns_if`
/// in the namespace. Deleted on drop (the pair goes with either end).
#[derive(Debug)]
pub struct Link {
    pub root_if: String,
    pub ns_if: String,
    pub root_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    ns: String,
    cut: AtomicBool,
    /// Released (after the pair is deleted) when the link drops.
    _slot: SubnetSlot,
}

impl Link {
    pub fn new(ns: &NetNs) -> Self {
        let slot = SubnetSlot::acquire();
        let i = slot.index;
        // Interface names are limited to 15 bytes: "pgf1023r" is 8.
        let root_if = format!("pgf{i}r");
        let ns_if = format!("pgf{i}n");
        let base = u32::from(SUBNET_BASE) + 4 * i;
        let (root_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        // Left behind by a killed test that held the same slot.
        quiet(Command::new("ip").args(["link", "del", &root_if]));
        let link = Self {
            root_if,
            ns_if,
            root_ip,
            ns_ip,
            ns: ns.name().to_string(),
            cut: AtomicBool::new(false),
            _slot: slot,
        };
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &link.root_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.ns_if,
            "netns",
            &link.ns,
        ]));
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{root_ip}/30"),
            "dev",
            &link.root_if,
        ]));
        run_ok(Command::new("ip").args([
            "-n",
            &link.ns,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &link.ns_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &link.root_if, "up"]));
        run_ok(Command::new("ip").args(["-n", &link.ns, "link", "set", &link.ns_if, "up"]));
        link
    }

    /// Partitions silently: from now on every packet leaving either end
    /// of the pair is dropped.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        run_ok(Command::new("tc").args([
            "qdisc",
            "add",
            "dev",
            &self.root_if,
            "root",
            "blackhole",
        ]));
        run_ok(Command::new("tc").args([
            "-n",
            &self.ns,
            "qdisc",
            "add",
            "dev",
            &self.ns_if,
            "root",
            "blackhole",
        ]));
    }

    /// Ends the partition: both ends get their default qdisc back.
    pub fn heal(&self) {
        self.remove_blackholes(|cmd| {
            run_ok(cmd);
        });
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Deletes the qdisc on both ends, each command run by `run`.
    fn remove_blackholes(&self, run: fn(&mut Command)) {
        run(Command::new("tc").args(["qdisc", "del", "dev", &self.root_if, "root"]));
        run(Command::new("tc").args(["-n", &self.ns, "qdisc", "del", "dev", &self.ns_if, "root"]));
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if self.cut.load(Ordering::SeqCst) {
            self.remove_blackholes(quiet);
        }
        quiet(Command::new("ip").args(["link", "del", &self.root_if]));
    }
}

/// One of `SLOTS` subnets (and interface names), held across processes
/// by an flock on `/tmp/pgf-netns-<index>.lock`. The kernel drops the lock
/// when its process dies, so a killed test leaves no slot taken; the file
/// itself is removed on drop.
#[derive(Debug)]
struct SubnetSlot {
    index: u32,
    path: PathBuf,
    file: Option<File>,
}

impl SubnetSlot {
    fn acquire() -> Self {
        for index in 0..SLOTS {
            let path = std::env::temp_dir().join(format!("pgf-netns-{index}.lock"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => panic!("lock {}: {e}", path.display()),
            }
            // The previous holder unlinks the file before it unlocks: a
            // lock on an unlinked (or replaced) file holds nothing.
            let ours = file.metadata().map(|m| (m.dev(), m.ino()));
            let on_disk = fs::metadata(&path).map(|m| (m.dev(), m.ino()));
            if let (Ok(ours), Ok(on_disk)) = (ours, on_disk)
                && ours == on_disk
            {
                return Self {
                    index,
                    path,
                    file: Some(file),
                };
            }
        }
        panic!("all {SLOTS} test subnets are taken");
    }
}

impl Drop for SubnetSlot {
    fn drop(&mut self) {
        // Unlink while still holding the lock, then unlock (see acquire).
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != ErrorKind::NotFound
        {
            eprintln!("cannot remove {}: {e}", self.path.display());
        }
        drop(self.file.take());
    }
}

/// Runs a clean-up command, ignoring its outcome and output.
fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}
