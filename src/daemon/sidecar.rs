//! `isthmus sidecar --config FILE` and `isthmus sidecar --kubernetes`: the sidecar (config
//! format: `isthmus_sidecar::config`).

use std::path::Path;

use isthmus_sidecar::daemon::Daemon;

use super::{print_ready, wait_for_shutdown_signal};

/// Runs the sidecar from its config file until a shutdown signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    serve(Daemon::start_from_file(path).await?).await
}

/// Runs the injected sidecar, configured from its pod, until a shutdown signal.
pub async fn run_kubernetes() -> anyhow::Result<()> {
    serve(Daemon::start_kubernetes().await?).await
}

async fn serve(daemon: Daemon) -> anyhow::Result<()> {
    print_ready("sidecar", daemon.ready());
    wait_for_shutdown_signal().await?;
    daemon.shutdown().await;
    Ok(())
}
