//! `isthmus control --config FILE`: the cluster's control plane with its federation member
//! (config format: `isthmus_control::config`).

use std::path::Path;

use super::{print_ready, wait_for_shutdown_signal};

/// Runs the control plane until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let daemon = isthmus_control::daemon::Daemon::start_from_file(path).await?;
    print_ready("control", daemon.ready());
    wait_for_shutdown_signal().await?;
    daemon.shutdown().await;
    Ok(())
}
