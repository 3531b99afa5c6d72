//! How a data-plane daemon joins its control plane at start: which control plane it talks to
//! ([`ControlTarget`]: the API address and the CA its certificate chains to), and
//! [`attach`]: its own certificate (rotated at half-life), the config stream, and the trust
//! bundles that stream carries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{follow_own_bundle, follow_trust_bundles, ClientError, ControlClient, Token};
use crate::config::FieldError;
use crate::identity::{default_trust_domain, validate_label, SpiffeId};
use crate::mesh::MeshConfig;
use crate::tls::{Identity, TrustBundles};

/// How long a daemon waits for its first configuration at start.
pub const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(30);

/// Where an injected sidecar finds its projected service-account token and its pod's labels
/// (the injection webhook mounts them there).
pub const TOKEN_DIR: &str = "/var/run/secrets/isthmus";
pub const PODINFO_DIR: &str = "/etc/isthmus-pod";

/// Why a daemon could not join its control plane.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "{config}: field controlCa is missing: the control-plane API is TLS only; give the \
         PEM file of the cluster CA (the control plane's <dataDir>/ca.pem)"
    )]
    MissingCa { config: PathBuf },
    #[error("{config}: field controlCa: reading {file}: {source}")]
    ReadCa {
        config: PathBuf,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{config}: field controlCa: {file} holds no usable CA certificate: {source}")]
    BadCa {
        config: PathBuf,
        file: PathBuf,
        #[source]
        source: Box<crate::tls::TlsError>,
    },
    #[error("getting a certificate for {id} from the control plane at {addr}: {source}")]
    Certificate {
        id: String,
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

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
    /// Reads a config's `controlCa` (a PEM file, relative to the config file's directory)
    /// and checks that it holds usable CA certificates.
    pub fn load(
        config_path: &Path,
        addr: &str,
        ca_file: Option<&str>,
    ) -> Result<Self, AttachError> {
        let file = ca_file.ok_or_else(|| AttachError::MissingCa {
            config: config_path.to_path_buf(),
        })?;
        let path = config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(file);
        let ca_pem = std::fs::read_to_string(&path).map_err(|source| AttachError::ReadCa {
            config: config_path.to_path_buf(),
            file: path.clone(),
            source,
        })?;
        crate::api_tls::client_config(&ca_pem).map_err(|source| AttachError::BadCa {
            config: config_path.to_path_buf(),
            file: path.clone(),
            source: Box::new(source),
        })?;
        Ok(ControlTarget {
            addr: addr.to_string(),
            ca_pem,
        })
    }

    /// An anonymous client of the control plane's API (enough for `Sign`).
    pub fn client(&self) -> Result<ControlClient, ClientError> {
        ControlClient::new(&self.addr, &self.ca_pem)
    }
}

/// What a component gets from its control plane.
pub struct Attached {
    pub identity: Option<Arc<Identity>>,
    /// The client the attachment uses: presenting `identity` when there is one.
    pub client: ControlClient,
    pub trust: Arc<TrustBundles>,
    pub config: watch::Receiver<Arc<MeshConfig>>,
    /// Certificate rotation, the config stream and the trust-bundle follower: abort them when
    /// the component stops.
    pub tasks: Vec<JoinHandle<()>>,
}

impl Attached {
    /// Stops the tasks that keep the attachment current.
    pub fn detach(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Connects to the control plane: a certificate for `id` (when given, obtained with the
/// token) and the config stream, on a connection that presents that certificate.
pub async fn attach(
    control: &ControlTarget,
    node: &str,
    id: Option<(&SpiffeId, Token)>,
) -> Result<Attached, AttachError> {
    // What the control plane's certificate must chain to: the pinned `controlCa`, and the
    // cluster's bundle as the config stream carries it (a rotated CA is published there
    // before it signs the control plane's certificate: docs/security.md §5).
    let control_trust = TrustBundles::any_domain(&control.ca_pem).map_err(|e| ClientError::Ca {
        addr: control.addr.clone(),
        reason: e.to_string(),
    })?;
    let anonymous = ControlClient::trusting(&control.addr, control_trust.clone(), None)?;
    let trust = TrustBundles::new();
    let mut tasks = Vec::new();
    let identity = match id {
        Some((id, token)) => {
            let (identity, rotation) = anonymous
                .workload_identity(id, token, trust.clone())
                .await
                .map_err(|source| AttachError::Certificate {
                    id: id.to_string(),
                    addr: control.addr.clone(),
                    source,
                })?;
            tasks.push(rotation);
            Some(identity)
        }
        None => None,
    };
    let client = match &identity {
        Some(identity) => ControlClient::trusting(
            &control.addr,
            control_trust.clone(),
            Some(crate::tls::identity_resolver(identity.clone())),
        )?,
        None => anonymous,
    };
    let (config, stream) = client.watch_config(node, FIRST_CONFIG_WAIT).await?;
    tasks.push(stream);
    tasks.push(follow_trust_bundles(trust.clone(), config.clone()));
    tasks.push(follow_own_bundle(control_trust, config.clone()));
    Ok(Attached {
        identity,
        client,
        trust,
        config,
        tasks,
    })
}
