//! The control plane's own certificates in the cluster: ConfigMap isthmus-ca-root and the
//! injection webhook's caBundle, kept right against the test API server.

use std::time::Duration;

use base64::Engine;
use isthmus_control::kubernetes::publish::{run, Publish};
use isthmus_control::kubernetes::KubeSource;
use serde_json::json;

use super::eventually;
use isthmus_testkit::kube_api::KubeApi;

fn webhook_configuration(bundle: Option<&str>) -> serde_json::Value {
    let mut client = json!({"service": {"name": "isthmus-control", "namespace": "isthmus-system", "path": "/inject", "port": 443}});
    if let Some(b) = bundle {
        client["caBundle"] = json!(b);
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "isthmus-sidecar-injector"},
        "webhooks": [{
            "name": "sidecar-injector.isthmus.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": client,
        }],
    })
}

#[tokio::test]
async fn the_ca_root_configmap_and_the_webhook_ca_bundle_are_published_and_kept() {
    isthmus_core::install_crypto_provider();
    let api = KubeApi::start().await;
    api.put(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "isthmus-system"}}),
    );
    api.put(webhook_configuration(Some("c3RhbGU=")));
    let ca = isthmus_core::ca::CertificateAuthority::generate("east.isthmus.local").unwrap();
    let mut source = KubeSource::new(api.client());
    source.retry = Duration::from_millis(100);
    source.resync = Duration::from_millis(300);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(run(
        source,
        Publish {
            ca_root: Some(("isthmus-system".into(), "isthmus-ca-root".into())),
            webhook_configuration: Some("isthmus-sidecar-injector".into()),
            ca_pem: ca.cert_pem().to_string(),
        },
        stop,
    ));
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());

    let webhook = || {
        api.get(
            "MutatingWebhookConfiguration",
            "",
            "isthmus-sidecar-injector",
        )
    };
    let published = eventually("the CA root ConfigMap", || {
        api.get("ConfigMap", "isthmus-system", "isthmus-ca-root")
    })
    .await;
    assert_eq!(published["data"]["ca.pem"], ca.cert_pem());
    eventually("the webhook's caBundle", || {
        let w = webhook()?;
        (w["webhooks"][0]["clientConfig"]["caBundle"] == bundle).then_some(())
    })
    .await;
    // The rest of the webhook is untouched.
    let w = webhook().unwrap();
    assert_eq!(
        w["webhooks"][0]["clientConfig"]["service"]["path"],
        "/inject"
    );

    // Someone resets the caBundle and deletes the ConfigMap: both come back on the resync.
    api.put(webhook_configuration(None));
    assert!(api.remove("ConfigMap", "isthmus-system", "isthmus-ca-root"));
    eventually("the caBundle restored", || {
        let w = webhook()?;
        (w["webhooks"][0]["clientConfig"]["caBundle"] == bundle).then_some(())
    })
    .await;
    eventually("the ConfigMap restored", || {
        api.get("ConfigMap", "isthmus-system", "isthmus-ca-root")
    })
    .await;
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the publisher stops")
        .unwrap();
}
