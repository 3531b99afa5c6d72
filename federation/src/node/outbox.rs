//! The test network's transport: it collects what a node sends, and the test delivers it.

use std::sync::Mutex;

use raft::eraftpb::Message;

use super::Transport;

/// Collects what a node sends; the test network delivers it.
#[derive(Default)]
pub(super) struct Outbox(Mutex<Vec<Message>>);

impl Transport for Outbox {
    fn send(&self, message: Message) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(message);
    }
}

impl Outbox {
    /// Everything sent since the last call, in order.
    pub(super) fn take(&self) -> Vec<Message> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
