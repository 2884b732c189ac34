//! `logmesh status`: a thin client of a node's `/status` endpoint.

use std::io::IsTerminal;

use anyhow::Context;

use crate::admin::NodeStatus;
use discovery::MemberState;

pub fn fetch(admin: &str) -> anyhow::Result<NodeStatus> {
    let base = admin.trim_end_matches('/');
    let url = if base.starts_with("http://") || base.starts_with("https://") {
        format!("{base}/status")
    } else {
        format!("http://{base}/status")
    };
    let resp = ureq::get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .call()
        .with_context(|| {
            format!("cannot reach {url}; is the node running, and is --admin its admin address?")
        })?;
    resp.into_json::<NodeStatus>()
        .with_context(|| format!("{url} did not return a logmesh status document"))
}

fn state_rank(s: MemberState) -> u8 {
    match s {
        MemberState::Down => 0,
        MemberState::Suspect => 1,
        MemberState::Leaving => 2,
        MemberState::Left => 3,
        MemberState::Alive => 4,
    }
}

/// Render the table (problems first). Colour only when `color`.
pub fn render(st: &NodeStatus, color: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let aggs = st
        .members
        .iter()
        .filter(|m| m.member.role == discovery::Role::Aggregator)
        .count();
    let _ = writeln!(
        out,
        "mesh seen by {} ({}) via {}{} — ring {} — {} members: {} aggregators, {} collectors",
        st.node_id,
        st.role,
        st.backend,
        if st.degraded { " [DEGRADED]" } else { "" },
        &st.ring_version[..8.min(st.ring_version.len())],
        st.members.len(),
        aggs,
        st.members.len() - aggs,
    );
    if let Some(r) = &st.degraded_reason {
        let _ = writeln!(out, "  degraded: {r}");
    }
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:<21} {:<8} {:>6} {:<5}",
        "ID", "ROLE", "ADDRESS", "STATE", "SHARE", "READY"
    );
    let mut ms: Vec<_> = st.members.iter().collect();
    ms.sort_by_key(|m| {
        (
            state_rank(m.member.state),
            m.member.role,
            m.member.id.clone(),
        )
    });
    for m in ms {
        let state = m.member.state.as_str();
        let state = if color {
            let code = match m.member.state {
                MemberState::Alive => "32",
                MemberState::Suspect | MemberState::Leaving => "33",
                MemberState::Down => "31",
                MemberState::Left => "90",
            };
            format!("\x1b[{code}m{state:<8}\x1b[0m")
        } else {
            format!("{state:<8}")
        };
        let share = m
            .ring_share
            .map(|s| format!("{s:.1}%"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<21} {} {:>6} {:<5}",
            m.member.id,
            m.member.role.as_str(),
            m.member.data_addr.to_string(),
            state,
            share,
            if m.member.ready { "yes" } else { "no" }
        );
    }
    out
}

/// Healthy = at least one routable aggregator and nobody down.
pub fn healthy(st: &NodeStatus) -> bool {
    let any_agg = st
        .members
        .iter()
        .any(|m| m.member.role == discovery::Role::Aggregator && m.ring_share.is_some());
    let none_down = st
        .members
        .iter()
        .all(|m| m.member.state != MemberState::Down);
    any_agg && none_down
}

pub fn run(admin: &str, json: bool) -> anyhow::Result<bool> {
    let st = fetch(admin)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render(&st, std::io::stdout().is_terminal()));
    }
    Ok(healthy(&st))
}
