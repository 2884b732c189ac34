//! The static backend: a fixed aggregator list, always alive. For tests and small setups.

use std::sync::Arc;

use crate::{BackendCtx, Command, DiscoveryError, Member, MemberState, Role, StaticConfig, View};

pub(crate) fn spawn(config: StaticConfig, ctx: BackendCtx) -> Result<(), DiscoveryError> {
    let mut seen = std::collections::HashSet::new();
    for p in &config.aggregators {
        if !seen.insert(p.id.clone()) {
            return Err(DiscoveryError::Config(format!(
                "aggregator id {:?} appears twice in the static list",
                p.id
            )));
        }
    }
    let BackendCtx {
        mut local,
        mut commands,
        view,
        cancel,
        ..
    } = ctx;
    let build = move |local: &Member| {
        let mut v = View {
            backend: "static".into(),
            ..View::default()
        };
        for p in &config.aggregators {
            v.members.insert(
                p.id.clone(),
                Member {
                    id: p.id.clone(),
                    role: Role::Aggregator,
                    data_addr: p.addr,
                    admin_addr: p.addr,
                    zone: String::new(),
                    version: String::new(),
                    weight: 1,
                    state: MemberState::Alive,
                    incarnation: 0,
                    ready: true,
                    stats: None,
                },
            );
        }
        v.members.insert(local.id.clone(), local.clone());
        Arc::new(v)
    };
    view.send_replace(build(&local));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(Command::SetLocal(m)) => {
                        local = *m;
                        view.send_replace(build(&local));
                    }
                    Some(Command::SetStats(st)) => {
                        local.stats = Some(st);
                        view.send_replace(build(&local));
                    }
                    Some(Command::SetKeyring(_)) => {}
                    Some(Command::Forget(_, reply)) => {
                        // The static list is fixed: nothing to forget.
                        let _ = reply.send(false);
                    }
                    Some(Command::Leave(reply)) => {
                        local.state = MemberState::Leaving;
                        view.send_replace(build(&local));
                        let _ = reply.send(());
                    }
                },
            }
        }
    });
    Ok(())
}
