//! `--join` seeds: parsing, DNS resolution and the retry backoff.
//!
//! A seed is `host:port`, `ip:port`, `[v6]:port`, or a bare host/IP (default port). DNS
//! names are resolved again at every retry (a headless service's addresses change as pods
//! come and go) and may yield several addresses; every one is tried. Nothing but what the
//! user listed is ever contacted. Parsing and backoff are sans-IO; [`resolve`] is the only
//! I/O here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One `--join` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seed {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// Parse one `--join` entry.
pub(crate) fn parse_seed(raw: &str, default_port: u16) -> Result<Seed, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty --join entry".into());
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Seed::Addr(addr));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Seed::Addr(SocketAddr::new(ip, default_port)));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        if let Ok(ip) = inner.parse::<IpAddr>() {
            return Ok(Seed::Addr(SocketAddr::new(ip, default_port)));
        }
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => {
            let port = port.parse::<u16>().map_err(|_| {
                format!("--join {raw:?}: {port:?} is not a port number (expected host:port)")
            })?;
            (host, port)
        }
        None => (s, default_port),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !valid {
        return Err(format!(
            "--join {raw:?}: {host:?} is not a host name or IP address"
        ));
    }
    Ok(Seed::Name {
        host: host.to_string(),
        port,
    })
}

/// Addresses of the literal seeds (no DNS needed).
pub(crate) fn literal_addrs(seeds: &[Seed]) -> Vec<SocketAddr> {
    seeds
        .iter()
        .filter_map(|s| match s {
            Seed::Addr(a) => Some(*a),
            Seed::Name { .. } => None,
        })
        .collect()
}

pub(crate) fn has_names(seeds: &[Seed]) -> bool {
    seeds.iter().any(|s| matches!(s, Seed::Name { .. }))
}

/// Resolve the DNS seeds (each bounded by `timeout`); failures are logged and skipped.
pub(crate) async fn resolve(seeds: &[Seed], timeout: Duration) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for seed in seeds {
        let Seed::Name { host, port } = seed else {
            continue;
        };
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), *port))).await {
            Ok(Ok(addrs)) => out.extend(addrs),
            Ok(Err(e)) => tracing::debug!(%host, error = %e, "gossip seed did not resolve"),
            Err(_) => tracing::debug!(%host, "gossip seed resolution timed out"),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Exponential backoff between join attempts.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt; doubles up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_all_forms() {
        let a = |s: &str| Seed::Addr(s.parse().unwrap());
        assert_eq!(parse_seed("10.0.0.1:7000", 7946), Ok(a("10.0.0.1:7000")));
        assert_eq!(parse_seed(" 10.0.0.1 ", 7946), Ok(a("10.0.0.1:7946")));
        assert_eq!(parse_seed("[::1]:7000", 7946), Ok(a("[::1]:7000")));
        assert_eq!(parse_seed("[::1]", 7946), Ok(a("[::1]:7946")));
        assert_eq!(parse_seed("::1", 7946), Ok(a("[::1]:7946")));
        assert_eq!(
            parse_seed("agg.logmesh.svc:7000", 7946),
            Ok(Seed::Name {
                host: "agg.logmesh.svc".into(),
                port: 7000
            })
        );
        assert_eq!(
            parse_seed("agg", 7946),
            Ok(Seed::Name {
                host: "agg".into(),
                port: 7946
            })
        );
        assert!(parse_seed("", 1).is_err());
        assert!(parse_seed("host:http", 1).is_err());
        assert!(parse_seed("bad host:1", 1).is_err());
        assert!(parse_seed(":7000", 1).is_err());
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let got: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, vec![200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[tokio::test]
    async fn resolves_localhost_names() {
        let seeds = vec![
            parse_seed("localhost:7000", 1).unwrap(),
            parse_seed("10.1.1.1:5", 1).unwrap(),
        ];
        assert!(has_names(&seeds));
        assert_eq!(literal_addrs(&seeds), vec!["10.1.1.1:5".parse().unwrap()]);
        let got = resolve(&seeds, Duration::from_secs(5)).await;
        assert!(got.iter().all(|a| a.port() == 7000 && a.ip().is_loopback()));
        assert!(!got.is_empty());
    }

    proptest! {
        #[test]
        fn prop_parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_seed(&s, 7946);
        }

        #[test]
        fn prop_socket_addrs_roundtrip(ip in any::<std::net::Ipv4Addr>(), port in any::<u16>()) {
            let addr = SocketAddr::from((ip, port));
            prop_assert_eq!(parse_seed(&addr.to_string(), 1), Ok(Seed::Addr(addr)));
        }
    }
}
