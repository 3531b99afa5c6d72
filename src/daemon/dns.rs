//! `isthmus dns --config FILE`: the DNS proxy (config format: `isthmus_dns::config`).

use std::path::Path;

use super::{print_ready, wait_for_shutdown_signal};

/// Runs the DNS proxy until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let daemon = isthmus_dns::daemon::Daemon::start_from_file(path).await?;
    print_ready("dns", daemon.ready());
    wait_for_shutdown_signal().await?;
    daemon.shutdown().await;
    Ok(())
}
