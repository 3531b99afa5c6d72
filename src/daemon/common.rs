//! Pieces every data-plane daemon shares: its connection to the control plane.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::client::{follow_trust_bundles, ControlClient, Token};
use isthmus_core::config::FieldError;
use isthmus_core::identity::{default_trust_domain, validate_label, SpiffeId};
use isthmus_core::mesh::MeshConfig;
use isthmus_core::tls::{Identity, TrustBundles};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a daemon waits for its first configuration at start.
pub const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(30);

/// Validates the cluster name and returns the trust domain (explicit or the default).
pub fn cluster_and_trust_domain(
    cluster: &str,
    trust_domain: Option<String>,
) -> Result<String, FieldError> {
    validate_label("cluster name", cluster)
        .map_err(|e| FieldError::new("cluster", cluster, e.to_string()))?;
    Ok(trust_domain.unwrap_or_else(|| default_trust_domain(cluster)))
}

/// The control plane a daemon talks to: its API address and the cluster CA that the API's
/// certificate chains to (docs/control-api.md).
#[derive(Debug, Clone)]
pub struct ControlTarget {
    pub addr: String,
    pub ca_pem: String,
}

impl ControlTarget {
    /// Reads the config's `controlCa` (a PEM file, relative to the config file's directory)
    /// and checks that it holds usable CA certificates.
    pub fn load(config_path: &Path, addr: &str, ca_file: Option<&str>) -> anyhow::Result<Self> {
        let file = ca_file.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: field controlCa is missing: the control-plane API is TLS only; give the \
                 PEM file of the cluster CA (the control plane's <dataDir>/ca.pem)",
                config_path.display()
            )
        })?;
        let path = config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(file);
        let ca_pem = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: field controlCa: reading {}",
                config_path.display(),
                path.display()
            )
        })?;
        isthmus_core::api_tls::client_config(&ca_pem).map_err(|e| {
            anyhow::anyhow!(
                "{}: field controlCa: {} holds no usable CA certificate: {e}",
                config_path.display(),
                path.display()
            )
        })?;
        Ok(ControlTarget {
            addr: addr.to_string(),
            ca_pem,
        })
    }

    /// A client of the control plane's API.
    pub fn client(&self) -> anyhow::Result<ControlClient> {
        Ok(ControlClient::new(&self.addr, &self.ca_pem)?)
    }
}

/// What a component gets from its control plane.
pub struct Attached {
    pub identity: Option<Arc<Identity>>,
    pub trust: Arc<TrustBundles>,
    pub config: watch::Receiver<Arc<MeshConfig>>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Connects to the control plane: a certificate for `id` (when given) and the config stream.
pub async fn attach(
    control: &ControlTarget,
    node: &str,
    id: Option<(&SpiffeId, Token)>,
) -> anyhow::Result<Attached> {
    let client = control.client()?;
    let trust = TrustBundles::new();
    let mut tasks = Vec::new();
    let identity = match id {
        Some((id, token)) => {
            let (identity, rotation) = client
                .workload_identity(id, token, trust.clone())
                .await
                .with_context(|| {
                    format!(
                        "getting a certificate for {id} from the control plane at {}",
                        control.addr
                    )
                })?;
            tasks.push(rotation);
            Some(identity)
        }
        None => None,
    };
    let (config, stream) = client.watch_config(node, FIRST_CONFIG_WAIT).await?;
    tasks.push(stream);
    tasks.push(follow_trust_bundles(trust.clone(), config.clone()));
    Ok(Attached {
        identity,
        trust,
        config,
        tasks,
    })
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Prints the one `ready` line a daemon emits once it serves.
pub fn print_ready(component: &str, addrs: serde_json::Value) {
    println!("isthmus {component} ready {addrs}");
}

/// Reports a sidecar's failover tables to its control plane (for `isthmus explain`): on
/// change, checked every second, and at least every five seconds so the report stays fresh.
pub fn report_failover(
    control: &ControlTarget,
    node: &str,
    health: Arc<isthmus_sidecar::failover::Health>,
) -> anyhow::Result<JoinHandle<()>> {
    let client = control.client()?;
    let node = node.to_string();
    Ok(tokio::spawn(async move {
        let mut last = String::new();
        let mut sent_at = tokio::time::Instant::now();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let tables = health.tables();
            if tables.is_empty() {
                continue;
            }
            let Ok(json) = serde_json::to_string(&tables) else {
                continue;
            };
            if json == last && sent_at.elapsed() < Duration::from_secs(5) {
                continue;
            }
            match client.report_failover(&node, json.clone()).await {
                Ok(()) => {
                    last = json;
                    sent_at = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reporting failover tables failed; will retry")
                }
            }
        }
    }))
}
