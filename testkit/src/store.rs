//! A one-member federation store: its own leader at once, so writes commit locally.

use std::collections::BTreeMap;
use std::time::Duration;

use isthmus_federation::{Store, StoreOptions};

/// The raft tick the fixtures use: short, so a test's store elects itself within a few
/// tens of milliseconds.
pub const TEST_TICK: Duration = Duration::from_millis(20);

/// Starts a one-member store (member 1) on `127.0.0.1`, an ephemeral port, in memory.
pub async fn one_member_store() -> Store {
    isthmus_core::install_crypto_provider();
    let binding = isthmus_federation::bind("127.0.0.1:0".parse().expect("a loopback address"))
        .await
        .expect("binding a loopback port for the test store");
    let peers = BTreeMap::from([(1, binding.local_addr())]);
    binding
        .start(StoreOptions {
            tick: TEST_TICK,
            ..StoreOptions::new(1, peers)
        })
        .await
        .expect("starting the test store")
}
