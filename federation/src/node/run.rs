//! Drives a [`RaftNode`] from a tokio task: its clock, incoming messages, writes and reads.

use raft::eraftpb::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::{ProposeRequest, RaftNode, ReadRequest};
use crate::storage::LogStore;

/// How many incoming messages are stepped before the loop handles a ready.
const MAX_STEPS_PER_READY: usize = 256;
/// How many writes are proposed before the loop handles a ready: they share one fsync.
const MAX_PROPOSALS_PER_READY: usize = 512;

/// What drives one member's raft loop besides its clock.
pub(crate) struct NodeInputs {
    /// Messages from other members (from the peer server).
    pub(crate) inbound: mpsc::Receiver<Message>,
    /// Writes and membership changes from [`crate::Store`] handles.
    pub(crate) proposals: mpsc::Receiver<ProposeRequest>,
    /// Linearizable reads from [`crate::Store`] handles.
    pub(crate) reads: mpsc::Receiver<ReadRequest>,
    /// Turns true when the store shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Runs the raft loop until shutdown (or a log store failure). Every iteration handles one
/// input (or a burst of them), then the ready, then publishes the status.
pub(crate) async fn run<S: LogStore>(mut node: RaftNode<S>, mut inputs: NodeInputs) {
    let mut ticker = tokio::time::interval(node.config.tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = inputs.shutdown.wait_for(|stopped| *stopped) => break,
            Some(message) = inputs.inbound.recv() => {
                node.handle_message(message);
                for _ in 1..MAX_STEPS_PER_READY {
                    match inputs.inbound.try_recv() {
                        Ok(message) => node.handle_message(message),
                        Err(_) => break,
                    }
                }
            }
            Some(request) = inputs.proposals.recv() => {
                let now = Instant::now();
                node.handle_propose(request, now);
                for _ in 1..MAX_PROPOSALS_PER_READY {
                    match inputs.proposals.try_recv() {
                        Ok(request) => node.handle_propose(request, now),
                        Err(_) => break,
                    }
                }
            }
            Some(request) = inputs.reads.recv() => {
                let now = Instant::now();
                node.handle_read(request, now);
                for _ in 1..MAX_PROPOSALS_PER_READY {
                    match inputs.reads.try_recv() {
                        Ok(request) => node.handle_read(request, now),
                        Err(_) => break,
                    }
                }
            }
            _ = ticker.tick() => node.handle_tick(Instant::now()),
        }
        if let Err(err) = node.handle_ready() {
            // A log write or fsync that failed: nothing more can be made durable, so the
            // member stops, loudly (the daemon exits non-zero with this reason).
            let reason = error_chain(&err);
            tracing::error!(member = node.config.id, error = %reason, "stopping the raft loop");
            node.replica.set_failure(reason);
            break;
        }
        node.replica.publish_status(node.status());
    }
    tracing::debug!(member = node.config.id, "raft loop stopped");
    node.replica.set_stopped();
    // Dropping the node answers every waiting write with `Stopped` and releases the data
    // directory.
}

/// An error with its causes, `: `-separated (the message names the file that failed).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Some errors print their cause in their own message already.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}
