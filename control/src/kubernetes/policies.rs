//! Policies as Kubernetes resources: Isthmus's own kinds (`isthmus.io`: `RateLimitPolicy`,
//! `FailoverPolicy`) and Istio's `VirtualService`, `DestinationRule`
//! (`networking.istio.io`), `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication` (`security.istio.io`), written to the federation store as the same documents
//! `isthmus apply -f` stores.
//!
//! The policy writer (one task, started with the other writers by
//! [`super::Running::start_writers`]):
//! 1. **API discovery.** A kind is watched once its group serves it at one of the versions
//!    the kind is accepted at (its CRD is installed); the first served of those, in the
//!    order [`Kind::api_versions`] lists them (v1, v1beta1, v1alpha3), is watched. Kinds
//!    not served yet are asked about again every [`KubeSource::api_recheck`] (30 s), so
//!    Istio's CRDs installed later start their watches then.
//! 2. **Watches.** One kube-rs watcher + reflector per served kind, all namespaces.
//! 3. **Reconciling**, whenever objects change and every resync, for each kind that has been
//!    listed in full at least once (so nothing is withdrawn for lack of news). Each object
//!    becomes the document `apiVersion` (the watched version), `kind`, `metadata.name`,
//!    `metadata.namespace` and `spec` (labels, annotations and status are left out),
//!    validated by [`Policy::from_json_at`].
//!
//! **Ownership.** Every policy this cluster's Kubernetes wrote is recorded under
//! `kubernetes-policies/<cluster>/<kind>/<namespace>/<name>` ([`ORIGIN_PREFIX`]) with the
//! document it wrote. The rules, in full:
//! - An object is written (to `policies/...`, only if the store does not already hold that
//!   document) when its document differs from this cluster's record: it was created or
//!   changed in Kubernetes. It is never rewritten because the store differs, so the last
//!   writer wins: a later `isthmus apply`, or another cluster's Kubernetes writing the same
//!   policy, replaces it and stays until the object changes again. Two clusters holding the
//!   same object therefore never fight.
//! - An object that is gone (deleted, being deleted, or absent from a complete list)
//!   withdraws its policy only if the store still holds exactly what this cluster wrote.
//!   If another cluster's Kubernetes holds the same policy too, its document (the one
//!   recorded most recently) takes over instead of the policy being deleted. Then the
//!   record goes. A policy applied with the CLI has no record, so Kubernetes never removes
//!   it.
//! - An invalid object changes nothing stored: the last valid document stays, in the store
//!   and in the record. The problem is logged once, naming the object and the field, and —
//!   for Isthmus's own kinds, whose CRDs have a `status` subresource — shown as the
//!   condition `Accepted=False` (reason `Invalid`) on the object. Istio's status is left to
//!   Istio.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{BoxStream, SelectAll, StreamExt};
use isthmus_core::policy::{Kind, Policy, PolicyError};
use isthmus_federation::{Store, StoreError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store as Reflected};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::conditions::Wanted;
use super::KubeSource;

/// Where each cluster records the policies its Kubernetes wrote:
/// `kubernetes-policies/<cluster>/<kind>/<namespace>/<name>`, the document as written.
pub const ORIGIN_PREFIX: &str = isthmus_core::keyspace::KUBERNETES_POLICIES_PREFIX;

/// The condition on Isthmus's own policy resources saying whether the object is in effect.
pub const CONDITION_ACCEPTED: &str = "Accepted";

/// The group of `kind` and the versions it is accepted at, preferred first.
pub fn group_and_versions(kind: Kind) -> (&'static str, Vec<&'static str>) {
    let split: Vec<(&'static str, &'static str)> = kind
        .api_versions()
        .iter()
        .filter_map(|v| v.split_once('/'))
        .collect();
    let group = split.first().map(|(g, _)| *g).unwrap_or_default();
    (group, split.into_iter().map(|(_, v)| v).collect())
}

/// The key of this cluster's record of the policy stored at `key` (`policies/...`).
pub fn origin_key(cluster: &str, key: &str) -> String {
    isthmus_core::keyspace::kubernetes_policy(cluster, key)
}

/// The cluster and the policy key of a record key; `None` if it is not one.
pub fn parse_origin_key(origin: &str) -> Option<(&str, String)> {
    isthmus_core::keyspace::parse_kubernetes_policy(origin)
}

/// `Kind namespace/name` of an object, for messages.
fn describe(kind: Kind, object: &DynamicObject) -> String {
    format!(
        "{kind} {}/{}",
        object.metadata.namespace.as_deref().unwrap_or(""),
        object.metadata.name.as_deref().unwrap_or("")
    )
}

/// The policy document a Kubernetes object read as `resource` stands for: what
/// `isthmus apply -f` sends for the same YAML, less what the API server adds.
pub fn document(resource: &ApiResource, object: &DynamicObject) -> Value {
    let mut metadata = serde_json::Map::new();
    if let Some(name) = &object.metadata.name {
        metadata.insert("name".into(), json!(name));
    }
    if let Some(namespace) = &object.metadata.namespace {
        metadata.insert("namespace".into(), json!(namespace));
    }
    let mut doc = json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": metadata,
    });
    if let Some(spec) = object.data.get("spec") {
        doc["spec"] = spec.clone();
    }
    doc
}

/// The validated policy of an object, or the error naming its field.
pub fn parse(resource: &ApiResource, object: &DynamicObject) -> Result<Policy, PolicyError> {
    let doc = document(resource, object).to_string();
    Policy::from_json_at("Kubernetes", 1, doc.as_bytes())
}

/// One change reconciling a kind makes to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Store the policy (if the store does not hold it already) and record it as this
    /// cluster's.
    Write(Policy),
    /// This cluster's object for `key` is gone: withdraw what it wrote (`wrote`; `None` when
    /// the record does not decode, which withdraws nothing but the record).
    Withdraw { key: String, wrote: Option<Policy> },
}

/// What to change for one kind, given what this cluster's Kubernetes holds (`held`, by
/// store key: the valid document of each object, `None` for an invalid one) and what it
/// wrote before (`wrote`, its records by store key). Pure.
pub fn plan(
    held: &BTreeMap<String, Option<Policy>>,
    wrote: &BTreeMap<String, Option<Policy>>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (key, policy) in held {
        // An invalid object leaves whatever was written for it.
        let Some(policy) = policy else { continue };
        if wrote.get(key).and_then(Option::as_ref) != Some(policy) {
            steps.push(Step::Write(policy.clone()));
        }
    }
    for (key, before) in wrote {
        if !held.contains_key(key) {
            steps.push(Step::Withdraw {
                key: key.clone(),
                wrote: before.clone(),
            });
        }
    }
    steps
}

/// What the store holds at `key`, if it is a valid policy.
fn stored(store: &Store, key: &str) -> Option<Policy> {
    store
        .get(key)
        .and_then(|r| Policy::from_json(&r.value).ok())
}

/// Carries out one step (see the module docs for the rules).
pub async fn execute(store: &Store, cluster: &str, step: &Step) -> Result<(), StoreError> {
    match step {
        Step::Write(policy) => {
            let key = policy.store_key();
            let value = policy.to_json().to_string().into_bytes();
            // The policy first, then the record: a crash in between writes it again.
            if stored(store, &key).as_ref() != Some(policy) {
                store.put(&key, value.clone()).await?;
                tracing::info!(%key, "policy from Kubernetes stored");
            }
            store.put(&origin_key(cluster, &key), value).await?;
        }
        Step::Withdraw { key, wrote } => {
            let current = stored(store, key);
            if wrote.is_some() && current == *wrote {
                let heir = store
                    .list(ORIGIN_PREFIX)
                    .into_iter()
                    .filter(|(k, _)| {
                        parse_origin_key(k).is_some_and(|(c, p)| c != cluster && p == *key)
                    })
                    .filter_map(|(_, r)| Some((r.revision, Policy::from_json(&r.value).ok()?)))
                    .max_by_key(|(revision, _)| *revision)
                    .map(|(_, p)| p);
                match heir {
                    Some(p) if Some(&p) == current.as_ref() => {}
                    Some(p) => {
                        store.put(key, p.to_json().to_string().into_bytes()).await?;
                        tracing::info!(%key, "policy deleted in Kubernetes; another cluster's copy takes over");
                    }
                    None => {
                        store.delete(key).await?;
                        tracing::info!(%key, "policy deleted in Kubernetes withdrawn");
                    }
                }
            } else {
                tracing::info!(%key, "policy deleted in Kubernetes was replaced since (CLI or another cluster); left in place");
            }
            store.delete(&origin_key(cluster, key)).await?;
        }
    }
    Ok(())
}

/// The policy writer's inputs.
pub(super) struct PolicyWriter {
    pub source: KubeSource,
    pub cluster: String,
    pub store: Store,
    pub stop: watch::Receiver<bool>,
}

/// A kind being watched.
struct Watched {
    resource: ApiResource,
    reader: Reflected<DynamicObject>,
    /// Whether `Accepted` is written on the objects' status (Isthmus's kinds with a
    /// `status` subresource).
    status: bool,
    /// Listed in full at least once.
    synced: bool,
}

type Events = BoxStream<'static, (Kind, Result<bool, watcher::Error>)>;

/// Runs until `stop`.
pub(super) async fn run(mut w: PolicyWriter) {
    let mut watched: BTreeMap<Kind, Watched> = BTreeMap::new();
    let mut events: SelectAll<Events> = SelectAll::new();
    let mut recheck = tokio::time::interval(w.source.api_recheck);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = tokio::time::interval(w.source.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut log = Log::default();
    let mut ok = true;
    loop {
        tokio::select! {
            _ = w.stop.changed() => return,
            _ = recheck.tick(), if watched.len() < Kind::ALL.len() => {
                for (kind, resource, status) in discover(&w.source.client, &watched, &mut log).await {
                    tracing::info!(kind = %kind, api_version = %resource.api_version, "watching policy resources");
                    let writer = reflector::store::Writer::new(resource.clone());
                    let reader = writer.as_reader();
                    let api = Api::<DynamicObject>::all_with(w.source.client.clone(), &resource);
                    events.push(
                        watcher(api, watcher::Config::default())
                            .default_backoff()
                            .reflect(writer)
                            .map(move |e| (kind, e.map(|e| matches!(e, watcher::Event::InitDone))))
                            .boxed(),
                    );
                    watched.insert(kind, Watched { resource, reader, status, synced: false });
                }
                continue;
            }
            first = events.next(), if !events.is_empty() => {
                let Some(first) = first else { continue };
                // Fold everything already waiting into one reconcile.
                for (kind, result) in super::with_ready(first, &mut events) {
                    match result {
                        Ok(init_done) => {
                            if log.failing_watches.remove(&kind) {
                                tracing::info!(%kind, "policy watch recovered");
                            }
                            if let (true, Some(x)) = (init_done, watched.get_mut(&kind)) {
                                x.synced = true;
                            }
                        }
                        Err(e) => {
                            if log.failing_watches.insert(kind) {
                                tracing::warn!(%kind, error = %e, "policy watch failed; retrying");
                            } else {
                                tracing::debug!(%kind, error = %e, "policy watch failed again");
                            }
                        }
                    }
                }
            }
            _ = resync.tick() => {}
            _ = tokio::time::sleep(w.source.retry), if !ok => {}
        }
        ok = reconcile(&w, &watched, &mut log).await;
    }
}

/// What has been logged, so each problem is said once while it lasts.
#[derive(Default)]
struct Log {
    problems: BTreeSet<String>,
    /// Objects (`Kind namespace/name`) whose status could not be written.
    failing_status: BTreeSet<String>,
    failing_groups: BTreeSet<&'static str>,
    failing_watches: BTreeSet<Kind>,
}

/// The kinds not watched yet that the API server now serves: (kind, its resource at the
/// preferred served version, whether it has a status subresource Isthmus writes). One
/// request for the groups (`/apis`), then one per group version that could serve a kind.
async fn discover(
    client: &kube::Client,
    watched: &BTreeMap<Kind, Watched>,
    log: &mut Log,
) -> Vec<(Kind, ApiResource, bool)> {
    let served = match client.list_api_groups().await {
        Ok(list) => {
            if log.failing_groups.remove("") {
                tracing::info!("API discovery recovered");
            }
            list.groups
        }
        Err(e) => {
            if log.failing_groups.insert("") {
                tracing::warn!(error = %e, "API discovery failed; asking again later");
            }
            return Vec::new();
        }
    };
    let mut resources: BTreeMap<(&'static str, &'static str), Vec<(ApiResource, _)>> =
        BTreeMap::new();
    let mut found = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| !watched.contains_key(k)) {
        let (group, versions) = group_and_versions(kind);
        let Some(offered) = served.iter().find(|g| g.name == group) else {
            tracing::debug!(%kind, group, "API group not served (CRDs not installed); asking again later");
            continue;
        };
        for version in versions {
            if !offered.versions.iter().any(|v| v.version == version) {
                continue;
            }
            if let Entry::Vacant(slot) = resources.entry((group, version)) {
                let gv = kube::core::GroupVersion::gv(group, version);
                match kube::discovery::pinned_group(client, &gv).await {
                    Ok(g) => {
                        log.failing_groups.remove(group);
                        slot.insert(g.versioned_resources(version));
                    }
                    Err(e) => {
                        if log.failing_groups.insert(group) {
                            tracing::warn!(group, version, error = %e, "API discovery failed; asking again later");
                        }
                        break;
                    }
                }
            }
            let hit = resources[&(group, version)]
                .iter()
                .find(|(r, _)| r.kind == kind.as_str());
            if let Some((resource, caps)) = hit {
                let status = group == "isthmus.io"
                    && caps.subresources.iter().any(|(s, _)| s.plural == "status");
                found.push((kind, resource.clone(), status));
                break;
            }
        }
    }
    found
}

/// Reconciles every kind listed in full; false if a write failed (retried soon).
async fn reconcile(w: &PolicyWriter, watched: &BTreeMap<Kind, Watched>, log: &mut Log) -> bool {
    let mut ok = true;
    let mut problems = BTreeSet::new();
    for (kind, x) in watched.iter().filter(|(_, x)| x.synced) {
        let prefix = origin_key(
            &w.cluster,
            &isthmus_core::keyspace::policies_of_kind(kind.as_str()),
        );
        let wrote: BTreeMap<String, Option<Policy>> = w
            .store
            .list(&prefix)
            .into_iter()
            .filter_map(|(k, r)| {
                let (_, key) = parse_origin_key(&k)?;
                Some((key, Policy::from_json(&r.value).ok()))
            })
            .collect();
        let mut held = BTreeMap::new();
        let mut verdicts = Vec::new();
        for object in x.reader.state() {
            let (Some(namespace), Some(name)) = (&object.metadata.namespace, &object.metadata.name)
            else {
                continue;
            };
            if object.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let key = isthmus_core::policy::store_key(*kind, namespace, name);
            let verdict = match parse(&x.resource, &object) {
                Ok(policy) => {
                    held.insert(key.clone(), Some(policy));
                    Wanted {
                        type_: CONDITION_ACCEPTED,
                        status: "True",
                        reason: "Accepted",
                        message: format!("valid; stored mesh-wide as {key}"),
                    }
                }
                Err(e) => {
                    let kept = wrote.get(&key).is_some_and(Option::is_some);
                    held.insert(key.clone(), None);
                    let problem = format!(
                        "{}: field {}: {}",
                        describe(*kind, &object),
                        e.field,
                        e.message
                    );
                    if !log.problems.contains(&problem) {
                        tracing::warn!(
                            object = %describe(*kind, &object),
                            field = %e.field,
                            error = %e.message,
                            "invalid policy resource ignored; {}",
                            if kept { "its last valid version stays in effect" } else { "nothing is stored for it" }
                        );
                    }
                    problems.insert(problem);
                    Wanted {
                        type_: CONDITION_ACCEPTED,
                        status: "False",
                        reason: "Invalid",
                        message: format!(
                            "field {}: {}; {}",
                            e.field,
                            e.message,
                            if kept {
                                "the last valid version stays in effect"
                            } else {
                                "nothing is stored for it"
                            }
                        ),
                    }
                }
            };
            if x.status {
                verdicts.push((object, verdict));
            }
        }
        for step in plan(&held, &wrote) {
            if let Err(e) = execute(&w.store, &w.cluster, &step).await {
                tracing::warn!(error = %e, ?step, "writing a policy from Kubernetes to the federation failed; will retry");
                ok = false;
            }
        }
        // A status that cannot be written (no RBAC for it, say) is tried again on the next
        // change or resync, not at the retry pace: it changes nothing in the mesh.
        for (object, verdict) in verdicts {
            write_condition(w, &x.resource, &object, &verdict, log).await;
        }
    }
    log.problems = problems;
    ok
}

/// Sets `wanted` on the object's status unless it already says so.
async fn write_condition(
    w: &PolicyWriter,
    resource: &ApiResource,
    object: &DynamicObject,
    wanted: &Wanted,
    log: &mut Log,
) {
    let (Some(namespace), Some(name)) = (&object.metadata.namespace, &object.metadata.name) else {
        return;
    };
    let what = format!("{} {namespace}/{name}", resource.kind);
    let current: Vec<Condition> = object
        .data
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let Some(next) = super::status::merge(
        &current,
        std::slice::from_ref(wanted),
        object.metadata.generation,
    ) else {
        log.failing_status.remove(&what);
        return;
    };
    let api = Api::<DynamicObject>::namespaced_with(w.source.client.clone(), namespace, resource);
    let patch = json!({"status": {"conditions": next}});
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            if log.failing_status.remove(&what) {
                tracing::info!(object = %what, "policy status written again");
            }
        }
        // Deleted meanwhile: nothing to say any more.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            if log.failing_status.insert(what.clone()) {
                tracing::warn!(object = %what, error = %e, "writing the policy's status failed; will retry on the next change or resync");
            }
        }
    }
}

#[cfg(test)]
mod tests;
