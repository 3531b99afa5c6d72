//! The one error type of the federation store.

use std::net::SocketAddr;
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
    /// A write was not applied within the proposal timeout (for example no quorum).
    #[error("write not applied within {timeout:?} (no leader or no quorum?)")]
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
}
