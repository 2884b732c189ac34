//! Layered configuration: TOML file < `LOGMESH_*` environment < flags, then validation into
//! typed settings before anything starts. Every problem is reported with its key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One configuration problem, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// All problems found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for e in &self.0 {
            writeln!(f, "  {}: {}", e.key, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    pub fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.to_string(),
            message: message.into(),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn into_result<T>(self, ok: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(self)
        }
    }
}

/// Long flag names of a clap `Args` type: the keys a config file may hold.
pub fn known_keys<A: clap::Args>() -> Vec<String> {
    A::augment_args(clap::Command::new("logmesh"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect()
}

/// Read a TOML config file into a table with keys normalised to flag spelling
/// (`node_id` and `node-id` both mean `--node-id`).
pub fn read_file(path: &Path) -> Result<toml::Table, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errs.push("config", format!("cannot read {}: {e}", path.display()));
            return Err(errs);
        }
    };
    match text.parse::<toml::Table>() {
        Ok(t) => Ok(t
            .into_iter()
            .map(|(k, v)| (k.replace('_', "-"), v))
            .collect()),
        Err(e) => {
            errs.push(
                "config",
                format!("{} is not valid TOML: {e}", path.display()),
            );
            Err(errs)
        }
    }
}

/// Layer `cli` (flags and env, as clap parsed them) over `file` and return the merged args.
/// Keys of `file` that are not flags of `A` (other than those in `extra_keys`) are errors.
pub fn layer<A>(cli: &A, file: Option<toml::Table>, extra_keys: &[&str]) -> Result<A, ConfigErrors>
where
    A: clap::Args + Serialize + DeserializeOwned,
{
    let mut errs = ConfigErrors::default();
    let known = known_keys::<A>();
    let mut merged = toml::Table::new();
    if let Some(file) = file {
        for (k, v) in file {
            if k == "config" {
                errs.push("config", "a config file cannot name another config file");
            } else if known.contains(&k) {
                merged.insert(k, v);
            } else if !extra_keys.contains(&k.as_str()) {
                errs.push(&k, "unknown key (see config.example.toml for every key)");
            }
        }
    }
    match toml::Table::try_from(cli) {
        Ok(over) => {
            for (k, v) in over {
                merged.insert(k, v);
            }
        }
        Err(e) => errs.push("(flags)", e.to_string()),
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    match A::deserialize(merged) {
        Ok(a) => Ok(a),
        Err(e) => {
            // serde's message names the field ("invalid type ... for key `x`")
            errs.push("config", e.to_string());
            Err(errs)
        }
    }
}

/// Refuses a secret file (private key, gossip keyring, admin token) that other users could
/// read: any permission for others, or for the group unless the file belongs to root and the
/// group may only read it (how Kubernetes mounts a Secret with `fsGroup`). Symlinks are
/// followed. A missing file is not an error here (the reader reports it).
pub fn check_secret_file(path: &Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.mode() & 0o777;
    let root_group_read = meta.uid() == 0 && mode & 0o070 == 0o040;
    if mode & 0o007 != 0 || (mode & 0o070 != 0 && !root_group_read) {
        return Err(format!(
            "the {what} {p} is readable by other users (mode {mode:04o}): run `chmod 600 {p}`",
            p = path.display()
        ));
    }
    Ok(())
}

/// Writes a secret file with mode 0600 from creation on (never briefly readable by others).
/// Refuses to replace an existing file unless `overwrite`.
pub fn write_secret_file(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} already exists: pass --force to replace it",
                path.display()
            )
        } else {
            format!("cannot write {}: {e}", path.display())
        }
    })?;
    // `mode` applies only on creation; an overwritten file is made private too
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(contents))
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `s` with the user-info of every URL in it (`scheme://user:password@host`) replaced by
/// `***`, for anything shown in logs or `/status`.
pub fn redact_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // the authority ends at the first '/', '?', '#', whitespace or quote
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Parse a duration such as "200ms", "5s", "1m" or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(std::time::Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 200ms, 5s or 1m"))
}

/// Parse a socket address, resolving a host name if needed.
pub fn parse_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not a HOST:PORT address ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{AggregatorArgs, CollectorArgs};

    #[test]
    fn flags_win_over_file_and_unknown_keys_are_named() {
        let file: toml::Table =
            "node_id = \"from-file\"\nlisten = \"127.0.0.1:9\"\nout-dir = \"/x\""
                .parse()
                .unwrap();
        let file: toml::Table = file
            .into_iter()
            .map(|(k, v)| (k.replace('_', "-"), v))
            .collect();
        let mut cli = AggregatorArgs::default();
        cli.node = crate::cli::NodeArgs {
            node_id: Some("from-flag".into()),
            ..Default::default()
        };
        let a = layer(&cli, Some(file), &[]).unwrap();
        assert_eq!(a.node.node_id.as_deref(), Some("from-flag"));
        assert_eq!(a.listen.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(a.out_dir.as_deref(), Some(Path::new("/x")));

        let bad: toml::Table = "lisen = \"x\"".parse().unwrap();
        let e = layer(&AggregatorArgs::default(), Some(bad), &[]).unwrap_err();
        assert_eq!(e.0[0].key, "lisen");
    }

    #[test]
    fn lists_and_bools_layer() {
        let file: toml::Table = "tail = [\"/a/*.log\"]\nstdin = true\nlabel = [\"env=prod\"]"
            .parse()
            .unwrap();
        let cli = CollectorArgs {
            label: vec!["host=h1".into()],
            ..Default::default()
        };
        let a = layer(&cli, Some(file), &[]).unwrap();
        assert_eq!(a.tail, vec!["/a/*.log"]);
        assert!(a.stdin);
        assert_eq!(a.label, vec!["host=h1"]);
    }

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_userinfo("POST http://u:p@h:1/x failed; see https://h2/a@b"),
            "POST http://***@h:1/x failed; see https://h2/a@b"
        );
        assert_eq!(redact_userinfo("no url here"), "no url here");
        assert_eq!(
            redact_userinfo("\"nats://tok@n:4222\""),
            "\"nats://***@n:4222\""
        );
    }

    #[test]
    fn secret_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, "x").unwrap();
        // group read is accepted on root-owned files only (Kubernetes Secrets under fsGroup)
        let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&p).unwrap()) == 0;
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o640, root),
            (0o660, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_secret_file(&p, "key");
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            }
        }
        assert!(check_secret_file(&d.path().join("missing"), "key").is_ok());
    }

    #[test]
    fn secret_files_are_written_private_and_not_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_secret_file(&p, b"one", false).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = write_secret_file(&p, b"two", false).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_file(&p, b"two", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap().as_millis(), 200);
        assert_eq!(parse_duration("2").unwrap().as_secs(), 2);
        assert!(parse_duration("soon").is_err());
    }
}
