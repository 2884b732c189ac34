//! Gossip and etcd backend settings from the node flags.

use crate::cli::NodeArgs;
use crate::config::ConfigErrors;
use discovery::etcd::{EtcdConfig, EtcdTls};
use discovery::gossip::GossipConfig;

pub fn gossip(_a: &NodeArgs, errs: &mut ConfigErrors) -> Option<GossipConfig> {
    errs.push("discovery", "gossip backend is not wired yet");
    None
}

pub fn etcd(a: &NodeArgs, errs: &mut ConfigErrors) -> Option<EtcdConfig> {
    if a.etcd.is_empty() {
        errs.push(
            "etcd",
            "--discovery etcd needs at least one --etcd URL (e.g. http://127.0.0.1:2379)",
        );
        return None;
    }
    let mut c = EtcdConfig::new(a.etcd.clone());
    if let Some(p) = &a.etcd_prefix {
        c.prefix = p.clone();
    }
    if let Some(t) = a.etcd_ttl {
        if t == 0 {
            errs.push("etcd-ttl", "must be at least 1 second");
        }
        c.ttl_secs = t;
    }
    c.user = a.etcd_user.clone();
    c.password = a.etcd_password.clone();
    match (&a.etcd_ca, &a.etcd_cert, &a.etcd_key) {
        (None, None, None) => {}
        (Some(ca), cert, key) => {
            c.tls = Some(EtcdTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })
        }
        (None, _, _) => errs.push("etcd-ca", "--etcd-cert/--etcd-key need --etcd-ca as well"),
    }
    Some(c)
}
