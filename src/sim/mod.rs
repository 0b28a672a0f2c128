//! Deterministic simulation of the control plane, in the manner of
//! FoundationDB and TigerBeetle: the real voter state machine and the
//! real lease and election arithmetic, several proxies, a witness and
//! node agents, against model PostgreSQL servers, on simulated time. A
//! seeded PRNG decides every delay, loss, duplication, partition (both
//! ways and one way), freeze, crash and restart, and each member's clock
//! rate (within `MAX_CLOCK_DRIFT`). After every event it checks:
//!
//! - **one writer**: at no instant are two nodes writable *and* routed to
//!   by a proxy's data plane;
//! - **no stale commit**: no write commits on a node after a node of a
//!   newer term committed one;
//! - **liveness**: once every fault is healed, writes come back within
//!   `LIVENESS_BOUND`.
//!
//! A failure names its seed and prints the trace; `replay(seed)` runs it
//! again exactly. `PGFAILOVER_SIM_SCHEDULES=N cargo nextest run sim::`
//! runs a longer soak.

mod member;
mod node;
mod world;

use std::fmt::Write as _;

use member::{Ctx, Kind, Member, Msg, Seat, TICK};
use node::PgNode;
use world::{Clock, Event, Network, Queue, Rng, Time};

use crate::consensus::VoterRecord;
use crate::consensus::state::{Now, ms};
use crate::consensus::timing::{MAX_CLOCK_DRIFT, Timing};

/// Known defects, switchable back on to prove the simulation finds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flaws {
    /// The data plane stops writing only when the coordinator's loop
    /// refreshes the route, not at the lease's end on its own timer.
    pub evict_on_coordinator_step: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub seed: u64,
    /// Node agents beside the servers (else plain servers).
    pub agents: bool,
    /// Faulty part of the run; then everything heals.
    pub fault_ms: Time,
    pub flaws: Flaws,
    pub faults: Faults,
}

/// Which faults the faulty part of a run has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Faults {
    /// Drawn from the seed: partitions, freezes, crashes, kills.
    #[default]
    Random,
    /// One kill -9 of the first primary's server at the first fault
    /// instant, nothing else (the agent, if any, stays up).
    KillPrimary,
}

/// After the last fault heals, writes must be back within this.
const LIVENESS_BOUND: Time = 30_000;
const PROXIES: usize = 2;
const NODES: [&str; 2] = ["n1", "n2"];

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub events: u64,
    pub faults: u64,
    pub commits: u64,
    pub promotions: u64,
    /// No write committed in the `LIVENESS_BOUND` after everything
    /// healed.
    pub stalled: bool,
    /// `Faults::KillPrimary`: from the kill to the first write committed
    /// after it (on any node), and to the first promotion.
    pub kill_to_write: Option<Time>,
    pub kill_to_promotion: Option<Time>,
}

struct Slot {
    member: Member,
    clock: Clock,
    alive: bool,
    frozen_until: Option<Time>,
    deferred: Vec<(usize, Msg)>,
}

struct Commit {
    at: Time,
    node: usize,
    timeline: u64,
}

pub struct Sim {
    config: Config,
    timing: Timing,
    now: Time,
    rng: Rng,
    queue: Queue,
    net: Network,
    slots: Vec<Slot>,
    nodes: Vec<PgNode>,
    newest_commit: Option<Commit>,
    last_commit_at: Time,
    trace: Vec<String>,
    stats: Stats,
    /// Members and nodes stopped by a fault, restarted at the heal.
    crashed: Vec<usize>,
    killed: Vec<usize>,
    /// When `Faults::KillPrimary` killed the primary.
    killed_primary_at: Option<Time>,
}

impl Sim {
    pub fn new(config: Config) -> Self {
        let timing = Timing::new(std::time::Duration::from_secs(4));
        let mut rng = Rng::new(config.seed);
        // Hosts: one per proxy, the witness, one per node (its agent too).
        let witness_host = PROXIES;
        let node_host = |n: usize| PROXIES + 1 + n;
        let mut kinds: Vec<(String, usize, Kind)> = (0..PROXIES)
            .map(|p| (format!("p{}", p + 1), p, Kind::Proxy))
            .collect();
        kinds.push(("w1".into(), witness_host, Kind::Witness));
        if config.agents {
            for n in 0..NODES.len() {
                kinds.push((format!("a{}", n + 1), node_host(n), Kind::Agent { node: n }));
            }
        }
        // A cluster that has been running with leases: every voter has
        // granted some.
        let record = VoterRecord {
            voted_term: 1,
            term: 1,
            primary: Some(NODES[0].into()),
            grants_leases: true,
            ..VoterRecord::default()
        };
        let slots = kinds
            .iter()
            .enumerate()
            .map(|(id, (name, host, kind))| {
                let drift = (rng.float() * 2.0 - 1.0) * MAX_CLOCK_DRIFT;
                let clock = Clock {
                    rate: 1.0 + drift,
                    offset: rng.range(0, 100_000) as f64,
                };
                let now = Now {
                    mono: clock.local(0),
                    wall: clock.local(0),
                };
                Slot {
                    member: Member::new(
                        Seat {
                            id,
                            name,
                            host: *host,
                            kind: *kind,
                        },
                        &NODES,
                        record.clone(),
                        timing,
                        now,
                    ),
                    clock,
                    alive: true,
                    frozen_until: None,
                    deferred: Vec::new(),
                }
            })
            .collect::<Vec<_>>();
        let nodes = vec![
            PgNode::new(NODES[0], node_host(0), false, None),
            PgNode::new(NODES[1], node_host(1), true, Some(0)),
        ];
        // The first primary's agent starts holding a lease (the voters
        // assume one from their start: `VoterState::start`).
        let mut slots = slots;
        for slot in &mut slots {
            if slot.member.kind == (Kind::Agent { node: 0 }) {
                let local = slot.clock.local(0);
                slot.member
                    .holder
                    .on_round(local, &[ms(timing.lease)], 1, local);
            }
        }
        let mut sim = Self {
            config,
            timing,
            now: 0,
            rng,
            queue: Queue::default(),
            net: Network::new(PROXIES + 1 + NODES.len()),
            slots,
            nodes,
            newest_commit: None,
            last_commit_at: 0,
            trace: Vec::new(),
            stats: Stats::default(),
            crashed: Vec::new(),
            killed: Vec::new(),
            killed_primary_at: None,
        };
        for m in 0..sim.slots.len() {
            let first = sim.rng.range(1, TICK);
            sim.queue.push(first, Event::Tick { member: m });
        }
        for n in 0..sim.nodes.len() {
            sim.queue.push(50, Event::NodeWork { node: n });
        }
        sim.queue.push(5_000, Event::Fault);
        sim
    }

    /// Runs the schedule: faults until `fault_ms`, then a heal and a quiet
    /// period that must see writes again.
    pub fn run(&mut self) -> Result<Stats, String> {
        let healed_at = self.config.fault_ms;
        let end = healed_at + LIVENESS_BOUND;
        let mut healed = false;
        while let Some((at, event)) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            if !healed && at >= healed_at {
                healed = true;
                self.heal_everything();
            }
            self.stats.events += 1;
            self.handle(event);
            self.check_one_writer()?;
            if let Some(violation) = self.trace.iter().rev().find(|l| l.starts_with("VIOLATION")) {
                return Err(violation.clone());
            }
        }
        // Liveness is measured, not yet enforced: see `Stats::stalled`.
        self.stats.stalled = self.last_commit_at <= healed_at;
        Ok(self.stats)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { member } => self.tick(member),
            Event::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Event::NodeWork { node } => self.node_work(node),
            Event::Fault => self.fault(),
            Event::Thaw { member } => self.thaw(member),
            Event::Restart { member } => {
                if !self.slots[member].alive {
                    self.restart_member(member);
                }
            }
            Event::Heal => {
                self.net.heal();
                self.note("network healed".into());
            }
        }
    }

    fn tick(&mut self, m: usize) {
        let now = self.now;
        let slot = &mut self.slots[m];
        if !slot.alive {
            return;
        }
        if let Some(until) = slot.frozen_until.filter(|t| now < *t) {
            // Timers that elapsed during the freeze fire at the wake-up.
            self.queue.push(until, Event::Tick { member: m });
            return;
        }
        let local = slot.clock.local(now);
        let next = slot.clock.real(local + TICK).max(now + 1);
        self.queue.push(next, Event::Tick { member: m });
        self.with_member(m, |member, ctx| {
            member.tick(ctx);
            if member.kind == Kind::Proxy {
                member.data_plane(ctx);
            }
        });
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        let members = self.slots.len();
        if to >= members {
            return self.node_receive(from, to - members, msg);
        }
        let now = self.now;
        let slot = &mut self.slots[to];
        if !slot.alive {
            return;
        }
        if slot.frozen_until.is_some_and(|t| now < t) {
            slot.deferred.push((from, msg));
            return;
        }
        self.with_member(to, |member, ctx| member.receive(from, msg, ctx));
    }

    /// Runs `f` on member `m` with its clock read, then sends what it
    /// sent.
    fn with_member(&mut self, m: usize, f: impl FnOnce(&mut Member, &mut Ctx)) {
        let members = self.slots.len();
        let slot = &mut self.slots[m];
        let local = slot.clock.local(self.now);
        let mut ctx = Ctx {
            local,
            wall: local,
            out: Vec::new(),
            rng: &mut self.rng,
            flaws: self.config.flaws,
            members,
            timing: self.timing,
            notes: Vec::new(),
        };
        f(&mut slot.member, &mut ctx);
        let (out, notes) = (ctx.out, ctx.notes);
        for note in notes {
            self.note(note);
        }
        for (to, msg) in out {
            self.send(m, to, msg);
        }
    }

    fn host_of(&self, addr: usize) -> usize {
        match addr.checked_sub(self.slots.len()) {
            Some(node) => self.nodes[node].host,
            None => self.slots[addr].member.host,
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let (a, b) = (self.host_of(from), self.host_of(to));
        if !self.net.can_send(a, b) {
            return;
        }
        let stream = matches!(msg, Msg::Write { .. } | Msg::Reset { .. });
        let local = a == b;
        if !stream && !local && self.rng.chance(self.net.loss_percent) {
            return;
        }
        let base = if local { 1 } else { self.rng.range(1, 10) };
        let slow = if stream || local || self.net.slow_ms == 0 {
            0
        } else {
            self.rng.range(0, self.net.slow_ms)
        };
        let copies = if !stream && !local && self.rng.chance(self.net.duplicate_percent) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + base + slow + self.rng.range(0, 3);
            self.queue.push(
                at,
                Event::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    // ---- nodes ----

    fn node_receive(&mut self, from: usize, n: usize, msg: Msg) {
        let now = self.now;
        let frozen = self.nodes[n].frozen(now);
        match msg {
            Msg::Probe(id) if !frozen => {
                let node = &self.nodes[n];
                let report = node.running.then(|| node.report());
                self.send(self.slots.len() + n, from, Msg::ProbeRep(report, id));
            }
            Msg::Write { proxy, conn } if frozen => self.nodes[n].queued.push((proxy, conn)),
            Msg::Write { proxy, conn } => self.write(n, proxy, conn),
            Msg::Reset { proxy, conn } => {
                let node = &mut self.nodes[n];
                let dead = node.reset.entry(proxy).or_default();
                *dead = (*dead).max(conn);
                node.queued.retain(|(p, c)| *p != proxy || *c > conn);
            }
            Msg::SoftFence if !frozen && self.nodes[n].running => {
                self.nodes[n].read_only = true;
                self.note(format!("{} soft-fenced", self.nodes[n].name));
            }
            Msg::Stop if self.nodes[n].running && self.nodes[n].stop_at.is_none() => {
                let at = now + self.rng.range(20, 800);
                self.nodes[n].stop_at = Some(at);
            }
            Msg::StartPrimary if !self.nodes[n].running => {
                self.nodes[n].start();
                self.note(format!("{} started by its agent", self.nodes[n].name));
            }
            Msg::Rejoin {
                primary,
                timeline,
                fork_lsn,
            } if primary != n => {
                self.nodes[n].rejoin(primary, timeline, fork_lsn);
                self.note(format!(
                    "{} rejoined onto timeline {timeline}",
                    self.nodes[n].name
                ));
            }
            Msg::Promote(term) if !frozen && self.nodes[n].running => {
                let node = &mut self.nodes[n];
                let ok = if node.standby {
                    node.promote(term);
                    self.stats.promotions += 1;
                    if let Some(killed) = self.killed_primary_at {
                        self.stats.kill_to_promotion.get_or_insert(now - killed);
                    }
                    true
                } else {
                    node.timeline == term
                };
                if ok {
                    self.note(format!("{} promoted in term {term}", self.nodes[n].name));
                }
                self.send(self.slots.len() + n, from, Msg::PromoteRep(term, ok));
            }
            _ => {}
        }
    }

    fn write(&mut self, n: usize, proxy: usize, conn: u64) {
        let now = self.now;
        let node = &mut self.nodes[n];
        if !node.connection_open(proxy, conn) || !node.writable(now) {
            return;
        }
        node.lsn += 1;
        let commit = Commit {
            at: now,
            node: n,
            timeline: node.timeline,
        };
        self.stats.commits += 1;
        self.last_commit_at = now;
        if let Some(killed) = self.killed_primary_at {
            self.stats.kill_to_write.get_or_insert(now - killed);
        }
        if let Some(newest) = &self.newest_commit
            && commit.timeline < newest.timeline
            && !self.trace.iter().any(|l| l.starts_with("VIOLATION"))
        {
            {
                self.trace.push(format!(
                    "VIOLATION stale commit: {} committed on timeline {} at {now} ms after {} committed on timeline {} at {} ms",
                    self.nodes[n].name,
                    commit.timeline,
                    self.nodes[newest.node].name,
                    newest.timeline,
                    newest.at
                ));
                return;
            }
        }
        if self
            .newest_commit
            .as_ref()
            .is_none_or(|c| commit.timeline >= c.timeline)
        {
            self.newest_commit = Some(commit);
        }
    }

    fn node_work(&mut self, n: usize) {
        let now = self.now;
        self.queue.push(now + 50, Event::NodeWork { node: n });
        if self.nodes[n].stop_at.is_some_and(|t| now >= t) {
            self.nodes[n].kill();
            self.note(format!("{} stopped", self.nodes[n].name));
        }
        if self.nodes[n].frozen_until.is_some_and(|t| now >= t) {
            self.nodes[n].frozen_until = None;
            for (proxy, conn) in std::mem::take(&mut self.nodes[n].queued) {
                self.write(n, proxy, conn);
            }
        }
        let node = &self.nodes[n];
        if let Some(up) = node
            .upstream
            .filter(|_| node.standby && node.running && !node.frozen(now))
            && self.net.can_send(self.nodes[up].host, node.host)
            && !self.nodes[up].frozen(now)
        {
            let upstream = self.nodes[up].clone();
            self.nodes[n].stream_from(&upstream);
        }
    }

    // ---- faults ----

    fn fault(&mut self) {
        if self.now >= self.config.fault_ms {
            return;
        }
        if self.config.faults == Faults::KillPrimary {
            return self.kill_primary();
        }
        self.stats.faults += 1;
        let next = self.now + self.rng.range(1_000, 6_000);
        self.queue.push(next, Event::Fault);
        let hosts = PROXIES + 1 + NODES.len();
        let lasting = self.rng.range(500, 15_000);
        match self.rng.range(0, 10) {
            10 => self.isolate_primary_with_frozen_proxy(),
            0 | 1 => {
                let side: Vec<bool> = (0..hosts).map(|_| self.rng.chance(50)).collect();
                self.net.split(&side);
                self.note(format!("fault: partition {side:?}"));
            }
            2 => {
                let (a, b) = (
                    self.rng.range(0, hosts as u64 - 1),
                    self.rng.range(0, hosts as u64 - 1),
                );
                self.net.cut_one_way(a as usize, b as usize);
                self.note(format!("fault: one-way cut {a} -> {b}"));
            }
            3 => {
                self.net.heal();
                self.note("fault: network healed".into());
            }
            4 => {
                self.net.slow_ms = self.rng.range(100, 2_000);
                self.net.loss_percent = self.rng.range(0, 30);
                self.net.duplicate_percent = self.rng.range(0, 20);
                self.note(format!(
                    "fault: slow {} ms, loss {} %, duplication {} %",
                    self.net.slow_ms, self.net.loss_percent, self.net.duplicate_percent
                ));
            }
            5 | 6 => {
                let m = self.rng.range(0, self.slots.len() as u64 - 1) as usize;
                self.freeze_member(m, lasting);
            }
            7 => {
                let m = self.rng.range(0, self.slots.len() as u64 - 1) as usize;
                if self.slots[m].alive {
                    self.slots[m].alive = false;
                    self.slots[m].deferred.clear();
                    self.crashed.push(m);
                    self.note(format!("fault: crash of {}", self.slots[m].member.name));
                    if self.rng.chance(50) {
                        // A quick restart, within one lease.
                        let at = self.now + self.rng.range(100, 3_000);
                        self.queue.push(at, Event::Restart { member: m });
                    }
                } else {
                    self.restart_member(m);
                }
            }
            _ => self.node_fault(lasting),
        }
    }

    fn kill_primary(&mut self) {
        if let Some(n) = (0..self.nodes.len()).find(|n| self.nodes[*n].writable(self.now)) {
            self.nodes[n].kill();
            self.killed.push(n);
            self.killed_primary_at = Some(self.now);
            self.note(format!("fault: kill -9 of {}", self.nodes[n].name));
        }
    }

    /// The measured split brain: the primary's host and one proxy cut off
    /// from the rest, that proxy frozen through the other side's failover,
    /// then everything heals while it is still frozen or just after.
    fn isolate_primary_with_frozen_proxy(&mut self) {
        let Some(primary) = (0..self.nodes.len()).find(|n| self.nodes[*n].writable(self.now))
        else {
            return;
        };
        let proxy = self.rng.range(0, PROXIES as u64 - 1) as usize;
        let hosts = PROXIES + 1 + NODES.len();
        let side: Vec<bool> = (0..hosts)
            .map(|h| h == self.nodes[primary].host || h == self.slots[proxy].member.host)
            .collect();
        self.net.split(&side);
        self.note(format!(
            "fault: {} and {} cut off from the rest",
            self.nodes[primary].name, self.slots[proxy].member.name
        ));
        let frozen = self.rng.range(8_000, 15_000);
        self.freeze_member(proxy, frozen);
        let heal = self.now + self.rng.range(6_000, 16_000);
        self.queue.push(heal, Event::Heal);
    }

    fn freeze_member(&mut self, m: usize, lasting: Time) {
        let until = self.now + lasting;
        self.slots[m].frozen_until = Some(until);
        self.queue.push(until, Event::Thaw { member: m });
        self.note(format!(
            "fault: freeze of {} for {lasting} ms",
            self.slots[m].member.name
        ));
    }

    /// The end of a freeze: what reached the member's sockets meanwhile
    /// is read, in order.
    fn thaw(&mut self, m: usize) {
        if self.slots[m].frozen_until.is_some_and(|t| self.now < t) {
            return;
        }
        self.slots[m].frozen_until = None;
        for (from, msg) in std::mem::take(&mut self.slots[m].deferred) {
            self.deliver(from, m, msg);
        }
    }

    fn node_fault(&mut self, lasting: Time) {
        let n = self.rng.range(0, self.nodes.len() as u64 - 1) as usize;
        if self.rng.chance(50) && self.nodes[n].running {
            self.nodes[n].kill();
            self.killed.push(n);
            self.note(format!("fault: kill -9 of {}", self.nodes[n].name));
        } else if !self.config.agents {
            // Plain servers: a frozen server with writes queued across a
            // partition can commit them at thaw; only node agents fence
            // that (see the README). Restart a killed one instead.
            if !self.nodes[n].running {
                self.nodes[n].start();
                self.note(format!("fault: restart of {}", self.nodes[n].name));
            }
        } else {
            self.nodes[n].frozen_until = Some(self.now + lasting.min(10_000));
            self.note(format!(
                "fault: SIGSTOP of {} for {lasting} ms",
                self.nodes[n].name
            ));
        }
    }

    fn restart_member(&mut self, m: usize) {
        let slot = &mut self.slots[m];
        let local = slot.clock.local(self.now);
        slot.member.restart(Now {
            mono: local,
            wall: local,
        });
        slot.alive = true;
        slot.frozen_until = None;
        self.crashed.retain(|c| *c != m);
        let line = format!("restart of {}", slot.member.name);
        self.note(line);
        self.queue.push(self.now + 1, Event::Tick { member: m });
    }

    fn heal_everything(&mut self) {
        self.net.heal();
        for m in std::mem::take(&mut self.crashed) {
            self.restart_member(m);
        }
        for m in 0..self.slots.len() {
            self.slots[m].frozen_until = None;
            self.thaw(m);
        }
        for n in std::mem::take(&mut self.killed) {
            if !self.config.agents && !self.nodes[n].running {
                self.nodes[n].start();
            }
        }
        for node in &mut self.nodes {
            node.frozen_until = node.frozen_until.map(|_| self.now);
        }
        self.note("heal: every fault is over".into());
    }

    // ---- invariants ----

    fn check_one_writer(&mut self) -> Result<(), String> {
        let now = self.now;
        let mut routed: Vec<(usize, usize)> = Vec::new();
        for (m, slot) in self.slots.iter().enumerate() {
            if !slot.alive || slot.frozen_until.is_some_and(|t| now < t) {
                continue;
            }
            if slot.member.kind != Kind::Proxy {
                continue;
            }
            let local = slot.clock.local(now);
            if let Some(node) = slot.member.route(local, self.config.flaws)
                && self.nodes[node].writable(now)
            {
                routed.push((m, node));
            }
        }
        if let Some((a, b)) = routed
            .iter()
            .flat_map(|x| routed.iter().map(move |y| (x, y)))
            .find(|(x, y)| x.1 != y.1)
        {
            let line = format!(
                "VIOLATION two writers at {now} ms: {} routes to {} and {} routes to {}, both writable",
                self.slots[a.0].member.name,
                self.nodes[a.1].name,
                self.slots[b.0].member.name,
                self.nodes[b.1].name
            );
            self.trace.push(line.clone());
            return Err(line);
        }
        Ok(())
    }

    fn note(&mut self, line: String) {
        let now = self.now;
        self.trace.push(format!("{now:>7} {line}"));
    }

    pub fn trace(&self) -> String {
        let mut out = String::new();
        for line in &self.trace {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// Runs one seed; a violation comes back with the end of the trace.
pub fn run_seed(config: Config) -> Result<Stats, String> {
    let mut sim = Sim::new(config);
    sim.run().map_err(|violation| {
        let trace = sim.trace();
        let lines: Vec<&str> = trace.lines().collect();
        let tail = lines[lines.len().saturating_sub(TRACE_LINES)..].join("\n");
        format!(
            "seed {} ({config:?}): {violation}\n--- last {TRACE_LINES} trace lines ---\n{tail}",
            config.seed
        )
    })
}

/// How much of a failing trace is printed.
const TRACE_LINES: usize = 120;

#[cfg(test)]
mod tests;
