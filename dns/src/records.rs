//! The mesh record table: every name the proxy answers itself, built from one [`MeshConfig`].
//!
//! The table is a plain map from a normalised owner name (lower case, one entry per label) to
//! the records at that name. The proxy is authoritative for the whole `clusterset.local.`
//! zone of the Multi-Cluster Services DNS specification: its apex holds the SOA,
//! `dns-version.clusterset.local.` the schema version (TXT), and services live under
//! `svc.clusterset.local.`. Names that only exist because something lives below them (for
//! example `<ns>.svc.clusterset.local`, or `_tcp.<svc>.<ns>.svc.clusterset.local`) are kept as
//! nodes without records, so they answer NODATA instead of NXDOMAIN, as RFC 8020 asks.
//! Reverse names of the virtual IPs live in a second map.
//!
//! A headless service has no ClusterSetIP: its name holds one address per ready endpoint,
//! and each ready endpoint with a hostname has a name of its own,
//! `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local.`, which its SRV records point at
//! and its PTR record names (see `headless`).
//!
//! Nothing here does I/O; [`MeshTable::build`] is cheap enough to run on every snapshot.

mod headless;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;
use isthmus_core::mesh::{MeshConfig, MeshService};
use tracing::warn;

/// The zone the proxy is authoritative for, as lower-case labels.
pub const ZONE: [&str; 2] = ["clusterset", "local"];

/// Where services live in the zone.
pub const SERVICES: [&str; 3] = ["svc", "clusterset", "local"];

/// The version of the Multi-Cluster Services DNS schema the proxy implements.
pub const SCHEMA_VERSION: &str = "1.0.0";

/// The owner of the schema version's TXT record, under the zone apex.
pub const VERSION_LABEL: &str = "dns-version";

/// The TTL of the schema version's TXT record (the specification's example value).
pub const VERSION_TTL: u32 = 28_800;

/// The last labels of a Kubernetes cluster-local name, the tail of every search-path expansion.
const CLUSTER_LOCAL: [&str; 2] = ["cluster", "local"];

/// Records at one mesh name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// IPv4 addresses: the service VIP, or a headless service's ready endpoints.
    pub a: Vec<Ipv4Addr>,
    /// IPv6 addresses, as `a`.
    pub aaaa: Vec<Ipv6Addr>,
    /// SRV targets, for `_<port>._<proto>` names.
    pub srv: Vec<SrvTarget>,
    /// A TXT string (the schema version at `dns-version`).
    pub txt: Option<&'static str>,
    /// Whether this is the zone apex, which holds the SOA.
    pub apex: bool,
}

impl Node {
    /// Whether the name holds records (a service or a port), rather than only existing because
    /// names below it do.
    pub fn has_records(&self) -> bool {
        !self.a.is_empty()
            || !self.aaaa.is_empty()
            || !self.srv.is_empty()
            || self.txt.is_some()
            || self.apex
    }
}

/// One SRV answer: a port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    pub port: u16,
    /// `<svc>.<ns>.svc.clusterset.local.`, or a headless endpoint's own name.
    pub target: Name,
    /// The target's address, for the additional section.
    pub vip: IpAddr,
}

/// Where a question's name falls, as far as the mesh is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// A name in the mesh zone that exists (with or without records).
    Found(&'a Node),
    /// A name in the mesh zone that does not exist.
    NxDomain,
    /// A Kubernetes search-path expansion of a mesh name, such as
    /// `web.default.svc.clusterset.local.default.svc.cluster.local.`: the first `labels`
    /// labels of the question name are the mesh name, which holds `node`.
    SearchExpansion {
        /// How many leading labels of the question name make up the mesh name.
        labels: usize,
        /// The records at the mesh name.
        node: &'a Node,
    },
    /// Not a mesh name: the question goes upstream (unless it is a VIP's reverse name).
    Outside,
}

/// Every name the proxy answers itself, from one configuration snapshot.
#[derive(Debug, Clone, Default)]
pub struct MeshTable {
    version: u64,
    nodes: HashMap<String, Node>,
    reverse: HashMap<String, Name>,
    /// The services in the table, by owner key.
    services: HashSet<String>,
}

impl MeshTable {
    /// Builds the table from a snapshot. Services whose name or namespace cannot be a DNS label
    /// are left out with a warning; so are ports whose name cannot be one (unnamed ports have
    /// no SRV record, as in Kubernetes).
    pub fn build(config: &MeshConfig) -> MeshTable {
        let mut table = MeshTable {
            version: config.version,
            nodes: HashMap::new(),
            reverse: HashMap::new(),
            services: HashSet::new(),
        };
        // The zone apex, the schema version and the services' parent exist even when no
        // service does.
        table.nodes.insert(
            key_of(&ZONE),
            Node {
                apex: true,
                ..Node::default()
            },
        );
        table.nodes.insert(
            key_of(&[VERSION_LABEL, ZONE[0], ZONE[1]]),
            Node {
                txt: Some(SCHEMA_VERSION),
                ..Node::default()
            },
        );
        table.nodes.insert(key_of(&SERVICES), Node::default());
        for service in &config.services {
            table.add_service(service);
        }
        table
    }

    /// The snapshot version the table was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many services have names in the table.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Classifies a question's name (compared case-insensitively).
    pub fn lookup(&self, name: &Name) -> Lookup<'_> {
        let labels = lower_labels(name);
        if ends_with(&labels, &ZONE) {
            return match self.nodes.get(&key_of(&labels)) {
                Some(node) => Lookup::Found(node),
                None => Lookup::NxDomain,
            };
        }
        match self.search_expansion(&labels) {
            Some((labels, node)) => Lookup::SearchExpansion { labels, node },
            None => Lookup::Outside,
        }
    }

    /// The service name whose VIP has this reverse name (`<reversed>.in-addr.arpa.` or
    /// `<nibbles>.ip6.arpa.`), if any.
    pub fn reverse(&self, name: &Name) -> Option<&Name> {
        self.reverse.get(&key_of(&lower_labels(name)))
    }

    /// `X.clusterset.local.<anything>.cluster.local.` where `X.clusterset.local` holds
    /// records: how many labels `X.clusterset.local` has, and its node. `<anything>` may be
    /// empty, which covers the `cluster.local` search domain as well as `svc.cluster.local`
    /// and `<ns>.svc.cluster.local`.
    fn search_expansion(&self, labels: &[String]) -> Option<(usize, &Node)> {
        if !ends_with(labels, &CLUSTER_LOCAL) {
            return None;
        }
        let before_tail = labels.len() - CLUSTER_LOCAL.len();
        (ZONE.len()..=before_tail).find_map(|end| {
            if !ends_with(&labels[..end], &ZONE) {
                return None;
            }
            self.nodes
                .get(&key_of(&labels[..end]))
                .filter(|node| node.has_records())
                .map(|node| (end, node))
        })
    }

    fn add_service(&mut self, service: &MeshService) {
        if !is_dns_label(&service.name) || !is_dns_label(&service.namespace) {
            warn!(
                service = %service.name,
                namespace = %service.namespace,
                "service name or namespace is not a DNS label; it gets no DNS records"
            );
            return;
        }
        let owner = [
            service.name.as_str(),
            service.namespace.as_str(),
            SERVICES[0],
            SERVICES[1],
            SERVICES[2],
        ];
        let target = match Name::from_labels(owner) {
            Ok(name) => name,
            Err(error) => {
                warn!(service = %service.key(), %error, "cannot build the service's DNS name");
                return;
            }
        };
        if !self.services.insert(key_of(&owner)) {
            warn!(service = %service.key(), "service listed twice; keeping the first");
            return;
        }
        if let Some(headless) = &service.headless {
            self.add_headless(service, headless, &owner);
            return;
        }
        push_address(self.nodes.entry(key_of(&owner)).or_default(), service.vip);
        self.add_empty(&owner[1..]);
        self.add_srv(service, &owner, &[(target.clone(), service.vip)]);
        self.add_reverse(service.vip, target, service);
    }

    /// The SRV names of `service`'s named ports (under `owner`), each answering every one of
    /// `targets` (name, address). Unnamed ports have no SRV name, as in Kubernetes.
    fn add_srv(&mut self, service: &MeshService, owner: &[&str; 5], targets: &[(Name, IpAddr)]) {
        for port in &service.ports {
            if port.name.is_empty() {
                continue;
            }
            let port_label = format!("_{}", port.name);
            let proto_label = format!("_{}", port.protocol.transport());
            if !is_dns_label(&port_label) {
                warn!(service = %service.key(), port = %port.name, "port name is not a DNS label; it gets no SRV record");
                continue;
            }
            let mut srv_owner = vec![port_label.as_str(), proto_label.as_str()];
            srv_owner.extend_from_slice(owner);
            self.nodes
                .entry(key_of(&srv_owner))
                .or_default()
                .srv
                .extend(targets.iter().map(|(target, vip)| SrvTarget {
                    port: port.port,
                    target: target.clone(),
                    vip: *vip,
                }));
            self.add_empty(&srv_owner[1..]);
        }
    }

    /// Makes `ip`'s reverse name answer `target`, unless another name has it already.
    fn add_reverse(&mut self, ip: IpAddr, target: Name, service: &MeshService) {
        let reverse_key = key_of(&lower_labels(&Name::from(ip)));
        if let Some(existing) = self.reverse.get(&reverse_key) {
            warn!(vip = %ip, service = %service.key(), existing = %existing, "VIP shared by two names; PTR answers the first");
        } else {
            self.reverse.insert(reverse_key, target);
        }
    }

    /// Makes `labels` and every ancestor down to the zone apex exist (without records).
    fn add_empty<L: AsRef<str>>(&mut self, labels: &[L]) {
        for start in 0..labels.len().saturating_sub(ZONE.len()) {
            self.nodes.entry(key_of(&labels[start..])).or_default();
        }
    }
}

/// The labels of `name`, lower-cased, with bytes outside `[a-z0-9_-]` escaped so that two
/// different names never produce the same labels.
pub fn lower_labels(name: &Name) -> Vec<String> {
    name.iter()
        .map(|label| {
            let mut out = String::with_capacity(label.len());
            for &byte in label {
                let byte = byte.to_ascii_lowercase();
                if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
                    out.push(char::from(byte));
                } else {
                    out.push_str(&format!("\\{byte:03}"));
                }
            }
            out
        })
        .collect()
}

/// The map key of a name given as labels: lower case, dot-separated, with a trailing dot.
fn key_of<L: AsRef<str>>(labels: &[L]) -> String {
    let mut key = String::new();
    for label in labels {
        key.push_str(&label.as_ref().to_ascii_lowercase());
        key.push('.');
    }
    key
}

fn ends_with<L: AsRef<str>>(labels: &[L], tail: &[&str]) -> bool {
    labels.len() >= tail.len()
        && labels[labels.len() - tail.len()..]
            .iter()
            .zip(tail)
            .all(|(label, want)| label.as_ref() == *want)
}

/// Adds `ip` to the node's A or AAAA records.
fn push_address(node: &mut Node, ip: IpAddr) {
    match ip {
        IpAddr::V4(ip) => node.a.push(ip),
        IpAddr::V6(ip) => node.aaaa.push(ip),
    }
}

/// A label we are willing to publish: 1–63 characters of letters, digits, `-` and `_`.
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::mesh::Protocol;
    use isthmus_testkit::mesh::service;

    fn table() -> MeshTable {
        MeshTable::build(&MeshConfig {
            version: 7,
            cluster: "east".into(),
            services: vec![
                service(
                    "web",
                    "shop",
                    "240.240.0.1",
                    &[("http", 80, Protocol::Http), ("dns", 53, Protocol::Udp)],
                ),
                service("db", "shop", "fd00::5", &[("", 5432, Protocol::Tcp)]),
            ],
            clusters: vec![],
            policies: vec![],
        })
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn service_name_is_found_with_its_vip() {
        let t = table();
        match t.lookup(&name("web.shop.svc.clusterset.local.")) {
            Lookup::Found(node) => {
                assert_eq!(node.a, [Ipv4Addr::new(240, 240, 0, 1)]);
                assert!(node.aaaa.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(t.version(), 7);
        assert_eq!(t.service_count(), 2);
    }

    #[test]
    fn lookup_ignores_case() {
        let t = table();
        assert!(matches!(
            t.lookup(&name("WeB.ShOp.SVC.ClusterSet.LOCAL.")),
            Lookup::Found(n) if !n.a.is_empty()
        ));
    }

    #[test]
    fn ipv6_service_fills_aaaa_only() {
        let t = table();
        match t.lookup(&name("db.shop.svc.clusterset.local.")) {
            Lookup::Found(node) => {
                assert!(node.a.is_empty());
                assert_eq!(node.aaaa, ["fd00::5".parse::<Ipv6Addr>().unwrap()]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn named_ports_get_srv_nodes_with_their_transport() {
        let t = table();
        let Lookup::Found(http) = t.lookup(&name("_http._tcp.web.shop.svc.clusterset.local."))
        else {
            panic!("no SRV node for _http._tcp");
        };
        assert_eq!(http.srv.len(), 1);
        assert_eq!(http.srv[0].port, 80);
        assert_eq!(http.srv[0].target, name("web.shop.svc.clusterset.local."));
        let Lookup::Found(dns) = t.lookup(&name("_dns._udp.web.shop.svc.clusterset.local.")) else {
            panic!("no SRV node for _dns._udp");
        };
        assert_eq!(dns.srv[0].port, 53);
        assert_eq!(
            t.lookup(&name("_http._udp.web.shop.svc.clusterset.local.")),
            Lookup::NxDomain
        );
    }

    #[test]
    fn unnamed_ports_get_no_srv_node() {
        let t = table();
        assert_eq!(
            t.lookup(&name("_._tcp.db.shop.svc.clusterset.local.")),
            Lookup::NxDomain
        );
        assert_eq!(
            t.lookup(&name("_tcp.db.shop.svc.clusterset.local.")),
            Lookup::NxDomain
        );
    }

    #[test]
    fn ancestors_of_mesh_names_exist_without_records() {
        let t = table();
        for ent in [
            "svc.clusterset.local.",
            "shop.svc.clusterset.local.",
            "_tcp.web.shop.svc.clusterset.local.",
            "_udp.web.shop.svc.clusterset.local.",
        ] {
            match t.lookup(&name(ent)) {
                Lookup::Found(node) => assert!(!node.has_records(), "{ent} has records"),
                other => panic!("{ent}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_names_in_the_zone_do_not_exist() {
        let t = table();
        for nx in [
            "nope.shop.svc.clusterset.local.",
            "web.other.svc.clusterset.local.",
            "x.web.shop.svc.clusterset.local.",
            "other.svc.clusterset.local.",
        ] {
            assert_eq!(t.lookup(&name(nx)), Lookup::NxDomain, "{nx}");
        }
    }

    #[test]
    fn the_apex_holds_the_soa_and_dns_version_the_schema_version() {
        let t = table();
        let Lookup::Found(apex) = t.lookup(&name("ClusterSet.Local.")) else {
            panic!("no apex");
        };
        assert!(apex.apex && apex.has_records());
        let Lookup::Found(version) = t.lookup(&name("dns-version.clusterset.local.")) else {
            panic!("no dns-version");
        };
        assert_eq!(version.txt, Some("1.0.0"));
        for nx in ["other.clusterset.local.", "x.dns-version.clusterset.local."] {
            assert_eq!(t.lookup(&name(nx)), Lookup::NxDomain, "{nx}");
        }
    }

    #[test]
    fn empty_config_still_has_the_zone_apex() {
        let t = MeshTable::build(&MeshConfig::default());
        assert!(matches!(
            t.lookup(&name("svc.clusterset.local.")),
            Lookup::Found(_)
        ));
        assert_eq!(
            t.lookup(&name("web.shop.svc.clusterset.local.")),
            Lookup::NxDomain
        );
    }

    #[test]
    fn names_outside_the_zone_are_outside() {
        let t = table();
        for out in [
            "example.com.",
            "web.shop.svc.cluster.local.",
            "local.",
            "xclusterset.local.",
            ".",
        ] {
            assert_eq!(t.lookup(&name(out)), Lookup::Outside, "{out}");
        }
    }

    #[test]
    fn search_expansions_of_mesh_names_are_recognised() {
        let t = table();
        for (expansion, mesh_labels) in [
            ("web.shop.svc.clusterset.local.shop.svc.cluster.local.", 5),
            ("web.shop.svc.clusterset.local.svc.cluster.local.", 5),
            ("web.shop.svc.clusterset.local.cluster.local.", 5),
            ("WEB.shop.svc.clusterset.local.Cluster.Local.", 5),
            (
                "_http._tcp.web.shop.svc.clusterset.local.default.svc.cluster.local.",
                7,
            ),
        ] {
            match t.lookup(&name(expansion)) {
                Lookup::SearchExpansion { labels, node } => {
                    assert_eq!(labels, mesh_labels, "{expansion}");
                    assert!(node.has_records(), "{expansion}");
                }
                other => panic!("{expansion}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn search_expansions_of_non_mesh_names_are_outside() {
        let t = table();
        for out in [
            "nope.shop.svc.clusterset.local.shop.svc.cluster.local.",
            "shop.svc.clusterset.local.cluster.local.",
            "web.shop.svc.clusterset.local.example.com.",
            "web.shop.svc.cluster.local.",
        ] {
            assert_eq!(t.lookup(&name(out)), Lookup::Outside, "{out}");
        }
    }

    #[test]
    fn reverse_names_of_vips_point_at_the_service() {
        let t = table();
        assert_eq!(
            t.reverse(&name("1.0.240.240.in-addr.arpa.")),
            Some(&name("web.shop.svc.clusterset.local."))
        );
        assert_eq!(
            t.reverse(&name("1.0.240.240.IN-ADDR.ARPA.")),
            Some(&name("web.shop.svc.clusterset.local."))
        );
        let v6 = Name::from("fd00::5".parse::<IpAddr>().unwrap());
        assert_eq!(t.reverse(&v6), Some(&name("db.shop.svc.clusterset.local.")));
        assert_eq!(t.reverse(&name("2.0.240.240.in-addr.arpa.")), None);
    }

    #[test]
    fn services_with_names_that_are_not_labels_are_skipped() {
        let t = MeshTable::build(&MeshConfig {
            services: vec![
                service("a.b", "shop", "240.240.0.9", &[]),
                service("", "shop", "240.240.0.10", &[]),
                service(
                    "ok",
                    "shop",
                    "240.240.0.11",
                    &[("bad port", 1, Protocol::Tcp)],
                ),
            ],
            ..Default::default()
        });
        assert_eq!(t.service_count(), 1);
        assert_eq!(
            t.lookup(&name("a.b.shop.svc.clusterset.local.")),
            Lookup::NxDomain
        );
        assert_eq!(t.reverse(&name("9.0.240.240.in-addr.arpa.")), None);
    }

    #[test]
    fn duplicate_service_keeps_the_first_vip() {
        let t = MeshTable::build(&MeshConfig {
            services: vec![
                service("web", "shop", "240.240.0.1", &[]),
                service("WEB", "shop", "240.240.0.2", &[]),
            ],
            ..Default::default()
        });
        let Lookup::Found(node) = t.lookup(&name("web.shop.svc.clusterset.local.")) else {
            panic!("missing");
        };
        assert_eq!(node.a, [Ipv4Addr::new(240, 240, 0, 1)]);
    }

    #[test]
    fn labels_with_dots_do_not_collide_with_separate_labels() {
        let dotted = Name::from_labels(vec![&b"a.b"[..], b"c"]).unwrap();
        let plain = name("a.b.c.");
        assert_ne!(
            key_of(&lower_labels(&dotted)),
            key_of(&lower_labels(&plain))
        );
    }
}
