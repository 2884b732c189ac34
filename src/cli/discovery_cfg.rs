//! Gossip and etcd backend settings from the node flags.

use crate::cli::NodeArgs;
use crate::config::parse_addr;
use crate::config::ConfigErrors;
use discovery::etcd::{EtcdConfig, EtcdTls};
use discovery::gossip::{GossipConfig, Keyring};

pub fn gossip(a: &NodeArgs, errs: &mut ConfigErrors) -> Option<GossipConfig> {
    let mut c = GossipConfig::default();
    if let Some(g) = &a.gossip_addr {
        match parse_addr(g) {
            Ok(addr) => c.bind = addr,
            Err(e) => errs.push("gossip-addr", e),
        }
    }
    if let Some(g) = &a.gossip_advertise {
        match parse_addr(g) {
            Ok(addr) => c.advertise = Some(addr),
            Err(e) => errs.push("gossip-advertise", e),
        }
    }
    c.join = a.join.clone();
    if let Some(cl) = &a.cluster {
        if cl.is_empty() {
            errs.push("cluster", "must not be empty");
        }
        c.cluster = cl.clone();
    }
    if let Some(path) = &a.gossip_key_file {
        if let Err(e) = crate::config::check_secret_file(path, "gossip key file") {
            errs.push("gossip-key-file", e);
        }
    }
    match (&a.gossip_key_file, a.insecure.unwrap_or(false)) {
        (Some(path), _) => match Keyring::from_file(path) {
            Ok(k) => c.keyring = Some(k),
            Err(e) => errs.push("gossip-key-file", e.to_string()),
        },
        (None, true) => c.keyring = None,
        (None, false) => errs.push(
            "gossip-key-file",
            "gossip is encrypted: give --gossip-key-file (make a key with `logmesh keygen`), or run with --insecure for experiments",
        ),
    }
    Some(c)
}

pub fn etcd(a: &NodeArgs, errs: &mut ConfigErrors) -> Option<EtcdConfig> {
    if a.etcd.is_empty() {
        errs.push(
            "etcd",
            "--discovery etcd needs at least one --etcd URL (e.g. http://127.0.0.1:2379)",
        );
        return None;
    }
    for e in &a.etcd {
        if crate::config::redact_userinfo(e) != *e {
            errs.push(
                "etcd",
                format!(
                    "{} carries credentials in the URL, where logs and /status would show them: \
                     give the user with --etcd-user and the password in LOGMESH_ETCD_PASSWORD",
                    crate::config::redact_userinfo(e)
                ),
            );
        }
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
