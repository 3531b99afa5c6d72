//! `isthmus apply|get|delete`: mesh-wide policies, through a cluster's control plane.
//!
//! `apply` validates the file locally first (errors name the file, the document and the field
//! path), then the control plane validates again and stores every document in the federation
//! store, from where every cluster's control plane streams it to its sidecars.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use isthmus_core::client::ControlClient;
use isthmus_core::contexts;
use isthmus_core::policy::{parse_documents, Kind};

/// The control plane the CLI talks to when `--control` is not given.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:15012";

/// How the CLI reaches a control plane's API (TLS only, docs/control-api.md): `--control`
/// (or `$ISTHMUS_CONTROL`) with `--ca-file` (or `$ISTHMUS_CA_FILE`); else a context from the
/// operator's contexts file (`--context NAME`, or its current context, as `isthmus demo`
/// writes them); else 127.0.0.1:15012 with `--ca-file`. The operator credential presented
/// is `--cert`/`--key` (or `$ISTHMUS_CERT`/`$ISTHMUS_KEY`), else the context's.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// Control-plane API address, host:port (default $ISTHMUS_CONTROL, the context's, or
    /// 127.0.0.1:15012).
    #[arg(long)]
    pub control: Option<String>,
    /// The cluster CA's PEM file (the control plane's <dataDir>/ca.pem), which the API's
    /// certificate must chain to (default $ISTHMUS_CA_FILE, or the context's).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// A context of the contexts file ($ISTHMUS_CONFIG, default ~/.config/isthmus/config.yaml);
    /// default: its current context.
    #[arg(long)]
    pub context: Option<String>,
    /// An operator credential's certificate (PEM, from `isthmus credentials issue`;
    /// default $ISTHMUS_CERT, or the context's).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// The credential's private key (PEM; default $ISTHMUS_KEY, or the context's).
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// A control plane to call and what to present to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl ControlArgs {
    /// The control plane these arguments, the environment or the context name: `None` when
    /// nothing names one (no flag, no variable, no context).
    pub fn target(&self) -> anyhow::Result<Option<Target>> {
        if let Some(addr) = self
            .control
            .clone()
            .or_else(|| std::env::var("ISTHMUS_CONTROL").ok())
        {
            return Ok(Some(Target {
                addr,
                ca_file: flag_or_env(&self.ca_file, "ISTHMUS_CA_FILE"),
                cert_file: flag_or_env(&self.cert, "ISTHMUS_CERT"),
                key_file: flag_or_env(&self.key, "ISTHMUS_KEY"),
            }));
        }
        let path = contexts::config_path(&|name| std::env::var(name).ok())?;
        let all = contexts::Contexts::load(&path)?;
        Ok(all.select(&path, self.context.as_deref())?.map(|c| Target {
            addr: c.control.clone(),
            ca_file: Some(self.ca_file.clone().unwrap_or_else(|| c.ca_file.clone())),
            cert_file: flag_or_env(&self.cert, "ISTHMUS_CERT").or_else(|| c.cert_file.clone()),
            key_file: flag_or_env(&self.key, "ISTHMUS_KEY").or_else(|| c.key_file.clone()),
        }))
    }

    /// A client of the control plane these arguments (or the environment, or the context)
    /// name, presenting the operator credential when one is given.
    pub fn client(&self) -> anyhow::Result<ControlClient> {
        let target = match self.target()? {
            Some(target) => target,
            None => Target {
                addr: DEFAULT_CONTROL.to_string(),
                ca_file: flag_or_env(&self.ca_file, "ISTHMUS_CA_FILE"),
                cert_file: flag_or_env(&self.cert, "ISTHMUS_CERT"),
                key_file: flag_or_env(&self.key, "ISTHMUS_KEY"),
            },
        };
        let addr = &target.addr;
        let ca_file = target.ca_file.with_context(|| {
            format!(
                "the control-plane API at {addr} is TLS only: give --ca-file (or \
                 $ISTHMUS_CA_FILE), the cluster CA's PEM file (the control plane's \
                 <dataDir>/ca.pem), or use a context (isthmus context list)"
            )
        })?;
        let ca_pem = std::fs::read_to_string(&ca_file)
            .with_context(|| format!("--ca-file: reading {}", ca_file.display()))?;
        let credential = match (target.cert_file, target.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let cert_pem = std::fs::read_to_string(&cert)
                    .with_context(|| format!("--cert: reading {}", cert.display()))?;
                let key_pem = std::fs::read_to_string(&key)
                    .with_context(|| format!("--key: reading {}", key.display()))?;
                Some(
                    isthmus_core::tls::StaticClientCert::from_pem(&cert_pem, &key_pem)
                        .with_context(|| {
                            format!(
                                "the credential {} / {} is not a usable certificate and key",
                                cert.display(),
                                key.display()
                            )
                        })?,
                )
            }
            (Some(_), None) => bail!("--cert is given without --key (or $ISTHMUS_KEY)"),
            (None, Some(_)) => bail!("--key is given without --cert (or $ISTHMUS_CERT)"),
        };
        match credential {
            Some(credential) => ControlClient::authenticated(addr, &ca_pem, credential),
            None => ControlClient::new(addr, &ca_pem),
        }
        .with_context(|| format!("--ca-file {}", ca_file.display()))
    }
}

/// A flag's value, else the environment variable's.
fn flag_or_env(flag: &Option<PathBuf>, var: &str) -> Option<PathBuf> {
    flag.clone()
        .or_else(|| std::env::var_os(var).map(PathBuf::from))
}

/// `isthmus apply -f FILE [--dry-run]`: prints one line per document.
pub async fn apply(control: &ControlArgs, file: &Path, dry_run: bool) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let policies = parse_documents(&file.display().to_string(), &text)?;
    if policies.is_empty() {
        bail!("{}: no documents to apply", file.display());
    }
    let client = control.client()?;
    let results = client.apply(&policies, dry_run).await?;
    let suffix = if dry_run { " (dry run)" } else { "" };
    for (resource, action) in results {
        println!("{resource} {action}{suffix}");
    }
    Ok(())
}

/// Output formats of `isthmus get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Yaml,
    Json,
}

/// `isthmus get KIND [NAME] [-n NS] [-o yaml|json]`.
pub async fn get(
    control: &ControlArgs,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let kind = if kind == "all" {
        None
    } else {
        Some(parse_kind(kind)?)
    };
    let client = control.client()?;
    let policies = client.get_policies(kind, namespace, name).await?;
    if let (Some(name), true) = (name, policies.is_empty()) {
        bail!(
            "no {} named {name}",
            kind.map(|k| k.as_str()).unwrap_or("policy")
        );
    }
    let docs: Vec<serde_json::Value> = policies.iter().map(|p| p.to_json()).collect();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&docs)?),
        Output::Yaml => {
            for (i, doc) in docs.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_yaml::to_string(doc)?);
            }
        }
    }
    Ok(())
}

/// `isthmus delete KIND NAME [-n NS]`.
pub async fn delete(
    control: &ControlArgs,
    kind: &str,
    name: &str,
    namespace: &str,
) -> anyhow::Result<()> {
    let kind = parse_kind(kind)?;
    let client = control.client()?;
    if client.delete_policy(kind, namespace, name).await? {
        println!("{kind} {namespace}/{name} deleted");
        Ok(())
    } else {
        bail!("{kind} {namespace}/{name} not found")
    }
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    Kind::parse(kind).with_context(|| {
        format!("unknown kind {kind:?} (VirtualService, DestinationRule, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, RateLimitPolicy, FailoverPolicy, or all)")
    })
}

/// `isthmus explain SERVICE [-n NS] [--from CLUSTER] [-o table|json]`: the failover priority
/// tables the sidecars of a cluster use for a service right now, and why.
pub async fn explain(
    control: &ControlArgs,
    service: &str,
    namespace: &str,
    from: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let client = control.client()?;
    let (cluster, tables) = client
        .explain(service, namespace, from.unwrap_or(""))
        .await
        .with_context(|| format!("asking the control plane at {}", client.addr()))?;
    if tables.is_empty() {
        bail!("cluster {cluster} does not know service {service}.{namespace}");
    }
    match output {
        Output::Json => {
            let json: Vec<serde_json::Value> = tables
                .iter()
                .map(|(node, age, table)| {
                    serde_json::json!({"cluster": cluster, "node": node, "ageMs": isthmus_core::clock::millis(*age), "table": table})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Yaml => {
            for (node, age, table) in &tables {
                println!("# {node}, reported {} ms ago", age.as_millis());
                print!("{}", isthmus_core::failover::render(table, &cluster));
                println!();
            }
        }
    }
    Ok(())
}
