//! The table in use: follows the control plane's configuration channel.
//!
//! [`LiveTable::current`] compares the snapshot in the channel with the one the table was
//! built from (by pointer, so it costs nothing when nothing changed) and rebuilds on a
//! difference, so the first query after a new snapshot already sees it. The config follower
//! task calls the same method on every change, so the rebuild usually happens before any
//! query needs it. When the sender is dropped the channel keeps its last value, and the table
//! built from it keeps answering.
//!
//! Each table comes with its memo: the encoded answer (or the decision to forward) for every
//! question key asked since the table was built. It is thrown away with the table, so a new
//! snapshot can never be answered from an old memo.

use std::sync::{Arc, Mutex, PoisonError};

use isthmus_core::mesh::MeshConfig;
use tokio::sync::watch;
use tracing::info;

use crate::cache::ShardedLru;
use crate::records::MeshTable;
use crate::wire::Template;

/// Question keys remembered per table.
const MEMO_ENTRIES: usize = 16_384;

/// What the table decided for one question key.
#[derive(Debug, Clone)]
pub(crate) enum Decision {
    /// Answer with this (the table's own answer, encoded).
    Local(Arc<Template>),
    /// Not the mesh's name: forward it (through the reply cache).
    Forward,
}

/// One table and the memo of its answers.
#[derive(Debug)]
pub(crate) struct TableState {
    pub(crate) table: MeshTable,
    pub(crate) memo: Option<ShardedLru<Decision>>,
}

/// The current [`MeshTable`], rebuilt whenever the configuration channel holds a new snapshot.
#[derive(Debug)]
pub(crate) struct LiveTable {
    config: watch::Receiver<Arc<MeshConfig>>,
    built: Mutex<Built>,
}

#[derive(Debug)]
struct Built {
    from: Arc<MeshConfig>,
    state: Arc<TableState>,
}

impl LiveTable {
    /// Builds the table from the snapshot currently in `config`.
    pub(crate) fn new(config: watch::Receiver<Arc<MeshConfig>>) -> LiveTable {
        let from = config.borrow().clone();
        let state = Arc::new(build(&from));
        LiveTable {
            config,
            built: Mutex::new(Built { from, state }),
        }
    }

    /// The table for the newest snapshot, rebuilding it first if the snapshot changed.
    pub(crate) fn current(&self) -> Arc<TableState> {
        let latest = self.config.borrow().clone();
        // A panic while rebuilding cannot leave `Built` half-written (it is replaced whole),
        // so a poisoned lock is safe to keep using.
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&built.from, &latest) {
            built.state = Arc::new(build(&latest));
            built.from = latest;
        }
        built.state.clone()
    }
}

fn build(config: &MeshConfig) -> TableState {
    let table = MeshTable::build(config);
    info!(
        version = table.version(),
        cluster = %config.cluster,
        services = table.service_count(),
        "DNS table built from mesh configuration"
    );
    TableState {
        table,
        memo: ShardedLru::new(MEMO_ENTRIES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;

    use crate::records::Lookup;
    use isthmus_testkit::mesh::service;

    fn config(version: u64, services: &[(&str, &str)]) -> Arc<MeshConfig> {
        Arc::new(MeshConfig {
            version,
            services: services
                .iter()
                .map(|(name, vip)| service(name, "shop", vip, &[]))
                .collect(),
            ..Default::default()
        })
    }

    fn found(table: &MeshTable, svc: &str) -> bool {
        let name = Name::from_ascii(format!("{svc}.shop.svc.clusterset.local.")).unwrap();
        matches!(table.lookup(&name), Lookup::Found(n) if n.has_records())
    }

    #[test]
    fn a_new_snapshot_is_used_by_the_next_lookup() {
        let (tx, rx) = watch::channel(config(1, &[("web", "240.240.0.1")]));
        let live = LiveTable::new(rx);
        assert!(found(&live.current().table, "web"));
        assert!(!found(&live.current().table, "api"));

        tx.send_replace(config(2, &[("api", "240.240.0.2")]));
        let table = &live.current().table;
        assert_eq!(table.version(), 2);
        assert!(found(table, "api"));
        assert!(!found(table, "web"));
    }

    #[test]
    fn an_unchanged_snapshot_is_not_rebuilt() {
        let (_tx, rx) = watch::channel(config(1, &[("web", "240.240.0.1")]));
        let live = LiveTable::new(rx);
        assert!(Arc::ptr_eq(&live.current(), &live.current()));
    }

    #[test]
    fn the_last_snapshot_keeps_answering_after_the_sender_is_dropped() {
        let (tx, rx) = watch::channel(config(1, &[("web", "240.240.0.1")]));
        let live = LiveTable::new(rx);
        tx.send_replace(config(2, &[("api", "240.240.0.2")]));
        drop(tx);
        let table = &live.current().table;
        assert_eq!(table.version(), 2);
        assert!(found(table, "api"));
    }
}
