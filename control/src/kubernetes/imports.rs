//! The import writer: a `ServiceImport` in this cluster for every service it imports.
//!
//! A service is imported when another cluster exports it (it has remote exports in the
//! merged configuration). Its ServiceImport, in the service's namespace and labelled
//! `app.kubernetes.io/managed-by: isthmus`, carries the type (`ClusterSetIP`, or `Headless`
//! for a headless service), the VIP this cluster allocated (`spec.ips`) and the merged ports.
//! It is applied with server-side apply (field manager `isthmus-control`) and deleted when
//! the import goes. Failed writes are retried; a resync re-applies everything now and then,
//! so a ServiceImport deleted by hand comes back.

use std::collections::BTreeMap;
use std::sync::Arc;

use isthmus_core::mesh::{MeshConfig, Protocol};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::Api;
use tokio::sync::watch;

use super::resources::{ServiceImport, ServiceImportPort, ServiceImportSpec, API_VERSION};
use super::{KubeSource, FIELD_MANAGER};

/// The ServiceImports this cluster should hold, by (namespace, name).
pub fn wanted(config: &MeshConfig) -> BTreeMap<(String, String), ServiceImportSpec> {
    config
        .services
        .iter()
        .filter(|s| !s.remote.is_empty())
        .map(|s| {
            let spec = ServiceImportSpec {
                type_: if s.headless.is_some() {
                    "Headless"
                } else {
                    "ClusterSetIP"
                }
                .into(),
                ips: if s.headless.is_some() {
                    Vec::new()
                } else {
                    vec![s.vip.to_string()]
                },
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServiceImportPort {
                        name: p.name.clone(),
                        protocol: if p.protocol == Protocol::Udp {
                            "UDP"
                        } else {
                            "TCP"
                        }
                        .into(),
                        app_protocol: match p.protocol {
                            Protocol::Http => Some("http".into()),
                            Protocol::Http2 => Some("kubernetes.io/h2c".into()),
                            Protocol::Grpc => Some("grpc".into()),
                            _ => None,
                        },
                        port: i32::from(p.port),
                    })
                    .collect(),
            };
            ((s.namespace.clone(), s.name.clone()), spec)
        })
        .collect()
}

pub(super) async fn run(
    source: KubeSource,
    mut config: watch::Receiver<Arc<MeshConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    // What the API server holds as far as we know: `None` = must be checked.
    let mut applied: BTreeMap<(String, String), Option<ServiceImportSpec>> = BTreeMap::new();
    let mut listed = false;
    let mut ok = false;
    let mut resync = tokio::time::interval(source.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !ok {
            if !listed {
                listed = list_ours(&source, &mut applied).await;
            }
            let want = wanted(&config.borrow_and_update());
            ok = listed && reconcile(&source, &want, &mut applied).await;
        }
        tokio::select! {
            _ = stop.changed() => return,
            changed = config.changed() => {
                if changed.is_err() { return }
                ok = false;
            }
            _ = resync.tick() => {
                for v in applied.values_mut() { *v = None; }
                ok = false;
            }
            _ = tokio::time::sleep(source.retry), if !ok => {}
        }
    }
}

/// Learns the ServiceImports a previous run left, so imports gone meanwhile are deleted.
async fn list_ours(
    source: &KubeSource,
    applied: &mut BTreeMap<(String, String), Option<ServiceImportSpec>>,
) -> bool {
    let api: Api<ServiceImport> = Api::all(source.client.clone());
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            for si in list.items.into_iter().filter(ServiceImport::is_ours) {
                if let (Some(ns), Some(name)) = (si.metadata.namespace, si.metadata.name) {
                    applied.entry((ns, name)).or_insert(Some(si.spec));
                }
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "listing ServiceImports failed; will retry");
            false
        }
    }
}

async fn reconcile(
    source: &KubeSource,
    want: &BTreeMap<(String, String), ServiceImportSpec>,
    applied: &mut BTreeMap<(String, String), Option<ServiceImportSpec>>,
) -> bool {
    let mut ok = true;
    for ((ns, name), spec) in want {
        let key = (ns.clone(), name.clone());
        if applied.get(&key).is_some_and(|a| a.as_ref() == Some(spec)) {
            continue;
        }
        let api: Api<ServiceImport> = Api::namespaced(source.client.clone(), ns);
        let body = ServiceImport::new(ns, name, spec.clone());
        let doc = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "ServiceImport",
            "metadata": body.metadata,
            "spec": body.spec,
        });
        match api
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(doc),
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(namespace = %ns, service = %name, "ServiceImport applied");
                applied.insert(key, Some(spec.clone()));
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, service = %name, error = %e, "applying the ServiceImport failed; will retry");
                ok = false;
            }
        }
    }
    let gone: Vec<(String, String)> = applied
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for (ns, name) in gone {
        let api: Api<ServiceImport> = Api::namespaced(source.client.clone(), &ns);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                applied.remove(&(ns, name));
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                applied.remove(&(ns, name));
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, service = %name, error = %e, "deleting the ServiceImport failed; will retry");
                ok = false;
            }
        }
    }
    ok
}
