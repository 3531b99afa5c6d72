//! A linearizability checker for histories of puts, compare-and-sets and linearizable
//! reads on independent keys (one register per key), used by the randomized tests.
//!
//! Raft gives every applied write a position: its revision. The checker takes that version
//! order from a replica and verifies that every client observation fits it (in the spirit
//! of Jepsen's version-order checkers; with the order given no search is needed):
//!
//! - every applied version was written by exactly one client operation (no phantom or
//!   doubled write), and every acknowledged write is applied at the revision it was
//!   acknowledged with (no acknowledged write lost);
//! - a compare-and-set that succeeded was applied right after the version it expected; one
//!   that failed was not applied and saw a version that existed;
//! - each operation gets a position (a write: its revision; a read or failed CAS: the
//!   revision it saw, 0 for "absent"), and real time must agree with positions: if A
//!   completed before B was invoked, then pos(A) <= pos(B), and pos(A) < pos(B) if B is a
//!   write. That forbids stale reads, reads from the future, and reordered writes.

use std::collections::{BTreeMap, HashMap};

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpKind {
    Put {
        value: Vec<u8>,
    },
    Cas {
        expected: Option<u64>,
        value: Vec<u8>,
    },
    Read,
}

/// What the client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpResult {
    /// The write (put or successful CAS) was applied at this revision.
    Written(u64),
    /// The CAS found the key at this revision (None: absent) and did nothing.
    Conflict(Option<u64>),
    /// The read saw this value at this revision (None: absent).
    Read(Option<(Vec<u8>, u64)>),
    /// No answer (timeout, crash): the operation may or may not have happened.
    Unknown,
}

/// One client operation on one key.
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) key: String,
    pub(crate) kind: OpKind,
    pub(crate) invoke: u64,
    /// When the answer arrived (None: never).
    pub(crate) complete: Option<u64>,
    pub(crate) result: OpResult,
}

impl Op {
    fn written_value(&self) -> Option<&[u8]> {
        match &self.kind {
            OpKind::Put { value } | OpKind::Cas { value, .. } => Some(value),
            OpKind::Read => None,
        }
    }
}

/// Checks `ops` against the applied versions of each key (revision, value), in order.
pub(crate) fn check(
    ops: &[Op],
    versions: &BTreeMap<String, Vec<(u64, Vec<u8>)>>,
) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    let empty = Vec::new();
    for (key, ops) in by_key {
        check_key(key, &ops, versions.get(key).unwrap_or(&empty))?;
    }
    Ok(())
}

fn check_key(key: &str, ops: &[&Op], versions: &[(u64, Vec<u8>)]) -> Result<(), String> {
    let value_rev: HashMap<&[u8], u64> = versions.iter().map(|(r, v)| (v.as_slice(), *r)).collect();
    let rev_value: HashMap<u64, &[u8]> = versions.iter().map(|(r, v)| (*r, v.as_slice())).collect();
    if value_rev.len() != versions.len() {
        return Err(format!("{key}: one value applied twice: {versions:?}"));
    }
    // Positions, and the per-op checks.
    let mut writers: HashMap<u64, usize> = HashMap::new();
    let mut pos: Vec<Option<u64>> = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let applied = op.written_value().and_then(|v| value_rev.get(v).copied());
        if let Some(rev) = applied {
            if writers.insert(rev, i).is_some() {
                return Err(format!("{key}: revision {rev} claimed by two writes"));
            }
        }
        let p = match (&op.kind, &op.result) {
            (OpKind::Put { .. } | OpKind::Cas { .. }, OpResult::Written(rev)) => {
                if applied != Some(*rev) {
                    return Err(format!(
                        "{key}: write acknowledged at revision {rev} but applied at {applied:?}: {op:?}"
                    ));
                }
                Some(*rev)
            }
            (OpKind::Cas { .. }, OpResult::Conflict(seen)) => {
                if applied.is_some() {
                    return Err(format!(
                        "{key}: CAS reported a conflict but was applied: {op:?}"
                    ));
                }
                if let Some(seen) = seen {
                    if !rev_value.contains_key(seen) {
                        return Err(format!(
                            "{key}: CAS saw revision {seen} that was never applied"
                        ));
                    }
                }
                Some(seen.unwrap_or(0))
            }
            (OpKind::Read, OpResult::Read(seen)) => match seen {
                None => Some(0),
                Some((value, rev)) => {
                    if rev_value.get(rev) != Some(&value.as_slice()) {
                        return Err(format!(
                            "{key}: read saw {value:?} at revision {rev}, which holds {:?}",
                            rev_value.get(rev)
                        ));
                    }
                    Some(*rev)
                }
            },
            (_, OpResult::Unknown) => applied,
            (kind, result) => {
                return Err(format!("{key}: impossible result {result:?} for {kind:?}"));
            }
        };
        pos.push(p);
    }
    if let Some((rev, _)) = versions.iter().find(|(rev, _)| !writers.contains_key(rev)) {
        return Err(format!(
            "{key}: revision {rev} was applied but nobody wrote it"
        ));
    }
    // A successful CAS follows the version it expected.
    for (i, (rev, _)) in versions.iter().enumerate() {
        let op = ops[writers[rev]];
        if let OpKind::Cas { expected, .. } = &op.kind {
            let previous = i.checked_sub(1).map(|j| versions[j].0);
            if *expected != previous {
                return Err(format!(
                    "{key}: CAS expecting {expected:?} applied at {rev} after {previous:?}"
                ));
            }
        }
    }
    // Real time agrees with positions.
    for (a, op_a) in ops.iter().enumerate() {
        let (Some(done), Some(pa)) = (op_a.complete, pos[a]) else {
            continue;
        };
        for (b, op_b) in ops.iter().enumerate() {
            let Some(pb) = pos[b] else { continue };
            if a == b || done >= op_b.invoke {
                continue;
            }
            let b_writes = op_b.written_value().is_some() && writers.get(&pb) == Some(&b);
            if pa > pb || (b_writes && pa == pb) {
                return Err(format!(
                    "{key}: not linearizable: {op_a:?} (position {pa}) completed before {op_b:?} (position {pb}) started"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, invoke: u64, complete: u64, result: OpResult) -> Op {
        Op {
            key: "k".to_string(),
            kind,
            invoke,
            complete: Some(complete),
            result,
        }
    }

    fn put(v: &str) -> OpKind {
        OpKind::Put {
            value: v.as_bytes().to_vec(),
        }
    }

    fn versions(v: &[(u64, &str)]) -> BTreeMap<String, Vec<(u64, Vec<u8>)>> {
        [(
            "k".to_string(),
            v.iter().map(|(r, s)| (*r, s.as_bytes().to_vec())).collect(),
        )]
        .into_iter()
        .collect()
    }

    fn read(v: Option<(&str, u64)>) -> OpResult {
        OpResult::Read(v.map(|(s, r)| (s.as_bytes().to_vec(), r)))
    }

    #[test]
    fn a_correct_history_passes() {
        let ops = [
            op(put("a"), 0, 2, OpResult::Written(5)),
            op(OpKind::Read, 1, 3, read(Some(("a", 5)))),
            op(put("b"), 4, 6, OpResult::Written(7)),
            // Concurrent with the put of b: may see either.
            op(OpKind::Read, 5, 8, read(Some(("a", 5)))),
            op(
                OpKind::Cas {
                    expected: Some(7),
                    value: b"c".to_vec(),
                },
                9,
                10,
                OpResult::Written(9),
            ),
            op(
                OpKind::Cas {
                    expected: Some(7),
                    value: b"d".to_vec(),
                },
                11,
                12,
                OpResult::Conflict(Some(9)),
            ),
        ];
        check(&ops, &versions(&[(5, "a"), (7, "b"), (9, "c")])).expect("linearizable");
    }

    #[test]
    fn stale_read_is_caught() {
        let ops = [
            op(put("a"), 0, 1, OpResult::Written(5)),
            op(put("b"), 2, 3, OpResult::Written(7)),
            op(OpKind::Read, 4, 5, read(Some(("a", 5)))),
        ];
        assert!(check(&ops, &versions(&[(5, "a"), (7, "b")])).is_err());
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        let ops = [op(put("a"), 0, 1, OpResult::Written(5))];
        assert!(check(&ops, &versions(&[])).is_err());
    }

    #[test]
    fn read_from_the_future_and_reordered_reads_are_caught() {
        let future = [
            op(OpKind::Read, 0, 1, read(Some(("a", 5)))),
            op(put("a"), 2, 3, OpResult::Written(5)),
        ];
        assert!(check(&future, &versions(&[(5, "a")])).is_err());
        let reordered = [
            op(put("a"), 0, 10, OpResult::Unknown),
            op(put("b"), 0, 10, OpResult::Unknown),
            op(OpKind::Read, 1, 2, read(Some(("b", 7)))),
            op(OpKind::Read, 3, 4, read(Some(("a", 5)))),
        ];
        assert!(check(&reordered, &versions(&[(5, "a"), (7, "b")])).is_err());
    }

    #[test]
    fn cas_applied_after_the_wrong_version_is_caught() {
        let ops = [
            op(put("a"), 0, 1, OpResult::Written(5)),
            op(put("b"), 0, 1, OpResult::Written(6)),
            op(
                OpKind::Cas {
                    expected: Some(5),
                    value: b"c".to_vec(),
                },
                2,
                3,
                OpResult::Written(7),
            ),
        ];
        assert!(check(&ops, &versions(&[(5, "a"), (6, "b"), (7, "c")])).is_err());
    }

    #[test]
    fn unacknowledged_write_may_or_may_not_apply() {
        let ops = [
            op(put("a"), 0, 1, OpResult::Written(5)),
            Op {
                key: "k".to_string(),
                kind: put("b"),
                invoke: 2,
                complete: None,
                result: OpResult::Unknown,
            },
        ];
        check(&ops, &versions(&[(5, "a")])).expect("not applied is fine");
        check(&ops, &versions(&[(5, "a"), (8, "b")])).expect("applied is fine");
    }
}
