//! `logmesh check-config FILE`: validate a node's config file without starting anything —
//! the same layering ([`config::layer`]) and validation (`aggregator::validate`,
//! `collector::validate`) a node runs at start-up, so paths, addresses, certificates and
//! their roles, regexes and templates are all checked. `LOGMESH_*` environment variables are
//! applied over the file as a node would (so a container's per-pod env, e.g. its node id,
//! counts); flags are not.

use std::path::Path;

use crate::cli::{aggregator, collector, AggregatorArgs, CollectorArgs};
use crate::config::{self, ConfigErrors};
use discovery::Role;

/// Check `file` as a config of `role` (default: the file's `role` key). `Ok(role)` when
/// valid; otherwise every problem with its key.
pub fn check(file: &Path, role: Option<&str>) -> Result<Role, ConfigErrors> {
    let table = config::read_file(file)?;
    let mut errs = ConfigErrors::default();
    let role_name = match (role, table.get("role")) {
        (Some(r), _) => Some(r.to_string()),
        (None, Some(toml::Value::String(r))) => Some(r.clone()),
        (None, Some(_)) => {
            errs.push("role", "must be a string: \"aggregator\" or \"collector\"");
            None
        }
        (None, None) => {
            errs.push(
                "role",
                "missing: add role = \"aggregator\" or role = \"collector\" to the file (or pass --role)",
            );
            None
        }
    };
    let Some(role_name) = role_name else {
        return Err(errs);
    };
    match role_name.as_str() {
        "aggregator" => {
            let a = config::layer(&from_env::<AggregatorArgs>()?, Some(table), &["role"])?;
            aggregator::validate(&a).map(|_| Role::Aggregator)
        }
        "collector" => {
            let a = config::layer(&from_env::<CollectorArgs>()?, Some(table), &["role"])?;
            collector::validate(&a).map(|_| Role::Collector)
        }
        other => {
            errs.push(
                "role",
                format!("{other:?} is not a node role: expected \"aggregator\" or \"collector\""),
            );
            Err(errs)
        }
    }
}

/// The node arguments the `LOGMESH_*` environment sets (no flags).
fn from_env<A: clap::Args + clap::FromArgMatches>() -> Result<A, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let parsed = A::augment_args(clap::Command::new("logmesh"))
        .try_get_matches_from(["logmesh"])
        .and_then(|m| A::from_arg_matches(&m));
    match parsed {
        Ok(a) => Ok(a),
        Err(e) => {
            errs.push("(environment)", e.to_string());
            Err(errs)
        }
    }
}

/// Run the subcommand: print the verdict; `Ok(true)` when the file is valid.
pub fn run(file: &Path, role: Option<&str>) -> bool {
    match check(file, role) {
        Ok(r) => {
            println!("{}: valid {r} configuration", file.display());
            true
        }
        Err(errs) => {
            eprintln!("{}: invalid configuration", file.display());
            for e in &errs.0 {
                eprintln!("  {}: {}", e.key, e.message);
            }
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn names_the_broken_key() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "role = \"collector\"\ninsecure = true\nstdin = true\nstream-key = \"{unclosed\"\ndiscovery = \"static\"\nstatic-aggregators = \"a@127.0.0.1:1\"\n",
        );
        let e = check(&p, None).unwrap_err();
        assert!(e.0.iter().any(|e| e.key == "stream-key"), "{e}");
        let p = write(&d, "insecure = true\n");
        assert_eq!(check(&p, None).unwrap_err().0[0].key, "role");
        let p = write(
            &d,
            "role = \"aggregator\"\ninsecure = true\nlisten = \"nowhere\"\n",
        );
        let e = check(&p, None).unwrap_err();
        assert!(e.0.iter().any(|e| e.key == "listen"), "{e}");
    }

    #[test]
    fn accepts_a_good_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "role = \"aggregator\"\ninsecure = true\nlisten = \"127.0.0.1:0\"\n",
        );
        assert_eq!(check(&p, None).unwrap(), Role::Aggregator);
    }
}
