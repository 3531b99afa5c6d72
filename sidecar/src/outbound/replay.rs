//! Request bodies kept for retries.
//!
//! A body known to be small (empty, or a `content-length` within the limit) is read whole
//! before the first attempt and replayed as often as needed. Any other body — chunked, or
//! HTTP/2 without a length, as gRPC clients send even unary calls — streams to the first
//! attempt as it arrives (a bidirectional stream must never wait for its end), while a copy
//! of its frames is kept up to the limit. If the stream ended within the limit by the time an
//! attempt failed, the copy is replayed (so a unary gRPC call answered `UNAVAILABLE` is
//! retried, as Envoy does); past the limit, or still streaming, it is sent once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::proxy::Body;

/// Bodies up to this size are kept so the request can be retried or mirrored.
pub const REPLAYABLE_BODY: u64 = 64 * 1024;

/// A request body, sendable once or replayable.
pub(crate) enum Replay {
    /// Read whole before the first attempt.
    Buffered(Bytes),
    /// Streamed to the first attempt, with a copy kept while it fits.
    Teed {
        first: Option<Tee>,
        copy: Arc<Mutex<Copy>>,
    },
}

/// What has been copied of a streamed body.
#[derive(Default)]
pub(crate) struct Copy {
    frames: Vec<Bytes>,
    size: u64,
    ended: bool,
    overflowed: bool,
}

impl Replay {
    /// Streams `body`, keeping a copy while it fits in `limit` bytes.
    pub(crate) fn teed(body: Incoming, limit: u64) -> Self {
        let copy = Arc::new(Mutex::new(Copy::default()));
        Replay::Teed {
            first: Some(Tee {
                inner: body,
                copy: copy.clone(),
                limit,
            }),
            copy,
        }
    }

    /// The body for the next attempt: the stream itself the first time, then its copy when
    /// it is whole; `None` when it cannot be sent again.
    pub(crate) fn take(&mut self) -> Option<Body> {
        match self {
            Replay::Buffered(b) => Some(full(b.clone())),
            Replay::Teed { first, copy } => {
                if let Some(tee) = first.take() {
                    return Some(tee.boxed());
                }
                let copy = copy.lock().unwrap_or_else(|e| e.into_inner());
                (copy.ended && !copy.overflowed).then(|| full(copy.frames.concat().into()))
            }
        }
    }

    /// Whether another attempt could be sent.
    pub(crate) fn replayable(&self) -> bool {
        match self {
            Replay::Buffered(_) => true,
            Replay::Teed { first, copy } => {
                first.is_some() || {
                    let copy = copy.lock().unwrap_or_else(|e| e.into_inner());
                    copy.ended && !copy.overflowed
                }
            }
        }
    }
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Passes a body through, copying its data frames into [`Copy`] until `limit` is passed.
pub(crate) struct Tee {
    inner: Incoming,
    copy: Arc<Mutex<Copy>>,
    limit: u64,
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let limit = self.limit;
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The sender may stop polling after the last frame, without seeing the end itself.
        let ended = self.inner.is_end_stream();
        let mut copy = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        copy.ended |= ended;
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    copy.size += data.len() as u64;
                    if copy.size > limit {
                        copy.overflowed = true;
                        copy.frames.clear();
                    } else if !copy.overflowed {
                        copy.frames.push(data.clone());
                    }
                }
            }
            Poll::Ready(None) => copy.ended = true,
            // A body that failed midway cannot be replayed.
            Poll::Ready(Some(Err(_))) => copy.overflowed = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
