//! Shared harness: whole federations of members in one process, on 127.0.0.1 and port 0,
//! talking real gRPC; and polling with a deadline instead of sleeping.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus_federation::{Role, Store, StoreOptions};

/// Generous: the machine running the tests may be busy compiling.
pub const DEADLINE: Duration = Duration::from_secs(15);
/// Short ticks keep the suite fast: elections take 250–500ms.
pub const TICK: Duration = Duration::from_millis(25);
pub const ELECTION_TICKS: usize = 10;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub fn options(node_id: u64, peers: &BTreeMap<u64, SocketAddr>) -> StoreOptions {
    StoreOptions {
        tick: TICK,
        election_ticks: ELECTION_TICKS,
        heartbeat_ticks: 2,
        proposal_timeout: Duration::from_secs(10),
        ..StoreOptions::new(node_id, peers.clone())
    }
}

/// Starts members 1..=n with the test timing.
pub async fn start_federation(n: u64) -> BTreeMap<u64, Store> {
    start_federation_with(n, options).await
}

pub async fn start_federation_with(
    n: u64,
    options: impl Fn(u64, &BTreeMap<u64, SocketAddr>) -> StoreOptions,
) -> BTreeMap<u64, Store> {
    init_tracing();
    let mut bindings = BTreeMap::new();
    for id in 1..=n {
        let binding = isthmus_federation::bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind peer listener");
        bindings.insert(id, binding);
    }
    let peers: BTreeMap<u64, SocketAddr> = bindings
        .iter()
        .map(|(&id, binding)| (id, binding.local_addr()))
        .collect();
    let mut stores = BTreeMap::new();
    for (id, binding) in bindings {
        let store = binding
            .start(options(id, &peers))
            .await
            .expect("start member");
        stores.insert(id, store);
    }
    stores
}

/// Polls `check` every 10ms until it returns `Some`, or panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every given member agrees on one leader that knows it leads; returns its id.
pub async fn agreed_leader(stores: &BTreeMap<u64, Store>) -> u64 {
    eventually("all members to agree on a leader", || async {
        let statuses: Vec<_> = stores.values().map(Store::status).collect();
        let leader = statuses.first()?.leader_id?;
        let all_agree = statuses.iter().all(|s| s.leader_id == Some(leader));
        let leader_leads = stores.get(&leader)?.status().role == Role::Leader;
        (all_agree && leader_leads).then_some(leader)
    })
    .await
}

/// Waits until `key` holds `value` on every given member.
pub async fn visible_everywhere(stores: &BTreeMap<u64, Store>, key: &str, value: &[u8]) {
    eventually(&format!("{key} to be visible on every member"), || async {
        stores
            .values()
            .all(|s| s.get(key).is_some_and(|r| r.value == value))
            .then_some(())
    })
    .await
}

pub async fn shutdown_all(stores: BTreeMap<u64, Store>) {
    for store in stores.into_values() {
        store.shutdown().await;
    }
}

/// Binds `addr` again once a stopped member has released it.
pub async fn rebind(addr: SocketAddr) -> isthmus_federation::Binding {
    eventually(&format!("{addr} to be free again"), || async {
        isthmus_federation::bind(addr).await.ok()
    })
    .await
}

/// A federation of `n` durable members, each with its own directory under `root`.
pub struct DurableFederation {
    pub root: tempfile::TempDir,
    pub peers: BTreeMap<u64, SocketAddr>,
    pub stores: BTreeMap<u64, Store>,
    pub tweak: fn(StoreOptions) -> StoreOptions,
}

impl DurableFederation {
    pub async fn start(n: u64, tweak: fn(StoreOptions) -> StoreOptions) -> Self {
        init_tracing();
        let root = tempfile::tempdir().expect("tempdir");
        let mut bindings = BTreeMap::new();
        for id in 1..=n {
            let binding = isthmus_federation::bind("127.0.0.1:0".parse().expect("address"))
                .await
                .expect("bind peer listener");
            bindings.insert(id, binding);
        }
        let peers: BTreeMap<u64, SocketAddr> = bindings
            .iter()
            .map(|(&id, b)| (id, b.local_addr()))
            .collect();
        let mut fed = DurableFederation {
            root,
            peers,
            stores: BTreeMap::new(),
            tweak,
        };
        for (id, binding) in bindings {
            let store = binding.start(fed.options(id)).await.expect("start member");
            fed.stores.insert(id, store);
        }
        fed
    }

    pub fn dir(&self, id: u64) -> std::path::PathBuf {
        self.root.path().join(format!("member-{id}"))
    }

    pub fn options(&self, id: u64) -> StoreOptions {
        (self.tweak)(StoreOptions {
            data_dir: Some(self.dir(id)),
            ..options(id, &self.peers)
        })
    }

    /// Restarts member `id` on its directory and address.
    pub async fn restart(&mut self, id: u64) -> Result<(), isthmus_federation::StoreError> {
        let binding = rebind(self.peers[&id]).await;
        let store = binding.start(self.options(id)).await?;
        self.stores.insert(id, store);
        Ok(())
    }

    pub async fn shutdown(self) {
        shutdown_all(self.stores).await;
    }
}

/// A control-plane identity of `ca`'s trust domain: what a member bound to that cluster
/// signs its entries with (`StoreOptions::signer`).
#[allow(dead_code)]
pub fn control_identity(
    ca: &isthmus_core::ca::CertificateAuthority,
) -> std::sync::Arc<isthmus_core::tls::Identity> {
    isthmus_core::install_crypto_provider();
    let id = isthmus_core::identity::SpiffeId::control(ca.trust_domain());
    let cert = ca
        .issue(&id, Duration::from_secs(3600))
        .expect("a control-plane certificate");
    isthmus_core::tls::Identity::from_pem(id, &cert.cert_chain_pem, &cert.key_pem)
        .expect("an identity")
}
