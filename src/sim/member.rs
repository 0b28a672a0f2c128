//! The members of the simulated cluster: every one a voter running the
//! real `VoterState`; proxies add the coordinator's election and
//! promotion sequence, a lease holder and a data plane that forwards
//! writes; node agents add the watchdog lease and bring their server up,
//! fence it and rejoin it. Decisions go through the same pure pieces the
//! real executors use (`VoterState`, `LeaseHolder`, `tally`, `Timing`).

use std::sync::Arc;

use super::Flaws;
use super::node::Report;
use super::world::Rng;
use crate::config::NodeSpec;
use crate::consensus::holder::{LeaseHolder, granted_durations, tally};
use crate::consensus::messages::{
    ElectionReason, LeaseRequest, LeaseResponse, PublishRequest, VoteRequest, VoteResponse,
};
use crate::consensus::state::{Millis, Now, VoterState, ms};
use crate::consensus::timing::{PEER_TIMEOUT, Timing};
use crate::consensus::{VoterRecord, majority};
use crate::topology::{NodeHealth, NodeState};

/// A member's timer period (local ms); every decision is taken on it.
pub const TICK: Millis = 100;
/// Probes, renewals and term pulls run every this many ticks (1 s).
pub const ROUND_TICKS: u64 = 10;
/// A probe without answer for this long calls the node down.
pub const DOWN_AFTER: Millis = 3000;
/// How long a promotion may take before its outcome is checked.
const PROMOTE_TIMEOUT: Millis = 2000;
/// How often the same vote is asked again while old leases run out.
const REASK_EVERY: Millis = 250;
/// Tries before a promotion whose answer never came is published.
const PROMOTE_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone)]
pub enum Msg {
    VoteReq(Box<VoteRequest>),
    VoteRep(Box<VoteResponse>),
    LeaseReq(Box<LeaseRequest>, u64),
    LeaseRep(Box<LeaseResponse>, u64),
    Publish(PublishRequest),
    Release(u64, String),
    StateReq(u64),
    StateRep(Box<VoterRecord>, u64),
    Probe(u64),
    /// `None`: the host answered but no server listens (refused).
    ProbeRep(Option<Report>, u64),
    Promote(u64),
    PromoteRep(u64, bool),
    Write {
        proxy: usize,
        conn: u64,
    },
    /// The proxy reset a connection (RST): queued writes are dropped.
    Reset {
        proxy: usize,
        conn: u64,
    },
    SoftFence,
    /// An agent's own server: stop now (the fence), start, rejoin.
    Stop,
    StartPrimary,
    Rejoin {
        primary: usize,
        timeline: u64,
        fork_lsn: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Proxy,
    Witness,
    Agent { node: usize },
}

/// Who a member is and where it runs.
pub struct Seat<'a> {
    pub id: usize,
    pub name: &'a str,
    pub host: usize,
    pub kind: Kind,
}

/// What a member hands the world to do.
pub struct Ctx<'a> {
    pub local: Millis,
    pub wall: Millis,
    pub out: Vec<(usize, Msg)>,
    pub rng: &'a mut Rng,
    pub flaws: Flaws,
    pub members: usize,
    pub timing: Timing,
    /// Notes for the trace.
    pub notes: Vec<String>,
}

impl Ctx<'_> {
    fn now(&self) -> Now {
        Now {
            mono: self.local,
            wall: self.wall,
        }
    }

    fn send_to_others(&mut self, me: usize, msg: &Msg) {
        for to in (0..self.members).filter(|m| *m != me) {
            self.out.push((to, msg.clone()));
        }
    }

    fn node_addr(&self, node: usize) -> usize {
        self.members + node
    }
}

#[derive(Debug, Clone, Default)]
struct Probe {
    last_ok: Option<Millis>,
    failing_since: Option<Millis>,
    refused: bool,
    /// The round of the last probe the host refused.
    refused_round: u64,
    report: Option<Report>,
}

#[derive(Debug, Clone)]
struct Renewal {
    id: u64,
    sent: Millis,
    /// Every answer, duplicates included (`granted_durations` counts a
    /// voter once).
    replies: Vec<Result<LeaseResponse, String>>,
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Voting {
        term: u64,
        node: usize,
        deadline: Millis,
        replies: Vec<Result<VoteResponse, String>>,
        act_before: Millis,
    },
    Waiting {
        term: u64,
        node: usize,
        until: Millis,
        act_before: Millis,
        /// The same vote asked again (as the real coordinator does) to
        /// shorten the wait: when, and the answers so far.
        reask_at: Millis,
        replies: Vec<Result<VoteResponse, String>>,
    },
    /// The barrier before promoting: no newer term known, and the same
    /// vote granted again by a majority (renewing the hold).
    Checking {
        term: u64,
        node: usize,
        round: u64,
        deadline: Millis,
        newer: bool,
        act_before: Millis,
        replies: Vec<Result<VoteResponse, String>>,
    },
    /// The barrier before publishing a promoted node's term, as the real
    /// coordinator's `settle_leases`: a lease a majority reports is
    /// waited out asking again meanwhile (which may shrink it), then the
    /// vote is confirmed again; the term is published once a confirmation
    /// reports no lease.
    Publishing {
        term: u64,
        node: usize,
        deadline: Millis,
        replies: Vec<Result<VoteResponse, String>>,
        publish_at: Option<Millis>,
        /// The last majority reported no lease: publish at `publish_at`
        /// (else confirm again then).
        settled: bool,
        reask_at: Millis,
    },
    Promoting {
        term: u64,
        node: usize,
        deadline: Millis,
        attempts: u32,
    },
    Backoff {
        until: Millis,
    },
}

pub struct Member {
    pub name: String,
    pub id: usize,
    pub host: usize,
    pub kind: Kind,
    pub voter: VoterState,
    /// The record as last fsynced.
    pub disk: VoterRecord,
    specs: Vec<Arc<NodeSpec>>,
    probes: Vec<Probe>,
    ticks: u64,
    round: u64,
    pub holder: LeaseHolder,
    renewal: Option<Renewal>,
    phase: Phase,
    min_next_term: u64,
    other_pending: bool,
    /// Node agent: the term its lease is for, and since when its primary
    /// was writable without one.
    lease_term: u64,
    unleased_since: Option<Millis>,
    /// Node agent: the probe round in which it last told its server to
    /// start, stop or rejoin.
    server_ordered_round: u64,
    /// Proxy data plane: the open connection (node, id), and the route
    /// the coordinator last computed (what the data plane used before it
    /// checked the lease itself).
    pub conn: Option<(usize, u64)>,
    next_conn: u64,
    route_cache: Option<usize>,
}

impl Member {
    pub fn new(
        seat: Seat<'_>,
        node_names: &[&str],
        record: VoterRecord,
        timing: Timing,
        now: Now,
    ) -> Self {
        let Seat {
            id,
            name,
            host,
            kind,
        } = seat;
        let specs: Vec<_> = node_names
            .iter()
            .map(|n| {
                Arc::new(NodeSpec {
                    name: (*n).into(),
                    host: "sim".into(),
                    port: 5432,
                })
            })
            .collect();
        let lease_term = record.term;
        let lead = match kind {
            Kind::Agent { .. } => ms(timing.fence_lead()),
            _ => 0,
        };
        Self {
            name: name.into(),
            id,
            host,
            kind,
            voter: VoterState::start(name.into(), timing, record.clone(), now),
            disk: record,
            probes: vec![Probe::default(); specs.len()],
            specs,
            ticks: 0,
            round: 0,
            holder: LeaseHolder::new(lead),
            renewal: None,
            phase: Phase::Idle,
            min_next_term: 0,
            other_pending: false,
            lease_term,
            unleased_since: None,
            server_ordered_round: 0,
            conn: None,
            next_conn: 0,
            route_cache: None,
        }
    }

    /// A restart: everything but the fsynced record is lost.
    pub fn restart(&mut self, now: Now) {
        let timing = self.voter.timing();
        let name = self.name.clone();
        let seat = Seat {
            id: self.id,
            name: &name,
            host: self.host,
            kind: self.kind,
        };
        let mut fresh = Self::new(
            seat,
            &self
                .specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            self.disk.clone(),
            timing,
            now,
        );
        fresh.next_conn = self.next_conn;
        *self = fresh;
    }

    fn view(&self, now: Millis) -> Vec<NodeState> {
        (0..self.specs.len())
            .map(|i| NodeState {
                spec: Arc::clone(&self.specs[i]),
                health: self.health(i, now),
            })
            .collect()
    }

    fn health(&self, node: usize, now: Millis) -> NodeHealth {
        let p = &self.probes[node];
        match (p.failing_since, p.report) {
            (Some(_), _) if p.refused => NodeHealth::Down("refused".into()),
            (Some(since), _) if now.saturating_sub(since) >= DOWN_AFTER => {
                NodeHealth::Down("timeout".into())
            }
            (Some(_), _) => NodeHealth::Suspect("timeout".into()),
            (None, Some(r)) if r.standby => NodeHealth::Standby,
            (None, Some(_)) => NodeHealth::Primary,
            (None, None) => NodeHealth::Unknown,
        }
    }

    fn persist(disk: &mut VoterRecord) -> impl FnMut(&VoterRecord) -> Result<(), String> + '_ {
        |r| {
            *disk = r.clone();
            Ok(())
        }
    }

    fn needed(&self, ctx: &Ctx) -> usize {
        majority(ctx.members)
    }

    /// The node this proxy's data plane forwards writes to right now.
    pub fn route(&self, local: Millis, flaws: Flaws) -> Option<usize> {
        if flaws.evict_on_coordinator_step {
            return self.route_cache;
        }
        self.fresh_route(local)
    }

    fn fresh_route(&self, local: Millis) -> Option<usize> {
        let record = self.voter.record();
        let primary = self
            .specs
            .iter()
            .position(|s| record.term > 0 && Some(s.name.as_str()) == record.primary.as_deref())?;
        let routable = self.health(primary, local) == NodeHealth::Primary
            && self.holder.is_valid(local)
            && matches!(self.phase, Phase::Idle | Phase::Backoff { .. });
        routable.then_some(primary)
    }

    // ---- messages ----

    pub fn receive(&mut self, from: usize, msg: Msg, ctx: &mut Ctx) {
        let now = ctx.now();
        match msg {
            Msg::VoteReq(request) => {
                let view = self.view(ctx.local);
                let mut reply =
                    self.voter
                        .vote(&request, &view, now, &mut Self::persist(&mut self.disk));
                self.revoke_on_grant(&mut reply, ctx.local);
                ctx.out.push((from, Msg::VoteRep(Box::new(reply))));
            }
            Msg::VoteRep(reply) => self.on_vote(*reply, ctx),
            Msg::LeaseReq(request, id) => {
                let reply = self
                    .voter
                    .lease(&request, now, &mut Self::persist(&mut self.disk));
                ctx.out.push((from, Msg::LeaseRep(Box::new(reply), id)));
            }
            Msg::LeaseRep(reply, id) => {
                if let Some(r) = self.renewal.as_mut().filter(|r| r.id == id) {
                    r.replies.push(Ok(*reply));
                }
            }
            Msg::Publish(request) => {
                let _ = self
                    .voter
                    .publish(&request, &mut Self::persist(&mut self.disk));
            }
            Msg::Release(term, candidate) => {
                self.voter
                    .release(term, &candidate, &mut Self::persist(&mut self.disk));
            }
            Msg::StateReq(id) => {
                let record = self.voter.record().clone();
                ctx.out.push((from, Msg::StateRep(Box::new(record), id)));
            }
            Msg::StateRep(record, id) => self.on_state(*record, id, ctx),
            Msg::ProbeRep(report, id) => self.on_probe(from - ctx.members, report, id, ctx),
            Msg::PromoteRep(term, ok) => self.on_promoted(term, ok, ctx),
            _ => {}
        }
    }

    /// As the real members: granting a vote stops a proxy's routing at
    /// once; a node agent gives its watchdog lease up when its server is
    /// known to be down and not being started (`node::gate`).
    fn revoke_on_grant(&mut self, reply: &mut VoteResponse, now: Millis) {
        let gives_up = match self.kind {
            Kind::Proxy => true,
            Kind::Agent { node } => self.server_known_down(node),
            Kind::Witness => false,
        };
        if reply.granted && gives_up {
            self.holder.revoke(now);
            self.route_cache = None;
            reply.holder_revoked = true;
        }
    }

    /// The agent's own server is down, and stays down until the agent
    /// starts it: a probe sent after the agent last told it to start or
    /// stop found no server listening (a stop still under way, or a
    /// start not yet done, is never taken for down).
    fn server_known_down(&self, node: usize) -> bool {
        let p = &self.probes[node];
        p.refused && p.refused_round > self.server_ordered_round
    }

    fn on_state(&mut self, record: VoterRecord, id: u64, ctx: &mut Ctx) {
        if record.term > self.voter.record().term
            && let Some(primary) = record.primary.clone()
        {
            let learn = PublishRequest {
                term: record.term,
                primary,
                timeline: record.primary_timeline,
            };
            let _ = self
                .voter
                .publish(&learn, &mut Self::persist(&mut self.disk));
        }
        if let Some((term, candidate)) = record.pending_vote(ctx.wall)
            && candidate != self.name
            && term > self.voter.record().term
        {
            self.other_pending = true;
        }
        if let Phase::Checking {
            round, term, newer, ..
        } = &mut self.phase
            && *round == id
        {
            *newer |= record.term > *term
                || record
                    .pending_vote(ctx.wall)
                    .is_some_and(|(t, _)| t > *term);
        }
    }

    fn on_probe(&mut self, node: usize, report: Option<Report>, id: u64, ctx: &mut Ctx) {
        if id != self.round {
            return;
        }
        let p = &mut self.probes[node];
        match report {
            Some(r) => {
                p.report = Some(r);
                p.last_ok = Some(ctx.local);
                p.failing_since = None;
                p.refused = false;
            }
            None => {
                p.failing_since.get_or_insert(ctx.local);
                p.refused = true;
                p.refused_round = id;
            }
        }
    }

    // ---- the timer ----

    pub fn tick(&mut self, ctx: &mut Ctx) {
        self.ticks += 1;
        if self.ticks % ROUND_TICKS == 1 {
            self.start_round(ctx);
        }
        match self.kind {
            Kind::Proxy => {
                self.coordinate(ctx);
                if self.ticks % ROUND_TICKS == 1 {
                    self.route_cache = self.fresh_route(ctx.local);
                }
            }
            Kind::Agent { node } => self.watch_node(node, ctx),
            Kind::Witness => {}
        }
    }

    /// Once a second: settle the last round, probe, pull terms, renew.
    fn start_round(&mut self, ctx: &mut Ctx) {
        // Probes not answered in the last round count as timeouts.
        for p in &mut self.probes {
            if p.last_ok
                .is_none_or(|t| ctx.local.saturating_sub(t) > 2 * TICK * ROUND_TICKS)
            {
                p.failing_since
                    .get_or_insert(ctx.local.saturating_sub(TICK * ROUND_TICKS));
            }
        }
        if let Some(r) = self.renewal.take() {
            let needed = self.needed(ctx);
            let granted = granted_durations(&r.replies);
            self.holder.on_round(r.sent, &granted, needed, ctx.local);
        }
        self.round += 1;
        let id = self.round;
        for node in 0..self.specs.len() {
            let addr = ctx.node_addr(node);
            ctx.out.push((addr, Msg::Probe(id)));
        }
        self.other_pending = false;
        ctx.send_to_others(self.id, &Msg::StateReq(id));
        if self.wants_lease(ctx) {
            let record = self.voter.record().clone();
            let request = LeaseRequest {
                term: record.term,
                holder: self.name.clone(),
                primary: record.primary.clone().unwrap_or_default(),
            };
            let mine = self
                .voter
                .lease(&request, ctx.now(), &mut Self::persist(&mut self.disk));
            self.renewal = Some(Renewal {
                id,
                sent: ctx.local,
                replies: vec![Ok(mine)],
            });
            ctx.send_to_others(self.id, &Msg::LeaseReq(Box::new(request), id));
        }
    }

    fn wants_lease(&self, _ctx: &Ctx) -> bool {
        let record = self.voter.record();
        if record.term == 0 {
            return false;
        }
        match self.kind {
            Kind::Proxy => true,
            Kind::Witness => false,
            Kind::Agent { node } => record.primary.as_deref() == Some(&self.specs[node].name),
        }
    }

    // ---- node agent ----

    fn watch_node(&mut self, node: usize, ctx: &mut Ctx) {
        let record = self.voter.record().clone();
        if record.term == 0 {
            return;
        }
        let me = self.specs[node].name.clone();
        let addr = ctx.node_addr(node);
        let report = self.probes[node].report;
        let running = self.probes[node].failing_since.is_none() && report.is_some();
        let writable = running && report.is_some_and(|r| !r.standby);
        let primary_is_me = record.primary.as_deref() == Some(me.as_str());
        if record.term != self.lease_term {
            // A lease of another term says nothing about this one.
            self.lease_term = record.term;
            self.holder.drop_lease();
            self.unleased_since = None;
        }
        if report.is_some_and(|r| r.standby) && running {
            // As the real agent: a lease from before a demotion says
            // nothing about a later promotion.
            self.holder.drop_lease();
            self.unleased_since = None;
        }
        // The agent knows its own postmaster runs (frozen or not) unless
        // its host refuses connections: then it is gone.
        let up = !self.probes[node].refused;
        let standby = report.is_some_and(|r| r.standby);
        if primary_is_me {
            if up && !standby && self.must_fence(ctx) {
                ctx.notes
                    .push(format!("{} fences {me}: no lease", self.name));
                ctx.out.push((addr, Msg::Stop));
                self.server_ordered_round = self.round;
                self.probes[node].failing_since = Some(ctx.local);
                self.probes[node].refused = true;
            } else if !up && self.holder.is_valid(ctx.local) {
                ctx.out.push((addr, Msg::StartPrimary));
                self.server_ordered_round = self.round;
            }
            return;
        }
        let Some(primary) = self
            .specs
            .iter()
            .position(|s| Some(s.name.as_str()) == record.primary.as_deref())
        else {
            return;
        };
        // The term's primary, seen up and writable in the last probe:
        // rejoin onto it.
        let Some(theirs) = self.probes[primary]
            .report
            .filter(|r| !r.standby && self.probes[primary].failing_since.is_none())
        else {
            return;
        };
        let mine = report.map_or(0, |r| r.timeline);
        if mine > record.term {
            // Promoted in a term this agent has not learned yet.
            return;
        }
        let stale = writable || !running || mine < theirs.timeline;
        if stale && mine <= theirs.timeline {
            ctx.out.push((
                addr,
                Msg::Rejoin {
                    primary,
                    timeline: theirs.timeline,
                    fork_lsn: theirs.lsn,
                },
            ));
            self.server_ordered_round = self.round;
        }
    }

    /// The agent's watchdog: a writable primary whose lease ran out is
    /// fenced at once; one that never had a lease in this term (just
    /// promoted, the agent learning the term late) gets one lease period
    /// to obtain one.
    fn must_fence(&mut self, ctx: &Ctx) -> bool {
        if self.holder.is_valid(ctx.local) {
            self.unleased_since = None;
            return false;
        }
        if self.holder.valid_until().is_some() {
            return true;
        }
        let since = *self.unleased_since.get_or_insert(ctx.local);
        let grace = ms(ctx.timing.lease) - ms(ctx.timing.fence_lead());
        ctx.local.saturating_sub(since) >= grace
    }

    // ---- proxy coordinator ----

    fn coordinate(&mut self, ctx: &mut Ctx) {
        let local = ctx.local;
        match self.phase.clone() {
            Phase::Idle => self.decide(ctx),
            Phase::Backoff { until } if local >= until => self.phase = Phase::Idle,
            Phase::Voting { deadline, .. } if local >= deadline => self.finish_vote(ctx),
            Phase::Waiting {
                term,
                node,
                until,
                reask_at,
                ..
            } if local < until && local >= reask_at => {
                let request = self.request_for(term, node);
                ctx.send_to_others(self.id, &Msg::VoteReq(Box::new(request)));
                if let Phase::Waiting {
                    reask_at, replies, ..
                } = &mut self.phase
                {
                    *reask_at = local + REASK_EVERY;
                    replies.clear();
                }
            }
            Phase::Waiting {
                term,
                node,
                until,
                act_before,
                ..
            } if local >= until => {
                self.round += 1;
                ctx.send_to_others(self.id, &Msg::StateReq(self.round));
                let request = self.request_for(term, node);
                ctx.send_to_others(self.id, &Msg::VoteReq(Box::new(request)));
                let newer = self.voter.record().term > term;
                self.phase = Phase::Checking {
                    term,
                    node,
                    round: self.round,
                    deadline: local + ms(PEER_TIMEOUT),
                    newer,
                    act_before,
                    replies: Vec::new(),
                };
            }
            Phase::Checking {
                term,
                node,
                deadline,
                newer,
                act_before,
                mut replies,
                ..
            } if local >= deadline => {
                let mine = self.cast_own_vote(term, node, ctx);
                replies.push(Ok(mine));
                let counted = tally(&self.name, replies.iter());
                let wait = counted.lease_wait + self.margin_if(counted.leases_seen, ctx);
                if newer || local >= act_before || counted.granted < majority(ctx.members) {
                    ctx.notes
                        .push(format!("{} abandons term {term}", self.name));
                    self.give_up(term, ctx);
                } else if wait > 0 {
                    // A lease renewed while the hold had lapsed: wait it
                    // out too, the renewed hold keeps new ones away.
                    let hold = ms(ctx.timing.hold_window());
                    self.phase = Phase::Waiting {
                        term,
                        node,
                        until: local + wait,
                        act_before: local + hold - 10_000,
                        reask_at: local + REASK_EVERY,
                        replies: Vec::new(),
                    };
                } else {
                    ctx.notes.push(format!(
                        "{} promotes {} in term {term}",
                        self.name, self.specs[node].name
                    ));
                    let addr = ctx.node_addr(node);
                    ctx.out.push((addr, Msg::Promote(term)));
                    self.phase = Phase::Promoting {
                        term,
                        node,
                        deadline: local + PROMOTE_TIMEOUT,
                        attempts: 1,
                    };
                }
            }
            Phase::Promoting {
                term,
                node,
                deadline,
                attempts,
            } if local >= deadline => {
                // The outcome is unknown: ask again (a promoted node says
                // yes). Never give the term back: once pg_promote was sent
                // the term is decided; past a few tries it is published
                // (a node found still in recovery is then replaced like a
                // demoted primary).
                if attempts >= PROMOTE_ATTEMPTS {
                    self.confirm_before_publishing(term, node, ctx);
                } else {
                    let addr = ctx.node_addr(node);
                    ctx.out.push((addr, Msg::Promote(term)));
                    self.phase = Phase::Promoting {
                        term,
                        node,
                        deadline: local + PROMOTE_TIMEOUT,
                        attempts: attempts + 1,
                    };
                }
            }
            Phase::Publishing {
                term,
                node,
                publish_at: Some(at),
                settled,
                ..
            } if local >= at => {
                if settled {
                    self.publish(term, node, ctx);
                } else {
                    self.confirm_before_publishing(term, node, ctx);
                }
            }
            Phase::Publishing {
                term,
                node,
                publish_at: Some(_),
                reask_at,
                ..
            } if local >= reask_at => {
                let request = self.request_for(term, node);
                ctx.send_to_others(self.id, &Msg::VoteReq(Box::new(request)));
                if let Phase::Publishing {
                    reask_at, replies, ..
                } = &mut self.phase
                {
                    *reask_at = local + REASK_EVERY;
                    replies.clear();
                }
            }
            Phase::Publishing {
                term,
                node,
                deadline,
                publish_at: None,
                ..
            } if local >= deadline => {
                ctx.notes.push(format!(
                    "{} withholds term {term}: its votes no longer hold ({} promoted, unpublished)",
                    self.name, self.specs[node].name
                ));
                self.min_next_term = self.min_next_term.max(term + 1);
                self.phase = Phase::Backoff {
                    until: local + ctx.rng.range(100, 1000),
                };
            }
            _ => {}
        }
    }

    fn margin_if(&self, leases_seen: bool, ctx: &Ctx) -> Millis {
        if leases_seen {
            ms(ctx.timing.promotion_margin())
        } else {
            0
        }
    }

    /// The barrier before publishing: the same vote asked again.
    fn confirm_before_publishing(&mut self, term: u64, node: usize, ctx: &mut Ctx) {
        let request = self.request_for(term, node);
        ctx.send_to_others(self.id, &Msg::VoteReq(Box::new(request)));
        self.phase = Phase::Publishing {
            term,
            node,
            deadline: ctx.local + ms(PEER_TIMEOUT),
            replies: Vec::new(),
            publish_at: None,
            settled: false,
            reask_at: Millis::MAX,
        };
    }

    /// An answer at one of the barriers: before promoting it waits for
    /// the deadline; before publishing, a majority (own vote last) sets
    /// when to publish, after what they report of old leases.
    fn on_barrier_vote(&mut self, reply: VoteResponse, ctx: &mut Ctx) {
        if let Phase::Checking { replies, .. } = &mut self.phase {
            return replies.push(Ok(reply));
        }
        if let Some(wait) = self.count_again(reply, ctx)
            && let Phase::Publishing {
                publish_at,
                settled,
                reask_at,
                ..
            } = &mut self.phase
        {
            let until = ctx.local + wait;
            *publish_at = Some(publish_at.map_or(until, |at| at.min(until)));
            *settled = wait == 0;
            *reask_at = ctx.local + REASK_EVERY;
        }
    }

    /// Adds an answer to a vote asked again (while waiting, or before
    /// publishing). Once the answers and this member's own same vote make
    /// a majority, they are used up and the old-term leases they report
    /// may run this long from now (margin included).
    fn count_again(&mut self, reply: VoteResponse, ctx: &mut Ctx) -> Option<Millis> {
        let (term, node, replies) = match &mut self.phase {
            Phase::Waiting {
                term,
                node,
                replies,
                ..
            }
            | Phase::Publishing {
                term,
                node,
                replies,
                settled: false,
                ..
            } => (*term, *node, replies),
            _ => return None,
        };
        replies.push(Ok(reply));
        if tally(&self.name, replies.iter()).granted + 1 < majority(ctx.members) {
            return None;
        }
        let mut answers = std::mem::take(replies);
        answers.push(Ok(self.cast_own_vote(term, node, ctx)));
        let counted = tally(&self.name, answers.iter());
        (counted.granted >= majority(ctx.members))
            .then(|| counted.lease_wait + self.margin_if(counted.leases_seen, ctx))
    }

    fn decide(&mut self, ctx: &mut Ctx) {
        let record = self.voter.record().clone();
        let local = ctx.local;
        let Some(old) = self
            .specs
            .iter()
            .position(|s| Some(s.name.as_str()) == record.primary.as_deref())
        else {
            return;
        };
        match self.health(old, local) {
            NodeHealth::Down(_) if !self.other_pending => {
                if let Some(node) = self.candidate(old, local) {
                    let term = self.next_term();
                    self.start_vote(term, old, node, ctx);
                }
            }
            NodeHealth::Standby if !self.other_pending => {
                // The term's primary is in recovery (a promotion that
                // never happened): promote the best node, itself included.
                if let Some(node) = self.candidate(usize::MAX, local) {
                    let term = self.next_term();
                    self.start_vote(term, old, node, ctx);
                }
            }
            NodeHealth::Primary if self.holder.is_valid(local) => {
                // Fence any other writable node (a stale primary).
                for (i, p) in self.probes.iter().enumerate() {
                    if i != old
                        && self.health(i, local) == NodeHealth::Primary
                        && p.report.is_some_and(|r| !r.read_only)
                    {
                        let addr = ctx.node_addr(i);
                        ctx.out.push((addr, Msg::SoftFence));
                    }
                }
            }
            _ => {}
        }
    }

    /// The furthest healthy standby (the sim's candidate choice; the real
    /// one is `failover::candidate::pick`).
    fn candidate(&self, old: usize, local: Millis) -> Option<usize> {
        (0..self.specs.len())
            .filter(|i| *i != old && self.health(*i, local) == NodeHealth::Standby)
            .max_by_key(|i| self.probes[*i].report.map(|r| (r.timeline, r.lsn)))
    }

    fn next_term(&mut self) -> u64 {
        let record = self.voter.record();
        // A term this voter already gave (to anyone, itself included: a
        // term is tried once) cannot be won again.
        let own_floor = record.voted_term + 1;
        (record.term + 1).max(self.min_next_term).max(own_floor)
    }

    fn start_vote(&mut self, term: u64, old: usize, node: usize, ctx: &mut Ctx) {
        let request = VoteRequest {
            term,
            candidate: self.name.clone(),
            old_primary: Some(self.specs[old].name.clone()),
            new_primary: self.specs[node].name.clone(),
            reason: ElectionReason::Failover,
        };
        ctx.send_to_others(self.id, &Msg::VoteReq(Box::new(request)));
        let hold = ms(ctx.timing.hold_window());
        self.phase = Phase::Voting {
            term,
            node,
            deadline: ctx.local + ms(PEER_TIMEOUT),
            replies: Vec::new(),
            act_before: ctx.local + hold - 10_000,
        };
    }

    fn request_for(&self, term: u64, node: usize) -> VoteRequest {
        VoteRequest {
            term,
            candidate: self.name.clone(),
            old_primary: self.voter.record().primary.clone(),
            new_primary: self.specs[node].name.clone(),
            reason: ElectionReason::Failover,
        }
    }

    /// This member's own vote, cast last (when it completes a majority),
    /// as the real candidate does.
    fn cast_own_vote(&mut self, term: u64, node: usize, ctx: &mut Ctx) -> VoteResponse {
        let request = self.request_for(term, node);
        let view = self.view(ctx.local);
        let mut mine = self.voter.vote(
            &request,
            &view,
            ctx.now(),
            &mut Self::persist(&mut self.disk),
        );
        self.revoke_on_grant(&mut mine, ctx.local);
        mine
    }

    /// An answer to a vote asked again while waiting: with a majority
    /// (this member's own same vote included), the wait shrinks to what
    /// the fresh answers report, counted from now.
    fn on_reasked_vote(&mut self, reply: VoteResponse, ctx: &mut Ctx) {
        if let Some(wait) = self.count_again(reply, ctx)
            && let Phase::Waiting { until, .. } = &mut self.phase
        {
            *until = (*until).min(ctx.local + wait);
        }
    }

    fn on_vote(&mut self, reply: VoteResponse, ctx: &mut Ctx) {
        match self.phase {
            Phase::Waiting { .. } => return self.on_reasked_vote(reply, ctx),
            Phase::Checking { .. } | Phase::Publishing { .. } => {
                return self.on_barrier_vote(reply, ctx);
            }
            _ => {}
        }
        let Phase::Voting {
            term,
            node,
            replies,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if reply.record.voted_term != *term && reply.granted {
            return;
        }
        replies.push(Ok(reply));
        let granted = tally(&self.name, replies.iter()).granted;
        if granted + 1 >= majority(ctx.members) {
            let (term, node) = (*term, *node);
            let mine = self.cast_own_vote(term, node, ctx);
            if let Phase::Voting { replies, .. } = &mut self.phase {
                replies.push(Ok(mine));
            }
            self.finish_vote(ctx);
        }
    }

    fn finish_vote(&mut self, ctx: &mut Ctx) {
        let Phase::Voting {
            term,
            node,
            replies,
            act_before,
            ..
        } = self.phase.clone()
        else {
            return;
        };
        let counted = tally(&self.name, replies.iter());
        self.min_next_term = self.min_next_term.max(counted.taken_term + 1);
        if counted.granted >= majority(ctx.members) {
            let wait = counted.lease_wait + self.margin_if(counted.leases_seen, ctx);
            let leases: Vec<String> = replies
                .iter()
                .flatten()
                .filter(|r| r.granted)
                .map(|r| {
                    format!(
                        "{}{:?}{}",
                        r.voter,
                        r.leases_ms,
                        if r.holder_revoked { " revoked" } else { "" }
                    )
                })
                .collect();
            ctx.notes.push(format!(
                "{} won term {term} for {}; waits {wait} ms (leases by voter: {})",
                self.name,
                self.specs[node].name,
                leases.join(", ")
            ));
            self.phase = Phase::Waiting {
                term,
                node,
                until: ctx.local + wait,
                act_before,
                reask_at: ctx.local + REASK_EVERY,
                replies: Vec::new(),
            };
        } else {
            self.give_up(term, ctx);
        }
    }

    fn give_up(&mut self, term: u64, ctx: &mut Ctx) {
        let name = self.name.clone();
        self.voter
            .release(term, &name, &mut Self::persist(&mut self.disk));
        ctx.send_to_others(self.id, &Msg::Release(term, name));
        self.min_next_term = self.min_next_term.max(term + 1);
        let pause = ctx.rng.range(100, 1000);
        self.phase = Phase::Backoff {
            until: ctx.local + pause,
        };
    }

    fn on_promoted(&mut self, term: u64, ok: bool, ctx: &mut Ctx) {
        let Phase::Promoting { term: t, node, .. } = self.phase.clone() else {
            return;
        };
        if t != term || !ok {
            return;
        }
        // The promotion is verified: route without waiting for a probe.
        self.probes[node].report = Some(Report {
            standby: false,
            timeline: term,
            lsn: self.probes[node].report.map_or(0, |r| r.lsn),
            read_only: false,
        });
        self.confirm_before_publishing(term, node, ctx);
    }

    fn publish(&mut self, term: u64, node: usize, ctx: &mut Ctx) {
        let publish = PublishRequest {
            term,
            primary: self.specs[node].name.clone(),
            timeline: None,
        };
        ctx.notes.push(format!(
            "{} publishes term {term} ({})",
            self.name, publish.primary
        ));
        let _ = self
            .voter
            .publish(&publish, &mut Self::persist(&mut self.disk));
        ctx.send_to_others(self.id, &Msg::Publish(publish));
        self.phase = Phase::Idle;
    }

    /// The data plane: one write per tick through the current route,
    /// resetting a connection whose route went away.
    pub fn data_plane(&mut self, ctx: &mut Ctx) {
        let route = self.route(ctx.local, ctx.flaws);
        if let Some((node, conn)) = self.conn
            && route != Some(node)
        {
            let addr = ctx.node_addr(node);
            ctx.out.push((
                addr,
                Msg::Reset {
                    proxy: self.id,
                    conn,
                },
            ));
            self.conn = None;
        }
        let Some(node) = route else { return };
        let (node, conn) = *self.conn.get_or_insert_with(|| {
            self.next_conn += 1;
            (node, self.next_conn)
        });
        let addr = ctx.node_addr(node);
        ctx.out.push((
            addr,
            Msg::Write {
                proxy: self.id,
                conn,
            },
        ));
    }
}
