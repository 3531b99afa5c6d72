//! The federation store's keyspace, in one place: every key the control planes, the CLI, the
//! Terraform provider and the federation's status report read or write is built and parsed
//! here, so no crate spells one (docs/federation-store.md, docs/security.md §7).
//!
//! | key | what |
//! |---|---|
//! | `clusters/<cluster>` | a member cluster's record (trust domain, CA bundle, gateway, member id) |
//! | `exports/<namespace>/<service>/<cluster>` | one cluster's export of one service |
//! | `policies/<kind>/<namespace>/<name>` | a mesh-wide policy (kind in lowercase) |
//! | `kubernetes-policies/<cluster>/<kind>/<namespace>/<name>` | a policy as a cluster's Kubernetes wrote it |
//! | `grants/mesh-admin/<trust-domain>/<name>` | makes `spiffe://<trust-domain>/operator/admin/<name>` a mesh admin |
//! | `grants/policy-writer/<cluster>` | lets that cluster's control plane write `policies/` (its Kubernetes policies) |
//!
//! [`ClusterRecord`] is here because the federation writes it when a cluster joins (its trust
//! domain and CA bundle, before its control plane can write anything); the other values'
//! types live with their writers (`isthmus_control::records`, [`crate::policy::Policy`]).

pub mod rules;
pub mod writers;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A member cluster (`clusters/<name>`): written when it joins, then kept up to date by its
/// own control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    pub name: String,
    pub trust_domain: String,
    /// The east-west gateway's QUIC address, reachable from the other clusters.
    pub gateway: Option<SocketAddr>,
    /// The cluster CA's certificate(s), PEM.
    pub ca_bundle_pem: String,
    #[serde(default)]
    pub locality: Option<String>,
    /// The raft id of the cluster's federation member (`isthmus cluster remove NAME` finds
    /// the member by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<u64>,
    /// The control plane's gRPC address, when it listens on a specific one (`isthmus
    /// explain --from` reaches the cluster's control plane through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<SocketAddr>,
}

/// Where member clusters' records live.
pub const CLUSTERS_PREFIX: &str = "clusters/";
/// Where exports live.
pub const EXPORTS_PREFIX: &str = "exports/";
/// Where mesh-wide policies live.
pub const POLICIES_PREFIX: &str = "policies/";
/// Where each cluster records the policies its Kubernetes wrote.
pub const KUBERNETES_POLICIES_PREFIX: &str = "kubernetes-policies/";
/// Where mesh-admin grants live.
pub const MESH_ADMIN_GRANTS_PREFIX: &str = "grants/mesh-admin/";
/// Where policy-writer grants live.
pub const POLICY_WRITER_GRANTS_PREFIX: &str = "grants/policy-writer/";
/// Where the federation remembers the ids of removed members, which are never reused.
pub const REMOVED_MEMBERS_PREFIX: &str = "members/removed/";

/// `members/removed/<id>`: written when member `id` is removed; a join with that id is
/// refused (a rejoining cluster takes a new id, with an empty raft log).
pub fn removed_member(id: u64) -> String {
    format!("{REMOVED_MEMBERS_PREFIX}{id}")
}

/// `clusters/<cluster>`.
pub fn cluster(name: &str) -> String {
    format!("{CLUSTERS_PREFIX}{name}")
}

/// `exports/<namespace>/<service>/<cluster>`.
pub fn export(namespace: &str, service: &str, cluster: &str) -> String {
    format!("{EXPORTS_PREFIX}{namespace}/{service}/{cluster}")
}

/// `policies/<kind>/<namespace>/<name>`, `kind` as the policy kind's name (stored in
/// lowercase).
pub fn policy(kind: &str, namespace: &str, name: &str) -> String {
    format!(
        "{POLICIES_PREFIX}{}/{namespace}/{name}",
        kind.to_ascii_lowercase()
    )
}

/// The prefix of every policy of one kind: `policies/<kind>/`.
pub fn policies_of_kind(kind: &str) -> String {
    format!("{POLICIES_PREFIX}{}/", kind.to_ascii_lowercase())
}

/// `kubernetes-policies/<cluster>/<rest>` for the policy stored at `policies/<rest>`.
pub fn kubernetes_policy(cluster: &str, policy_key: &str) -> String {
    let rest = policy_key
        .strip_prefix(POLICIES_PREFIX)
        .unwrap_or(policy_key);
    format!("{KUBERNETES_POLICIES_PREFIX}{cluster}/{rest}")
}

/// `grants/mesh-admin/<trust-domain>/<name>`.
pub fn mesh_admin_grant(trust_domain: &str, name: &str) -> String {
    format!("{MESH_ADMIN_GRANTS_PREFIX}{trust_domain}/{name}")
}

/// `grants/policy-writer/<cluster>`.
pub fn policy_writer_grant(cluster: &str) -> String {
    format!("{POLICY_WRITER_GRANTS_PREFIX}{cluster}")
}

/// A key, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    Cluster {
        name: &'a str,
    },
    Export {
        namespace: &'a str,
        service: &'a str,
        cluster: &'a str,
    },
    Policy {
        kind: &'a str,
        namespace: &'a str,
        name: &'a str,
    },
    KubernetesPolicy {
        cluster: &'a str,
        kind: &'a str,
        namespace: &'a str,
        name: &'a str,
    },
    MeshAdminGrant {
        trust_domain: &'a str,
        name: &'a str,
    },
    PolicyWriterGrant {
        cluster: &'a str,
    },
    /// Anything else (including a known prefix with the wrong number of segments).
    Other,
}

impl<'a> Key<'a> {
    /// Parses `key`; segments must be non-empty.
    pub fn parse(key: &'a str) -> Key<'a> {
        let segments = |rest: &'a str| -> Vec<&'a str> { rest.split('/').collect() };
        let full = |parts: &[&str]| parts.iter().all(|p| !p.is_empty());
        if let Some(rest) = key.strip_prefix(CLUSTERS_PREFIX) {
            if let [name] = segments(rest)[..] {
                if !name.is_empty() {
                    return Key::Cluster { name };
                }
            }
        } else if let Some(rest) = key.strip_prefix(EXPORTS_PREFIX) {
            let parts = segments(rest);
            if let [namespace, service, cluster] = parts[..] {
                if full(&parts) {
                    return Key::Export {
                        namespace,
                        service,
                        cluster,
                    };
                }
            }
        } else if let Some(rest) = key.strip_prefix(POLICIES_PREFIX) {
            let parts = segments(rest);
            if let [kind, namespace, name] = parts[..] {
                if full(&parts) {
                    return Key::Policy {
                        kind,
                        namespace,
                        name,
                    };
                }
            }
        } else if let Some(rest) = key.strip_prefix(KUBERNETES_POLICIES_PREFIX) {
            let parts = segments(rest);
            if let [cluster, kind, namespace, name] = parts[..] {
                if full(&parts) {
                    return Key::KubernetesPolicy {
                        cluster,
                        kind,
                        namespace,
                        name,
                    };
                }
            }
        } else if let Some(rest) = key.strip_prefix(MESH_ADMIN_GRANTS_PREFIX) {
            let parts = segments(rest);
            if let [trust_domain, name] = parts[..] {
                if full(&parts) {
                    return Key::MeshAdminGrant { trust_domain, name };
                }
            }
        } else if let Some(cluster) = key.strip_prefix(POLICY_WRITER_GRANTS_PREFIX) {
            if !cluster.is_empty() && !cluster.contains('/') {
                return Key::PolicyWriterGrant { cluster };
            }
        }
        Key::Other
    }

    /// The cluster that owns this record, for the keys a cluster writes about itself
    /// (`clusters/<c>`, `exports/*/*/<c>`, `kubernetes-policies/<c>/…`).
    pub fn owner(&self) -> Option<&'a str> {
        match self {
            Key::Cluster { name } => Some(name),
            Key::Export { cluster, .. } | Key::KubernetesPolicy { cluster, .. } => Some(cluster),
            _ => None,
        }
    }
}

/// The policy key a `kubernetes-policies/<cluster>/…` key records, with its cluster.
pub fn parse_kubernetes_policy(key: &str) -> Option<(&str, String)> {
    match Key::parse(key) {
        Key::KubernetesPolicy {
            cluster,
            kind,
            namespace,
            name,
        } => Some((cluster, policy(kind, namespace, name))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips_through_its_builder_and_the_parser() {
        assert_eq!(Key::parse(&cluster("east")), Key::Cluster { name: "east" });
        assert_eq!(
            Key::parse(&export("default", "ratings", "west")),
            Key::Export {
                namespace: "default",
                service: "ratings",
                cluster: "west"
            }
        );
        assert_eq!(
            Key::parse(&policy("VirtualService", "default", "reviews")),
            Key::Policy {
                kind: "virtualservice",
                namespace: "default",
                name: "reviews"
            }
        );
        let k8s = kubernetes_policy("east", &policy("DestinationRule", "default", "r"));
        assert_eq!(k8s, "kubernetes-policies/east/destinationrule/default/r");
        assert_eq!(
            parse_kubernetes_policy(&k8s),
            Some(("east", policy("destinationrule", "default", "r")))
        );
        assert_eq!(
            Key::parse(&mesh_admin_grant("east.isthmus.local", "admin")),
            Key::MeshAdminGrant {
                trust_domain: "east.isthmus.local",
                name: "admin"
            }
        );
    }

    #[test]
    fn odd_keys_are_other_and_owners_are_the_writing_cluster() {
        for odd in [
            "clusters/",
            "clusters/a/b",
            "exports/default/east",
            "exports/default//east",
            "exports/a/b/c/d",
            "policies/x",
            "grants/mesh-admin/td",
            "grants/policy-writer/",
            "grants/policy-writer/a/b",
            "load/00/1",
            "",
        ] {
            assert_eq!(Key::parse(odd), Key::Other, "{odd}");
        }
        assert_eq!(Key::parse("clusters/east").owner(), Some("east"));
        assert_eq!(
            Key::parse("exports/default/ratings/central").owner(),
            Some("central")
        );
        assert_eq!(Key::parse("policies/a/b/c").owner(), None);
        assert_eq!(
            Key::parse(&policy_writer_grant("west")),
            Key::PolicyWriterGrant { cluster: "west" }
        );
    }
}
