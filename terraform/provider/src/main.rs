//! `terraform-provider-isthmus`: Terraform launches it; it serves the plugin protocol until
//! Terraform shuts it down. Logs go to stderr (Terraform shows them with TF_LOG).

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use terraform_provider_isthmus::plugin::{serve, LaunchEnv};
use terraform_provider_isthmus::provider::IsthmusProvider;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TF_PROVIDER_ISTHMUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let env = LaunchEnv::from_process();
    match serve(&env, IsthmusProvider::standard()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("terraform-provider-isthmus: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
