//! The Multi-Cluster Services API's resources (`multicluster.x-k8s.io/v1alpha1`), as kube-rs
//! resources: [`ServiceExport`] (the user's "export this Service") and [`ServiceImport`]
//! (what the control plane writes where a service is imported).
//!
//! The `kube::Resource` impls are written out rather than derived, which keeps `kube-derive`
//! and `schemars` out of the build; the CRDs themselves are the upstream ones (installed by
//! the chart), so no schema is generated here.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

/// The API group and version of the MCS API.
pub const GROUP: &str = "multicluster.x-k8s.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "multicluster.x-k8s.io/v1alpha1";

/// The label the control plane puts on every ServiceImport it manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "isthmus";

/// Condition types and reasons on a ServiceExport's status (KEP-1645).
pub const CONDITION_VALID: &str = "Valid";
pub const CONDITION_CONFLICT: &str = "Conflict";

/// `ServiceExport`: a Service of the same namespace and name is exported while it exists.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExport {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceExportStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExportStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// `ServiceImport`: a service imported from the clusterset, with its ClusterSetIP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImport {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceImportSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceImportPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

impl ServiceImport {
    /// A ServiceImport as the control plane applies it (labelled as ours).
    pub fn new(namespace: &str, name: &str, spec: ServiceImportSpec) -> Self {
        ServiceImport {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_string(),
                    MANAGED_BY.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec,
        }
    }

    /// Whether the control plane manages this ServiceImport.
    pub fn is_ours(&self) -> bool {
        self.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY)
    }
}

macro_rules! mcs_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

mcs_resource!(ServiceExport, "ServiceExport", "serviceexports");
mcs_resource!(ServiceImport, "ServiceImport", "serviceimports");
