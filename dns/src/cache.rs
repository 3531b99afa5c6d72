//! The reply cache for forwarded questions, and the memo of encoded mesh answers.
//!
//! Both are [`ShardedLru`]s keyed by the bytes of [`QueryView::key_into`](crate::wire::QueryView::key_into):
//! a fixed number of independently locked LRU maps, so that concurrent workers rarely wait
//! on one another.
//!
//! [`ReplyCache`] stores upstream replies as [`Template`]s with a lifetime decided by
//! [`CachePolicy::lifetime`] (RFC 1035 TTLs, RFC 2308 negative caching) and hands them back
//! with their age, so every served TTL counts down. It takes the current time as an argument
//! and never reads a clock.

use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::wire::{ReplyFacts, Template};

/// How many independently locked parts a cache has.
const SHARDS: usize = 16;

/// RCODE NOERROR.
const NOERROR: u16 = 0;
/// RCODE NXDOMAIN.
const NXDOMAIN: u16 = 3;

/// A bounded map from key bytes to `V`, least recently used evicted first, split into
/// shards by key hash.
#[derive(Debug)]
pub struct ShardedLru<V> {
    shards: Vec<Mutex<LruCache<Box<[u8]>, V>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl<V: Clone> ShardedLru<V> {
    /// A map holding at most about `capacity` entries (rounded up to a multiple of the shard
    /// count); `None` for a capacity of 0, which means "no cache".
    pub fn new(capacity: usize) -> Option<ShardedLru<V>> {
        if capacity == 0 {
            return None;
        }
        let per_shard = NonZeroUsize::new(capacity.div_ceil(SHARDS)).unwrap_or(NonZeroUsize::MIN);
        Some(ShardedLru {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    fn shard_of(&self, key: &[u8]) -> usize {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "any bits of the hash pick a shard equally well"
        )]
        let hash = self.hasher.hash_one(key) as usize;
        hash % self.shards.len()
    }

    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, LruCache<Box<[u8]>, V>> {
        let index = self.shard_of(key);
        // An entry is replaced whole under the lock, so a poisoned shard is still consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The value for `key`, marking it recently used.
    pub fn get(&self, key: &[u8]) -> Option<V> {
        self.shard(key).get(key).cloned()
    }

    /// The value for `key` if `keep` accepts it; a rejected value is removed.
    pub fn get_if(&self, key: &[u8], keep: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut shard = self.shard(key);
        let value = shard.get(key)?;
        if keep(value) {
            Some(value.clone())
        } else {
            shard.pop(key);
            None
        }
    }

    /// Stores `value` under `key`, evicting the least recently used entry of its shard when
    /// the shard is full.
    pub fn insert(&self, key: &[u8], value: V) {
        self.shard(key).put(Box::from(key), value);
    }

    /// Entries held, over all shards.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries the map holds.
    pub fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).cap().get())
            .sum()
    }
}

/// How long replies may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// The longest a positive reply is kept, whatever its TTLs say.
    pub max_ttl: u32,
    /// The longest a negative reply (NXDOMAIN, NODATA) is kept.
    pub max_negative_ttl: u32,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            max_ttl: 86_400,
            max_negative_ttl: 900,
        }
    }
}

impl CachePolicy {
    /// How many seconds a reply with these facts may be served from the cache, or `None` when
    /// it must not be cached:
    ///
    /// - truncated replies, and error codes other than NXDOMAIN, are not cached;
    /// - a positive reply (NOERROR with answers) lives for its smallest TTL;
    /// - a negative reply (NXDOMAIN, or NOERROR without answers) lives for min(SOA TTL, SOA
    ///   MINIMUM) of the SOA in its authority section, and is not cached without one
    ///   (RFC 2308 §5), nor for longer than any other record in it;
    /// - each is capped by the policy, and a lifetime of 0 is not cached.
    pub fn lifetime(&self, facts: &ReplyFacts) -> Option<u32> {
        if facts.truncated {
            return None;
        }
        let lifetime = match facts.rcode {
            NOERROR if facts.answers > 0 => facts.min_ttl?.min(self.max_ttl),
            NOERROR | NXDOMAIN => {
                let negative = facts.negative_ttl?;
                negative
                    .min(facts.min_ttl.unwrap_or(negative))
                    .min(self.max_negative_ttl)
            }
            _ => return None,
        };
        (lifetime > 0).then_some(lifetime)
    }
}

/// One cached reply.
#[derive(Debug, Clone)]
struct Entry {
    template: Arc<Template>,
    stored: Instant,
    expires: Instant,
}

/// A cache hit: the reply and how many whole seconds it has been held.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The stored reply.
    pub template: Arc<Template>,
    /// Seconds since it was stored; subtract from every TTL.
    pub age: u32,
}

/// Upstream replies by cache key, each kept for its lifetime.
#[derive(Debug)]
pub struct ReplyCache {
    entries: ShardedLru<Entry>,
    policy: CachePolicy,
}

impl ReplyCache {
    /// A cache of at most about `capacity` replies; `None` when `capacity` is 0.
    pub fn new(capacity: usize, policy: CachePolicy) -> Option<ReplyCache> {
        Some(ReplyCache {
            entries: ShardedLru::new(capacity)?,
            policy,
        })
    }

    /// The live reply for `key` at `now`, if any; an expired one is removed.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Hit> {
        let entry = self.entries.get_if(key, |entry| now < entry.expires)?;
        let age = now.saturating_duration_since(entry.stored).as_secs();
        Some(Hit {
            template: entry.template,
            age: u32::try_from(age).unwrap_or(u32::MAX),
        })
    }

    /// Stores `template` (a reply with `facts`) under `key` if the policy allows caching it,
    /// with its TTLs clamped to its lifetime; returns the stored reply.
    pub fn insert(
        &self,
        key: &[u8],
        mut template: Template,
        facts: &ReplyFacts,
        now: Instant,
    ) -> Option<Arc<Template>> {
        let lifetime = self.policy.lifetime(facts)?;
        template.clamp_ttls(lifetime);
        let template = Arc::new(template);
        self.entries.insert(
            key,
            Entry {
                template: template.clone(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(lifetime)),
            },
        );
        Some(template)
    }

    /// Replies held (expired ones included until they are looked up or evicted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[path = "cache/tests.rs"]
mod tests;
