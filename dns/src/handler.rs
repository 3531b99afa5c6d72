//! One question's trip through the proxy, between the socket loops and the answering logic.
//!
//! [`Worker::handle`] does everything that needs no waiting, in this order:
//!
//! 1. if a new configuration snapshot has arrived (one atomic load), switch to its table;
//! 2. read the packet with the fast parser ([`QueryView`]); a packet it does not accept goes
//!    through [`handle_packet`] (the full decoder) and is never memoised or cached;
//! 3. look the question's key up in the table's memo: a mesh answer is replayed from its
//!    template; a name known to be forwarded goes to the reply cache;
//! 4. on a memo miss, answer with the full decoder and [`answer`], and memoise the result;
//! 5. a forwarded question that misses the cache becomes a [`ForwardJob`].
//!
//! [`resolve`] then runs the job: one upstream exchange per key at a time (the others wait
//! for it, see [`crate::inflight`]), the reply stored in the cache when its TTLs allow.
//!
//! The reply of a [`Step::Reply`] is in [`Worker::out`], a buffer reused for every question.

use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::Message;
use isthmus_core::mesh::MeshConfig;
use tokio::sync::watch;

use crate::answer::{answer, encode_limited, handle_packet, servfail, Action, Outcome, Transport};
use crate::cache::ReplyCache;
use crate::forward::Forwarder;
use crate::inflight::{self, Inflight, Joined};
use crate::live_table::{Decision, LiveTable, TableState};
use crate::metrics::{Metrics, Source};
use crate::wire::{peek_qtype, QueryView, Template};

/// RCODE SERVFAIL.
const SERVFAIL: u8 = 2;

/// What every worker and forwarding task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) table: LiveTable,
    pub(crate) forwarder: Forwarder,
    pub(crate) cache: Option<ReplyCache>,
    pub(crate) inflight: Inflight,
    pub(crate) metrics: Metrics,
    pub(crate) ttl: u32,
}

/// What to do after [`Worker::handle`].
#[derive(Debug)]
pub(crate) enum Step {
    /// Send [`Worker::out`].
    Reply,
    /// Send nothing.
    Drop,
    /// Ask upstream (see [`resolve`]).
    Forward(ForwardJob),
}

/// A question that must go upstream.
#[derive(Debug)]
pub(crate) struct ForwardJob {
    packet: Vec<u8>,
    transport: Transport,
    /// The cache key, for questions the fast parser read; others are neither cached nor
    /// deduplicated.
    key: Option<Vec<u8>>,
    /// The decoded request, for questions the fast parser did not read (to build SERVFAIL).
    request: Option<Box<Message>>,
}

/// Per-task state: the table in use and reusable buffers.
#[derive(Debug)]
pub(crate) struct Worker {
    shared: Arc<Shared>,
    config: watch::Receiver<Arc<MeshConfig>>,
    state: Arc<TableState>,
    /// Whether the configuration channel was seen closed (and the last table taken).
    closed: bool,
    key: Vec<u8>,
    /// The reply of the last [`Step::Reply`].
    pub(crate) out: Vec<u8>,
}

impl Worker {
    pub(crate) fn new(shared: Arc<Shared>, mut config: watch::Receiver<Arc<MeshConfig>>) -> Worker {
        config.mark_unchanged();
        let state = shared.table.current();
        Worker {
            shared,
            config,
            state,
            closed: false,
            key: Vec::with_capacity(300),
            out: Vec::with_capacity(1500),
        }
    }

    /// Switches to the newest table if the snapshot changed since the last question.
    fn refresh(&mut self) {
        match self.config.has_changed() {
            Ok(false) => {}
            Ok(true) => {
                self.config.mark_unchanged();
                self.state = self.shared.table.current();
            }
            // The control plane went away; its last snapshot may not have been seen yet, and
            // nothing will change after it.
            Err(_) if !self.closed => {
                self.closed = true;
                self.state = self.shared.table.current();
            }
            Err(_) => {}
        }
    }

    /// Handles one received packet, at time `now`.
    pub(crate) fn handle(&mut self, packet: &[u8], transport: Transport, now: Instant) -> Step {
        self.refresh();
        let Some(view) = QueryView::parse(packet) else {
            return self.handle_unusual(packet, transport);
        };
        view.key_into(&mut self.key);
        let memoised = self
            .state
            .memo
            .as_ref()
            .and_then(|memo| memo.get(&self.key));
        let decision = match memoised {
            Some(decision) => decision,
            None => match self.decide(packet) {
                Some(decision) => decision,
                None => return self.handle_unusual(packet, transport),
            },
        };
        let limit = view.reply_limit(transport);
        let metrics = &self.shared.metrics;
        match decision {
            Decision::Local(template) => {
                template.write_reply(&view, 0, limit, &mut self.out);
                let rcode = template.rcode();
                metrics.query(Some(view.qtype), Some(rcode), local_source(rcode));
                Step::Reply
            }
            Decision::Forward => {
                if let Some(cache) = &self.shared.cache {
                    if let Some(hit) = cache.get(&self.key, now) {
                        hit.template
                            .write_reply(&view, hit.age, limit, &mut self.out);
                        metrics.cache_hit();
                        metrics.query(Some(view.qtype), Some(hit.template.rcode()), Source::Cache);
                        return Step::Reply;
                    }
                    metrics.cache_miss();
                }
                Step::Forward(ForwardJob {
                    packet: packet.to_vec(),
                    transport,
                    key: Some(self.key.clone()),
                    request: None,
                })
            }
        }
    }

    /// Answers a question the memo does not know with the full decoder, and memoises the
    /// result. `None` when the full decoder refuses the packet.
    fn decide(&self, packet: &[u8]) -> Option<Decision> {
        let request = Message::from_vec(packet).ok()?;
        let decision = match answer(&self.state.table, &request, self.shared.ttl) {
            Outcome::Forward => Decision::Forward,
            Outcome::Respond(msg) => {
                let bytes = encode_limited(&msg, usize::MAX)?;
                let (template, _) = Template::from_reply(&bytes).ok()?;
                Decision::Local(Arc::new(template))
            }
        };
        if let Some(memo) = &self.state.memo {
            memo.insert(&self.key, decision.clone());
        }
        Some(decision)
    }

    /// The full decoder's path, for packets the fast parser does not read.
    fn handle_unusual(&mut self, packet: &[u8], transport: Transport) -> Step {
        let metrics = &self.shared.metrics;
        let qtype = peek_qtype(packet);
        match handle_packet(&self.state.table, packet, transport, self.shared.ttl) {
            Action::Reply(reply) => {
                let rcode = reply.get(3).map(|flags| u16::from(flags & 0xf));
                metrics.query(qtype, rcode, rcode.map_or(Source::Error, local_source));
                self.out = reply;
                Step::Reply
            }
            Action::Drop => {
                metrics.query(qtype, None, Source::Error);
                Step::Drop
            }
            Action::Forward { request } => Step::Forward(ForwardJob {
                packet: packet.to_vec(),
                transport,
                key: None,
                request: Some(request),
            }),
        }
    }
}

/// Runs a forwarded question to its end; returns the reply for the client, or `None` when
/// there is nothing to say (a SERVFAIL that cannot be encoded).
pub(crate) async fn resolve(shared: &Shared, job: ForwardJob) -> Option<Vec<u8>> {
    let qtype = peek_qtype(&job.packet);
    let Some(key) = &job.key else {
        return match exchange(shared, &job).await {
            Some(reply) => {
                shared
                    .metrics
                    .query(qtype, rcode_of(&reply), Source::Upstream);
                Some(reply)
            }
            None => servfail_for(shared, &job),
        };
    };
    let mut flight_key = key.clone();
    flight_key.push(job.transport as u8);
    match shared.inflight.join(&flight_key) {
        Joined::Leader(leader) => {
            let Some(reply) = exchange(shared, &job).await else {
                leader.publish(inflight::Outcome::Failed);
                return servfail_for(shared, &job);
            };
            let outcome = match Template::from_reply(&reply) {
                Ok((template, facts)) => {
                    let stored = shared.cache.as_ref().and_then(|cache| {
                        cache.insert(
                            key,
                            template.clone(),
                            &facts,
                            tokio::time::Instant::now().into_std(),
                        )
                    });
                    inflight::Outcome::Reply(stored.unwrap_or_else(|| Arc::new(template)))
                }
                Err(_) => inflight::Outcome::Raw(Arc::from(reply.as_slice())),
            };
            leader.publish(outcome);
            shared
                .metrics
                .query(qtype, rcode_of(&reply), Source::Upstream);
            Some(reply)
        }
        Joined::Follower(slot) => {
            shared.metrics.deduplicated();
            let outcome = inflight::wait(slot).await;
            let Some(view) = QueryView::parse(&job.packet) else {
                return servfail_for(shared, &job);
            };
            let mut out = Vec::new();
            match outcome {
                inflight::Outcome::Reply(template) => {
                    template.write_reply(&view, 0, view.reply_limit(job.transport), &mut out);
                }
                inflight::Outcome::Raw(reply) => {
                    out.extend_from_slice(&reply);
                    out[..2].copy_from_slice(&view.id().to_be_bytes());
                }
                inflight::Outcome::Failed => return servfail_for(shared, &job),
            }
            shared
                .metrics
                .query(Some(view.qtype), rcode_of(&out), Source::Upstream);
            Some(out)
        }
    }
}

/// One exchange with the upstreams, timed.
async fn exchange(shared: &Shared, job: &ForwardJob) -> Option<Vec<u8>> {
    let started = tokio::time::Instant::now();
    let result = shared.forwarder.forward(&job.packet, job.transport).await;
    shared.metrics.upstream(started.elapsed(), result.is_ok());
    result.ok()
}

fn servfail_for(shared: &Shared, job: &ForwardJob) -> Option<Vec<u8>> {
    let reply = match (QueryView::parse(&job.packet), &job.request) {
        (Some(view), _) => {
            let mut out = Vec::new();
            view.error_reply(SERVFAIL, &mut out);
            Some(out)
        }
        (None, Some(request)) => servfail(request),
        (None, None) => None,
    };
    shared.metrics.query(
        peek_qtype(&job.packet),
        reply.as_ref().map(|_| u16::from(SERVFAIL)),
        Source::Error,
    );
    reply
}

/// Who a locally built answer with `rcode` counts as coming from: the mesh table, or the
/// proxy refusing the request (FORMERR, NOTIMP, REFUSED).
fn local_source(rcode: u16) -> Source {
    match rcode {
        1 | 4 | 5 => Source::Error,
        _ => Source::Mesh,
    }
}

fn rcode_of(reply: &[u8]) -> Option<u16> {
    reply.get(3).map(|flags| u16::from(flags & 0xf))
}
