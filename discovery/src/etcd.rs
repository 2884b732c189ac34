//! etcd backend. Placeholder until the etcd work lands.

use crate::{BackendCtx, DiscoveryError};

#[derive(Debug, Clone)]
pub struct EtcdConfig {}

pub(crate) async fn spawn(_c: EtcdConfig, _ctx: BackendCtx) -> Result<(), DiscoveryError> {
    Err(DiscoveryError::Config("etcd backend not built yet".into()))
}
