//! The simulated world: real time, one event queue, per-member clocks
//! with bounded rate drift, a network of hosts with cuts, delays, loss,
//! duplication and reordering, and the seeded PRNG that decides all of
//! it. Nothing here knows the protocol.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::member::Msg;

/// Real (simulated) time in milliseconds.
pub type Time = u64;

/// SplitMix64: small, fast, and the same sequence on every platform and
/// crate version, so a seed replays exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn float(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A member's monotonic clock: `local = offset + rate · real`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub rate: f64,
    pub offset: f64,
}

impl Clock {
    pub fn local(&self, t: Time) -> u64 {
        (self.offset + self.rate * t as f64) as u64
    }

    /// The real time at which this clock reads `local` (rounded up).
    pub fn real(&self, local: u64) -> Time {
        ((local as f64 - self.offset) / self.rate).ceil().max(0.0) as Time
    }
}

/// Something that happens at an instant.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message arrives at `to` (a member or a node address).
    Deliver { from: usize, to: usize, msg: Msg },
    /// A member's periodic timer.
    Tick { member: usize },
    /// A node's background work (replication, a stop completing).
    NodeWork { node: usize },
    /// The next fault of the schedule.
    Fault,
    /// A member's freeze ends.
    Thaw { member: usize },
    /// A crashed member starts again.
    Restart { member: usize },
    /// Every network fault ends.
    Heal,
}

/// The event queue, ordered by time then insertion.
#[derive(Default)]
pub struct Queue {
    heap: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: Vec<Option<Event>>,
    seq: u64,
}

impl Queue {
    pub fn push(&mut self, at: Time, event: Event) {
        self.seq += 1;
        self.events.push(Some(event));
        self.heap
            .push(Reverse((at, self.seq, self.events.len() - 1)));
    }

    pub fn pop(&mut self) -> Option<(Time, Event)> {
        let Reverse((at, _, slot)) = self.heap.pop()?;
        let event = self.events[slot].take()?;
        if self.heap.is_empty() {
            self.events.clear();
        }
        Some((at, event))
    }
}

/// Which host can send to which.
#[derive(Debug, Clone)]
pub struct Network {
    hosts: usize,
    /// `cut[a * hosts + b]`: packets from host a to host b are dropped.
    cut: Vec<bool>,
    /// Extra delay on every message (a slow network), until healed.
    pub slow_ms: u64,
    pub loss_percent: u64,
    pub duplicate_percent: u64,
}

impl Network {
    pub fn new(hosts: usize) -> Self {
        Self {
            hosts,
            cut: vec![false; hosts * hosts],
            slow_ms: 0,
            loss_percent: 0,
            duplicate_percent: 0,
        }
    }

    pub fn can_send(&self, from: usize, to: usize) -> bool {
        from == to || !self.cut[from * self.hosts + to]
    }

    pub fn cut_one_way(&mut self, from: usize, to: usize) {
        if from != to {
            self.cut[from * self.hosts + to] = true;
        }
    }

    pub fn split(&mut self, side: &[bool]) {
        for a in 0..self.hosts {
            for b in 0..self.hosts {
                if side[a] != side[b] {
                    self.cut[a * self.hosts + b] = true;
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.iter_mut().for_each(|c| *c = false);
        self.slow_ms = 0;
        self.loss_percent = 0;
        self.duplicate_percent = 0;
    }
}
