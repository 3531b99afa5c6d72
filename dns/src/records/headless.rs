//! The names of a headless service (Multi-Cluster Services DNS specification, §2.4.2).
//!
//! - `<svc>.<ns>.svc.clusterset.local.` holds one address per ready endpoint, in every
//!   cluster, and exists (NODATA) when none is ready;
//! - `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local.` holds the address of that ready
//!   endpoint, and `<cluster>.<svc>...` exists without records above it;
//! - `_<port>._<proto>.<svc>...` has one SRV record per ready endpoint with a hostname,
//!   pointing at its name;
//! - the reverse name of a ready endpoint with a hostname answers that name.
//!
//! The addresses are the per-endpoint virtual IPs the control plane allocated; the
//! service's own VIP is not published.

use std::net::IpAddr;

use hickory_proto::rr::Name;
use isthmus_core::mesh::{Headless, MeshService};
use tracing::warn;

use super::{key_of, push_address, MeshTable};

impl MeshTable {
    /// Adds the names of headless `service`, whose name is `owner`.
    pub(super) fn add_headless(
        &mut self,
        service: &MeshService,
        headless: &Headless,
        owner: &[&str; 5],
    ) {
        self.nodes.entry(key_of(owner)).or_default();
        self.add_empty(&owner[1..]);
        let mut named: Vec<(Name, IpAddr)> = Vec::new();
        for endpoint in headless.endpoints.iter().filter(|e| e.ready) {
            push_address(self.nodes.entry(key_of(owner)).or_default(), endpoint.vip);
            let Some(hostname) = &endpoint.hostname else {
                continue;
            };
            if !is_hostname(hostname) || !is_hostname(&endpoint.cluster) {
                warn!(
                    service = %service.key(),
                    %hostname,
                    cluster = %endpoint.cluster,
                    "headless endpoint hostname or cluster is not a host name label; it gets no name"
                );
                continue;
            }
            let labels = [
                hostname.as_str(),
                endpoint.cluster.as_str(),
                owner[0],
                owner[1],
                owner[2],
                owner[3],
                owner[4],
            ];
            let name = match Name::from_labels(labels) {
                Ok(name) => name,
                Err(error) => {
                    warn!(service = %service.key(), %hostname, %error, "cannot build the endpoint's DNS name");
                    continue;
                }
            };
            let node = self.nodes.entry(key_of(&labels)).or_default();
            if !node.a.is_empty() || !node.aaaa.is_empty() {
                warn!(service = %service.key(), %hostname, cluster = %endpoint.cluster, "hostname listed twice in one cluster; keeping the first");
                continue;
            }
            push_address(node, endpoint.vip);
            self.add_empty(&labels[1..]);
            self.add_reverse(endpoint.vip, name.clone(), service);
            named.push((name, endpoint.vip));
        }
        self.add_srv(service, owner, &named);
    }
}

/// A host name label: 1–63 letters, digits and `-` (no `_`, so that no endpoint or cluster
/// name can be mistaken for an SRV name's `_<port>` or `_<proto>` label).
fn is_hostname(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use isthmus_core::mesh::{HeadlessEndpoint, MeshConfig, Protocol};

    use super::*;
    use crate::records::Lookup;
    use isthmus_testkit::mesh::service;

    fn endpoint(cluster: &str, hostname: Option<&str>, vip: &str, ready: bool) -> HeadlessEndpoint {
        HeadlessEndpoint {
            cluster: cluster.into(),
            id: hostname.unwrap_or("ep.0000000000000001").into(),
            hostname: hostname.map(Into::into),
            vip: vip.parse().unwrap(),
            ready,
        }
    }

    fn table() -> MeshTable {
        let mut web = service(
            "web",
            "shop",
            "240.240.0.1",
            &[("http", 80, Protocol::Http)],
        );
        web.headless = Some(Headless {
            endpoints: vec![
                endpoint("east", Some("web-0"), "240.240.0.2", true),
                endpoint("east", None, "240.240.0.3", true),
                endpoint("west", Some("web-0"), "240.240.0.4", true),
                endpoint("west", Some("web-1"), "240.240.0.5", false),
                endpoint("west", Some("bad_name"), "240.240.0.6", true),
            ],
        });
        MeshTable::build(&MeshConfig {
            services: vec![web],
            ..Default::default()
        })
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn found<'a>(t: &'a MeshTable, s: &str) -> &'a crate::records::Node {
        match t.lookup(&name(s)) {
            Lookup::Found(node) => node,
            other => panic!("{s}: unexpected {other:?}"),
        }
    }

    #[test]
    fn the_service_name_holds_every_ready_endpoint_and_not_the_service_vip() {
        let t = table();
        let ip = |d| Ipv4Addr::new(240, 240, 0, d);
        assert_eq!(
            found(&t, "web.shop.svc.clusterset.local.").a,
            [ip(2), ip(3), ip(4), ip(6)]
        );
        assert_eq!(t.service_count(), 1);
        assert_eq!(t.reverse(&name("1.0.240.240.in-addr.arpa.")), None);
    }

    #[test]
    fn ready_endpoints_with_hostnames_have_names_srv_targets_and_ptrs() {
        let t = table();
        assert_eq!(
            found(&t, "web-0.west.web.shop.svc.clusterset.local.").a,
            [Ipv4Addr::new(240, 240, 0, 4)]
        );
        assert!(!found(&t, "west.web.shop.svc.clusterset.local.").has_records());
        let srv = &found(&t, "_http._tcp.web.shop.svc.clusterset.local.").srv;
        let targets: Vec<String> = srv.iter().map(|s| s.target.to_string()).collect();
        assert_eq!(
            targets,
            [
                "web-0.east.web.shop.svc.clusterset.local.",
                "web-0.west.web.shop.svc.clusterset.local."
            ]
        );
        assert_eq!(
            t.reverse(&name("2.0.240.240.in-addr.arpa.")),
            Some(&name("web-0.east.web.shop.svc.clusterset.local."))
        );
    }

    #[test]
    fn unready_unnamed_and_unusable_endpoints_have_no_names() {
        let t = table();
        for nx in [
            "web-1.west.web.shop.svc.clusterset.local.",
            "web-9.east.web.shop.svc.clusterset.local.",
            "web-0.central.web.shop.svc.clusterset.local.",
            "central.web.shop.svc.clusterset.local.",
        ] {
            assert_eq!(t.lookup(&name(nx)), Lookup::NxDomain, "{nx}");
        }
        // No PTR for an endpoint without a hostname, nor for a not-ready one.
        assert_eq!(t.reverse(&name("3.0.240.240.in-addr.arpa.")), None);
        assert_eq!(t.reverse(&name("5.0.240.240.in-addr.arpa.")), None);
        assert_eq!(t.reverse(&name("6.0.240.240.in-addr.arpa.")), None);
    }

    #[test]
    fn a_headless_service_without_ready_endpoints_exists_without_records() {
        let mut web = service(
            "web",
            "shop",
            "240.240.0.1",
            &[("http", 80, Protocol::Http)],
        );
        web.headless = Some(Headless {
            endpoints: vec![endpoint("east", Some("web-0"), "240.240.0.2", false)],
        });
        let t = MeshTable::build(&MeshConfig {
            services: vec![web],
            ..Default::default()
        });
        assert!(!found(&t, "web.shop.svc.clusterset.local.").has_records());
        assert!(!found(&t, "_http._tcp.web.shop.svc.clusterset.local.").has_records());
    }
}
