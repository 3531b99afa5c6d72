//! One demo cluster: control plane, gateway, DNS proxy, sample workloads and a client sidecar.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use isthmus_control::tokens::TokenPolicy;
use isthmus_core::identity::{
    default_trust_domain, SpiffeId, DNS_SERVICE_ACCOUNT, GATEWAY_SERVICE_ACCOUNT, SYSTEM_NAMESPACE,
};
use isthmus_core::mesh::{MeshConfig, Protocol};
use isthmus_core::tls::Identity;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use isthmus_core::attach::{Attached, ControlTarget};

use crate::sample::{self, SampleApp, SampleHandle};
use crate::{
    ClusterPorts, DemoOptions, CLIENT_ACCOUNT, SAMPLE_NAMESPACE, SAMPLE_PORT, SAMPLE_SERVICES,
};
use isthmus_core::admin::ComponentAdmin;

/// The bootstrap token every demo component uses to get its certificate.
const DEMO_TOKEN: &str = "isthmus-demo-bootstrap-token";

/// What the demo token may obtain: any sample workload's identity, and the gateway's by name.
fn demo_tokens() -> anyhow::Result<TokenPolicy> {
    Ok(TokenPolicy::from_raw(
        "demo",
        vec![isthmus_control::tokens::RawToken {
            token: DEMO_TOKEN.into(),
            allow: vec![
                format!("{SAMPLE_NAMESPACE}/*"),
                format!("{SYSTEM_NAMESPACE}/{GATEWAY_SERVICE_ACCOUNT}"),
                format!("{SYSTEM_NAMESPACE}/{DNS_SERVICE_ACCOUNT}"),
            ],
        }],
    )?)
}

/// A sample workload: the app and its sidecar.
pub struct Workload {
    pub service: String,
    pub version: String,
    pub app: SampleHandle,
    pub sidecar: isthmus_sidecar::SidecarHandle,
    /// The sidecar's identity, rotated in place at half its certificate's lifetime.
    pub identity: Arc<Identity>,
}

/// A running demo cluster.
pub struct DemoCluster {
    pub name: String,
    pub trust_domain: String,
    pub federation: SocketAddr,
    pub control: isthmus_control::ControlHandle,
    /// The cluster CA's certificate file, which the control-plane API's certificate chains
    /// to (what `isthmus --ca-file` takes).
    pub ca_file: std::path::PathBuf,
    /// The credential of this cluster's operator `admin` (certificate chain and key files):
    /// what the demo's contexts present. East's is the federation's first mesh admin.
    pub admin_credential: (std::path::PathBuf, std::path::PathBuf),
    /// The east-west gateway; `None` once [`DemoCluster::kill_gateway`] stopped it.
    pub gateway: Option<isthmus_gateway::GatewayHandle>,
    /// The gateway's address for local sidecars (kept after it is killed).
    gateway_local: SocketAddr,
    /// The gateway's QUIC address (kept after it is killed).
    gateway_quic: SocketAddr,
    pub dns: isthmus_dns::DnsHandle,
    /// The client sidecar: outbound listeners on every VIP, identity `default/sleep`.
    pub client: isthmus_sidecar::SidecarHandle,
    /// The client sidecar's identity (rotated in place).
    pub client_identity: Arc<Identity>,
    pub workloads: Vec<Workload>,
    /// The configuration as the client sidecar receives it over gRPC.
    pub config: watch::Receiver<Arc<MeshConfig>>,
    admins: BTreeMap<String, ComponentAdmin>,
    background: Vec<JoinHandle<()>>,
    /// How the control plane was started, and its federation member (for a restart).
    control_options: isthmus_control::ControlOptions,
    store: isthmus_federation::Store,
}

/// How this process's components reach a control plane's API.
fn target(control: &isthmus_control::ControlHandle) -> ControlTarget {
    ControlTarget {
        addr: control.grpc_addr().to_string(),
        ca_pem: control.ca_pem().to_string(),
    }
}

/// Attaches a component to its control plane the way the daemons do: a certificate for `id`
/// and the config stream.
async fn attach(
    control: &ControlTarget,
    node: &str,
    id: SpiffeId,
) -> anyhow::Result<(Arc<Identity>, Attached)> {
    let att = isthmus_core::attach::attach(control, node, Some((&id, DEMO_TOKEN.into()))).await?;
    let identity = att
        .identity
        .clone()
        .with_context(|| format!("no certificate for {id}"))?;
    Ok((identity, att))
}

/// Starts the cluster's east-west gateway on `quic` and `local` (port 0 picks).
async fn start_gateway(
    control: &ControlTarget,
    cluster: &str,
    trust_domain: &str,
    quic: SocketAddr,
    local: SocketAddr,
) -> anyhow::Result<(isthmus_gateway::GatewayHandle, Attached)> {
    let (gw_identity, gw) = attach(control, "gateway", SpiffeId::gateway(trust_domain)).await?;
    let gateway = isthmus_gateway::start(
        isthmus_gateway::GatewayOptions {
            cluster: cluster.to_string(),
            quic_listen: quic,
            local_listen: local,
            identity: gw_identity,
            trust: gw.trust.clone(),
            keep_alive: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            transport: isthmus_gateway::Transport::Quic,
        },
        gw.config.clone(),
    )
    .await?;
    Ok((gateway, gw))
}

/// Starts one sample workload (the app on `app_listen`, its sidecar's inbound port on
/// `inbound_listen`) with its own identity, attached to the control plane at `control`.
#[allow(clippy::too_many_arguments)]
async fn start_workload(
    control: &ControlTarget,
    cluster: &str,
    trust_domain: &str,
    service: &str,
    version: &str,
    app_listen: SocketAddr,
    inbound_listen: SocketAddr,
    gateway: SocketAddr,
) -> anyhow::Result<(Workload, Vec<JoinHandle<()>>)> {
    let app = sample::start(
        SampleApp {
            service: service.to_string(),
            version: version.to_string(),
            cluster: cluster.to_string(),
        },
        app_listen,
    )
    .await?;
    let (identity, att) = attach(
        control,
        &format!("sidecar/{service}-{version}"),
        SpiffeId::new(trust_domain, SAMPLE_NAMESPACE, service),
    )
    .await?;
    let sidecar = isthmus_sidecar::start(
        isthmus_sidecar::SidecarOptions {
            cluster: cluster.to_string(),
            identity: identity.clone(),
            trust: att.trust,
            labels: [
                ("app".to_string(), service.to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into(),
            outbound: false,
            inbound: vec![isthmus_sidecar::InboundPort {
                listen: inbound_listen,
                forward_to: app.addr,
                protocol: Protocol::Http,
            }],
            gateway: Some(gateway),
            connect_timeout: Duration::from_secs(2),
            metrics: Default::default(),
            access_log: Default::default(),
            path_normalization: Default::default(),
            limits: Default::default(),
        },
        att.config,
    )
    .await?;
    Ok((
        Workload {
            service: service.to_string(),
            version: version.to_string(),
            identity,
            app,
            sidecar,
        },
        att.tasks,
    ))
}

/// A workload [`DemoCluster::kill_workloads`] stopped, to bring back on the same addresses.
#[derive(Debug, Clone)]
pub struct StoppedWorkload {
    pub service: String,
    pub version: String,
    pub app: SocketAddr,
    pub inbound: SocketAddr,
}

impl DemoCluster {
    /// Kills every workload of `service` in this cluster at once, as a crashed pod dies:
    /// listeners and connections close, the discovery file still lists them (as it would
    /// until Kubernetes noticed). Returns what was stopped.
    pub async fn kill_workloads(&mut self, service: &str) -> Vec<StoppedWorkload> {
        let (dead, alive): (Vec<Workload>, Vec<Workload>) = std::mem::take(&mut self.workloads)
            .into_iter()
            .partition(|w| w.service == service);
        self.workloads = alive;
        let mut stopped = Vec::new();
        for w in dead {
            stopped.push(StoppedWorkload {
                service: w.service.clone(),
                version: w.version.clone(),
                app: w.app.addr,
                inbound: w.sidecar.inbound_addrs()[0],
            });
            // Both at once, as a pod dies: the listener and the app go together.
            w.app.shutdown();
            w.sidecar.shutdown().await;
        }
        stopped
    }

    /// Stops the apps of `service`'s workloads in this cluster, leaving their sidecars up
    /// (a container that crashed in a running pod): callers still reach the sidecars, which
    /// answer 502 for want of their app. Returns how many were stopped.
    pub fn stop_apps(&mut self, service: &str) -> usize {
        let mut stopped = 0;
        for w in self.workloads.iter().filter(|w| w.service == service) {
            w.app.stop();
            stopped += 1;
        }
        stopped
    }

    /// Stops this cluster's east-west gateway: the other gateways see their connections to it
    /// close, and answer their sidecars `Unreachable` for this cluster.
    pub async fn kill_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }

    /// Starts the gateway again on its old addresses (after [`DemoCluster::kill_gateway`]).
    pub async fn revive_gateway(&mut self) -> anyhow::Result<()> {
        if self.gateway.is_some() {
            return Ok(());
        }
        let (gateway, att) = start_gateway(
            &target(&self.control),
            &self.name,
            &self.trust_domain,
            self.gateway_quic,
            self.gateway_local,
        )
        .await?;
        self.background.extend(att.tasks);
        self.gateway = Some(gateway);
        Ok(())
    }

    /// Stops this cluster's control plane (its federation member stays up): the data plane
    /// keeps its last configuration and certificates, and the export leases it renewed
    /// lapse in the other clusters' view.
    pub async fn stop_control(&mut self) {
        self.control.halt().await;
    }

    /// Starts the control plane again (after [`DemoCluster::stop_control`]) on its old gRPC
    /// address, so its data plane reconnects; it renews its export leases at once.
    pub async fn restart_control(&mut self) -> anyhow::Result<()> {
        let mut options = self.control_options.clone();
        options.grpc_listen = self.control.grpc_addr();
        options.gateway_address = Some(self.gateway_quic);
        self.control = isthmus_control::start(options, self.store.clone()).await?;
        Ok(())
    }

    /// Starts killed workloads again on their old addresses.
    pub async fn revive_workloads(&mut self, stopped: &[StoppedWorkload]) -> anyhow::Result<()> {
        for s in stopped {
            let (workload, tasks) = start_workload(
                &target(&self.control),
                &self.name,
                &self.trust_domain,
                &s.service,
                &s.version,
                s.app,
                s.inbound,
                self.gateway_local,
            )
            .await?;
            self.background.extend(tasks);
            self.workloads.push(workload);
        }
        Ok(())
    }

    pub(super) async fn start(
        name: &str,
        vip_range: Ipv4Net,
        dir: &Path,
        store: isthmus_federation::Store,
        members: isthmus_control::members::MemberTrust,
        opts: &DemoOptions,
    ) -> anyhow::Result<DemoCluster> {
        let trust_domain = default_trust_domain(name);
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let federation = store.peer_addr();
        let ca = isthmus_control::config::load_or_create_ca(&dir.join("data"), &trust_domain)?;
        let discovery_file = dir.join("services.yaml");
        std::fs::write(&discovery_file, "services: []\n").context("writing the discovery file")?;
        let control_options = isthmus_control::ControlOptions {
            cluster: name.to_string(),
            trust_domain: trust_domain.clone(),
            locality: crate::locality_of(name),
            grpc_listen: loopback,
            discovery: isthmus_control::DiscoverySource::File {
                path: discovery_file.clone(),
                poll: opts.discovery_poll,
            },
            vip_range,
            gateway_address: None,
            tokens: demo_tokens()?,
            cert_lifetime: opts.cert_lifetime,
            ca,
            export_lease: opts.export_lease,
            // The federation's first member (the lowest id) writes the first mesh-admin grant.
            bootstrap_admin: {
                let id = store.status().id;
                (store.members().keys().min() == Some(&id))
                    .then(|| isthmus_control::BOOTSTRAP_ADMIN.to_string())
            },
            members: Some(members),
        };
        let control = isthmus_control::start(control_options.clone(), store.clone()).await?;
        let admin_credential = write_admin_credential(&control_options.ca, dir)?;

        let control_addr = target(&control);
        let mut background = Vec::new();
        let mut admins = BTreeMap::new();
        admins.insert("control".to_string(), {
            let metrics = control.api_metrics().clone();
            ComponentAdmin::start_with("control", loopback, control.config(), |registry| {
                metrics.register(registry);
                isthmus_control::members::FederationMetrics::register(store.clone(), registry);
            })
            .await?
        });

        // The gateway first: the others' routes to this cluster need its address.
        let (gateway, gw) =
            start_gateway(&control_addr, name, &trust_domain, loopback, loopback).await?;
        control.set_gateway(gateway.quic_addr());
        admins.insert("gateway".to_string(), {
            let metrics = gateway.metrics();
            ComponentAdmin::start_with("gateway", loopback, gw.config, |registry| {
                metrics.register(registry)
            })
            .await?
        });
        background.extend(gw.tasks);

        // The sample workloads, each with its own sidecar and identity.
        let mut workloads = Vec::new();
        for (_, service, version) in SAMPLE_SERVICES.iter().filter(|(c, _, _)| *c == name) {
            let (workload, tasks) = start_workload(
                &control_addr,
                name,
                &trust_domain,
                service,
                version,
                loopback,
                loopback,
                gateway.local_addr(),
            )
            .await?;
            background.extend(tasks);
            workloads.push(workload);
        }
        std::fs::write(&discovery_file, discovery_yaml(&workloads))
            .context("writing the discovery file")?;

        // The client sidecar, whose VIP listeners the demo's (and the user's) calls go through.
        let (identity, att) = attach(
            &control_addr,
            "sidecar/sleep",
            SpiffeId::new(&trust_domain, SAMPLE_NAMESPACE, CLIENT_ACCOUNT),
        )
        .await?;
        let client_metrics = isthmus_sidecar::metrics::Metrics::default();
        let client_sidecar = isthmus_sidecar::start(
            isthmus_sidecar::SidecarOptions {
                cluster: name.to_string(),
                identity: identity.clone(),
                trust: att.trust,
                labels: [("app".to_string(), CLIENT_ACCOUNT.to_string())].into(),
                outbound: true,
                inbound: vec![],
                gateway: Some(gateway.local_addr()),
                connect_timeout: Duration::from_secs(2),
                metrics: client_metrics.clone(),
                access_log: Default::default(),
                path_normalization: Default::default(),
                limits: Default::default(),
            },
            att.config.clone(),
        )
        .await?;
        admins.insert(
            "sidecar".to_string(),
            ComponentAdmin::start_full(
                "sidecar",
                loopback,
                att.config.clone(),
                |_| {},
                |root| client_metrics.register(root),
            )
            .await?,
        );
        background.extend(att.tasks);
        // Reports go out under the sidecar's own certificate (the API refuses anonymous ones).
        background.push(isthmus_sidecar::daemon::report_failover(
            att.client.clone(),
            "sidecar/sleep",
            client_sidecar.failover_health(),
        ));
        let config = att.config;

        let (_, dns_att) = attach(&control_addr, "dns", SpiffeId::dns(&trust_domain)).await?;
        let dns_config = dns_att.config.clone();
        background.extend(dns_att.tasks);
        let upstreams = std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| isthmus_dns::upstreams_from_resolv_conf(&t))
            .unwrap_or_default();
        let dns = isthmus_dns::start(
            isthmus_dns::DnsOptions {
                listen: loopback,
                upstreams,
                upstream_timeout: Duration::from_secs(2),
                ttl: 5,
                ..Default::default()
            },
            dns_config.clone(),
        )
        .await?;
        admins.insert(
            "dns".to_string(),
            ComponentAdmin::start_with("dns", loopback, dns_config, |registry| {
                dns.metrics().register(registry)
            })
            .await?,
        );

        Ok(DemoCluster {
            name: name.to_string(),
            trust_domain,
            federation,
            control,
            gateway_local: gateway.local_addr(),
            gateway_quic: gateway.quic_addr(),
            gateway: Some(gateway),
            dns,
            client: client_sidecar,
            client_identity: identity,
            workloads,
            config,
            admins,
            background,
            control_options,
            store,
            ca_file: dir.join("data").join("ca.pem"),
            admin_credential,
        })
    }

    /// Sample services this cluster cannot reach yet (no route, or no VIP listener).
    pub(super) fn unreachable_samples(&self) -> Vec<String> {
        let config = self.config.borrow().clone();
        let bound = self.client.outbound_addrs();
        let mut missing = Vec::new();
        let mut services: Vec<&str> = SAMPLE_SERVICES.iter().map(|(_, s, _)| *s).collect();
        services.dedup();
        for service in services {
            let ok = config.service(SAMPLE_NAMESPACE, service).is_some_and(|s| {
                (!s.local_endpoints.is_empty() || !s.remote.is_empty())
                    && bound.contains(&SocketAddr::new(s.vip, SAMPLE_PORT))
            });
            if !ok {
                missing.push(format!("{service} from {}", self.name));
            }
        }
        missing
    }

    /// The pairs `self`–`other` (for each of `others`) whose gateways hold no connection yet,
    /// as this cluster's gateway sees it (without a gateway: none).
    pub(super) async fn unconnected_gateways(&self, others: &[&str]) -> Vec<String> {
        let Some(gateway) = &self.gateway else {
            return Vec::new();
        };
        let connected = gateway.connected_peers().await;
        others
            .iter()
            .filter(|other| **other != self.name && !connected.contains(**other))
            .map(|other| format!("the gateway pair {}–{other}", self.name))
            .collect()
    }

    /// This cluster's federation member.
    pub fn store(&self) -> &isthmus_federation::Store {
        &self.store
    }

    /// The identity of this cluster's client sidecar.
    pub fn client_identity(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, SAMPLE_NAMESPACE, CLIENT_ACCOUNT)
    }

    pub(super) fn ports(&self) -> ClusterPorts {
        let config = self.config.borrow().clone();
        ClusterPorts {
            name: self.name.clone(),
            dns: self.dns.udp_addr().to_string(),
            control: self.control.grpc_addr().to_string(),
            ca_file: self.ca_file.display().to_string(),
            cert_file: self.admin_credential.0.display().to_string(),
            key_file: self.admin_credential.1.display().to_string(),
            gateway: self.gateway_quic.to_string(),
            federation: self.federation.to_string(),
            admin: self
                .admins
                .iter()
                .map(|(k, a)| (k.clone(), a.addr().to_string()))
                .collect(),
            vips: config
                .services
                .iter()
                .map(|s| (s.key(), s.vip.to_string()))
                .collect(),
        }
    }

    pub(super) async fn shutdown(self) {
        self.client.shutdown().await;
        for w in self.workloads {
            w.sidecar.shutdown().await;
            w.app.shutdown();
        }
        self.dns.shutdown().await;
        if let Some(gateway) = self.gateway {
            gateway.shutdown().await;
        }
        for (_, admin) in self.admins {
            admin.shutdown().await;
        }
        for task in self.background {
            task.abort();
        }
        self.control.shutdown().await;
    }
}

/// The discovery file for this cluster's workloads: every sample service exported.
fn discovery_yaml(workloads: &[Workload]) -> String {
    let mut out = String::from("services:\n");
    let mut services: Vec<&str> = workloads.iter().map(|w| w.service.as_str()).collect();
    services.sort();
    services.dedup();
    for service in services {
        out.push_str(&format!(
            "  - name: {service}\n    namespace: {SAMPLE_NAMESPACE}\n    export: true\n    ports:\n      - {{name: http, port: {SAMPLE_PORT}, protocol: http}}\n    endpoints:\n"
        ));
        for w in workloads.iter().filter(|w| w.service == service) {
            let addr = w.sidecar.inbound_addrs().first().copied();
            if let Some(addr) = addr {
                out.push_str(&format!(
                    "      - {{address: \"{addr}\", serviceAccount: {service}, labels: {{version: {}}}}}\n",
                    w.version
                ));
            }
        }
    }
    out
}

/// Issues this cluster's operator `admin` credential (as `isthmus credentials issue` does)
/// into `dir`: `admin.pem` and `admin-key.pem` (owner-only).
fn write_admin_credential(
    ca: &isthmus_core::ca::CertificateAuthority,
    dir: &Path,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use isthmus_core::durable::{write_atomic, Access};
    use isthmus_core::identity::{OperatorId, Role};
    let id = OperatorId::new(
        ca.trust_domain(),
        Role::Admin,
        isthmus_control::BOOTSTRAP_ADMIN,
    )?;
    let issued = ca.issue_operator(&id, Duration::from_secs(24 * 3600))?;
    let cert = dir.join("admin.pem");
    let key = dir.join("admin-key.pem");
    write_atomic(&key, issued.key_pem.as_bytes(), Access::Private)
        .with_context(|| format!("writing {}", key.display()))?;
    write_atomic(&cert, issued.cert_chain_pem.as_bytes(), Access::Default)
        .with_context(|| format!("writing {}", cert.display()))?;
    Ok((cert, key))
}
