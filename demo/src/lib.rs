//! isthmus-demo: `isthmus demo`, a whole federation in one process, on loopback only.
//!
//! Three clusters (`east`, `west`, `central`), each with its federation member, control
//! plane, east-west gateway, DNS proxy and a client sidecar, and Bookinfo-like sample
//! services with their own sidecars. Every component reaches its control plane over the real
//! gRPC API (config stream and certificate signing), exactly as the daemons do.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

//!
//! The CLI runs it ([`run`]), and the end-to-end tests (the Terraform provider's included)
//! start the same federation ([`Demo::start`]) to test against. [`sample`] is the sample
//! application it serves; [`probe`] the clients it (and the tests) call it with.

mod cluster;
mod narrate;
pub mod probe;
pub mod sample;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub use cluster::{DemoCluster, StoppedWorkload, Workload};
pub use narrate::{run, DemoArgs};

/// The sample services: (cluster, service, version). Every one is exported.
pub const SAMPLE_SERVICES: &[(&str, &str, &str)] = &[
    ("east", "productpage", "v1"),
    ("east", "details", "v1"),
    ("east", "reviews", "v1"),
    ("west", "details", "v1"),
    ("west", "reviews", "v2"),
    ("central", "reviews", "v3"),
    ("central", "ratings", "v1"),
];

/// The demo's clusters, in start order.
pub const CLUSTERS: &[&str] = &["east", "west", "central"];

/// Each demo cluster's locality: east and central share a region, west is far away.
pub fn locality_of(cluster: &str) -> Option<String> {
    match cluster {
        "east" => Some("us-east-1/a".into()),
        "central" => Some("us-east-1/b".into()),
        "west" => Some("us-west-2/a".into()),
        _ => None,
    }
}

/// The namespace and port of every sample service.
pub const SAMPLE_NAMESPACE: &str = "default";
pub const SAMPLE_PORT: u16 = 9080;
/// The service account of each cluster's client sidecar (the caller in the demo's calls).
pub const CLIENT_ACCOUNT: &str = "sleep";

/// Tunables; the defaults suit an interactive demo, tests shorten them.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Raft tick.
    pub tick: Duration,
    /// How often control planes re-read their discovery files.
    pub discovery_poll: Duration,
    /// Where data directories and discovery files go (a temporary directory when None).
    pub work_dir: Option<PathBuf>,
    /// The second octet of each cluster's VIP range `127.<n>.0.0/16` (loopback only), in
    /// [`CLUSTERS`] order. Two demos running at once need different ones.
    pub vip_octets: [u8; 3],
    /// The lease on each cluster's exports (see `ControlOptions::export_lease`).
    pub export_lease: Duration,
    /// The lifetime of the workload certificates the control planes sign (rotated at half).
    pub cert_lifetime: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            tick: Duration::from_millis(50),
            discovery_poll: Duration::from_millis(100),
            work_dir: None,
            vip_octets: [10, 20, 30],
            export_lease: Duration::from_secs(3),
            cert_lifetime: Duration::from_secs(3600),
        }
    }
}

impl DemoOptions {
    /// Fast timing (a 20 ms raft tick, discovery read every 50 ms) and VIP ranges
    /// `127.<vip_octet + i>.0.0/16` of its own, so tests and benchmarks that start demos at
    /// once converge quickly and do not collide.
    pub fn fast(vip_octet: u8) -> Self {
        DemoOptions {
            tick: Duration::from_millis(20),
            discovery_poll: Duration::from_millis(50),
            vip_octets: [vip_octet, vip_octet + 1, vip_octet + 2],
            ..DemoOptions::default()
        }
    }
}

/// The JSON written by `--ports-file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortsFile {
    pub clusters: Vec<ClusterPorts>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterPorts {
    pub name: String,
    /// DNS proxy (UDP and TCP).
    pub dns: String,
    /// Control plane gRPC API (TLS).
    pub control: String,
    /// The cluster CA's PEM file: `isthmus --ca-file`, daemons' `controlCa`.
    pub ca_file: String,
    /// The cluster's operator `admin` credential (certificate chain, key): `isthmus --cert
    /// --key`. East's admin is the federation's first mesh admin.
    pub cert_file: String,
    pub key_file: String,
    /// East-west gateway, QUIC (UDP).
    pub gateway: String,
    /// Federation peer port.
    pub federation: String,
    /// Admin servers by component.
    pub admin: BTreeMap<String, String>,
    /// The virtual IP of every service this cluster can reach, by `<svc>.<ns>`.
    pub vips: BTreeMap<String, String>,
}

/// A running demo federation.
pub struct Demo {
    pub clusters: Vec<DemoCluster>,
    stores: Vec<isthmus_federation::Store>,
    _work_dir: Option<tempfile::TempDir>,
}

impl Demo {
    /// Starts the three clusters and waits until each can reach every sample service.
    pub async fn start(opts: DemoOptions) -> anyhow::Result<Demo> {
        isthmus_core::install_crypto_provider();
        let (temp, root) = match &opts.work_dir {
            Some(dir) => (None, dir.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("isthmus-demo-")
                    .tempdir()
                    .context("creating a work directory")?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        // Every cluster's CA first: the members authenticate each other on their peer ports
        // from the start (each is an initial member, pinned with its trust domain and CA).
        let mut cas = Vec::new();
        for name in CLUSTERS {
            let trust_domain = isthmus_core::identity::default_trust_domain(name);
            cas.push(isthmus_control::config::load_or_create_ca(
                &root.join(name).join("data"),
                &trust_domain,
            )?);
        }
        let initial: Vec<isthmus_control::members::InitialMember> = cas
            .iter()
            .enumerate()
            .map(|(i, ca)| isthmus_control::members::InitialMember {
                id: i as u64 + 1,
                trust_domain: ca.trust_domain().to_string(),
                ca_pem: ca.cert_pem().to_string(),
            })
            .collect();
        // Federation: bind every member first so each knows the others' addresses.
        let mut bindings = Vec::new();
        let mut trusts = Vec::new();
        for (i, ca) in cas.iter().enumerate() {
            let trust = isthmus_control::members::MemberTrust::new(
                ca.clone(),
                i as u64 + 1,
                initial.clone(),
                opts.cert_lifetime,
            )?;
            // As `isthmus control` runs it: mutual TLS between members, and writes only
            // through the authenticated API port.
            bindings.push(
                isthmus_federation::bind("127.0.0.1:0".parse()?)
                    .await
                    .context("binding a federation member")?
                    .refuse_client_writes()
                    .with_tls(trust.peer_tls()),
            );
            trusts.push(trust);
        }
        let peers: BTreeMap<u64, SocketAddr> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64 + 1, b.local_addr()))
            .collect();
        let mut stores = Vec::new();
        for (i, binding) in bindings.into_iter().enumerate() {
            let options = isthmus_federation::StoreOptions {
                tick: opts.tick,
                ..isthmus_federation::StoreOptions::new(i as u64 + 1, peers.clone())
            };
            stores.push(
                binding
                    .start(options)
                    .await
                    .context("starting a federation member")?,
            );
        }
        let mut clusters = Vec::new();
        for (i, name) in CLUSTERS.iter().enumerate() {
            let dir = root.join(name);
            let range =
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, opts.vip_octets[i], 0, 0), 16)?;
            let c = DemoCluster::start(
                name,
                range,
                &dir,
                stores[i].clone(),
                trusts[i].clone(),
                &opts,
            )
            .await
            .with_context(|| format!("starting cluster {name}"))?;
            clusters.push(c);
        }
        let demo = Demo {
            clusters,
            stores,
            _work_dir: temp,
        };
        demo.wait_until_converged(Duration::from_secs(30)).await?;
        Ok(demo)
    }

    /// Waits until every cluster has a route to every sample service, its client sidecar
    /// listens on each of their VIPs, and every pair of gateways is connected (so the first
    /// call crosses at once, with each other's trust bundles in place).
    pub async fn wait_until_converged(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let with_gateways: Vec<&str> = self
            .clusters
            .iter()
            .filter(|c| c.gateway.is_some())
            .map(|c| c.name.as_str())
            .collect();
        loop {
            let mut pending: Vec<String> = self
                .clusters
                .iter()
                .flat_map(|c| c.unreachable_samples())
                .collect();
            for c in &self.clusters {
                pending.extend(c.unconnected_gateways(&with_gateways).await);
            }
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the federation did not converge within {within:?}; still missing: {} \
                     (if another demo is running, its VIP listeners hold these addresses)",
                    pending.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn cluster(&self, name: &str) -> anyhow::Result<&DemoCluster> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no cluster named {name}"))
    }

    /// The federation member of each cluster, in cluster order.
    pub fn stores(&self) -> &[isthmus_federation::Store] {
        &self.stores
    }

    /// Makes `cluster`'s operator `admin` a mesh admin, as an operator would: east's admin
    /// (the first mesh admin) writes the grant through east's control-plane API; returns once
    /// `cluster`'s own replica holds it (so its control plane honours it).
    pub async fn grant_mesh_admin(&self, cluster: &str) -> anyhow::Result<()> {
        let east = self.cluster("east")?;
        let target = self.cluster(cluster)?;
        let id = isthmus_core::identity::OperatorId::new(
            &target.trust_domain,
            isthmus_core::identity::Role::Admin,
            isthmus_control::BOOTSTRAP_ADMIN,
        )?;
        let key = isthmus_control::records::mesh_admin_grant_key(id.trust_domain(), id.name());
        let record = isthmus_control::records::GrantRecord {
            identity: id.to_string(),
            granted_by: format!(
                "spiffe://{}/operator/admin/{}",
                east.trust_domain,
                isthmus_control::BOOTSTRAP_ADMIN
            ),
            granted_at_ms: isthmus_core::clock::unix_ms(),
        };
        let mut kv = isthmus_federation::KvClient::from_channel(east.control.client().channel());
        kv.put(&key, serde_json::to_vec(&record)?)
            .await
            .with_context(|| format!("granting {id} mesh admin through east"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while target.store().get(&key).is_none() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{cluster}'s replica never received the grant {key}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Every bound address, as `--ports-file` writes it.
    pub fn ports(&self) -> PortsFile {
        PortsFile {
            clusters: self.clusters.iter().map(|c| c.ports()).collect(),
        }
    }

    /// Stops every component; no listener or task is left behind.
    pub async fn shutdown(self) {
        for c in self.clusters {
            c.shutdown().await;
        }
        for s in self.stores {
            s.shutdown().await;
        }
    }
}

/// The VIP a cluster's config gives `<service>.<namespace>`, if any.
pub fn vip_of(config: &isthmus_core::mesh::MeshConfig, service: &str) -> Option<IpAddr> {
    config.service(SAMPLE_NAMESPACE, service).map(|s| s.vip)
}
