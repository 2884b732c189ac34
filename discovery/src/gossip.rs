//! SWIM gossip backend (foca over UDP). Placeholder until the gossip work lands.

use crate::{BackendCtx, DiscoveryError};

#[derive(Debug, Clone)]
pub struct GossipConfig {}

pub(crate) async fn spawn(_c: GossipConfig, _ctx: BackendCtx) -> Result<(), DiscoveryError> {
    Err(DiscoveryError::Config(
        "gossip backend not built yet".into(),
    ))
}
pub fn generate_key() -> String {
    String::new()
}
