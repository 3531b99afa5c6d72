//! Open connections by their caller's trust domain, so a domain that loses its rights is cut
//! off at once instead of on its next request.
//!
//! A server port registers each authenticated connection ([`ConnectionRegistry::register`])
//! and keeps the returned [`Registration`] for as long as the connection lives; the
//! registration's [`Registration::closed`] future ends when [`ConnectionRegistry::close_domain`]
//! is called for the connection's trust domain (the federation peer port calls it when a
//! member is removed). Dropping the registration forgets the connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The connections a port holds, by the trust domain of their client certificate.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    by_domain: HashMap<String, HashMap<u64, watch::Sender<bool>>>,
}

impl ConnectionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(ConnectionRegistry::default())
    }

    /// Registers one open connection whose caller is of `trust_domain`.
    pub fn register(self: &Arc<Self>, trust_domain: &str) -> Registration {
        let trust_domain = trust_domain.to_ascii_lowercase();
        let (tx, mut rx) = watch::channel(false);
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner
            .by_domain
            .entry(trust_domain.clone())
            .or_default()
            .insert(id, tx);
        drop(inner);
        Registration {
            registry: self.clone(),
            trust_domain,
            id,
            closed: Box::pin(async move {
                // An error means the registry forgot the sender: treated as closed too.
                let _ = rx.wait_for(|closed| *closed).await;
            }),
        }
    }

    /// Closes every open connection of `trust_domain`; returns how many there were.
    pub fn close_domain(&self, trust_domain: &str) -> usize {
        let closed = self
            .lock()
            .by_domain
            .remove(&trust_domain.to_ascii_lowercase())
            .unwrap_or_default();
        for tx in closed.values() {
            tx.send_replace(true);
        }
        closed.len()
    }

    /// How many connections of `trust_domain` are open.
    pub fn open(&self, trust_domain: &str) -> usize {
        self.lock()
            .by_domain
            .get(&trust_domain.to_ascii_lowercase())
            .map_or(0, HashMap::len)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, trust_domain: &str, id: u64) {
        let mut inner = self.lock();
        if let Some(conns) = inner.by_domain.get_mut(trust_domain) {
            conns.remove(&id);
            if conns.is_empty() {
                inner.by_domain.remove(trust_domain);
            }
        }
    }
}

/// One registered connection; forgotten when dropped.
pub struct Registration {
    registry: Arc<ConnectionRegistry>,
    trust_domain: String,
    id: u64,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Registration {
    /// Ready once the connection's trust domain has been closed.
    pub fn poll_closed(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.closed.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("trust_domain", &self.trust_domain)
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.forget(&self.trust_domain, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    fn closed_now(registration: &mut Registration) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        registration.poll_closed(&mut cx) == Poll::Ready(())
    }

    #[test]
    fn closing_a_domain_closes_its_connections_and_no_others() {
        let registry = ConnectionRegistry::new();
        let mut east1 = registry.register("east.isthmus.local");
        let mut east2 = registry.register("EAST.isthmus.local");
        let mut west = registry.register("west.isthmus.local");
        assert_eq!(registry.open("east.isthmus.local"), 2);
        assert!(!closed_now(&mut east1) && !closed_now(&mut west));

        assert_eq!(registry.close_domain("east.isthmus.local"), 2);
        assert!(closed_now(&mut east1) && closed_now(&mut east2));
        assert!(!closed_now(&mut west));
        assert_eq!(registry.open("east.isthmus.local"), 0);
        assert_eq!(registry.close_domain("east.isthmus.local"), 0);

        // A closed connection that goes away, and one that was never closed, are forgotten.
        drop(east1);
        assert_eq!(registry.open("west.isthmus.local"), 1);
        drop(west);
        assert_eq!(registry.open("west.isthmus.local"), 0);
        // A new connection of a closed domain is open until closed again.
        let mut again = registry.register("east.isthmus.local");
        assert!(!closed_now(&mut again));
    }
}
