//! `isthmus credentials issue`: an operator credential, a client certificate for
//! `spiffe://<trust-domain>/operator/<role>/<name>` from a cluster's CA (docs/security.md §3,
//! §6), written beside an optional context that presents it. With `--data-dir` the CA files
//! sign it here (the first admin's way in); without, a control plane's
//! `CredentialService.Issue` does, for one of its cluster's admins (the key never leaves this
//! machine: only a CSR is sent).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::contexts::{config_path, Contexts};
use isthmus_core::durable::{write_atomic, Access};
use isthmus_core::identity::{OperatorId, Role};

/// The longest an operator credential may live.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// What `isthmus credentials issue` was asked for.
#[derive(clap::Args, Debug, Clone)]
pub struct Issue {
    /// The operator's name (a DNS label).
    #[arg(long)]
    pub name: String,
    /// viewer (get, status, explain) or admin (also this cluster's records; with a
    /// mesh-admin grant, policies and membership).
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// The control plane's data directory (or its caDir), holding ca.pem and ca-key.pem.
    /// Without it, the control plane named by --control/--context issues the credential
    /// (you must be one of its cluster's admins).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Default: the trust domain the CA names (`Isthmus CA <trust-domain>`).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// How long the credential is valid (at most 365 days).
    #[arg(long, value_parser = parse_ttl, default_value = "720h")]
    pub ttl: Duration,
    /// Where to write <name>.pem and <name>-key.pem.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Also add (or replace) a context of this name that presents the credential (with
    /// --data-dir, --control names its control plane).
    #[arg(long)]
    pub add_context: Option<String>,
    #[command(flatten)]
    pub api: crate::policy_cmd::ControlArgs,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|_| format!("invalid role {s:?}: viewer or admin"))
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    isthmus_core::config::parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?}: expected e.g. 24h or 720h"))
}

/// `isthmus credentials issue`: issues the credential and says where it went.
pub async fn run(req: &Issue) -> anyhow::Result<()> {
    let (cert, key) = issue(req).await?;
    println!("wrote {} and {}", cert.display(), key.display());
    if let Some(context) = &req.add_context {
        println!("context {context} presents it (isthmus context use {context})");
    }
    Ok(())
}

/// Issues the credential; returns the certificate and key paths.
pub async fn issue(req: &Issue) -> anyhow::Result<(PathBuf, PathBuf)> {
    if req.ttl.is_zero() || req.ttl > MAX_TTL {
        bail!("--ttl: an operator credential lives longer than zero and at most 365 days");
    }
    // The credential, and the control plane (address, CA file) a context would name.
    let (chain_pem, key_pem, control, ca_file) = match &req.data_dir {
        Some(dir) => {
            let (chain, key, ca_file) = issue_from_ca_files(req, dir)?;
            (chain, key, req.api.control.clone(), ca_file)
        }
        None => {
            let client = req.api.client()?;
            let (chain, key) = client
                .issue_credential(&req.name, req.role, req.ttl)
                .await
                .with_context(|| format!("asking the control plane at {}", client.addr()))?;
            let target = req.api.target()?;
            let ca_file = target
                .as_ref()
                .and_then(|t| t.ca_file.clone())
                .context("the control plane's CA file (--ca-file or the context's)")?;
            (chain, key, Some(client.addr().to_string()), ca_file)
        }
    };
    if req.add_context.is_some() && control.is_none() {
        bail!("--add-context needs --control, the control-plane API address the context names");
    }
    std::fs::create_dir_all(&req.out)
        .with_context(|| format!("--out: creating {}", req.out.display()))?;
    let cert_file = absolute(&req.out.join(format!("{}.pem", req.name)))?;
    let key_file = absolute(&req.out.join(format!("{}-key.pem", req.name)))?;
    // Key first, owner-only; then the certificate.
    write_atomic(&key_file, key_pem.as_bytes(), Access::Private)
        .with_context(|| format!("writing {}", key_file.display()))?;
    write_atomic(&cert_file, chain_pem.as_bytes(), Access::Default)
        .with_context(|| format!("writing {}", cert_file.display()))?;
    if let (Some(name), Some(control)) = (&req.add_context, control) {
        let path = config_path(&|v| std::env::var(v).ok())?;
        let mut all = Contexts::load(&path)?;
        all.contexts.insert(
            name.clone(),
            isthmus_core::contexts::Context {
                control,
                ca_file: absolute(&ca_file)?,
                cert_file: Some(cert_file.clone()),
                key_file: Some(key_file.clone()),
            },
        );
        all.save(&path)?;
    }
    Ok((cert_file, key_file))
}

/// Signs the credential with the CA files in `dir`: (chain PEM, key PEM, the CA file).
fn issue_from_ca_files(req: &Issue, dir: &Path) -> anyhow::Result<(String, String, PathBuf)> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    let ca_pem = std::fs::read_to_string(&cert_path)
        .with_context(|| format!("--data-dir: reading {}", cert_path.display()))?;
    let ca_key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("--data-dir: reading {}", key_path.display()))?;
    let trust_domain = match &req.trust_domain {
        Some(td) => td.clone(),
        None => isthmus_core::ca::trust_domain_named_by(&ca_pem).with_context(|| {
            format!(
                "{} does not name its trust domain (an operator-supplied CA): give --trust-domain",
                cert_path.display()
            )
        })?,
    };
    let ca = CertificateAuthority::from_pem(&trust_domain, &ca_pem, &ca_key)
        .with_context(|| format!("loading the CA in {}", dir.display()))?;
    let id = OperatorId::new(&trust_domain, req.role, &req.name).context("--name")?;
    let issued = ca
        .issue_operator(&id, req.ttl)
        .with_context(|| format!("issuing {id}"))?;
    Ok((issued.cert_chain_pem, issued.key_pem, cert_path))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}
