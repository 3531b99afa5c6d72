//! In-flight deduplication of forwarded questions.
//!
//! The first question for a key becomes the [`Leader`]: it asks upstream and publishes what it
//! got. Identical questions arriving meanwhile become followers: they wait for that outcome
//! instead of sending their own, so N simultaneous identical questions cost one upstream
//! exchange. The entry disappears when the leader finishes — or is cancelled, in which case
//! the followers see [`Outcome::Failed`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::wire::Template;

/// What a leader got from upstream.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A reply, stored as a template (cached or not).
    Reply(Arc<Template>),
    /// A reply the template reader refused; relayed with only the id changed.
    Raw(Arc<[u8]>),
    /// No upstream answered.
    Failed,
}

type Slot = watch::Receiver<Option<Outcome>>;

/// The questions currently being asked upstream, by key.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    waiting: Mutex<HashMap<Box<[u8]>, Slot>>,
}

/// The result of [`Inflight::join`].
pub(crate) enum Joined<'a> {
    /// Nobody is asking: ask, then [`Leader::publish`].
    Leader(Leader<'a>),
    /// Somebody is asking: wait with [`wait`].
    Follower(Slot),
}

/// The one question of a key that goes upstream.
pub(crate) struct Leader<'a> {
    inflight: &'a Inflight,
    key: Box<[u8]>,
    tx: watch::Sender<Option<Outcome>>,
}

impl Inflight {
    /// Joins the question with `key`: leads it if nobody is asking it yet, follows otherwise.
    pub(crate) fn join(&self, key: &[u8]) -> Joined<'_> {
        let mut waiting = self.lock();
        if let Some(slot) = waiting.get(key) {
            return Joined::Follower(slot.clone());
        }
        let (tx, rx) = watch::channel(None);
        waiting.insert(Box::from(key), rx);
        Joined::Leader(Leader {
            inflight: self,
            key: Box::from(key),
            tx,
        })
    }

    /// Questions being asked upstream right now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, Slot>> {
        // Entries are inserted and removed whole: a poisoned map is still consistent.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Leader<'_> {
    /// Hands `outcome` to every follower, and to any that join before the entry is gone.
    pub(crate) fn publish(self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.inflight.lock().remove(&self.key);
    }
}

/// Waits for the leader's outcome; [`Outcome::Failed`] if the leader went away without one.
pub(crate) async fn wait(mut slot: Slot) -> Outcome {
    match slot.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Outcome::Failed),
        Err(_) => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome() {
        let inflight = Inflight::default();
        let Joined::Leader(leader) = inflight.join(b"k") else {
            panic!("the first question must lead");
        };
        let Joined::Follower(a) = inflight.join(b"k") else {
            panic!("the second question must follow");
        };
        let Joined::Follower(b) = inflight.join(b"k") else {
            panic!("the third question must follow");
        };
        assert!(matches!(inflight.join(b"other"), Joined::Leader(_)));
        assert_eq!(inflight.len(), 1, "the other leader was dropped at once");
        let waiting = tokio::spawn(async move { (wait(a).await, wait(b).await) });
        leader.publish(Outcome::Raw(Arc::from(&b"reply"[..])));
        let (a, b) = waiting.await.unwrap();
        for outcome in [a, b] {
            assert!(matches!(outcome, Outcome::Raw(bytes) if &*bytes == b"reply"));
        }
        assert_eq!(inflight.len(), 0);
        assert!(matches!(inflight.join(b"k"), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_vanished_leader_fails_its_followers() {
        let inflight = Inflight::default();
        let leader = inflight.join(b"k");
        let Joined::Follower(slot) = inflight.join(b"k") else {
            panic!("must follow");
        };
        drop(leader);
        assert!(matches!(wait(slot).await, Outcome::Failed));
        assert_eq!(inflight.len(), 0);
    }
}
