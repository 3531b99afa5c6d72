//! The daemons: `isthmus control|gateway|dns|sidecar --config FILE`.
//!
//! Each component crate owns its daemon: its config format and validation (`config`) and
//! `daemon::Daemon`, which starts everything that part runs. These files only hand over the
//! config file, print one `ready` line with the bound addresses as JSON (so scripts and tests
//! can start a daemon on port 0 and read where it listens), and run until SIGINT/SIGTERM.
//! A config error names the file, the field and the bad value, and the process exits
//! non-zero.

pub mod control;
pub mod dns;
pub mod gateway;
pub mod redirect;
pub mod sidecar;

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Prints the one `ready` line a daemon emits once it serves.
pub fn print_ready(component: &str, addrs: serde_json::Value) {
    println!("isthmus {component} ready {addrs}");
}
