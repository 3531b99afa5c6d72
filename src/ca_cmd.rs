//! `isthmus ca rotate`: one step of a cluster CA's rotation in a control plane's CA directory
//! (docs/security.md §5; the files and steps are `isthmus_control::ca_rotation`'s). Run it on
//! the control plane's machine, then restart the control plane.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use isthmus_control::ca_rotation::{self, NextCa};

/// What `isthmus ca rotate` was asked for.
#[derive(clap::Args, Debug, Clone)]
pub struct Rotate {
    /// The control plane's data directory (or its caDir), holding ca.pem and ca-key.pem.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The control plane's certLifetime: the old CA is retired only this long after the
    /// new one started signing.
    #[arg(long, value_parser = parse_lifetime, default_value = "1h")]
    pub cert_lifetime: Duration,
    /// Retire the old CA now, even if certificates it signed may still be valid.
    #[arg(long)]
    pub force: bool,
    /// The trust domain a generated CA names. Default: the one the current CA names.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Stage this CA certificate (PEM) instead of generating one (with --next-key).
    #[arg(long, requires = "next_key")]
    pub next_cert: Option<PathBuf>,
    /// The key of --next-cert (PEM).
    #[arg(long, requires = "next_cert")]
    pub next_key: Option<PathBuf>,
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    isthmus_core::config::parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?}: expected e.g. 1h or 30m"))
}

/// Takes the step and says what it did and what comes next.
pub fn run(req: &Rotate) -> anyhow::Result<()> {
    let next = || -> Result<NextCa, String> {
        if let (Some(cert), Some(key)) = (&req.next_cert, &req.next_key) {
            let read = |file: &PathBuf, what: &str| {
                std::fs::read_to_string(file)
                    .map_err(|e| format!("--{what}: reading {}: {e}", file.display()))
            };
            return Ok(NextCa::Supplied {
                cert_pem: read(cert, "next-cert")?,
                key_pem: read(key, "next-key")?,
            });
        }
        let trust_domain = match &req.trust_domain {
            Some(td) => td.clone(),
            None => {
                let current = req.data_dir.join(ca_rotation::CERT);
                let pem = std::fs::read_to_string(&current)
                    .map_err(|e| format!("reading {}: {e}", current.display()))?;
                isthmus_core::ca::trust_domain_named_by(&pem).ok_or_else(|| {
                    format!(
                        "{} names no trust domain (not a CA Isthmus generated): pass \
                         --trust-domain, or --next-cert and --next-key",
                        current.display()
                    )
                })?
            }
        };
        Ok(NextCa::Generate { trust_domain })
    };
    let step = ca_rotation::rotate(
        &req.data_dir,
        next,
        req.cert_lifetime,
        SystemTime::now(),
        req.force,
    )
    .context("isthmus ca rotate")?;
    let done = match step {
        ca_rotation::Step::Staged => format!(
            "staged a new CA as {}",
            req.data_dir.join(ca_rotation::NEXT_CERT).display()
        ),
        ca_rotation::Step::Activated => format!(
            "the new CA is {} (the old one is kept as {})",
            req.data_dir.join(ca_rotation::CERT).display(),
            req.data_dir.join(ca_rotation::PREVIOUS_CERT).display()
        ),
        ca_rotation::Step::Retired => "retired the old CA".to_string(),
    };
    println!("{done}.\nNext: {}", step.next());
    Ok(())
}
