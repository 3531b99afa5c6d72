//! Transparent interception in Kubernetes: the pod's TCP redirected to the sidecar.
//!
//! `isthmus sidecar init` (the injected init container) installs the rules [`Plan`] renders,
//! in the pod's network namespace, with nftables (`nft -f -`), or with iptables where `nft`
//! is missing:
//! - outbound: TCP the application sends (any destination but loopback) is redirected to the
//!   sidecar's outbound port (15001), except traffic of the proxy's own user (and group, or
//!   packet mark), so the sidecar's upstream connections leave untouched;
//! - inbound: TCP arriving from outside the pod is redirected to the inbound port (15006),
//!   except the sidecar's own ports and any excluded ones.
//!
//! The sidecar then recovers where the application meant to go from the accepted socket
//! (`SO_ORIGINAL_DST`, [`original_destination`]) and serves the connection exactly as a VIP
//! listener would (see `crate::outbound`). Rendering is pure; [`apply`] only runs the tool.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

/// The nftables table Isthmus owns in a pod's network namespace.
pub const TABLE: &str = "isthmus";

/// What to redirect, and what never to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The user the sidecar runs as; its traffic is never redirected.
    pub proxy_uid: u32,
    /// Also exempt this group's traffic (Istio's 1337 convention for both).
    pub proxy_gid: Option<u32>,
    /// Also exempt packets carrying this mark.
    pub proxy_mark: Option<u32>,
    pub outbound_port: u16,
    /// `None`: leave inbound traffic alone.
    pub inbound_port: Option<u16>,
    /// Destination ports the application reaches directly.
    pub exclude_outbound_ports: Vec<u16>,
    /// Ports served directly to callers (the sidecar's own are always excluded).
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            proxy_uid: 1337,
            proxy_gid: Some(1337),
            proxy_mark: None,
            outbound_port: 15001,
            inbound_port: Some(15006),
            exclude_outbound_ports: vec![],
            exclude_inbound_ports: vec![],
        }
    }
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("running {tool} failed")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} refused the rules: {stderr}")]
    Refused { tool: &'static str, stderr: String },
    #[error("neither nft nor iptables is installed")]
    NoTool,
}

/// The sidecar's own ports, never redirected inbound: outbound, inbound, admin.
fn sidecar_ports(plan: &Plan) -> Vec<u16> {
    let mut ports = vec![plan.outbound_port];
    ports.extend(plan.inbound_port);
    ports.extend([15020, 15021, 15090]);
    ports.extend(&plan.exclude_inbound_ports);
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn port_set(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

impl Plan {
    /// The nftables ruleset, replacing any earlier Isthmus table atomically (one `nft -f`).
    pub fn nft_ruleset(&self) -> String {
        let mut out = String::new();
        // Declaring then deleting makes the load idempotent: re-running init never stacks.
        out.push_str(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"));
        out.push_str(&format!("table inet {TABLE} {{\n"));
        out.push_str("  chain output {\n    type nat hook output priority -100; policy accept;\n");
        out.push_str(&format!("    meta skuid {} return\n", self.proxy_uid));
        if let Some(gid) = self.proxy_gid {
            out.push_str(&format!("    meta skgid {gid} return\n"));
        }
        if let Some(mark) = self.proxy_mark {
            out.push_str(&format!("    meta mark {mark:#x} return\n"));
        }
        out.push_str("    ip daddr 127.0.0.0/8 return\n    ip6 daddr ::1 return\n");
        if !self.exclude_outbound_ports.is_empty() {
            out.push_str(&format!(
                "    tcp dport {} return\n",
                port_set(&self.exclude_outbound_ports)
            ));
        }
        out.push_str(&format!(
            "    meta l4proto tcp redirect to :{}\n  }}\n",
            self.outbound_port
        ));
        if let Some(inbound) = self.inbound_port {
            out.push_str(
                "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n",
            );
            out.push_str("    iifname \"lo\" return\n");
            out.push_str(&format!(
                "    tcp dport {} return\n",
                port_set(&sidecar_ports(self))
            ));
            out.push_str(&format!(
                "    meta l4proto tcp redirect to :{inbound}\n  }}\n"
            ));
        }
        out.push_str("}\n");
        out
    }

    /// The same rules as `iptables -t nat` invocations (IPv4), for nodes without nftables.
    pub fn iptables_commands(&self) -> Vec<Vec<String>> {
        let mut cmds: Vec<Vec<String>> = Vec::new();
        let mut add = |args: &str| cmds.push(args.split_whitespace().map(String::from).collect());
        add("-t nat -N ISTHMUS_OUTPUT");
        add("-t nat -A OUTPUT -p tcp -j ISTHMUS_OUTPUT");
        add(&format!(
            "-t nat -A ISTHMUS_OUTPUT -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        if let Some(gid) = self.proxy_gid {
            add(&format!(
                "-t nat -A ISTHMUS_OUTPUT -m owner --gid-owner {gid} -j RETURN"
            ));
        }
        if let Some(mark) = self.proxy_mark {
            add(&format!(
                "-t nat -A ISTHMUS_OUTPUT -m mark --mark {mark:#x} -j RETURN"
            ));
        }
        add("-t nat -A ISTHMUS_OUTPUT -d 127.0.0.0/8 -j RETURN");
        for port in &self.exclude_outbound_ports {
            add(&format!(
                "-t nat -A ISTHMUS_OUTPUT -p tcp --dport {port} -j RETURN"
            ));
        }
        add(&format!(
            "-t nat -A ISTHMUS_OUTPUT -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        if let Some(inbound) = self.inbound_port {
            add("-t nat -N ISTHMUS_INBOUND");
            add("-t nat -A PREROUTING -p tcp -j ISTHMUS_INBOUND");
            add("-t nat -A ISTHMUS_INBOUND -i lo -j RETURN");
            for port in sidecar_ports(self) {
                add(&format!(
                    "-t nat -A ISTHMUS_INBOUND -p tcp --dport {port} -j RETURN"
                ));
            }
            add(&format!(
                "-t nat -A ISTHMUS_INBOUND -p tcp -j REDIRECT --to-ports {inbound}"
            ));
        }
        cmds
    }
}

/// Installs `plan` in the current network namespace: nftables when `nft` exists, else
/// iptables. Returns which tool did it.
pub fn apply(plan: &Plan) -> Result<&'static str, RedirectError> {
    match run_nft(&plan.nft_ruleset()) {
        Err(RedirectError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other.map(|()| "nft"),
    }
    for args in plan.iptables_commands() {
        let output = Command::new("iptables").args(&args).output();
        let output = match output {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RedirectError::NoTool)
            }
            other => other.map_err(|source| RedirectError::Spawn {
                tool: "iptables",
                source,
            })?,
        };
        if !output.status.success() {
            return Err(RedirectError::Refused {
                tool: "iptables",
                stderr: format!(
                    "iptables {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
    }
    Ok("iptables")
}

fn run_nft(ruleset: &str) -> Result<(), RedirectError> {
    let spawn = |source| RedirectError::Spawn {
        tool: "nft",
        source,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(ruleset.as_bytes()).map_err(spawn)?;
    }
    let output = child.wait_with_output().map_err(spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Refused {
            tool: "nft",
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Where a redirected connection was headed before the redirect (`SO_ORIGINAL_DST`).
pub fn original_destination(tcp: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let local = tcp.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nft_ruleset_exempts_the_proxy_and_loopback_and_redirects_the_rest() {
        let rules = Plan {
            exclude_outbound_ports: vec![5432],
            exclude_inbound_ports: vec![8081],
            ..Plan::default()
        }
        .nft_ruleset();
        let expected = "\
table inet isthmus
delete table inet isthmus
table inet isthmus {
  chain output {
    type nat hook output priority -100; policy accept;
    meta skuid 1337 return
    meta skgid 1337 return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    tcp dport { 5432 } return
    meta l4proto tcp redirect to :15001
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    iifname \"lo\" return
    tcp dport { 8081, 15001, 15006, 15020, 15021, 15090 } return
    meta l4proto tcp redirect to :15006
  }
}
";
        assert_eq!(rules, expected);
    }

    #[test]
    fn outbound_only_plans_leave_inbound_alone_and_marks_are_exempt() {
        let rules = Plan {
            proxy_uid: 0,
            proxy_gid: None,
            proxy_mark: Some(0x539),
            inbound_port: None,
            ..Plan::default()
        }
        .nft_ruleset();
        assert!(rules.contains("meta skuid 0 return"), "{rules}");
        assert!(rules.contains("meta mark 0x539 return"), "{rules}");
        assert!(!rules.contains("skgid"), "{rules}");
        assert!(!rules.contains("prerouting"), "{rules}");
    }

    #[test]
    fn iptables_commands_mirror_the_nft_rules() {
        let cmds: Vec<String> = Plan::default()
            .iptables_commands()
            .into_iter()
            .map(|c| c.join(" "))
            .collect();
        assert!(
            cmds.contains(&"-t nat -A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN".into())
        );
        assert!(
            cmds.contains(&"-t nat -A ISTHMUS_OUTPUT -p tcp -j REDIRECT --to-ports 15001".into())
        );
        assert!(cmds.contains(&"-t nat -A ISTHMUS_INBOUND -p tcp --dport 15020 -j RETURN".into()));
        assert_eq!(
            cmds.last().map(String::as_str),
            Some("-t nat -A ISTHMUS_INBOUND -p tcp -j REDIRECT --to-ports 15006")
        );
        // Exemptions come before the redirect.
        let uid = cmds.iter().position(|c| c.contains("--uid-owner")).unwrap();
        let redirect = cmds
            .iter()
            .position(|c| c.contains("--to-ports 15001"))
            .unwrap();
        assert!(uid < redirect);
    }
}
