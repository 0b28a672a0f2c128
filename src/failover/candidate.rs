//! Choosing the standby to promote: healthy, same system, same timeline
//! lineage, furthest in the WAL, close enough to the old primary; in
//! synchronous mode only the synchronous standby recorded with the voters.

use crate::config::FailoverConfig;
use crate::monitor::{Lsn, NodeStatus};
use crate::topology::{NodeHealth, NodeState};

#[derive(Debug, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    /// The candidate's WAL position when chosen.
    pub position: Lsn,
    /// Bytes the old primary had written beyond it (data at risk in
    /// asynchronous mode), when the old primary's position is known.
    pub gap: Option<u64>,
}

/// Picks the standby to promote in place of node `old`, or says why none
/// qualifies. Ties go to the old primary (when demoted), then to the node
/// listed first. In synchronous mode only `designated` (the standby the
/// voters recorded) qualifies.
pub fn pick(
    nodes: &[NodeState],
    statuses: &[Option<NodeStatus>],
    old: usize,
    config: &FailoverConfig,
    designated: Option<&str>,
) -> Result<Candidate, String> {
    let old_status = statuses.get(old).and_then(Option::as_ref);
    let old_position = old_status.and_then(NodeStatus::wal_position);
    let mut refusals = Vec::new();
    let mut best: Option<Candidate> = None;
    for (index, node) in nodes.iter().enumerate() {
        // The old primary itself only when it was demoted: in recovery it
        // still holds every record it wrote.
        let reference = if index == old {
            if node.health != NodeHealth::Standby {
                continue;
            }
            Reference::Itself
        } else {
            Reference::OldPrimary(old_status)
        };
        match qualify(
            node,
            statuses.get(index).and_then(Option::as_ref),
            reference,
            config.synchronous.then_some(designated),
        ) {
            Ok(position) => {
                let gap = old_position.map(|p| p.saturating_sub(position));
                if let Some(gap) = gap.filter(|g| !config.synchronous && *g > config.max_lag) {
                    refusals.push(format!(
                        "{}: {gap} bytes behind (max-lag-on-failover {})",
                        node.spec.name, config.max_lag
                    ));
                    continue;
                }
                // On a tie the demoted old primary wins: promoting it
                // forks no timeline.
                let better = best.as_ref().is_none_or(|b| {
                    position > b.position || (position == b.position && index == old)
                });
                if better {
                    best = Some(Candidate {
                        index,
                        position,
                        gap,
                    });
                }
            }
            Err(reason) => refusals.push(format!("{}: {reason}", node.spec.name)),
        }
    }
    best.ok_or_else(|| format!("no standby can be promoted ({})", refusals.join("; ")))
}

/// What a candidate is checked against.
#[derive(Clone, Copy)]
enum Reference<'a> {
    /// The old primary's last status, when it was ever seen.
    OldPrimary(Option<&'a NodeStatus>),
    /// The candidate is the old primary, demoted: nothing to compare.
    Itself,
}

/// `synchronous`: in synchronous mode, the standby the voters recorded.
fn qualify(
    node: &NodeState,
    status: Option<&NodeStatus>,
    reference: Reference<'_>,
    synchronous: Option<Option<&str>>,
) -> Result<Lsn, String> {
    if node.health != NodeHealth::Standby {
        return Err(format!("is {}", node.health));
    }
    let status = status.ok_or("no status yet")?;
    let Reference::OldPrimary(old) = reference else {
        return status
            .wal_position()
            .ok_or_else(|| "no WAL position".into());
    };
    match synchronous {
        Some(Some(d)) if d != node.spec.name => {
            return Err(format!("not the recorded synchronous standby ({d})"));
        }
        Some(None) => return Err("no synchronous standby is recorded".into()),
        _ => {}
    }
    if let Some(old) = old {
        if old.system_id.is_some() && status.system_id != old.system_id {
            return Err("different system identifier".into());
        }
        if let (Some(mine), Some(theirs)) = (status.timeline, old.timeline)
            && mine != theirs
        {
            return Err(format!("on timeline {mine}, primary was on {theirs}"));
        }
    }
    status
        .wal_position()
        .ok_or_else(|| "no WAL position".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{FailoverMode, NodeSpec};
    use crate::monitor::Replica;

    fn node(name: &str, health: NodeHealth) -> NodeState {
        NodeState {
            spec: Arc::new(NodeSpec {
                name: name.into(),
                host: "h".into(),
                port: 1,
            }),
            health,
        }
    }

    fn standby(receive: Lsn) -> Option<NodeStatus> {
        Some(NodeStatus {
            in_recovery: true,
            system_id: Some("42".into()),
            timeline: Some(1),
            receive_lsn: Some(receive),
            replay_lsn: Some(receive),
            ..Default::default()
        })
    }

    fn primary(current: Lsn, sync: &str) -> Option<NodeStatus> {
        Some(NodeStatus {
            system_id: Some("42".into()),
            timeline: Some(1),
            current_lsn: Some(current),
            replicas: vec![Replica {
                name: sync.into(),
                state: "streaming".into(),
                sync_state: "sync".into(),
                flush_lsn: None,
            }],
            ..Default::default()
        })
    }

    fn config(synchronous: bool) -> FailoverConfig {
        FailoverConfig {
            mode: FailoverMode::Auto,
            max_lag: 1000,
            synchronous,
            synchronous_strict: false,
            drain_timeout: std::time::Duration::from_secs(10),
        }
    }

    fn cluster() -> Vec<NodeState> {
        vec![
            node("n1", NodeHealth::Down("refused".into())),
            node("n2", NodeHealth::Standby),
            node("n3", NodeHealth::Standby),
        ]
    }

    #[test]
    fn prefers_the_furthest_standby_and_reports_the_gap() {
        let statuses = vec![primary(5000, "n2"), standby(4000), standby(4500)];
        let c = pick(&cluster(), &statuses, 0, &config(false), None).expect("a candidate");
        assert_eq!(c.index, 2);
        assert_eq!(c.gap, Some(500));
    }

    #[test]
    fn refuses_standbys_too_far_behind() {
        let statuses = vec![primary(9000, "n2"), standby(4000), standby(4500)];
        let e = pick(&cluster(), &statuses, 0, &config(false), None).expect_err("too far");
        assert!(e.contains("bytes behind"), "{e}");
    }

    /// The old primary's last probe (n2 synchronous) may be stale: only
    /// the standby recorded with the voters counts.
    #[test]
    fn synchronous_mode_takes_only_the_recorded_standby() {
        let statuses = vec![primary(9000, "n2"), standby(4000), standby(4500)];
        let c = pick(&cluster(), &statuses, 0, &config(true), Some("n3")).expect("n3");
        assert_eq!(c.index, 2);
        let c = pick(&cluster(), &statuses, 0, &config(true), Some("n2")).expect("n2");
        assert_eq!(c.index, 1);
        let e = pick(&cluster(), &statuses, 0, &config(true), None).expect_err("none recorded");
        assert!(e.contains("no synchronous standby is recorded"), "{e}");
    }

    #[test]
    fn skips_other_systems_and_timelines() {
        let mut other = standby(4600);
        other.as_mut().expect("status").system_id = Some("7".into());
        let mut forked = standby(4700);
        forked.as_mut().expect("status").timeline = Some(2);
        let mut nodes = cluster();
        nodes.push(node("n4", NodeHealth::Standby));
        let statuses = vec![primary(5000, "n2"), standby(4000), other, forked];
        let c = pick(&nodes, &statuses, 0, &config(false), None).expect("n2 only");
        assert_eq!(c.index, 1);
    }

    #[test]
    fn a_demoted_old_primary_is_a_candidate_even_in_synchronous_mode() {
        let mut nodes = cluster();
        nodes[0].health = NodeHealth::Standby;
        let statuses = vec![standby(5000), standby(4000), standby(4500)];
        for synchronous in [false, true] {
            let c = pick(&nodes, &statuses, 0, &config(synchronous), None).expect("n1 itself");
            assert_eq!((c.index, c.gap), (0, Some(0)));
        }
        nodes.swap(0, 1);
        let statuses = vec![standby(5000), standby(5000), standby(4500)];
        for synchronous in [false, true] {
            let c = pick(&nodes, &statuses, 1, &config(synchronous), None).expect("n1 itself");
            assert_eq!(c.index, 1, "the old primary wins a tie");
        }
    }
}
