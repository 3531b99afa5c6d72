//! Log storage: where a member keeps its raft log, hard state and snapshot.
//!
//! raft-rs reads through its [`raft::Storage`] trait; [`LogStore`] adds the writes the ready
//! loop makes. The walking skeleton keeps everything in memory ([`MemLogStore`]); a durable
//! on-disk store implements the same trait later and the raft loop does not change.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;

/// The raft log as the ready loop writes it. Every write must be durable (for a durable
/// store) before the call returns: the loop sends "persisted" messages right after.
pub(crate) trait LogStore: raft::Storage + Send + 'static {
    /// Appends entries, replacing any conflicting suffix of the log.
    fn append(&mut self, entries: &[Entry]) -> raft::Result<()>;
    /// Records the current term, vote and commit index.
    fn set_hard_state(&mut self, hard_state: HardState) -> raft::Result<()>;
    /// Records a new commit index without changing term or vote.
    fn set_commit(&mut self, commit: u64) -> raft::Result<()>;
    /// Replaces the log up to the snapshot's index with the snapshot.
    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()>;
}

/// In-memory log storage (raft-rs's [`MemStorage`]): fine for the skeleton and for tests,
/// lost when the process exits.
#[derive(Clone)]
pub(crate) struct MemLogStore {
    inner: MemStorage,
}

impl MemLogStore {
    /// A fresh, empty log whose initial configuration has `voters` as its voters. Every
    /// member of a static federation must start from the same voters.
    pub(crate) fn new(voters: impl IntoIterator<Item = u64>) -> Self {
        let conf_state = ConfState::from((voters, Vec::<u64>::new()));
        MemLogStore {
            inner: MemStorage::new_with_conf_state(conf_state),
        }
    }
}

impl raft::Storage for MemLogStore {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.inner.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.inner.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.inner.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.inner.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.inner.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.inner.snapshot(request_index, to)
    }
}

impl LogStore for MemLogStore {
    fn append(&mut self, entries: &[Entry]) -> raft::Result<()> {
        self.inner.wl().append(entries)
    }

    fn set_hard_state(&mut self, hard_state: HardState) -> raft::Result<()> {
        self.inner.wl().set_hardstate(hard_state);
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> raft::Result<()> {
        self.inner.wl().mut_hard_state().set_commit(commit);
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()> {
        self.inner.wl().apply_snapshot(snapshot)
    }
}
