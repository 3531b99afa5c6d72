//! The one error type of the federation store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong when starting or using a federation store member.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The peer listener could not be bound.
    #[error("binding the federation peer listener on {addr}")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
    /// A join was refused before its token was used: `field` of the request is wrong.
    #[error("{field}: {reason} (the token was not used)")]
    InvalidJoin { field: &'static str, reason: String },
    /// The peer port's TLS configuration could not be built from the member's identity.
    #[error("the federation peer port's TLS configuration: {0}")]
    Tls(String),
    /// The bound peer listener could not report its address.
    #[error("reading the address of the federation peer listener")]
    LocalAddr(#[source] std::io::Error),
    /// The options given to [`crate::Binding::start`] are not usable.
    #[error("invalid federation store options: {field}: {reason}")]
    InvalidOptions {
        /// The option at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// raft-rs refused to create the raft node (for example an invalid raft configuration).
    #[error("creating the raft node")]
    CreateRaft(#[source] raft::Error),
    /// A key that cannot be stored was given to `put` or `delete`.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// raft-rs rejected a proposal for a reason other than having no leader yet.
    #[error("proposing a write to raft")]
    Propose(#[source] raft::Error),
    /// A write was not applied within the proposal timeout: this member could not reach a
    /// leader with a quorum (for example it is cut off from the majority).
    #[error("write not applied within {timeout:?}: no leader with a quorum is reachable from this member (is it partitioned from the majority?)")]
    ProposalTimeout {
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The log store failed to persist raft state; the member stops rather than risk
    /// breaking raft's promises.
    #[error("writing the raft log")]
    Storage(#[source] raft::Error),
    /// The store has been shut down (or its raft loop stopped), so the write cannot be made.
    #[error("the federation store is shut down")]
    Stopped,
    /// A file or directory under the data directory could not be read or written.
    #[error("{op} {path}")]
    DataDir {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A log or snapshot file does not verify (checksum, length, order): the member refuses
    /// to start rather than silently lose acknowledged writes.
    #[error("corrupt federation log file {file} at offset {offset}: {reason}")]
    CorruptLog {
        /// The file at fault.
        file: PathBuf,
        /// Byte offset of the bad record in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Entries handed to the log store do not continue the log (a bug, or raft misuse).
    #[error("appending entries from index {first} to a log holding {offset}+1..={last}")]
    LogGap {
        /// First index of the entries.
        first: u64,
        /// Index just before the first retained entry.
        offset: u64,
        /// Last index held.
        last: u64,
    },
    /// Another member of this process is still using the data directory.
    #[error("data directory {0} is in use by another running member")]
    DataDirInUse(PathBuf),
    /// The store's rules refused the write when it was applied (the same on every replica:
    /// docs/security.md §7); nothing was written.
    #[error("refused by the federation store's rules: {0}")]
    Refused(isthmus_core::keyspace::rules::Refusal),
    /// A value larger than [`crate::MAX_VALUE_BYTES`] was given to a write.
    #[error("the value for {key:?} is {size} bytes; the federation store takes at most {limit} bytes per record")]
    ValueTooLarge {
        key: String,
        size: usize,
        limit: usize,
    },
    /// A join token was asked for with a validity of zero or above [`crate::MAX_JOIN_TOKEN_TTL`].
    #[error("a join token must be valid for longer than zero and at most {max:?}, not {ttl:?}")]
    TokenTtl { ttl: Duration, max: Duration },
    /// Another process holds the data directory's lock.
    #[error("data directory lock {path} is held by another process (pid {holder}): one member per data directory")]
    DataDirLocked { path: PathBuf, holder: String },
    /// A stored snapshot does not decode into a state machine.
    #[error("snapshot at index {index} does not decode: {reason}")]
    BadSnapshot {
        /// Raft index of the snapshot.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A watch asked for changes older than this member still remembers: re-list, then
    /// watch from the listed revision + 1.
    #[error("revision {requested} is compacted (oldest watchable revision is {oldest}): re-list and watch from the list's revision + 1")]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The oldest revision a watch can start from now.
        oldest: u64,
    },
    /// A linearizable read could not be confirmed by a leader in time.
    #[error("linearizable read not confirmed within {timeout:?} (no leader or no quorum?)")]
    ReadTimeout {
        /// The timeout that expired.
        timeout: Duration,
    },
    /// `renew` was called on a key that does not exist or has no lease.
    #[error("{key:?} has no lease to renew")]
    NoLease {
        /// The key.
        key: String,
    },
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// A join token is unknown, already used, expired or wrong.
    #[error("join token refused: {0}")]
    Token(&'static str),
    /// The client API could not reach a member.
    #[error("federation client: {0}")]
    Client(String),
}
