//! The on-disk half of a member's log: a write-ahead log of checksummed records and one
//! snapshot file, under `<data_dir>/raft/`. The format and the fsync points are described in
//! `docs/federation-durability.md`; in short:
//!
//! - `wal-<seq>.log`: an 8-byte magic, then records `[len u32 LE][crc32 u32 LE][payload]`
//!   where the payload is a prost `WalRecord`. The first record is always a checkpoint
//!   holding everything the log held when the segment was started, so only the newest
//!   segment is ever read; older ones are left over from a crash during a switch and are
//!   deleted at start.
//! - `snapshot-<index>-<term>.snap`: an 8-byte magic, `[len u64 LE][crc32 u32 LE]`, then a
//!   rust-protobuf `eraftpb::Snapshot`.
//!
//! New files are written under a `.tmp` name, fsynced, renamed, and the directory fsynced,
//! so a file with its final name is always whole. Anything that does not verify at start is
//! an error naming the file and offset: the log is never silently reset.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use isthmus_core::durable::{write_atomic, Access};
use prost::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};

use crate::proto::v1 as pb;
use crate::StoreError;

const WAL_MAGIC: &[u8; 8] = b"ISTHWAL1";
const SNAP_MAGIC: &[u8; 8] = b"ISTHSNP1";
/// Largest record accepted when reading back; anything larger is corruption.
const MAX_RECORD: u32 = 256 * 1024 * 1024;

/// What a log directory held at start.
#[derive(Default)]
pub(crate) struct Recovered {
    pub(crate) hard_state: HardState,
    /// The snapshot the log continues from (empty metadata if none).
    pub(crate) snapshot: Snapshot,
    pub(crate) offset_index: u64,
    pub(crate) offset_term: u64,
    /// Consecutive entries from `offset_index + 1`.
    pub(crate) entries: Vec<Entry>,
}

/// The open write-ahead log of one member.
pub(crate) struct Wal {
    dir: PathBuf,
    seq: u64,
    file: File,
    /// Bytes written to the current segment.
    size: u64,
    /// Encoded records not yet written (written and fsynced by [`Wal::sync`]).
    pending: Vec<u8>,
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::DataDir {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StoreError {
    StoreError::CorruptLog {
        file: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:016x}.log")
}

fn snapshot_name(index: u64, term: u64) -> String {
    format!("snapshot-{index:016x}-{term:016x}.snap")
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing directory", dir, e))
}

/// Writes `bytes` to `dir/name` atomically and durably (tmp file, fsync, rename, dir fsync).
fn write_file_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    write_atomic(&path, bytes, Access::Default).map_err(|e| io_err("writing", &path, e))
}

fn encode_frame(out: &mut Vec<u8>, record: &pb::WalRecord) {
    let payload = record.encode_to_vec();
    // Records are bounded by raft's message size; MAX_RECORD guards reading.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

fn encode_raft<M: protobuf::Message>(message: &M) -> Vec<u8> {
    // rust-protobuf only fails to encode messages with missing required fields, which
    // proto3 raft messages do not have.
    message.write_to_bytes().unwrap_or_default()
}

fn checkpoint_record(state: &Recovered) -> pb::WalRecord {
    pb::WalRecord {
        record: Some(pb::wal_record::Record::Checkpoint(pb::WalCheckpoint {
            hard_state: encode_raft(&state.hard_state),
            snapshot_index: state.snapshot.get_metadata().index,
            snapshot_term: state.snapshot.get_metadata().term,
            offset_index: state.offset_index,
            offset_term: state.offset_term,
            entries: state.entries.iter().map(encode_raft).collect(),
        })),
    }
}

impl Wal {
    /// Opens (or creates) the log under `dir`, returning what it holds. `fresh` is the
    /// state to start a new log with when the directory holds none.
    pub(crate) fn open(dir: &Path, fresh: Recovered) -> Result<(Wal, Recovered), StoreError> {
        fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let mut segments = Vec::new();
        let mut snapshots = Vec::new();
        let listing = fs::read_dir(dir).map_err(|e| io_err("listing", dir, e))?;
        for item in listing {
            let item = item.map_err(|e| io_err("listing", dir, e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // Never renamed, so never part of the log: a crash while writing it.
                let path = item.path();
                fs::remove_file(&path).map_err(|e| io_err("removing", &path, e))?;
            } else if let Some(seq) = name
                .strip_prefix("wal-")
                .and_then(|s| s.strip_suffix(".log"))
            {
                let seq = u64::from_str_radix(seq, 16)
                    .map_err(|_| corrupt(&item.path(), 0, "not a log segment name"))?;
                segments.push(seq);
            } else if name.starts_with("snapshot-") && name.ends_with(".snap") {
                snapshots.push(name);
            }
        }
        segments.sort_unstable();
        let Some(&last) = segments.last() else {
            if !snapshots.is_empty() {
                return Err(corrupt(
                    &dir.join(&snapshots[0]),
                    0,
                    "a snapshot file without any log segment: the log was deleted",
                ));
            }
            write_snapshot(dir, &fresh.snapshot)?;
            let wal = Wal::create(dir, 1, &fresh)?;
            return Ok((wal, fresh));
        };
        let path = dir.join(segment_name(last));
        let SegmentRead {
            mut state,
            valid_len,
            torn,
        } = read_segment(&path)?;
        if let Some(reason) = torn {
            // A record cut short by a crash mid-write was never fsynced, so never
            // acknowledged: cutting it loses nothing any member was promised (as etcd repairs
            // its WAL tail). Damage anywhere else stays fatal.
            tracing::warn!(
                file = %path.display(),
                offset = valid_len,
                reason,
                "cutting a torn final record from the raft log"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_err("opening", &path, e))?;
            file.set_len(valid_len)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("truncating", &path, e))?;
        }
        let meta_index = state.snapshot.get_metadata().index;
        let meta_term = state.snapshot.get_metadata().term;
        if meta_index > 0 {
            let snap_path = dir.join(snapshot_name(meta_index, meta_term));
            state.snapshot = read_snapshot(&snap_path, meta_index, meta_term)?;
        }
        // Older segments and snapshots are superseded by the newest checkpoint.
        for seq in segments.iter().filter(|&&s| s != last) {
            let old = dir.join(segment_name(*seq));
            fs::remove_file(&old).map_err(|e| io_err("removing", &old, e))?;
        }
        let keep = snapshot_name(meta_index, meta_term);
        for name in snapshots.iter().filter(|n| **n != keep) {
            let old = dir.join(name);
            fs::remove_file(&old).map_err(|e| io_err("removing", &old, e))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let size = file
            .metadata()
            .map_err(|e| io_err("reading metadata of", &path, e))?
            .len();
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                seq: last,
                file,
                size,
                pending: Vec::new(),
            },
            state,
        ))
    }

    /// Starts segment `seq` with a checkpoint of `state` (durably).
    fn create(dir: &Path, seq: u64, state: &Recovered) -> Result<Wal, StoreError> {
        let mut bytes = WAL_MAGIC.to_vec();
        encode_frame(&mut bytes, &checkpoint_record(state));
        let name = segment_name(seq);
        write_file_atomic(dir, &name, &bytes)?;
        let path = dir.join(&name);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            seq,
            file,
            size: bytes.len() as u64,
            pending: Vec::new(),
        })
    }

    /// Queues appended entries (written by the next [`Wal::sync`]).
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        let record = pb::WalRecord {
            record: Some(pb::wal_record::Record::Entries(pb::WalEntries {
                entries: entries.iter().map(encode_raft).collect(),
            })),
        };
        encode_frame(&mut self.pending, &record);
    }

    /// Queues a hard state (written by the next [`Wal::sync`]).
    pub(crate) fn set_hard_state(&mut self, hard_state: &HardState) {
        let record = pb::WalRecord {
            record: Some(pb::wal_record::Record::HardState(encode_raft(hard_state))),
        };
        encode_frame(&mut self.pending, &record);
    }

    /// Writes the queued records and fsyncs them: one write and one `fdatasync` per call.
    /// A failure names the segment file (the member stops: see `node/run.rs`).
    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(segment_name(self.seq));
        let named = |op: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
        };
        self.file
            .write_all(&self.pending)
            .map_err(|e| named("writing", e))?;
        self.file.sync_data().map_err(|e| named("fsyncing", e))?;
        self.size += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Size of the current segment in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Durably replaces the log with `state`: writes its snapshot file (if new), starts a
    /// new segment with a checkpoint, then removes the older segment and snapshot.
    /// Queued records are dropped: `state` already contains them.
    pub(crate) fn checkpoint(
        &mut self,
        state: &Recovered,
        new_snapshot: bool,
    ) -> Result<(), StoreError> {
        let meta = state.snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        if new_snapshot {
            write_snapshot(&self.dir, &state.snapshot)?;
        }
        let old_seq = self.seq;
        let next = Wal::create(&self.dir, old_seq + 1, state)?;
        *self = next;
        let old = self.dir.join(segment_name(old_seq));
        fs::remove_file(&old).map_err(|e| io_err("removing", &old, e))?;
        // Snapshot files other than the current one are no longer referenced.
        let keep = snapshot_name(index, term);
        let listing = fs::read_dir(&self.dir).map_err(|e| io_err("listing", &self.dir, e))?;
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with("snapshot-") && name.ends_with(".snap") && name != keep {
                let path = item.path();
                fs::remove_file(&path).map_err(|e| io_err("removing", &path, e))?;
            }
        }
        sync_dir(&self.dir)
    }
}

/// Writes a snapshot file (if the snapshot is not empty), durably.
fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
    let meta = snapshot.get_metadata();
    if meta.index == 0 {
        return Ok(());
    }
    let data = encode_raft(snapshot);
    let mut bytes = SNAP_MAGIC.to_vec();
    bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    bytes.extend_from_slice(&data);
    write_file_atomic(dir, &snapshot_name(meta.index, meta.term), &bytes)
}

/// What a segment held, and where its valid records end.
struct SegmentRead {
    state: Recovered,
    /// Bytes of the file up to the end of its last whole record.
    valid_len: u64,
    /// Why the bytes after `valid_len`, if any, are a torn final record.
    torn: Option<String>,
}

/// Reads a whole segment: its checkpoint, then every record after it. A final record that a
/// crash cut short (an incomplete header or payload at the end of the file, or a zero-filled
/// remainder) is reported as torn; any other damage is an error naming the file and offset.
fn read_segment(path: &Path) -> Result<SegmentRead, StoreError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_err("reading", path, e))?;
    if bytes.len() < WAL_MAGIC.len() || &bytes[..WAL_MAGIC.len()] != WAL_MAGIC {
        return Err(corrupt(
            path,
            0,
            "missing log segment header (truncated or not a log file)",
        ));
    }
    let mut offset = WAL_MAGIC.len();
    let mut state: Option<Recovered> = None;
    let mut torn = None;
    while offset < bytes.len() {
        let at = offset as u64;
        let rest = &bytes[offset..];
        if rest.iter().all(|&b| b == 0) {
            torn = Some(format!(
                "{} zero bytes where a record should start",
                rest.len()
            ));
            break;
        }
        if rest.len() < 8 {
            torn = Some(format!(
                "record header cut short ({} of 8 bytes)",
                rest.len()
            ));
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_RECORD {
            return Err(corrupt(
                path,
                at,
                format!("record length {len} is implausible"),
            ));
        }
        let len = len as usize;
        if rest.len() - 8 < len {
            torn = Some(format!(
                "record cut short: {len} bytes announced, {} present",
                rest.len() - 8
            ));
            break;
        }
        let payload = &rest[8..8 + len];
        if crc32fast::hash(payload) != crc {
            return Err(corrupt(path, at, "record checksum mismatch"));
        }
        let record = pb::WalRecord::decode(payload)
            .map_err(|e| corrupt(path, at, format!("record does not decode: {e}")))?;
        apply_record(&mut state, record).map_err(|reason| corrupt(path, at, reason))?;
        offset += 8 + len;
    }
    let state =
        state.ok_or_else(|| corrupt(path, offset as u64, "log segment has no checkpoint"))?;
    Ok(SegmentRead {
        state,
        valid_len: offset as u64,
        torn,
    })
}

fn parse_raft<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, String> {
    M::parse_from_bytes(bytes).map_err(|e| format!("{what} does not decode: {e}"))
}

fn apply_record(state: &mut Option<Recovered>, record: pb::WalRecord) -> Result<(), String> {
    match record.record {
        Some(pb::wal_record::Record::Checkpoint(cp)) => {
            if state.is_some() {
                return Err("a second checkpoint in one segment".to_string());
            }
            let mut snapshot = Snapshot::default();
            snapshot.mut_metadata().index = cp.snapshot_index;
            snapshot.mut_metadata().term = cp.snapshot_term;
            let mut recovered = Recovered {
                hard_state: parse_raft(&cp.hard_state, "hard state")?,
                snapshot,
                offset_index: cp.offset_index,
                offset_term: cp.offset_term,
                entries: Vec::with_capacity(cp.entries.len()),
            };
            let entries = cp
                .entries
                .iter()
                .map(|e| parse_raft::<Entry>(e, "entry"))
                .collect::<Result<Vec<_>, _>>()?;
            append_entries(&mut recovered, entries)?;
            *state = Some(recovered);
        }
        Some(pb::wal_record::Record::Entries(batch)) => {
            let state = state.as_mut().ok_or("entries before the checkpoint")?;
            let entries = batch
                .entries
                .iter()
                .map(|e| parse_raft::<Entry>(e, "entry"))
                .collect::<Result<Vec<_>, _>>()?;
            append_entries(state, entries)?;
        }
        Some(pb::wal_record::Record::HardState(hs)) => {
            let state = state.as_mut().ok_or("hard state before the checkpoint")?;
            state.hard_state = parse_raft(&hs, "hard state")?;
        }
        None => return Err("empty record".to_string()),
    }
    Ok(())
}

/// Appends `entries` as raft does: they replace everything from their first index on.
fn append_entries(state: &mut Recovered, entries: Vec<Entry>) -> Result<(), String> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let last = state.offset_index + state.entries.len() as u64;
    if first.index <= state.offset_index || first.index > last + 1 {
        return Err(format!(
            "entries from index {} do not continue a log holding {}..={}",
            first.index,
            state.offset_index + 1,
            last
        ));
    }
    for pair in entries.windows(2) {
        if pair[1].index != pair[0].index + 1 {
            return Err(format!(
                "entry index {} follows {}",
                pair[1].index, pair[0].index
            ));
        }
    }
    state
        .entries
        .truncate(super::slot(first.index - state.offset_index - 1));
    state.entries.extend(entries);
    Ok(())
}

/// Reads and verifies the snapshot file a checkpoint refers to.
fn read_snapshot(path: &Path, index: u64, term: u64) -> Result<Snapshot, StoreError> {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(
                path,
                0,
                "the snapshot the log refers to is missing",
            ));
        }
        Err(e) => return Err(io_err("reading", path, e)),
    }
    let header = SNAP_MAGIC.len() + 12;
    if bytes.len() < header || &bytes[..SNAP_MAGIC.len()] != SNAP_MAGIC {
        return Err(corrupt(
            path,
            0,
            "missing snapshot header (truncated or not a snapshot)",
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[8..16]);
    let len = u64::from_le_bytes(len_bytes);
    let crc = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let data = &bytes[header..];
    if data.len() as u64 != len {
        return Err(corrupt(
            path,
            header as u64,
            format!("snapshot is {} bytes, its header says {len}", data.len()),
        ));
    }
    if crc32fast::hash(data) != crc {
        return Err(corrupt(path, header as u64, "snapshot checksum mismatch"));
    }
    let snapshot: Snapshot =
        parse_raft(data, "snapshot").map_err(|reason| corrupt(path, header as u64, reason))?;
    let meta = snapshot.get_metadata();
    if meta.index != index || meta.term != term {
        return Err(corrupt(
            path,
            header as u64,
            format!(
                "snapshot is at index {} term {}, the log expects {index} term {term}",
                meta.index, meta.term
            ),
        ));
    }
    Ok(snapshot)
}
