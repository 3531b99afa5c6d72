//! `isthmus control --config FILE`: the cluster's control plane with its federation member
//! (config format: `isthmus_control::config`).

use std::path::Path;

use super::{print_ready, wait_for_shutdown_signal};

/// Runs the control plane until a shutdown signal, or until its federation member fails to
/// write its log (then it exits non-zero, naming the file and the error).
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let daemon = isthmus_control::daemon::Daemon::start_from_file(path).await?;
    print_ready("control", daemon.ready());
    let failure = tokio::select! {
        signal = wait_for_shutdown_signal() => {
            signal?;
            None
        }
        reason = daemon.store_failure() => Some(reason),
    };
    daemon.shutdown().await;
    match failure {
        None => Ok(()),
        Some(reason) => anyhow::bail!("the federation member stopped: {reason}"),
    }
}
