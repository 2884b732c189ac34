//! The `logmesh` binary: parses the command line and runs a subcommand. Errors end here,
//! printed with their context chain, and the exit status says how it went.

use std::process::ExitCode;

use clap::Parser;
use logmesh::cli::{self, CertsCommand, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("logmesh: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Aggregator(args) => {
            let s = cli::aggregator::settings(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
            cli::node::init_logging(&s.node.log_format, &s.node.log_level);
            warn_insecure(&s.node.security);
            node_globals(&s.node);
            runtime()?.block_on(async move {
                cli::node::spawn_reload(move || cli::aggregator::settings(&args).map(|s| s.node));
                cli::aggregator::run(s).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Collector(args) => {
            let s = cli::collector::settings(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
            cli::node::init_logging(&s.node.log_format, &s.node.log_level);
            warn_insecure(&s.node.security);
            node_globals(&s.node);
            let out = runtime()?.block_on(async move {
                cli::node::spawn_reload(move || cli::collector::settings(&args).map(|s| s.node));
                cli::collector::run(s).await
            })?;
            if out.dropped_records > 0 {
                eprintln!(
                    "logmesh: {} records were dropped because the spool was full (--overflow drop-oldest)",
                    out.dropped_records
                );
            }
            if out.undelivered_records > 0 {
                eprintln!(
                    "logmesh: {} records were not delivered before the drain timeout ({} delivered); {} of them are kept in the spool and sent first at the next start",
                    out.undelivered_records, out.delivered_records, out.spooled_records
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Init { dir, force }) => {
            logmesh::transport::certs::init_ca(&dir, force)?;
            println!(
                "wrote {}/ca.pem and {}/ca.key",
                dir.display(),
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::InitCollectorCa {
            dir,
            out_dir,
            days,
            force,
        }) => {
            logmesh::transport::certs::init_collector_ca(&dir, &out_dir, days, force)?;
            let o = out_dir.display();
            println!("wrote {o}/collector-ca.pem, {o}/collector-ca.key and {o}/ca.pem");
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(CertsCommand::Issue {
            dir,
            issuer,
            out_dir,
            name,
            role,
            days,
        }) => {
            use logmesh::transport::{certs, CertError, CertRole};
            let role: CertRole = role.parse()?;
            let out = match (dir, issuer, out_dir) {
                (_, Some(issuer), Some(out)) => {
                    if role != CertRole::Collector {
                        return Err(CertError::IssuerRole(role).into());
                    }
                    certs::issue_collector(&issuer, &out, &name, days)?;
                    out
                }
                (Some(dir), _, _) => {
                    certs::issue(&dir, &name, role, days)?;
                    dir
                }
                _ => anyhow::bail!("give --dir (cluster CA) or --issuer with --out-dir"),
            };
            println!(
                "wrote {}/{name}.pem and {}/{name}.key ({role})",
                out.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen(a) => {
            let key = format!("{}\n", logmesh::discovery::gossip::generate_key());
            match &a.out {
                Some(out) => {
                    logmesh::config::write_secret_file(out, key.as_bytes(), a.force)
                        .map_err(anyhow::Error::msg)?;
                    eprintln!("wrote a new gossip key to {} (mode 0600)", out.display());
                }
                None => print!("{key}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(a) => Ok(verdict(cli::status::run(&a)?)),
        Command::Ring(a) => Ok(verdict(cli::ring::run(&a)?)),
        Command::Forget(a) => Ok(verdict(cli::status::forget(
            &a.admin,
            a.admin_token_file.as_deref(),
            &a.id,
        )?)),
        Command::CheckConfig(a) => Ok(verdict(cli::check::run(&a.file, a.role.as_deref()))),
        Command::Demo(a) => {
            cli::demo::run(&a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(a) => {
            cli::bench::run(&a)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn verdict(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Process-wide settings of the admin listener (token, cluster name shown in /status).
fn node_globals(s: &cli::node::NodeSettings) {
    logmesh::admin::set_token(s.admin_token.clone());
    if let logmesh::discovery::BackendConfig::Gossip(g) = &s.backend {
        logmesh::admin::set_cluster(&g.cluster);
    }
}

fn warn_insecure(sec: &logmesh::transport::Security) {
    if matches!(sec, logmesh::transport::Security::Insecure) {
        tracing::warn!(
            "--insecure: no certificate checks and unencrypted gossip; for experiments only"
        );
    }
}
