//! What the control plane keeps true about its own certificates in the cluster:
//!
//! - ConfigMap `caRoot.configMap` in `caRoot.namespace` holds the cluster CA's certificate
//!   (`ca.pem`), which the gateway and DNS proxy mount as their `controlCa`
//!   (docs/control-api.md). Server-side apply, field manager `isthmus-control`.
//! - The sidecar-injection MutatingWebhookConfiguration's `caBundle` (every webhook in it) is
//!   the cluster CA, which signs the webhook's serving certificate, so the API server trusts
//!   the webhook without anyone copying a certificate by hand.
//!
//! Both are re-applied every resync (someone may have edited them) and retried after a
//! failure; an unchanged object is not written again.

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{KubeSource, FIELD_MANAGER};

/// What to publish.
#[derive(Debug, Clone)]
pub struct Publish {
    /// `(namespace, name)` of the CA root ConfigMap.
    pub ca_root: Option<(String, String)>,
    /// The MutatingWebhookConfiguration whose caBundle to keep.
    pub webhook_configuration: Option<String>,
    pub ca_pem: String,
}

/// The server-side-apply document of the CA root ConfigMap.
pub fn ca_root_document(namespace: &str, name: &str, ca_pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "isthmus"},
        },
        "data": {"ca.pem": ca_pem},
    })
}

/// The JSON patch that sets every webhook's `caBundle` in `existing` to `ca_pem`, or `None`
/// when they all already carry it. `test` operations pin each webhook's name, so a
/// configuration that changed underneath fails the patch instead of being mangled.
pub fn ca_bundle_patch(existing: &Value, ca_pem: &str) -> Option<Value> {
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let webhooks = existing.get("webhooks")?.as_array()?;
    let mut ops = Vec::new();
    for (i, hook) in webhooks.iter().enumerate() {
        if hook
            .pointer("/clientConfig/caBundle")
            .and_then(Value::as_str)
            == Some(&bundle)
        {
            continue;
        }
        ops.push(
            json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": hook.get("name")}),
        );
        ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}));
    }
    (!ops.is_empty()).then_some(Value::Array(ops))
}

/// Keeps both published until `stop`: every resync when all is well, at the retry pace
/// after a failure (the ConfigMap apply is idempotent, so it is simply applied each round).
pub async fn run(source: KubeSource, publish: Publish, mut stop: watch::Receiver<bool>) {
    loop {
        let mut ok = true;
        if let Some((ns, name)) = &publish.ca_root {
            let api: Api<ConfigMap> = Api::namespaced(source.client.clone(), ns);
            let doc = ca_root_document(ns, name, &publish.ca_pem);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            if let Err(e) = api.patch(name, &params, &Patch::Apply(doc)).await {
                tracing::warn!(namespace = %ns, configmap = %name, error = %e, "publishing the cluster CA certificate failed; will retry");
                ok = false;
            }
        }
        if let Some(name) = &publish.webhook_configuration {
            if let Err(e) = keep_ca_bundle(&source, name, &publish.ca_pem).await {
                tracing::warn!(configuration = %name, error = %e, "setting the webhook's caBundle failed; will retry");
                ok = false;
            }
        }
        let wait = if ok { source.resync } else { source.retry };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn keep_ca_bundle(source: &KubeSource, name: &str, ca_pem: &str) -> Result<(), String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(source.client.clone());
    let existing = api.get(name).await.map_err(|e| e.to_string())?;
    let existing = serde_json::to_value(&existing).map_err(|e| e.to_string())?;
    let Some(patch) = ca_bundle_patch(&existing, ca_pem) else {
        return Ok(());
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| e.to_string())?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(configuration = %name, "webhook caBundle set to the cluster CA");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_root_configmap_holds_the_certificate_under_ca_pem() {
        let doc = ca_root_document("isthmus-system", "isthmus-ca-root", "PEM");
        assert_eq!(doc["data"]["ca.pem"], "PEM");
        assert_eq!(doc["metadata"]["namespace"], "isthmus-system");
        assert_eq!(doc["kind"], "ConfigMap");
    }

    #[test]
    fn the_ca_bundle_patch_sets_only_what_differs_and_pins_webhook_names() {
        let bundle = base64::engine::general_purpose::STANDARD.encode("CA");
        let config = json!({"webhooks": [
            {"name": "a.isthmus.io", "clientConfig": {"service": {"name": "x"}}},
            {"name": "b.isthmus.io", "clientConfig": {"caBundle": bundle}},
        ]});
        let patch = ca_bundle_patch(&config, "CA").unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/webhooks/0/name", "value": "a.isthmus.io"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle},
            ])
        );
        let done = json!({"webhooks": [{"name": "a", "clientConfig": {"caBundle": bundle}}]});
        assert_eq!(ca_bundle_patch(&done, "CA"), None);
        assert_eq!(ca_bundle_patch(&json!({}), "CA"), None);
    }
}
