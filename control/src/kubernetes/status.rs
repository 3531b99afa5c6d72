//! The status writer: `Valid` and `Conflict` on each of this cluster's ServiceExports.
//!
//! It follows local discovery and the federation store's export records, computes the
//! conditions ([`super::conditions`]) and patches the ServiceExport's `status` subresource
//! (a JSON merge patch) when they differ from what the object shows. `lastTransitionTime`
//! moves only when a condition's status changes.

use std::collections::BTreeMap;

use isthmus_federation::Store;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store as Reflected};
use kube::Api;
use tokio::sync::watch;

use super::conditions::{self, Wanted};
use super::resources::ServiceExport;
use super::KubeSource;
use crate::discovery::Discovery;
use crate::records::{self, ExportRecord};

pub(super) struct StatusWriter {
    pub source: KubeSource,
    pub cluster: String,
    pub store: Store,
    pub discovery: watch::Receiver<Option<Discovery>>,
    pub exports: Reflected<ServiceExport>,
    pub services: Reflected<Service>,
    pub stop: watch::Receiver<bool>,
}

pub(super) async fn run(mut w: StatusWriter) {
    let mut revision = w.store.revision();
    let mut resync = tokio::time::interval(w.source.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ok = false;
    loop {
        if !ok {
            ok = reconcile(&w).await;
        }
        tokio::select! {
            _ = w.stop.changed() => return,
            changed = w.discovery.changed() => { if changed.is_err() { return } ok = false; }
            changed = revision.changed() => { if changed.is_err() { return } ok = false; }
            _ = resync.tick() => ok = false,
            _ = tokio::time::sleep(w.source.retry), if !ok => {}
        }
    }
}

/// This cluster's export of `svc` as the conflict check sees it (ports, type, age).
fn own_record(cluster: &str, svc: &crate::discovery::LocalService) -> ExportRecord {
    ExportRecord {
        cluster: cluster.to_string(),
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        ports: svc.ports.clone(),
        identities: Vec::new(),
        endpoints: 0,
        healthy_endpoints: 0,
        subsets: BTreeMap::new(),
        headless: svc.headless.then(Default::default),
        exported_at_ms: svc.exported_at_ms,
        lease_expired_at_ms: None,
    }
}

async fn reconcile(w: &StatusWriter) -> bool {
    let Some(discovery) = w.discovery.borrow().clone() else {
        return false;
    };
    let all: Vec<ExportRecord> = w
        .store
        .list(records::EXPORTS_PREFIX)
        .into_iter()
        .filter_map(|(_, r)| serde_json::from_slice(&r.value).ok())
        .collect();
    let mut ok = true;
    for export in w.exports.state() {
        let (Some(ns), Some(name)) = (&export.metadata.namespace, &export.metadata.name) else {
            continue;
        };
        if export.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let service = w.services.get(&ObjectRef::new(name).within(ns));
        let mut wanted = vec![conditions::valid(service.as_deref())];
        if let Some(local) = discovery
            .services
            .iter()
            .find(|s| &s.namespace == ns && &s.name == name && s.export)
        {
            wanted.push(conditions::conflict(&own_record(&w.cluster, local), &all));
        }
        let current = export
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let Some(next) = merge(&current, &wanted, export.metadata.generation) else {
            continue;
        };
        let api: Api<ServiceExport> = Api::namespaced(w.source.client.clone(), ns);
        let patch = serde_json::json!({"status": {"conditions": next}});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(namespace = %ns, service = %name, "ServiceExport status written")
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, service = %name, error = %e, "writing the ServiceExport status failed; will retry");
                ok = false;
            }
        }
    }
    ok
}

/// The conditions to write, or `None` when `current` already says what is wanted. Other
/// condition types (someone else's) are kept.
pub(super) fn merge(
    current: &[Condition],
    wanted: &[Wanted],
    generation: Option<i64>,
) -> Option<Vec<Condition>> {
    let same = wanted.iter().all(|w| {
        current.iter().any(|c| {
            c.type_ == w.type_
                && c.status == w.status
                && c.reason == w.reason
                && c.message == w.message
        })
    });
    if same {
        return None;
    }
    let now = Time(k8s_openapi::chrono::Utc::now());
    let mut out: Vec<Condition> = current
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.type_ == c.type_))
        .cloned()
        .collect();
    for w in wanted {
        let before = current.iter().find(|c| c.type_ == w.type_);
        out.push(Condition {
            type_: w.type_.to_string(),
            status: w.status.to_string(),
            reason: w.reason.to_string(),
            message: w.message.clone(),
            observed_generation: generation,
            last_transition_time: match before {
                Some(b) if b.status == w.status => b.last_transition_time.clone(),
                _ => now.clone(),
            },
        });
    }
    Some(out)
}
