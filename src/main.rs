//! The `isthmus` command line.

// Code that ships: no unwrap on what input or the network can make fail, no silent lossy
// casts (see [workspace.lints] in the root Cargo.toml).
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "isthmus",
    version,
    about = "Isthmus: one service mesh over many clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum SidecarAction {
    /// Redirect this network namespace's TCP to the sidecar (the injected init container):
    /// nftables, or iptables where nft is missing.
    Init(isthmus::daemon::redirect::InitArgs),
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole three-cluster federation on loopback, in one process, and narrate it.
    Demo {
        /// Write every bound address to this file as JSON.
        #[arg(long)]
        ports_file: Option<PathBuf>,
        /// Stop after this long (e.g. 30s, 5m); without it, run until interrupted.
        #[arg(long, value_parser = parse_duration)]
        exit_after: Option<Duration>,
    },
    /// Run a cluster's control plane (and its federation member).
    Control {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a cluster's east-west gateway.
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a DNS proxy.
    Dns {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a sidecar proxy (`--config FILE`), or install a pod's traffic redirect (`init`).
    #[command(args_conflicts_with_subcommands = true)]
    Sidecar {
        #[command(subcommand)]
        action: Option<SidecarAction>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Configure from the pod the injection webhook prepared (environment, projected
        /// service-account token, downward-API labels) instead of a file.
        #[arg(long, conflicts_with = "config")]
        kubernetes: bool,
    },
    /// Apply mesh-wide policies (Istio VirtualService, DestinationRule, AuthorizationPolicy,
    /// PeerAuthentication, RequestAuthentication) from a multi-document YAML file.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Validate and show what would change, without storing anything.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        control: isthmus::policy_cmd::ControlArgs,
    },
    /// Show applied policies: KIND is a policy kind or `all`.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: isthmus::policy_cmd::Output,
        #[command(flatten)]
        control: isthmus::policy_cmd::ControlArgs,
    },
    /// Delete an applied policy.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        control: isthmus::policy_cmd::ControlArgs,
    },
    /// Why a service's traffic goes where it goes: the failover priority table the sidecars
    /// of a cluster use right now, with each cluster's health.
    Explain {
        service: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// The cluster whose sidecars to ask about (default: the control plane's own).
        #[arg(long)]
        from: Option<String>,
        /// `yaml` prints the tables as text; `json` for scripts.
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: isthmus::policy_cmd::Output,
        #[command(flatten)]
        control: isthmus::policy_cmd::ControlArgs,
    },
    /// The federation store: members, roles, leader, term, commit and applied index, lag,
    /// lease states.
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: isthmus::cluster_cmd::StatusOutput,
        /// The federation is reached through a control plane's TLS API (its member's `Kv`).
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
    /// The federation store's records under PREFIX (default: all): key, revision and who
    /// wrote each (the proposing member and the operator it acted for), as a viewer may read.
    Records {
        #[arg(default_value = "")]
        prefix: String,
        /// Print the values too (JSON, one line each).
        #[arg(long)]
        values: bool,
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
    /// Federation membership: join tokens, joining and removing clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Operator credentials: client certificates for the control-plane API.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// The cluster CA: rotating it without an outage.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The operator's contexts ($ISTHMUS_CONFIG, default ~/.config/isthmus/config.yaml).
    Context {
        #[command(subcommand)]
        command: ContextCommand,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Issue a credential for spiffe://<trust-domain>/operator/<role>/<name> from a control
    /// plane's CA; writes <out>/<name>.pem and <name>-key.pem (mode 0600).
    Issue(isthmus::credentials_cmd::Issue),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Take the next step of a CA rotation in a control plane's CA directory: stage a new
    /// CA, make it sign, or retire the old one. Restart the control plane after each.
    Rotate(isthmus::ca_cmd::Rotate),
}

#[derive(Subcommand)]
enum ContextCommand {
    /// Lists the contexts; `*` marks the current one.
    List,
    /// Makes NAME the context commands use when none is named.
    Use { name: String },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Mint a one-time, expiring join token on an existing member.
    Token {
        /// How long the token stays valid.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
        /// The control plane whose member mints it (as a mesh admin).
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
    /// Add a cluster's federation member (voter while fewer than five vote, else learner).
    /// Start its control plane with `federation.join: true`.
    Join {
        #[arg(long)]
        token: String,
        /// The new member's id (its control config's federation.nodeId).
        #[arg(long)]
        id: u64,
        /// Where the other members reach the new member's federation port.
        #[arg(long)]
        peer_addr: std::net::SocketAddr,
        /// The joining cluster's name (its control config's `cluster`).
        #[arg(long, requires_all = ["trust_domain", "bundle_file"])]
        cluster: Option<String>,
        /// The joining cluster's trust domain (its control config's `trustDomain`).
        #[arg(long, requires_all = ["cluster", "bundle_file"])]
        trust_domain: Option<String>,
        /// The joining cluster's CA bundle (PEM; `<dataDir>/ca.pem` of its control plane),
        /// recorded so the members authenticate its control plane.
        #[arg(long, requires_all = ["cluster", "trust_domain"])]
        bundle_file: Option<std::path::PathBuf>,
        /// Any member's federation (peer) address or control-plane API, host:port: the
        /// federation is verified against the digest in the token before the token is sent,
        /// so no CA file is needed.
        #[arg(long)]
        via: Option<String>,
        /// Or an existing member's control plane, trusted through its CA (--ca-file or a
        /// context). The token is the authority either way: no credential is needed.
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
    /// Remove a cluster's member (by cluster name or member id), with joint consensus.
    Remove {
        name: String,
        /// The control plane whose member proposes the removal (as a mesh admin).
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
    /// Let a cluster's control plane write mesh-wide policies from its Kubernetes resources
    /// (VirtualService, DestinationRule, AuthorizationPolicy, ...), as a mesh admin.
    GrantPolicies {
        /// The cluster's name.
        name: String,
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
    /// Withdraw that right; the policies it wrote stay until deleted.
    RevokePolicies {
        /// The cluster's name.
        name: String,
        #[command(flatten)]
        api: isthmus::policy_cmd::ControlArgs,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    isthmus_core::config::parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?}: expected e.g. 250ms, 30s, 5m or 1h"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ISTHMUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    isthmus_core::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo {
                ports_file,
                exit_after,
            } => {
                isthmus_demo::run(isthmus_demo::DemoArgs {
                    ports_file,
                    exit_after,
                })
                .await
            }
            Command::Control { config } => isthmus::daemon::control::run(&config).await,
            Command::Gateway { config } => isthmus::daemon::gateway::run(&config).await,
            Command::Dns { config } => isthmus::daemon::dns::run(&config).await,
            Command::Sidecar {
                action: Some(SidecarAction::Init(args)),
                ..
            } => isthmus::daemon::redirect::init(&args),
            Command::Sidecar {
                config: Some(config),
                ..
            } => isthmus::daemon::sidecar::run(&config).await,
            Command::Sidecar {
                kubernetes: true, ..
            } => isthmus::daemon::sidecar::run_kubernetes().await,
            Command::Sidecar { .. } => {
                anyhow::bail!(
                    "isthmus sidecar needs --config FILE, --kubernetes, or the init subcommand"
                )
            }
            Command::Apply {
                file,
                dry_run,
                control,
            } => isthmus::policy_cmd::apply(&control, &file, dry_run).await,
            Command::Get {
                kind,
                name,
                namespace,
                output,
                control,
            } => {
                isthmus::policy_cmd::get(
                    &control,
                    &kind,
                    name.as_deref(),
                    namespace.as_deref(),
                    output,
                )
                .await
            }
            Command::Delete {
                kind,
                name,
                namespace,
                control,
            } => isthmus::policy_cmd::delete(&control, &kind, &name, &namespace).await,
            Command::Explain {
                service,
                namespace,
                from,
                output,
                control,
            } => {
                isthmus::policy_cmd::explain(
                    &control,
                    &service,
                    &namespace,
                    from.as_deref(),
                    output,
                )
                .await
            }
            Command::Status { output, api } => {
                isthmus::cluster_cmd::status(&api.client()?, output).await
            }
            Command::Records {
                prefix,
                values,
                api,
            } => isthmus::cluster_cmd::records(&api.client()?, &prefix, values).await,
            Command::Cluster { command } => match command {
                ClusterCommand::Token { ttl, api } => {
                    isthmus::cluster_cmd::token(&api.client()?, ttl).await
                }
                ClusterCommand::Join {
                    token,
                    id,
                    peer_addr,
                    cluster,
                    trust_domain,
                    bundle_file,
                    via,
                    api,
                } => {
                    let claim = isthmus::cluster_cmd::claim(cluster, trust_domain, bundle_file)?;
                    let through = match via {
                        Some(_) if api.control.is_some() || api.ca_file.is_some() => {
                            anyhow::bail!("give --via or --control/--ca-file, not both")
                        }
                        Some(via) => isthmus::cluster_cmd::JoinThrough::Via(via),
                        None => isthmus::cluster_cmd::JoinThrough::Control(api.client()?),
                    };
                    isthmus::cluster_cmd::join(&through, &token, id, peer_addr, claim).await
                }
                ClusterCommand::Remove { name, api } => {
                    isthmus::cluster_cmd::remove(&api.client()?, &name).await
                }
                ClusterCommand::GrantPolicies { name, api } => {
                    isthmus::cluster_cmd::policy_writer(&api.client()?, &name, true).await
                }
                ClusterCommand::RevokePolicies { name, api } => {
                    isthmus::cluster_cmd::policy_writer(&api.client()?, &name, false).await
                }
            },
            Command::Credentials {
                command: CredentialsCommand::Issue(req),
            } => isthmus::credentials_cmd::run(&req).await,
            Command::Ca {
                command: CaCommand::Rotate(req),
            } => isthmus::ca_cmd::run(&req),
            Command::Context { command } => match command {
                ContextCommand::List => isthmus::context_cmd::list(),
                ContextCommand::Use { name } => isthmus::context_cmd::use_context(&name),
            },
        }
    });
    // Leave no task running behind us.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
