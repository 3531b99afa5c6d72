//! The KEP-1645 conditions the control plane sets on this cluster's ServiceExports.
//!
//! Pure. `Valid` says whether the export names a Service that can be exported. `Conflict`
//! says whether the clusters exporting the same service disagree on its ports or its type
//! (ClusterSetIP or headless): the oldest export (by the time each cluster exported it,
//! `exportedAtMs` in the federation store, then cluster name) is in effect, and — as the KEP
//! asks — every export of a conflicted service carries `Conflict=True` naming the winner.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;

use crate::records::ExportRecord;

/// One wanted condition (the API's `lastTransitionTime` is the writer's concern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// `Valid` for an export whose Service is `service` (absent: no such Service).
pub fn valid(service: Option<&Service>) -> Wanted {
    let external = service
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("ExternalName");
    match service {
        None => Wanted {
            type_: super::resources::CONDITION_VALID,
            status: "False",
            reason: "NoService",
            message: "no Service of this namespace and name exists".into(),
        },
        Some(_) if external => Wanted {
            type_: super::resources::CONDITION_VALID,
            status: "False",
            reason: "ServiceUnsupported",
            message: "ExternalName Services cannot be exported".into(),
        },
        Some(_) => Wanted {
            type_: super::resources::CONDITION_VALID,
            status: "True",
            reason: "ServiceExported",
            message: "the Service is exported to the clusterset".into(),
        },
    }
}

fn port_set(x: &ExportRecord) -> BTreeSet<(String, u16, String)> {
    x.ports
        .iter()
        .map(|p| (p.name.clone(), p.port, format!("{:?}", p.protocol)))
        .collect()
}

/// `Conflict` for this cluster's export `own`, given every cluster's export record of the
/// same service (`all`, which may or may not contain `own` yet).
pub fn conflict(own: &ExportRecord, all: &[ExportRecord]) -> Wanted {
    let mut exports: Vec<&ExportRecord> = all
        .iter()
        .filter(|x| x.cluster != own.cluster && x.namespace == own.namespace && x.name == own.name)
        .collect();
    exports.push(own);
    let age = |x: &&ExportRecord| (x.exported_at_ms.unwrap_or(u64::MAX), x.cluster.clone());
    exports.sort_by_key(age);
    let winner = exports[0];
    let types: Vec<&str> = exports
        .iter()
        .filter(|x| x.headless.is_some() != winner.headless.is_some())
        .map(|x| x.cluster.as_str())
        .collect();
    let ports: Vec<&str> = exports
        .iter()
        .filter(|x| port_set(x) != port_set(winner))
        .map(|x| x.cluster.as_str())
        .collect();
    let (reason, disagreeing) = if !types.is_empty() {
        ("TypeConflict", types)
    } else if !ports.is_empty() {
        ("PortConflict", ports)
    } else {
        return Wanted {
            type_: super::resources::CONDITION_CONFLICT,
            status: "False",
            reason: "NoConflicts",
            message: "every cluster's export agrees".into(),
        };
    };
    let what = if reason == "TypeConflict" {
        "type"
    } else {
        "ports"
    };
    Wanted {
        type_: super::resources::CONDITION_CONFLICT,
        status: "True",
        reason,
        message: format!(
            "the exports from {} disagree on the service's {what} with the oldest export, from \
             cluster {}, whose {what} are in effect",
            disagreeing.join(", "),
            winner.cluster
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_core::mesh::{Protocol, ServicePort};

    fn record(cluster: &str, at: Option<u64>, port: u16) -> ExportRecord {
        ExportRecord {
            cluster: cluster.into(),
            namespace: "default".into(),
            name: "ratings".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port,
                protocol: Protocol::Http,
            }],
            identities: vec![],
            endpoints: 1,
            healthy_endpoints: 1,
            subsets: Default::default(),
            headless: None,
            exported_at_ms: at,
            lease_expired_at_ms: None,
        }
    }

    #[test]
    fn agreeing_exports_have_no_conflict() {
        let own = record("east", Some(10), 9080);
        let c = conflict(&own, &[own.clone(), record("west", Some(5), 9080)]);
        assert_eq!((c.status, c.reason), ("False", "NoConflicts"));
    }

    #[test]
    fn a_port_conflict_names_the_oldest_export_on_both_sides() {
        let (old, new) = (
            record("west", Some(5), 9080),
            record("east", Some(10), 9090),
        );
        let c = conflict(&new, std::slice::from_ref(&old));
        assert_eq!((c.status, c.reason), ("True", "PortConflict"));
        assert!(
            c.message.contains("from east") && c.message.contains("cluster west"),
            "{}",
            c.message
        );
        let c = conflict(&old, &[new]);
        assert_eq!((c.status, c.reason), ("True", "PortConflict"));
        assert!(c.message.contains("cluster west"), "{}", c.message);
    }

    #[test]
    fn a_type_conflict_outranks_ports_and_unknown_ages_lose() {
        let mut headless = record("east", None, 9090);
        headless.headless = Some(Default::default());
        let c = conflict(&headless, &[record("west", Some(99), 9080)]);
        assert_eq!((c.status, c.reason), ("True", "TypeConflict"));
        assert!(c.message.contains("cluster west"), "{}", c.message);
    }

    #[test]
    fn valid_follows_the_service() {
        assert_eq!(valid(None).reason, "NoService");
        let mut s = Service::default();
        assert_eq!(valid(Some(&s)).status, "True");
        s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            type_: Some("ExternalName".into()),
            ..Default::default()
        });
        assert_eq!(valid(Some(&s)).reason, "ServiceUnsupported");
    }
}
