//! Text rendering of the cluster status and events for operators.

use std::fmt::Write;

use crate::admin::ClusterStatus;
use crate::events::Event;

/// A table like `repmgr cluster show`, then term, writes and voters.
pub fn render(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let header = [
        "Name", "Role", "State", "Upstream", "Timeline", "LSN", "Lag", "Pooled", "Note",
    ];
    let rows: Vec<[String; 9]> = s
        .nodes
        .iter()
        .map(|n| {
            let note = match (&n.detail, n.needs_rejoin) {
                (_, true) => "needs rejoin (fenced read-only)".to_string(),
                (Some(d), false) => d.clone(),
                (None, false) => String::new(),
            };
            [
                n.name.clone(),
                n.role.clone(),
                n.state.clone(),
                n.upstream.clone().unwrap_or_else(|| "-".into()),
                n.timeline
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                n.lsn.clone().unwrap_or_else(|| "-".into()),
                n.lag_bytes
                    .map(|b| format!("{b} B"))
                    .unwrap_or_else(|| "-".into()),
                n.pooled.to_string(),
                note,
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join(" | ").trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&header));
    let _ = writeln!(
        out,
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Term {}, primary {}, writes routed to {}",
        s.term,
        s.primary.as_deref().unwrap_or("none"),
        s.routing_to.as_deref().unwrap_or("nobody")
    );
    if let Some(reason) = &s.writes_blocked {
        let _ = writeln!(out, "Writes blocked: {reason}");
    }
    if let Some(standby) = &s.synchronous_standby {
        let _ = writeln!(
            out,
            "Synchronous standby: {standby} (recorded with the voters; the only failover target)"
        );
    }
    if !s.unmatched_standbys.is_empty() {
        let _ = writeln!(
            out,
            "Standbys under unknown names: {} (application_name matches no --node: never synchronous, never promoted)",
            s.unmatched_standbys.join(", ")
        );
    }
    if let Some(paused) = s.failover_paused {
        let _ = writeln!(
            out,
            "Automatic failover: {}",
            if paused { "paused" } else { "on" }
        );
    }
    if s.lease_needed {
        let _ = writeln!(
            out,
            "Routing lease: {}",
            if s.lease_valid { "held" } else { "NOT held" }
        );
    }
    let voters: Vec<String> = s
        .voters
        .iter()
        .map(|v| match (v.reachable, &v.kind) {
            (true, Some(kind)) => {
                format!("{} ({kind:?}, term {})", v.name, v.term.unwrap_or(0)).to_lowercase()
            }
            _ => format!("{} (unreachable)", v.name),
        })
        .collect();
    let _ = writeln!(out, "Voters: {}", voters.join(", "));
    out
}

/// One event per line: time, term, kind, node, detail, duration.
pub fn event_line(e: &Event) -> String {
    let at = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_ms),
    );
    let duration = e
        .duration_ms
        .map(|d| format!(" ({d} ms)"))
        .unwrap_or_default();
    format!(
        "{at}  term {:<3} {:<18} {:<6} {}{duration}",
        e.term,
        e.kind,
        e.node.as_deref().unwrap_or("-"),
        e.detail
    )
}

/// What a switchover did, or would do with `--dry-run`.
pub fn switchover(r: &crate::failover::SwitchoverReport) -> String {
    let lag = r
        .lag_bytes
        .map(|b| format!("{b} bytes"))
        .unwrap_or_else(|| "unknown".into());
    let mut out = format!(
        "{} switchover from {} to {} (term {}): target lag {lag}; {} sessions on {}, {} inside a transaction",
        if r.dry_run { "Would run" } else { "Ran" },
        r.from,
        r.to,
        r.term,
        r.sessions,
        r.from,
        r.open_transactions
    );
    if let Some(pause) = r.pause_ms {
        let drained = if r.drained == Some(false) {
            " (drain timeout reached)"
        } else {
            ""
        };
        out.push_str(&format!(
            "\nClients paused {pause} ms{drained}; old primary's last WAL {}",
            r.final_lsn.as_deref().unwrap_or("-")
        ));
    }
    out
}
