//! What both roles do with a tunnel's open request that cannot be read: answer
//! `BadRequest` when the other side can still hear it, count it, and log it within limits.

use isthmus_core::tunnel::{self, OpenResponse, ReasonCode, TunnelError};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, Rejection, Source};
use crate::GatewayError;

/// Answers a malformed header with `BadRequest` (when the other side can still hear it),
/// counts it, and logs it at most once per `who` and interval.
pub(crate) async fn reject_bad_header<W>(
    w: &mut W,
    e: TunnelError,
    metrics: &Metrics,
    log: &LogLimiter,
    source: Source,
    who: &str,
) where
    W: AsyncWrite + Unpin,
{
    let reason = match e {
        TunnelError::Read(_) | TunnelError::UnexpectedEof { .. } => {
            debug!(error = %GatewayError::ReadRequest(e).chain(), "connection ended before its request");
            return;
        }
        TunnelError::UnsupportedVersion { .. } => Rejection::UnsupportedHeaderVersion,
        _ => Rejection::MalformedHeader,
    };
    metrics.reject(source, reason);
    let e = GatewayError::ReadRequest(e);
    if let Some(suppressed) = log.admit(&format!("header {who} {}", reason.as_str())) {
        warn!(from = %who, error = %e.chain(), suppressed, "rejecting a malformed open request");
    }
    let response = OpenResponse::new(ReasonCode::BadRequest, e.chain());
    if tunnel::write_response(w, &response).await.is_ok() {
        let _ = w.shutdown().await;
    }
}
