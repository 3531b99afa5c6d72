use std::fs;

use raft::Storage as _;

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("data-{index}").into_bytes().into(),
        ..Default::default()
    }
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn open(dir: &Path) -> Result<RaftLog, StoreError> {
    RaftLog::open(dir, &[1, 2, 3], b"empty".to_vec())
}

fn entries_of(log: &RaftLog) -> Vec<(u64, u64)> {
    let first = log.first_index().expect("first");
    let last = log.last_index().expect("last");
    if last < first {
        return Vec::new();
    }
    log.entries(first, last + 1, None, GetEntriesContext::empty(false))
        .expect("entries")
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

fn segment(dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

#[test]
fn new_log_starts_from_the_bootstrap_snapshot_of_the_initial_voters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open(dir.path()).expect("open");
    let state = log.initial_state().expect("state");
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(log.first_index().expect("first"), 2);
    assert_eq!(log.last_index().expect("last"), 1);
    assert_eq!(log.term(1).expect("term"), 1);
    assert_eq!(log.latest_snapshot().data.as_ref(), b"empty");
}

#[test]
fn synced_entries_and_hard_state_survive_a_reopen_and_conflicting_suffixes_are_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut log = open(dir.path()).expect("open");
        log.append(&[entry(2, 2), entry(3, 2), entry(4, 2)])
            .expect("append");
        log.set_hard_state(hard_state(2, 1, 3)).expect("hs");
        log.sync().expect("sync");
        // A new leader overwrote index 4 onwards.
        log.append(&[entry(4, 3), entry(5, 3)]).expect("append");
        log.set_hard_state(hard_state(3, 2, 4)).expect("hs");
        log.sync().expect("sync");
        // Not synced: may or may not survive; here the log is dropped before any sync.
        log.append(&[entry(6, 3)]).expect("append");
    }
    let log = open(dir.path()).expect("reopen");
    assert_eq!(entries_of(&log), vec![(2, 2), (3, 2), (4, 3), (5, 3)]);
    assert_eq!(
        log.initial_state().expect("state").hard_state,
        hard_state(3, 2, 4)
    );
}

#[test]
fn snapshot_compacts_the_log_and_both_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut log = open(dir.path()).expect("open");
        let entries: Vec<Entry> = (2..=20).map(|i| entry(i, 2)).collect();
        log.append(&entries).expect("append");
        log.set_hard_state(hard_state(2, 1, 20)).expect("hs");
        log.sync().expect("sync");
        let mut snap = Snapshot {
            data: b"state at 15".to_vec().into(),
            ..Default::default()
        };
        snap.mut_metadata().index = 15;
        snap.mut_metadata().term = 2;
        snap.mut_metadata()
            .set_conf_state(ConfState::from((vec![1, 2, 3], vec![4])));
        // Keep 5 entries before the snapshot.
        log.save_snapshot(snap, 11).expect("snapshot");
        assert_eq!(log.first_index().expect("first"), 11);
        assert!(matches!(
            log.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        log.append(&[entry(21, 3)]).expect("append");
        log.sync().expect("sync");
    }
    let names: Vec<String> = fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "LOCK")
        .collect();
    assert_eq!(names.len(), 2, "one segment and one snapshot: {names:?}");
    let log = open(dir.path()).expect("reopen");
    assert_eq!(log.first_index().expect("first"), 11);
    assert_eq!(log.last_index().expect("last"), 21);
    assert_eq!(log.term(10).expect("offset term"), 2);
    let snap = log.snapshot(0, 2).expect("snapshot");
    assert_eq!(snap.get_metadata().index, 15);
    assert_eq!(snap.data.as_ref(), b"state at 15");
    assert_eq!(
        log.initial_state().expect("state").conf_state.learners,
        vec![4]
    );
    // Commit is at least the snapshot's, as raft requires on restart.
    assert!(log.initial_state().expect("state").hard_state.commit >= 15);
}

/// Opens the log in `dir`, lets `write` add to it, closes it, and returns its segment.
fn segment_after(dir: &Path, write: impl FnOnce(&mut RaftLog)) -> PathBuf {
    let mut log = open(dir).expect("open");
    write(&mut log);
    drop(log);
    segment(dir)
}

#[test]
fn a_torn_final_record_is_cut_at_start_and_the_records_before_it_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = segment_after(dir.path(), |log| {
        log.append(&[entry(2, 2), entry(3, 2)]).expect("append");
        log.sync().expect("sync");
    });
    let whole = fs::metadata(&path).expect("meta").len();
    {
        let mut log = open(dir.path()).expect("open");
        log.append(&[entry(4, 2)]).expect("append");
        log.sync().expect("sync");
    }
    let len = fs::metadata(&path).expect("meta").len();
    // A crash mid-write: the last record's header and part of its payload reached the disk.
    for cut in [len - 5, whole + 3] {
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(cut))
            .expect("truncate");
        let log = open(dir.path()).expect("a torn tail is cut, not fatal");
        assert_eq!(log.last_index().expect("last"), 3, "cut at {cut}");
        assert_eq!(log.term(3).expect("term"), 2);
        drop(log);
        // The file now ends after the last whole record, ready for appends.
        assert_eq!(fs::metadata(&path).expect("meta").len(), whole);
        let mut log = open(dir.path()).expect("reopen");
        log.append(&[entry(4, 2)]).expect("append");
        log.sync().expect("sync");
        drop(log);
        assert_eq!(
            open(dir.path()).expect("open").last_index().expect("last"),
            4
        );
    }
}

#[test]
fn a_zero_filled_tail_is_cut_but_a_damaged_whole_record_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = segment_after(dir.path(), |log| {
        log.append(&[entry(2, 2)]).expect("append");
        log.sync().expect("sync");
    });
    let whole = fs::read(&path).expect("read");
    // Space the file system allocated but the crash never filled.
    let mut zeros = whole.clone();
    zeros.extend_from_slice(&[0; 100]);
    fs::write(&path, &zeros).expect("write");
    assert_eq!(
        open(dir.path()).expect("open").last_index().expect("last"),
        2
    );
    assert_eq!(fs::read(&path).expect("read"), whole);
}

#[test]
fn flipped_byte_in_the_log_is_a_checksum_error_and_nothing_is_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut log = open(dir.path()).expect("open");
        log.append(&[entry(2, 2), entry(3, 2)]).expect("append");
        log.sync().expect("sync");
    }
    let path = segment(dir.path());
    let mut bytes = fs::read(&path).expect("read");
    let before = bytes.clone();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).expect("write");
    let err = open(dir.path()).err().expect("must fail");
    let message = err.to_string();
    assert!(message.contains("checksum"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    // The damaged file is left as it was for the operator.
    assert_eq!(fs::read(&path).expect("read").len(), before.len());
}

#[test]
fn missing_or_damaged_snapshot_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path()).expect("open"));
    let snap = fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .expect("bootstrap snapshot file");
    let mut bytes = fs::read(&snap).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&snap, &bytes).expect("write");
    let message = open(dir.path()).err().expect("must fail").to_string();
    assert!(message.contains("snapshot checksum"), "{message}");
    fs::remove_file(&snap).expect("remove");
    let message = open(dir.path()).err().expect("must fail").to_string();
    assert!(message.contains("missing"), "{message}");
}

#[test]
fn a_data_directory_is_used_by_one_member_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = open(dir.path()).expect("open");
    assert!(matches!(open(dir.path()), Err(StoreError::DataDirInUse(_))));
    drop(first);
    open(dir.path()).expect("free again");
}

#[test]
fn in_memory_log_answers_like_the_disk_one() {
    let mut log = RaftLog::in_memory(&[1], Vec::new());
    log.append(&[entry(2, 2), entry(3, 2)]).expect("append");
    log.sync().expect("sync is a no-op");
    assert_eq!(entries_of(&log), vec![(2, 2), (3, 2)]);
    assert!(matches!(
        log.entries(2, 9, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    // A joining member has no snapshot to send: raft is told to wait.
    let joiner = RaftLog::in_memory(&[], Vec::new());
    assert!(matches!(
        joiner.snapshot(0, 1),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));
}
