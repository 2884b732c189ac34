//! Gossip and etcd backend settings from the node flags.

use crate::cli::NodeArgs;
use crate::config::ConfigErrors;
use discovery::etcd::EtcdConfig;
use discovery::gossip::GossipConfig;

pub fn gossip(_a: &NodeArgs, errs: &mut ConfigErrors) -> Option<GossipConfig> {
    errs.push("discovery", "gossip backend is not wired yet");
    None
}

pub fn etcd(_a: &NodeArgs, errs: &mut ConfigErrors) -> Option<EtcdConfig> {
    errs.push("discovery", "etcd backend is not wired yet");
    None
}
