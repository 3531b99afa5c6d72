//! The TCP accept loop both TCP listeners run (the outbound role's local port, and the
//! TLS-over-TCP transport's): one task per connection, owned by the loop, so every one of
//! them has ended (and the listener is closed) when the loop returns.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use crate::{log_panic, Stop};

/// Accepts connections on `listener` until `stop` fires, serving each with `serve` in its own
/// task under a span named for `what`. A failed accept (usually: out of file descriptors)
/// backs off briefly instead of spinning.
pub(crate) async fn serve_tcp<F, Fut>(
    listener: TcpListener,
    mut stop: Stop,
    what: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.fired() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, from)) => {
                    let span = tracing::info_span!("accepted", listener = what, %from);
                    tasks.spawn(serve(tcp, from).instrument(span));
                }
                Err(e) => {
                    warn!(error = %e, listener = what, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
        }
    }
    drop(listener);
    tasks.shutdown().await;
    debug!(listener = what, "stopped");
}
