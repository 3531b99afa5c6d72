//! `isthmus sidecar init`: the injected init container's job — redirect the pod's TCP to its
//! sidecar (rules in `isthmus_sidecar::redirect`), once, before the application starts.

use isthmus_sidecar::redirect::{apply, Plan};

/// Options of `isthmus sidecar init` (Istio's istio-init defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The user the sidecar runs as; its own traffic is never redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The sidecar's group, also exempt (`none` to exempt only the user).
    #[arg(long, default_value = "1337")]
    pub proxy_gid: String,
    /// Also exempt packets with this mark (e.g. 0x539).
    #[arg(long)]
    pub proxy_mark: Option<String>,
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Leave inbound traffic alone (outbound only).
    #[arg(long)]
    pub no_inbound: bool,
    /// Destination ports the application reaches directly, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports callers reach the application on directly, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Print the nftables rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

impl InitArgs {
    /// The redirect plan these options describe; a bad value names its flag.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let proxy_gid =
            match self.proxy_gid.as_str() {
                "none" => None,
                g => Some(g.parse().map_err(|_| {
                    anyhow::anyhow!("--proxy-gid {g:?}: expected a group id or none")
                })?),
            };
        let proxy_mark = self
            .proxy_mark
            .as_deref()
            .map(|m| {
                let parsed = match m.strip_prefix("0x") {
                    Some(hex) => u32::from_str_radix(hex, 16),
                    None => m.parse(),
                };
                parsed.map_err(|_| anyhow::anyhow!("--proxy-mark {m:?}: expected a number"))
            })
            .transpose()?;
        Ok(Plan {
            proxy_uid: self.proxy_uid,
            proxy_gid,
            proxy_mark,
            outbound_port: self.outbound_port,
            inbound_port: (!self.no_inbound).then_some(self.inbound_port),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
        })
    }
}

/// Installs (or, with `--dry-run`, prints) the redirect in the current network namespace.
pub fn init(args: &InitArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    if args.dry_run {
        print!("{}", plan.nft_ruleset());
        return Ok(());
    }
    let tool = apply(&plan)?;
    println!(
        "redirected outbound TCP to :{} and {} with {tool}; exempt: uid {}{}",
        plan.outbound_port,
        plan.inbound_port.map_or_else(
            || "left inbound alone".to_string(),
            |p| format!("inbound TCP to :{p}")
        ),
        plan.proxy_uid,
        plan.proxy_gid
            .map_or_else(String::new, |g| format!(", gid {g}")),
    );
    Ok(())
}
