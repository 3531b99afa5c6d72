use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::*;
use crate::wire::{QueryView, Template};

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn query(qname: &str) -> Vec<u8> {
    let mut msg = Message::new(0x0101, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), RecordType::A));
    msg.to_vec().unwrap()
}

fn key(packet: &[u8]) -> Vec<u8> {
    let mut key = Vec::new();
    QueryView::parse(packet).unwrap().key_into(&mut key);
    key
}

/// A reply to `query` with `rcode`, one A record per TTL in `ttls`, and an SOA (TTL, MINIMUM)
/// in the authority section when given.
fn reply(
    query: &[u8],
    rcode: ResponseCode,
    ttls: &[u32],
    soa: Option<(u32, u32)>,
) -> (Template, ReplyFacts) {
    let req = Message::from_vec(query).unwrap();
    let mut msg = Message::response(req.metadata.id, OpCode::Query);
    msg.metadata.response_code = rcode;
    msg.queries = req.queries.clone();
    for &ttl in ttls {
        msg.add_answer(Record::from_rdata(
            req.queries[0].name.clone(),
            ttl,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
    }
    if let Some((ttl, minimum)) = soa {
        msg.add_authority(Record::from_rdata(
            name("example.com."),
            ttl,
            RData::SOA(SOA::new(
                name("ns.example.com."),
                name("admin.example.com."),
                1,
                3600,
                600,
                86400,
                minimum,
            )),
        ));
    }
    Template::from_reply(&msg.to_vec().unwrap()).unwrap()
}

fn served_ttls(hit: &Hit, query: &[u8]) -> Vec<u32> {
    let view = QueryView::parse(query).unwrap();
    let mut out = Vec::new();
    hit.template.write_reply(&view, hit.age, 65535, &mut out);
    let msg = Message::from_vec(&out).unwrap();
    msg.answers
        .iter()
        .chain(msg.authorities.iter())
        .map(|r| r.ttl)
        .collect()
}

#[test]
fn a_positive_reply_lives_for_its_smallest_ttl_and_counts_down() {
    let cache = ReplyCache::new(100, CachePolicy::default()).unwrap();
    let q = query("example.com.");
    let (template, facts) = reply(&q, ResponseCode::NoError, &[300, 60], None);
    let t0 = Instant::now();
    assert!(cache.insert(&key(&q), template, &facts, t0).is_some());

    let hit = cache
        .get(&key(&q), t0 + Duration::from_millis(20_500))
        .unwrap();
    assert_eq!(hit.age, 20);
    // Both records served with at most the remaining lifetime.
    assert_eq!(served_ttls(&hit, &q), vec![40, 40]);
    assert!(cache.get(&key(&q), t0 + Duration::from_secs(59)).is_some());
    assert!(cache.get(&key(&q), t0 + Duration::from_secs(60)).is_none());
    assert!(
        cache.is_empty(),
        "an expired entry is removed when looked up"
    );
}

#[test]
fn the_key_is_case_insensitive() {
    let cache = ReplyCache::new(100, CachePolicy::default()).unwrap();
    let q = query("example.com.");
    let (template, facts) = reply(&q, ResponseCode::NoError, &[60], None);
    let now = Instant::now();
    cache.insert(&key(&q), template, &facts, now);
    assert!(cache.get(&key(&query("EXAMPLE.com.")), now).is_some());
    assert!(cache.get(&key(&query("example.org.")), now).is_none());
}

#[test]
fn nxdomain_is_cached_for_the_soa_minimum() {
    let cache = ReplyCache::new(100, CachePolicy::default()).unwrap();
    let q = query("nope.example.com.");
    let (template, facts) = reply(&q, ResponseCode::NXDomain, &[], Some((3600, 30)));
    let t0 = Instant::now();
    cache.insert(&key(&q), template, &facts, t0);
    let hit = cache.get(&key(&q), t0 + Duration::from_secs(10)).unwrap();
    assert_eq!(hit.template.rcode(), 3);
    // The SOA's TTL counts down from the negative lifetime, not from 3600.
    assert_eq!(served_ttls(&hit, &q), vec![20]);
    assert!(cache.get(&key(&q), t0 + Duration::from_secs(30)).is_none());
}

#[test]
fn nodata_is_cached_like_nxdomain() {
    let policy = CachePolicy::default();
    let q = query("example.com.");
    let (_, facts) = reply(&q, ResponseCode::NoError, &[], Some((120, 600)));
    assert_eq!(policy.lifetime(&facts), Some(120));
}

#[test]
fn negative_replies_without_an_soa_are_not_cached() {
    let cache = ReplyCache::new(100, CachePolicy::default()).unwrap();
    let q = query("nope.example.com.");
    let (template, facts) = reply(&q, ResponseCode::NXDomain, &[], None);
    let now = Instant::now();
    assert!(cache.insert(&key(&q), template, &facts, now).is_none());
    assert!(cache.get(&key(&q), now).is_none());
}

#[test]
fn lifetimes_are_capped_by_the_policy() {
    let policy = CachePolicy {
        max_ttl: 100,
        max_negative_ttl: 10,
    };
    let q = query("example.com.");
    let (_, positive) = reply(&q, ResponseCode::NoError, &[86_400], None);
    assert_eq!(policy.lifetime(&positive), Some(100));
    let (_, negative) = reply(&q, ResponseCode::NXDomain, &[], Some((3600, 3600)));
    assert_eq!(policy.lifetime(&negative), Some(10));
}

#[test]
fn errors_truncated_replies_and_zero_ttls_are_not_cached() {
    let policy = CachePolicy::default();
    let q = query("example.com.");
    for rcode in [
        ResponseCode::ServFail,
        ResponseCode::Refused,
        ResponseCode::FormErr,
        ResponseCode::NotImp,
    ] {
        let (_, facts) = reply(&q, rcode, &[60], Some((60, 60)));
        assert_eq!(policy.lifetime(&facts), None, "{rcode:?}");
    }
    let (_, mut truncated) = reply(&q, ResponseCode::NoError, &[60], None);
    truncated.truncated = true;
    assert_eq!(policy.lifetime(&truncated), None);
    let (_, zero) = reply(&q, ResponseCode::NoError, &[0, 60], None);
    assert_eq!(policy.lifetime(&zero), None);
}

#[test]
fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
    let lru: ShardedLru<u32> = ShardedLru::new(16 * 2).unwrap();
    assert_eq!(lru.capacity(), 32);
    for i in 0..1_000u32 {
        lru.insert(&i.to_be_bytes(), i);
        assert!(lru.len() <= 32);
    }
    assert_eq!(lru.len(), 32);
    // The most recent entry is always kept.
    assert_eq!(lru.get(&999u32.to_be_bytes()), Some(999));
    assert_eq!(lru.get(&0u32.to_be_bytes()), None);
}

#[test]
fn a_recently_used_entry_survives_eviction() {
    // Two entries per shard; every key below lands in the same shard as "keep".
    let lru: ShardedLru<u32> = ShardedLru::new(16 * 2).unwrap();
    lru.insert(b"keep", 1);
    let same_shard: Vec<[u8; 4]> = (0..u32::MAX)
        .map(u32::to_be_bytes)
        .filter(|k| lru.shard_of(k) == lru.shard_of(b"keep"))
        .take(10)
        .collect();
    for key in &same_shard {
        assert_eq!(lru.get(b"keep"), Some(1));
        lru.insert(key, 0);
    }
    assert_eq!(lru.get(b"keep"), Some(1));
    assert_eq!(lru.get(&same_shard[0]), None, "the older entry went first");
}

#[test]
fn a_zero_capacity_means_no_cache() {
    assert!(ReplyCache::new(0, CachePolicy::default()).is_none());
    assert!(ShardedLru::<u8>::new(0).is_none());
}
