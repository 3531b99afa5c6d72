//! `isthmus gateway --config FILE`: the east-west gateway (config format:
//! `isthmus_gateway::config`).

use std::path::Path;

use super::{print_ready, wait_for_shutdown_signal};

/// Runs the gateway until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let daemon = isthmus_gateway::daemon::Daemon::start_from_file(path).await?;
    print_ready("gateway", daemon.ready());
    wait_for_shutdown_signal().await?;
    daemon.shutdown().await;
    Ok(())
}
