//! The federation benchmark's one program, driven by `bench/federation`:
//!
//! - `fedbench serve ID DATA_DIR TICK_MS 1=ADDR,2=ADDR,3=ADDR` runs one durable member
//!   until killed;
//! - `fedbench load ours|etcd CLIENTS SECONDS ADDR,ADDR,ADDR` drives puts (8-byte keys,
//!   256-byte values) from CLIENTS concurrent clients spread over the endpoints, and prints
//!   `writes_per_s=<n> p50_ms=<x> p99_ms=<x> errors=<n>`;
//! - `fedbench leader ours|etcd ADDR,...` prints the index (0-based) of the leader's
//!   endpoint;
//! - `fedbench failover ours|etcd PID LEADER_INDEX ADDR,...` SIGKILLs PID (the leader) and
//!   prints `failover_ms=<x>`: the time from the kill to the first committed put through a
//!   surviving endpoint.
//!
//! Both systems are driven the same way: one tonic channel per endpoint per 16 clients,
//! unary Put RPCs, each client waiting for its answer before the next.
//!
//! With `FEDBENCH_TLS=DIR` both run over mutual TLS, as in production: our members with
//! member certificates on the peer port (`DIR/m<i>-ca.pem`, `m<i>-ca-key.pem`: the CA of
//! member i, trust domain `m<i>.bench.local`; the client presents member 1's control-plane
//! certificate, as a member's control plane does), etcd with client and peer TLS and client
//! certificates (`DIR/etcd-ca.pem`, `etcd-client.pem`, `etcd-client-key.pem`; the bench makes
//! them with openssl).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use isthmus_federation::proto::v1 as fed;
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, missing_docs, dead_code)]
mod etcd {
    tonic::include_proto!("etcdserverpb");
}

const VALUE_SIZE: usize = 256;
const KEYSPACE: u64 = 100_000;
const CLIENTS_PER_CHANNEL: usize = 16;

#[derive(Clone)]
enum Client {
    Ours(fed::kv_client::KvClient<Channel>),
    Etcd(etcd::kv_client::KvClient<Channel>),
}

impl Client {
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        match self {
            Client::Ours(c) => {
                let key = String::from_utf8(key)?;
                c.put(fed::PutRequest {
                    key,
                    value,
                    lease_ttl_ms: 0,
                })
                .await?;
            }
            Client::Etcd(c) => {
                c.put(etcd::PutRequest {
                    key,
                    value,
                    ..Default::default()
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// `FEDBENCH_TLS`: the directory of the certificates, when both run over TLS.
fn tls_dir() -> Option<PathBuf> {
    std::env::var_os("FEDBENCH_TLS").map(PathBuf::from)
}

async fn channel(kind: &str, addr: &str) -> Result<Channel> {
    match (tls_dir(), kind) {
        (None, _) => Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}")),
        (Some(dir), "ours") => {
            // Member 1's control-plane certificate, trusting the members' bundles.
            let tls = member_tls(&dir, 1)?;
            let config = isthmus_core::api_tls::member_client_config(tls.identity, tls.bundles)?;
            isthmus_core::api_tls::channel(addr, Arc::new(config)).map_err(|e| anyhow!(e))
        }
        (Some(dir), _) => etcd_tls_channel(&dir, addr).await,
    }
}

/// Member `id`'s peer-port TLS: its control-plane certificate from its CA, the three
/// members' bundles, and their trust domains bound to their ids.
fn member_tls(dir: &Path, id: u64) -> Result<isthmus_federation::PeerTls> {
    let read = |name: String| {
        std::fs::read_to_string(dir.join(&name)).with_context(|| format!("reading {name}"))
    };
    let mut bundles = Vec::new();
    let mut members = BTreeMap::new();
    for i in 1..=3u64 {
        let td = format!("m{i}.bench.local");
        bundles.push((td.clone(), read(format!("m{i}-ca.pem"))?));
        members.insert(td, i);
    }
    let trust = isthmus_core::tls::TrustBundles::new();
    trust.replace(bundles.iter().map(|(td, pem)| (td.as_str(), pem.as_str())))?;
    let td = format!("m{id}.bench.local");
    let ca = isthmus_core::ca::CertificateAuthority::from_pem(
        &td,
        &read(format!("m{id}-ca.pem"))?,
        &read(format!("m{id}-ca-key.pem"))?,
    )?;
    let spiffe = isthmus_core::identity::SpiffeId::control(&td);
    let issued = ca.issue(&spiffe, Duration::from_secs(24 * 3600))?;
    Ok(isthmus_federation::PeerTls {
        identity: isthmus_core::tls::Identity::from_pem(
            spiffe,
            &issued.cert_chain_pem,
            &issued.key_pem,
        )?,
        bundles: trust,
        directory: isthmus_federation::MemberDirectory::new(members),
    })
}

/// `fedbench certs DIR`: the three members' CAs.
fn certs(dir: &str) -> Result<()> {
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir)?;
    for i in 1..=3 {
        let ca = isthmus_core::ca::CertificateAuthority::generate(&format!("m{i}.bench.local"))?;
        std::fs::write(dir.join(format!("m{i}-ca.pem")), ca.cert_pem())?;
        std::fs::write(dir.join(format!("m{i}-ca-key.pem")), ca.key_pem())?;
    }
    Ok(())
}

/// A TLS channel to etcd at `addr` (an IP address: its certificate names it), presenting the
/// bench's client certificate.
async fn etcd_tls_channel(dir: &Path, addr: &str) -> Result<Channel> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("etcd-ca.pem"))? {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_file_iter(dir.join("etcd-client.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("etcd-client-key.pem"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target: SocketAddr = addr.parse()?;
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector
                    .connect(ServerName::IpAddress(target.ip().into()), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to etcd at {addr} over TLS"))
}

async fn client(kind: &str, addr: &str) -> Result<Client> {
    let ch = channel(kind, addr).await?;
    Ok(match kind {
        "ours" => Client::Ours(fed::kv_client::KvClient::new(ch)),
        "etcd" => Client::Etcd(etcd::kv_client::KvClient::new(ch)),
        other => bail!("unknown target {other}"),
    })
}

fn key(n: u64) -> Vec<u8> {
    format!("{:08}", n % KEYSPACE).into_bytes()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn load(kind: &str, clients: usize, seconds: u64, endpoints: &[String]) -> Result<()> {
    // One channel per endpoint per CLIENTS_PER_CHANNEL clients.
    let mut channels = Vec::new();
    let per_endpoint = clients
        .div_ceil(endpoints.len())
        .div_ceil(CLIENTS_PER_CHANNEL)
        .max(1);
    for e in endpoints {
        for _ in 0..per_endpoint {
            channels.push(client(kind, e).await?);
        }
    }
    let warmup = Duration::from_millis(500);
    let run = Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut kv = channels[c % channels.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = (c as u64).wrapping_mul(7919);
            let value = vec![b'v'; VALUE_SIZE];
            while start.elapsed() < warmup + run {
                n = n.wrapping_add(1);
                let began = Instant::now();
                let ok = kv.put(key(n), value.clone()).await.is_ok();
                if began.duration_since(start) >= warmup {
                    if ok {
                        latencies.push(began.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    println!(
        "writes_per_s={:.0} p50_ms={:.3} p99_ms={:.3} errors={errors}",
        all.len() as f64 / run.as_secs_f64(),
        percentile(&all, 0.50),
        percentile(&all, 0.99)
    );
    Ok(())
}

async fn leader(kind: &str, endpoints: &[String]) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        for (i, e) in endpoints.iter().enumerate() {
            let Ok(ch) = channel(kind, e).await else {
                continue;
            };
            let is_leader = match kind {
                "ours" => fed::kv_client::KvClient::new(ch)
                    .status(fed::StatusRequest {})
                    .await
                    .map(|s| s.into_inner().role == "leader")
                    .unwrap_or(false),
                _ => etcd::maintenance_client::MaintenanceClient::new(ch)
                    .status(etcd::StatusRequest {})
                    .await
                    .map(|s| {
                        let s = s.into_inner();
                        s.header.is_some_and(|h| h.member_id == s.leader)
                    })
                    .unwrap_or(false),
            };
            if is_leader {
                return Ok(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(anyhow!("no leader found"))
}

async fn failover(kind: &str, pid: u32, leader: usize, endpoints: &[String]) -> Result<()> {
    let mut survivors = Vec::new();
    for (i, e) in endpoints.iter().enumerate() {
        if i != leader {
            survivors.push(client(kind, e).await?);
        }
    }
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    let killed = Instant::now();
    if !status.success() {
        bail!("kill -9 {pid} failed");
    }
    let mut n = 0u64;
    let deadline = killed + Duration::from_secs(30);
    while Instant::now() < deadline {
        for kv in &mut survivors {
            n += 1;
            let attempt = tokio::time::timeout(
                Duration::from_millis(100),
                kv.put(key(n), vec![b'f'; VALUE_SIZE]),
            )
            .await;
            if let Ok(Ok(())) = attempt {
                println!("failover_ms={:.1}", killed.elapsed().as_secs_f64() * 1000.0);
                return Ok(());
            }
        }
    }
    bail!("no write committed within 30s of the kill")
}

async fn serve(id: u64, dir: &str, tick_ms: u64, peers: &str) -> Result<()> {
    let mut map = BTreeMap::new();
    for part in peers.split(',') {
        let (i, a) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("bad peer {part}"))?;
        map.insert(i.parse::<u64>()?, a.parse::<SocketAddr>()?);
    }
    let addr = *map
        .get(&id)
        .ok_or_else(|| anyhow!("id {id} not in peers"))?;
    let mut binding = isthmus_federation::bind(addr).await?;
    if let Some(tls) = tls_dir() {
        binding = binding.with_tls(member_tls(&tls, id)?);
    }
    let store = binding
        .start(isthmus_federation::StoreOptions {
            data_dir: Some(dir.into()),
            tick: Duration::from_millis(tick_ms),
            ..isthmus_federation::StoreOptions::new(id, map)
        })
        .await?;
    println!("serving member {id} on {addr}");
    std::future::pending::<()>().await;
    drop(store);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    let list = |s: &String| -> Vec<String> { s.split(',').map(str::to_string).collect() };
    runtime.block_on(async {
        match args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["serve", id, dir, tick, peers] => serve(id.parse()?, dir, tick.parse()?, peers).await,
            ["certs", dir] => certs(dir),
            ["load", kind, clients, secs, eps] => {
                load(
                    kind,
                    clients.parse()?,
                    secs.parse()?,
                    &list(&eps.to_string()),
                )
                .await
            }
            ["leader", kind, eps] => {
                println!("{}", leader(kind, &list(&eps.to_string())).await?);
                Ok(())
            }
            ["failover", kind, pid, leader, eps] => {
                failover(kind, pid.parse()?, leader.parse()?, &list(&eps.to_string())).await
            }
            _ => bail!("usage: see the top of examples/fedbench.rs"),
        }
    })
}
