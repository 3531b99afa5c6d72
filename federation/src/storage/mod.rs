//! Log storage: where a member keeps its raft log, hard state and latest snapshot.
//!
//! raft-rs reads through its [`raft::Storage`] trait; [`LogStore`] adds the writes the ready
//! loop makes. [`RaftLog`] is the one implementation: the log is always held in memory (it
//! is bounded by snapshots), and with a data directory every change is also written to a
//! write-ahead log ([`wal`]) and fsynced by [`LogStore::sync`] before the ready loop sends
//! anything that promises it is durable.

pub(crate) mod wal;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::StoreError;
use wal::{Recovered, Wal};

/// Start a new segment (a checkpoint) once the current one is this large, even without a
/// snapshot.
const SEGMENT_SOFT_LIMIT: u64 = 64 * 1024 * 1024;

/// Data directories opened by a member of this process: two members writing one log would
/// corrupt it.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// The lock file in a data directory: an exclusive `flock` held while a member uses the
/// directory, and the holder's process id as its content (for the refusal message).
const LOCK_FILE: &str = "LOCK";

/// Holds a data directory for one member until dropped: against other members of this
/// process (a set of open directories) and against other processes (an exclusive `flock` on
/// `LOCK`, which the kernel releases when the process dies, so a crash leaves no stale lock).
struct DirGuard {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl DirGuard {
    fn acquire(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            op: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| StoreError::DataDir {
            op: "resolving",
            path: dir.to_path_buf(),
            source,
        })?;
        if !OPEN_DIRS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.clone())
        {
            return Err(StoreError::DataDirInUse(dir));
        }
        match lock_across_processes(&dir) {
            Ok(lock) => Ok(DirGuard { dir, _lock: lock }),
            Err(e) => {
                OPEN_DIRS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&dir);
                Err(e)
            }
        }
    }
}

/// Takes the exclusive lock on `dir/LOCK` without waiting, and writes this process's id
/// into it; refuses, naming the holder, when another process has it.
fn lock_across_processes(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let data_dir = |op: &'static str, source: std::io::Error| StoreError::DataDir {
        op,
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| data_dir("opening", e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(StoreError::DataDirLocked {
                path,
                holder: holder.trim().to_string(),
            });
        }
        Err(e) => return Err(data_dir("locking", e.into())),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.sync_all())
        .map_err(|e| data_dir("writing", e))?;
    Ok(file)
}

/// A data directory held by this process until dropped (see [`lock_data_dir`]).
#[derive(Debug)]
pub struct DataDirLock(#[allow(dead_code)] DirGuard);

impl std::fmt::Debug for DirGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirGuard").field("dir", &self.dir).finish()
    }
}

/// Holds `dir` against every other user, in this process and in others, the way a member
/// holds its raft directory: a daemon takes it on its whole data directory before it reads
/// or creates anything there (its CA), so two processes never race on those files.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, StoreError> {
    DirGuard::acquire(dir).map(DataDirLock)
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        OPEN_DIRS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.dir);
    }
}

/// The raft log as the ready loop writes it. Writes may be buffered until [`LogStore::sync`]
/// returns; the loop calls it before sending "persisted" messages.
pub(crate) trait LogStore: raft::Storage + Send + 'static {
    /// Appends entries, replacing any conflicting suffix of the log.
    fn append(&mut self, entries: &[Entry]) -> raft::Result<()>;
    /// Records the current term, vote and commit index.
    fn set_hard_state(&mut self, hard_state: HardState) -> raft::Result<()>;
    /// Records a new commit index without changing term or vote (not fsynced on its own:
    /// a lost commit index is learned again from the leader).
    fn set_commit(&mut self, commit: u64) -> raft::Result<()>;
    /// Replaces the log with a snapshot received from the leader (durably).
    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()>;
    /// Keeps a snapshot this member made of its own state, and discards the entries before
    /// `compact_to` (durably).
    fn save_snapshot(&mut self, snapshot: Snapshot, compact_to: u64) -> raft::Result<()>;
    /// Makes every write above durable.
    fn sync(&mut self) -> raft::Result<()>;
    /// The latest snapshot (received or made); empty metadata if none.
    fn latest_snapshot(&self) -> &Snapshot;
    /// Whether raft asked for a snapshot newer than the latest one (to send to a follower)
    /// since the last call; clears the request.
    fn take_snapshot_request(&mut self) -> bool;
}

/// A raft log in memory, optionally backed by a write-ahead log on disk.
pub(crate) struct RaftLog {
    hard_state: HardState,
    snapshot: Snapshot,
    /// Index and term of the entry just before `entries[0]`.
    offset_index: u64,
    offset_term: u64,
    entries: Vec<Entry>,
    wal: Option<Wal>,
    snapshot_requested: Cell<bool>,
    _guard: Option<DirGuard>,
}

fn storage_error(err: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(err)))
}

fn io_error(err: std::io::Error) -> raft::Error {
    raft::Error::Io(err)
}

/// The state of a brand-new member. The members of the initial configuration start from
/// the same snapshot at index 1 that holds them as voters (and an empty map), so any member
/// added later must catch up from a snapshot and learns the configuration from it. A member
/// joining later starts empty (`voters` empty).
fn fresh(voters: &[u64], empty_state: Vec<u8>) -> Recovered {
    let mut recovered = Recovered::default();
    if voters.is_empty() {
        return recovered;
    }
    let meta = recovered.snapshot.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.set_conf_state(ConfState::from((voters.to_vec(), Vec::<u64>::new())));
    recovered.snapshot.data = empty_state.into();
    recovered.hard_state.term = 1;
    recovered.hard_state.commit = 1;
    recovered.offset_index = 1;
    recovered.offset_term = 1;
    recovered
}

impl RaftLog {
    /// A log kept only in memory, lost when the process exits.
    pub(crate) fn in_memory(voters: &[u64], empty_state: Vec<u8>) -> Self {
        Self::from_recovered(fresh(voters, empty_state), None, None)
    }

    /// Opens the log in `dir`, creating it (from `voters`) if the directory holds none.
    pub(crate) fn open(
        dir: &Path,
        voters: &[u64],
        empty_state: Vec<u8>,
    ) -> Result<Self, StoreError> {
        let guard = DirGuard::acquire(dir)?;
        let (wal, recovered) = Wal::open(dir, fresh(voters, empty_state))?;
        Ok(Self::from_recovered(recovered, Some(wal), Some(guard)))
    }

    fn from_recovered(r: Recovered, wal: Option<Wal>, guard: Option<DirGuard>) -> Self {
        RaftLog {
            hard_state: r.hard_state,
            snapshot: r.snapshot,
            offset_index: r.offset_index,
            offset_term: r.offset_term,
            entries: r.entries,
            wal,
            snapshot_requested: Cell::new(false),
            _guard: guard,
        }
    }

    /// What a crash would leave of this log: everything [`LogStore::sync`] made durable
    /// (the simulator crashes members only between readies, when all of it is synced).
    #[cfg(test)]
    pub(crate) fn durable_copy(&self) -> RaftLog {
        Self::from_recovered(self.recovered(), None, None)
    }

    fn last(&self) -> u64 {
        self.offset_index + self.entries.len() as u64
    }

    /// The durable picture written at a checkpoint. The commit index is raised to the
    /// snapshot's, which raft requires on restart (applied <= committed).
    fn recovered(&self) -> Recovered {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = hard_state.commit.max(self.snapshot.get_metadata().index);
        Recovered {
            hard_state,
            snapshot: self.snapshot.clone(),
            offset_index: self.offset_index,
            offset_term: self.offset_term,
            entries: self.entries.clone(),
        }
    }

    fn checkpoint(&mut self, new_snapshot: bool) -> raft::Result<()> {
        let state = self.recovered();
        if let Some(wal) = self.wal.as_mut() {
            wal.checkpoint(&state, new_snapshot)
                .map_err(storage_error)?;
        }
        Ok(())
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.snapshot.get_metadata().get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.offset_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = slot(low - self.offset_index - 1);
        let to = slot(high - self.offset_index - 1);
        let mut entries = self.entries[from..to].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.offset_index {
            return Ok(self.offset_term);
        }
        if idx < self.offset_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[slot(idx - self.offset_index - 1)].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.offset_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        let index = meta.index;
        let cs = meta.get_conf_state();
        // A member added after the snapshot was taken would refuse it (it is not in its
        // configuration): it needs a newer one.
        let knows_to = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        if index == 0 || index < request_index || !knows_to {
            // The raft loop makes a fresh one after this ready; raft asks again later.
            self.snapshot_requested.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

impl LogStore for RaftLog {
    fn append(&mut self, entries: &[Entry]) -> raft::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.offset_index || first.index > self.last() + 1 {
            return Err(storage_error(StoreError::LogGap {
                first: first.index,
                offset: self.offset_index,
                last: self.last(),
            }));
        }
        self.entries
            .truncate(slot(first.index - self.offset_index - 1));
        self.entries.extend_from_slice(entries);
        if let Some(wal) = self.wal.as_mut() {
            wal.append(entries);
        }
        Ok(())
    }

    fn set_hard_state(&mut self, hard_state: HardState) -> raft::Result<()> {
        if let Some(wal) = self.wal.as_mut() {
            wal.set_hard_state(&hard_state);
        }
        self.hard_state = hard_state;
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> raft::Result<()> {
        self.hard_state.commit = commit;
        let hard_state = self.hard_state.clone();
        if let Some(wal) = self.wal.as_mut() {
            wal.set_hard_state(&hard_state);
        }
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()> {
        let meta = snapshot.get_metadata();
        if meta.index < self.snapshot.get_metadata().index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        self.offset_index = meta.index;
        self.offset_term = meta.term;
        self.entries.clear();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.snapshot = snapshot;
        self.checkpoint(true)
    }

    fn save_snapshot(&mut self, snapshot: Snapshot, compact_to: u64) -> raft::Result<()> {
        let index = snapshot.get_metadata().index;
        if index < self.snapshot.get_metadata().index || index > self.last() {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        let compact_to = compact_to.min(index + 1);
        if compact_to > self.offset_index + 1 {
            let new_offset = compact_to - 1;
            let term = raft::Storage::term(self, new_offset)?;
            self.entries.drain(..slot(new_offset - self.offset_index));
            self.offset_index = new_offset;
            self.offset_term = term;
        }
        self.snapshot = snapshot;
        self.checkpoint(true)
    }

    fn sync(&mut self) -> raft::Result<()> {
        let Some(wal) = self.wal.as_mut() else {
            return Ok(());
        };
        wal.sync().map_err(io_error)?;
        if wal.size() > SEGMENT_SOFT_LIMIT {
            self.checkpoint(false)?;
        }
        Ok(())
    }

    fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn take_snapshot_request(&mut self) -> bool {
        self.snapshot_requested.replace(false)
    }
}

/// A distance in the log as an index into the in-memory entries: every entry it can index
/// is in memory, so it fits a `usize`.
pub(crate) fn slot(distance: u64) -> usize {
    usize::try_from(distance).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests;
