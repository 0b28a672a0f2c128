//! The watchdog's lease and whether this node's server may be running,
//! under one lock, shared by the supervisor and the voter.
//!
//! When the voter grants a vote for a newer term it may give the lease up
//! (the candidate then need not wait it out, as with a proxy that stops
//! routing) only while no process of this node's server runs; the
//! supervisor starts a server writable only while the lease is valid, and
//! marks the server as possibly running in the same step. Both decisions
//! are taken under the lock, so the lease is never given up while a
//! server is being started, and no server is started writable on a lease
//! given up: it needs a renewal sent after the vote, which the voters
//! holding that vote refuse.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::consensus::holder::LeaseHolder;
use crate::consensus::state::Millis;
use crate::consensus::voter::mono_ms;

pub struct LeaseGate {
    data: PathBuf,
    lead: Millis,
    state: Mutex<GateState>,
}

struct GateState {
    holder: LeaseHolder,
    /// The supervisor reaped its postmaster (or killed every process of
    /// it) and has not started one since. Until then, or when it cannot
    /// tell, a server of this node may be running.
    exited: bool,
}

impl LeaseGate {
    /// `lead`: the fence lead taken off every lease (`LeaseHolder`).
    pub fn new(data: PathBuf, lead: Millis) -> Self {
        Self {
            data,
            lead,
            state: Mutex::new(GateState {
                holder: LeaseHolder::new(lead),
                exited: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A renewal round sent at `sent` (see `LeaseHolder::on_round`).
    pub fn on_round(&self, sent: Millis, granted: &[Millis], needed: usize) {
        self.lock()
            .holder
            .on_round(sent, granted, needed, mono_ms());
    }

    pub fn is_valid(&self) -> bool {
        self.lock().holder.is_valid(mono_ms())
    }

    pub fn valid_until(&self) -> Option<Millis> {
        self.lock().holder.valid_until()
    }

    /// Forgets the lease (the server was seen in recovery).
    pub fn drop_lease(&self) {
        self.lock().holder.drop_lease();
    }

    /// A lease of another term starts from nothing.
    pub fn new_term(&self) {
        self.lock().holder = LeaseHolder::new(self.lead);
    }

    /// The supervisor is about to start a server (any role): from now on
    /// the lease is not given up.
    pub fn starting(&self) {
        self.lock().exited = false;
    }

    /// The supervisor is about to start the server writable: only with a
    /// valid lease, checked and marked in one step.
    pub fn starting_writable(&self) -> Result<(), String> {
        let mut state = self.lock();
        if !state.holder.is_valid(mono_ms()) {
            return Err("the watchdog lease is not valid (given up for a newer term, or not renewed by a majority)".into());
        }
        state.exited = false;
        Ok(())
    }

    /// The supervisor's postmaster is gone: reaped after it exited, or
    /// killed with every backend.
    pub fn exited(&self) {
        self.lock().exited = true;
    }

    /// Called when the voter grants a vote for a newer term: gives the
    /// lease up when no process of the server runs, and says whether it
    /// did. A postmaster killed alone leaves backends that may still
    /// commit what they are executing, so they must be gone too.
    pub fn give_up_for_vote(&self) -> bool {
        let mut state = self.lock();
        if !state.exited || server_processes_may_remain(&self.data) {
            return false;
        }
        state.holder.revoke(mono_ms());
        true
    }
}

/// True unless it is certain that no process of the server on `data` is
/// alive: postmaster.pid (which survives a kill -9) names the System V
/// shared memory segment every process of that server attached (children
/// inherit it), and the kernel counts the processes still attached (the
/// check PostgreSQL itself makes before starting on a data directory).
/// Without postmaster.pid no server ran since the last clean stop.
fn server_processes_may_remain(data: &Path) -> bool {
    let lock_file = match std::fs::read_to_string(data.join("postmaster.pid")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    };
    let Some(shmid) = shmid_of_lock_file(&lock_file) else {
        return true;
    };
    match std::fs::read_to_string("/proc/sysvipc/shm") {
        Ok(table) => attached_to(&table, shmid) != Some(0),
        Err(_) => true,
    }
}

/// The segment id on postmaster.pid's seventh line ("key shmid").
fn shmid_of_lock_file(text: &str) -> Option<u64> {
    let line = text.lines().nth(6)?;
    let mut fields = line.split_whitespace();
    let _key: u64 = fields.next()?.parse().ok()?;
    fields.next()?.parse().ok()
}

/// How many processes are attached to segment `shmid`, from
/// /proc/sysvipc/shm; `Some(0)` when the segment is gone (it is removed
/// only once nobody is attached). `None` when the table cannot be read.
fn attached_to(table: &str, shmid: u64) -> Option<u64> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let id_col = header.iter().position(|h| *h == "shmid")?;
    let nattch_col = header.iter().position(|h| *h == "nattch")?;
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(id_col).and_then(|f| f.parse::<u64>().ok()) == Some(shmid) {
            return fields.get(nattch_col)?.parse().ok();
        }
    }
    Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
  10207248      32768   600                    56  6461  6517      0   101   104   101   104 1796386589 1796386590 1796386589                  4096                     0
  10201265     294913   600                    56 31356 31357      7   101   104   101   104 1796387973 1796387973 1796387971                  4096                     0
";

    #[test]
    fn reads_the_processes_attached_to_the_servers_segment() {
        assert_eq!(attached_to(TABLE, 294913), Some(7));
        assert_eq!(attached_to(TABLE, 32768), Some(0));
        assert_eq!(attached_to(TABLE, 5), Some(0), "a removed segment");
        assert_eq!(attached_to("garbage", 5), None);
        let lock_file =
            "4242\n/data\n1700000000\n5432\n/tmp\n127.0.0.1\n  5432001    294913\nready   \n";
        assert_eq!(shmid_of_lock_file(lock_file), Some(294913));
        assert_eq!(shmid_of_lock_file("4242\n/data\n"), None, "no segment yet");
    }

    /// A fresh directory for one test (removed at the end, best effort).
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgf-gate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn gate_in(dir: &Path) -> LeaseGate {
        let gate = LeaseGate::new(dir.to_path_buf(), 0);
        let now = mono_ms();
        gate.on_round(now, &[60_000, 60_000], 2);
        assert!(gate.is_valid());
        gate
    }

    /// The lease is given up only once the supervisor saw its server
    /// exit and no process of it is left; once given up, the server is
    /// not started writable until a renewal sent after that.
    #[test]
    fn the_lease_is_given_up_only_while_no_server_runs() {
        let dir = temp_dir("given-up");
        let gate = gate_in(&dir);
        assert!(!gate.give_up_for_vote(), "a server may run");
        assert!(gate.is_valid());
        gate.exited();
        std::fs::write(dir.join("postmaster.pid"), "4242\n/data\n").expect("lock file");
        assert!(!gate.give_up_for_vote(), "no segment named: cannot tell");
        std::fs::remove_file(dir.join("postmaster.pid")).expect("remove");
        let before = mono_ms();
        assert!(gate.give_up_for_vote());
        assert!(!gate.is_valid());
        let e = gate.starting_writable().expect_err("no lease");
        assert!(e.contains("not valid"), "{e}");
        gate.on_round(before, &[60_000, 60_000], 2);
        assert!(!gate.is_valid(), "a round sent before the vote is void");
        std::thread::sleep(std::time::Duration::from_millis(2));
        gate.on_round(mono_ms(), &[60_000, 60_000], 2);
        gate.starting_writable().expect("a fresh lease");
        assert!(!gate.give_up_for_vote(), "a server is starting");
        assert!(gate.is_valid());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_standby_start_also_keeps_the_lease() {
        let dir = temp_dir("standby");
        let gate = gate_in(&dir);
        gate.exited();
        gate.starting();
        assert!(!gate.give_up_for_vote());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
