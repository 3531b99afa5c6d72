//! The `tfplugin6.Provider` service: decodes Terraform's requests with the schemas, hands
//! them to the resource or data source they name, and encodes the answers.
//!
//! Terraform calls, per run: `GetProviderSchema`, the `Validate*` calls (before the provider
//! is configured: checks there are offline), `ConfigureProvider`, then per resource
//! `UpgradeResourceState` + `ReadResource` (refresh), `PlanResourceChange`, and on apply
//! `ApplyResourceChange`. `ImportResourceState` is followed by a `ReadResource`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use isthmus_core::client::ControlClient;
use tonic::{Request, Response, Status};

use crate::contract::{Conn, DataSource, Resource};
use crate::cty::{self, Type, Value};
use crate::diag::{self, Diag, Diags};
use crate::proto::tfplugin6 as pb;
use crate::schema::{Attr, Block};

/// The provider: its resources, data sources and, once configured, its connections.
pub struct IsthmusProvider {
    resources: BTreeMap<&'static str, Arc<dyn Resource>>,
    data_sources: BTreeMap<&'static str, Arc<dyn DataSource>>,
    conn: RwLock<Configured>,
}

/// What `ConfigureProvider` left the provider with.
#[derive(Clone, Default)]
enum Configured {
    /// Not called yet.
    #[default]
    No,
    /// Called during a plan with a configuration that depends on values not known until
    /// apply (another resource's or a module's output): planning works without the mesh, a
    /// refresh keeps the stored state, and Terraform configures the provider again with the
    /// values known before it applies anything.
    Unknown(Vec<&'static str>),
    Yes(Conn),
}

/// The control plane the provider uses when neither `control` nor `$ISTHMUS_CONTROL` is set.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:15012";

/// The provider block's attributes.
const PROVIDER_ATTRIBUTES: [&str; 4] = [
    "control",
    "ca_certificate",
    "client_certificate",
    "client_key",
];

fn provider_block() -> Block {
    Block::new(
        "Isthmus: a multi-cluster service mesh. The provider talks to one cluster's control \
         plane over TLS: policies, and the federation's membership and records.",
        vec![
            Attr::optional(
                "control",
                Type::String,
                "A control plane's API address, host:port or https://host:port (default $ISTHMUS_CONTROL, else 127.0.0.1:15012).",
            ),
            Attr::optional(
                "ca_certificate",
                Type::String,
                "PEM of the cluster CA that the control plane's API certificate chains to (its <dataDir>/ca.pem, or the isthmus-cluster module's trust_bundle output). Default: the file $ISTHMUS_CA_FILE names.",
            ),
            Attr::optional(
                "client_certificate",
                Type::String,
                "PEM of an operator credential's certificate (`isthmus credentials issue --role admin`), presented to the control plane: reads need a viewer, policies and membership a mesh admin. Default: the file $ISTHMUS_CERT names.",
            ),
            Attr::optional(
                "client_key",
                Type::String,
                "PEM of the credential's private key. Default: the file $ISTHMUS_KEY names.",
            )
            .sensitive(),
        ],
    )
}

impl IsthmusProvider {
    pub fn new(resources: Vec<Arc<dyn Resource>>, data_sources: Vec<Arc<dyn DataSource>>) -> Self {
        IsthmusProvider {
            resources: resources.into_iter().map(|r| (r.type_name(), r)).collect(),
            data_sources: data_sources
                .into_iter()
                .map(|d| (d.type_name(), d))
                .collect(),
            conn: RwLock::new(Configured::No),
        }
    }

    /// Every resource and data source of Isthmus.
    pub fn standard() -> Self {
        IsthmusProvider::new(
            vec![
                Arc::new(crate::resources::cluster::ClusterResource),
                Arc::new(crate::resources::failover::FailoverPolicyResource),
                Arc::new(crate::resources::policy::PolicyResource),
            ],
            vec![
                Arc::new(crate::data::federation::FederationData),
                Arc::new(crate::data::services::ServicesData),
            ],
        )
    }

    fn resource(&self, name: &str) -> Result<&Arc<dyn Resource>, Status> {
        self.resources
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no resource type {name:?}")))
    }

    fn data_source(&self, name: &str) -> Result<&Arc<dyn DataSource>, Status> {
        self.data_sources
            .get(name)
            .ok_or_else(|| Status::not_found(format!("no data source {name:?}")))
    }

    fn configured(&self) -> Configured {
        self.conn.read().map(|c| c.clone()).unwrap_or_default()
    }

    fn conn(&self) -> Result<Conn, Diags> {
        match self.configured() {
            Configured::Yes(conn) => Ok(conn),
            Configured::No => Err(vec![Diag::error(
                "The provider is not configured",
                "Terraform did not call ConfigureProvider before using it",
            )]),
            Configured::Unknown(attrs) => Err(vec![Diag::error(
                "The provider's configuration is not known yet",
                format!(
                    "{} of the provider \"isthmus\" block depend on values known only after \
                     apply, and this operation needs the control plane: apply what they depend \
                     on first (terraform apply -target=...), or give them known values",
                    attrs.join(", ")
                ),
            )]),
        }
    }
}

/// Checks the provider's own attributes (offline).
fn validate_provider(config: &Value) -> Diags {
    let mut diags = Vec::new();
    if let Some(addr) = config.get("control").as_str() {
        if let Err(message) = check_host_port(addr) {
            diags.push(Diag::error("Invalid control address", message).at("control"));
        }
    }
    if let Some(pem) = config.get("ca_certificate").as_str() {
        if let Err(e) = isthmus_core::api_tls::client_config(pem) {
            diags.push(
                Diag::error(
                    "Invalid ca_certificate",
                    format!("expected the PEM of one or more CA certificates: {e}"),
                )
                .at("ca_certificate"),
            );
        }
    }
    diags
}

fn check_host_port(addr: &str) -> Result<(), String> {
    let addr = addr.strip_prefix("https://").unwrap_or(addr);
    if addr.contains("://") {
        return Err(format!(
            "{addr:?}: the Isthmus control-plane API is TLS only; give host:port or https://host:port"
        ));
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{addr:?} is not host:port, e.g. 127.0.0.1:15012")),
    }
}

/// The CA to trust: `ca_certificate`, else the file `$ISTHMUS_CA_FILE` names.
fn ca_pem(config: &Value) -> Result<String, Diag> {
    if let Some(pem) = config.get("ca_certificate").as_str() {
        return Ok(pem.to_string());
    }
    let Some(file) = std::env::var_os("ISTHMUS_CA_FILE") else {
        return Err(Diag::error(
            "Missing ca_certificate",
            "The Isthmus control-plane API is TLS only: set ca_certificate to the cluster CA's \
             PEM (e.g. file(\"<dataDir>/ca.pem\")), or $ISTHMUS_CA_FILE to its path",
        )
        .at("ca_certificate"));
    };
    let pem = std::fs::read_to_string(&file).map_err(|e| {
        Diag::error(
            "Unreadable $ISTHMUS_CA_FILE",
            format!("reading {}: {e}", std::path::Path::new(&file).display()),
        )
    })?;
    isthmus_core::api_tls::client_config(&pem).map_err(|e| {
        Diag::error(
            "Invalid $ISTHMUS_CA_FILE",
            format!(
                "{} holds no usable CA certificate: {e}",
                std::path::Path::new(&file).display()
            ),
        )
    })?;
    Ok(pem)
}

/// The operator credential to present: `client_certificate` and `client_key`, else the files
/// `$ISTHMUS_CERT` and `$ISTHMUS_KEY` name; `None` when neither is given (the control plane
/// then refuses everything but reads of nothing: UNAUTHENTICATED).
fn credential(config: &Value) -> Result<Option<Arc<isthmus_core::tls::StaticClientCert>>, Diag> {
    let from = |attr: &'static str, env: &str| -> Result<Option<String>, Diag> {
        if let Some(pem) = config.get(attr).as_str() {
            return Ok(Some(pem.to_string()));
        }
        let Some(file) = std::env::var_os(env) else {
            return Ok(None);
        };
        std::fs::read_to_string(&file).map(Some).map_err(|e| {
            Diag::error(
                format!("Unreadable ${env}"),
                format!("reading {}: {e}", std::path::Path::new(&file).display()),
            )
        })
    };
    match (
        from("client_certificate", "ISTHMUS_CERT")?,
        from("client_key", "ISTHMUS_KEY")?,
    ) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => isthmus_core::tls::StaticClientCert::from_pem(&cert, &key)
            .map(Some)
            .map_err(|e| {
                Diag::error(
                    "Invalid client_certificate or client_key",
                    format!("expected an operator credential's certificate and key PEM: {e}"),
                )
                .at("client_certificate")
            }),
        (Some(_), None) => Err(Diag::error(
            "Missing client_key",
            "client_certificate is set; client_key (or $ISTHMUS_KEY) must be too",
        )
        .at("client_key")),
        (None, Some(_)) => Err(Diag::error(
            "Missing client_certificate",
            "client_key is set; client_certificate (or $ISTHMUS_CERT) must be too",
        )
        .at("client_certificate")),
    }
}

/// Decodes a `DynamicValue` (MessagePack, or JSON) of type `ty`.
pub fn decode(dv: Option<&pb::DynamicValue>, ty: &Type) -> Result<Value, Status> {
    let Some(dv) = dv else {
        return Ok(Value::Null);
    };
    let decoded = if !dv.msgpack.is_empty() {
        // TF_PROVIDER_ISTHMUS_LOG=trace shows what Terraform sent, byte for byte.
        tracing::trace!(
            msgpack = %dv.msgpack.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "decoding a value"
        );
        cty::from_msgpack(&dv.msgpack, ty)
    } else if !dv.json.is_empty() {
        cty::from_json(&dv.json, ty)
    } else {
        return Ok(Value::Null);
    };
    decoded.map_err(|e| Status::invalid_argument(format!("undecodable value: {e}")))
}

/// Encodes a value of type `ty` as a MessagePack `DynamicValue`.
pub fn encode(value: &Value, ty: &Type) -> Result<pb::DynamicValue, Status> {
    let msgpack = cty::to_msgpack(value, ty)
        .map_err(|e| Status::internal(format!("the provider built an invalid value: {e}")))?;
    Ok(pb::DynamicValue {
        msgpack,
        json: Vec::new(),
    })
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::provider_server::Provider for IsthmusProvider {
    async fn get_provider_schema(
        &self,
        _request: Request<pb::GetProviderSchemaRequest>,
    ) -> Answer<pb::GetProviderSchemaResponse> {
        Ok(Response::new(pb::GetProviderSchemaResponse {
            provider: Some(provider_block().schema()),
            resource_schemas: self
                .resources
                .iter()
                .map(|(name, r)| (name.to_string(), r.schema().schema()))
                .collect(),
            data_source_schemas: self
                .data_sources
                .iter()
                .map(|(name, d)| (name.to_string(), d.schema().schema()))
                .collect(),
            diagnostics: Vec::new(),
            provider_meta: None,
        }))
    }

    async fn validate_provider_config(
        &self,
        request: Request<pb::ValidateProviderConfigRequest>,
    ) -> Answer<pb::ValidateProviderConfigResponse> {
        let config = decode(request.get_ref().config.as_ref(), &provider_block().ty())?;
        Ok(Response::new(pb::ValidateProviderConfigResponse {
            diagnostics: diag::to_proto(&validate_provider(&config)),
        }))
    }

    async fn validate_resource_config(
        &self,
        request: Request<pb::ValidateResourceConfigRequest>,
    ) -> Answer<pb::ValidateResourceConfigResponse> {
        let r = request.get_ref();
        let resource = self.resource(&r.type_name)?;
        let config = decode(r.config.as_ref(), &resource.schema().ty())?;
        Ok(Response::new(pb::ValidateResourceConfigResponse {
            diagnostics: diag::to_proto(&resource.validate(&config)),
        }))
    }

    async fn validate_data_resource_config(
        &self,
        request: Request<pb::ValidateDataResourceConfigRequest>,
    ) -> Answer<pb::ValidateDataResourceConfigResponse> {
        let r = request.get_ref();
        let data = self.data_source(&r.type_name)?;
        let config = decode(r.config.as_ref(), &data.schema().ty())?;
        Ok(Response::new(pb::ValidateDataResourceConfigResponse {
            diagnostics: diag::to_proto(&data.validate(&config)),
        }))
    }

    async fn upgrade_resource_state(
        &self,
        request: Request<pb::UpgradeResourceStateRequest>,
    ) -> Answer<pb::UpgradeResourceStateResponse> {
        let r = request.get_ref();
        let ty = self.resource(&r.type_name)?.schema().ty();
        // Schema version 0 is the only one so far: the stored JSON is read with the current
        // schema (attributes it lacks are null).
        let json = r
            .raw_state
            .as_ref()
            .map(|s| s.json.as_slice())
            .unwrap_or_default();
        let (state, diagnostics) = if json.is_empty() {
            (Value::Null, Vec::new())
        } else {
            match cty::from_json(json, &ty) {
                Ok(v) => (v, Vec::new()),
                Err(e) => (
                    Value::Null,
                    vec![Diag::error("Unreadable stored state", e.to_string())],
                ),
            }
        };
        Ok(Response::new(pb::UpgradeResourceStateResponse {
            upgraded_state: Some(encode(&state, &ty)?),
            diagnostics: diag::to_proto(&diagnostics),
        }))
    }

    async fn configure_provider(
        &self,
        request: Request<pb::ConfigureProviderRequest>,
    ) -> Answer<pb::ConfigureProviderResponse> {
        let config = decode(request.get_ref().config.as_ref(), &provider_block().ty())?;
        let unknown: Vec<&'static str> = PROVIDER_ATTRIBUTES
            .into_iter()
            .filter(|attr| !config.get(attr).is_wholly_known())
            .collect();
        if !unknown.is_empty() {
            // Validation that needs these values waits until Terraform configures the
            // provider again with them known.
            if let Ok(mut slot) = self.conn.write() {
                *slot = Configured::Unknown(unknown);
            }
            return Ok(Response::new(pb::ConfigureProviderResponse {
                diagnostics: diag::to_proto(&validate_provider(&config)),
            }));
        }
        let mut diags = validate_provider(&config);
        let pick = |attr: &str, env: &str, default: &str| {
            config
                .get(attr)
                .as_str()
                .map(str::to_string)
                .or_else(|| std::env::var(env).ok())
                .unwrap_or_else(|| default.to_string())
        };
        let control_addr = pick("control", "ISTHMUS_CONTROL", DEFAULT_CONTROL);
        if diags.is_empty() {
            match ca_pem(&config).and_then(|pem| {
                let client = match credential(&config)? {
                    Some(credential) => {
                        ControlClient::authenticated(&control_addr, &pem, credential)
                    }
                    None => ControlClient::new(&control_addr, &pem),
                };
                client.map_err(|e| {
                    Diag::error("Invalid control address", e.to_string()).at("control")
                })
            }) {
                Ok(control) => {
                    if let Ok(mut slot) = self.conn.write() {
                        *slot = Configured::Yes(Conn {
                            control,
                            control_addr,
                        });
                    }
                }
                Err(diag) => diags.push(diag),
            }
        }
        Ok(Response::new(pb::ConfigureProviderResponse {
            diagnostics: diag::to_proto(&diags),
        }))
    }

    async fn read_resource(
        &self,
        request: Request<pb::ReadResourceRequest>,
    ) -> Answer<pb::ReadResourceResponse> {
        let r = request.get_ref();
        let resource = self.resource(&r.type_name)?;
        let ty = resource.schema().ty();
        let state = decode(r.current_state.as_ref(), &ty)?;
        let (new_state, diags) = if state.is_null() {
            (Value::Null, Vec::new())
        } else if let Configured::Unknown(attrs) = self.configured() {
            // A plan whose provider configuration waits on other changes: keep what is
            // stored (the apply configures the provider with known values and reads then).
            (
                state,
                vec![Diag::warning(
                    "Not refreshed",
                    format!(
                        "{} of the provider \"isthmus\" block are not known until apply, so \
                         the stored state was planned against without reading the mesh",
                        attrs.join(", ")
                    ),
                )],
            )
        } else {
            match self.conn() {
                Ok(conn) => match resource.read(&conn, &state).await {
                    Ok(Some(v)) => (v, Vec::new()),
                    Ok(None) => (Value::Null, Vec::new()),
                    Err(diags) => (state, diags),
                },
                Err(diags) => (state, diags),
            }
        };
        Ok(Response::new(pb::ReadResourceResponse {
            new_state: Some(encode(&new_state, &ty)?),
            diagnostics: diag::to_proto(&diags),
            private: r.private.clone(),
        }))
    }

    async fn plan_resource_change(
        &self,
        request: Request<pb::PlanResourceChangeRequest>,
    ) -> Answer<pb::PlanResourceChangeResponse> {
        let r = request.get_ref();
        let resource = self.resource(&r.type_name)?;
        let ty = resource.schema().ty();
        let prior = decode(r.prior_state.as_ref(), &ty)?;
        let proposed = decode(r.proposed_new_state.as_ref(), &ty)?;
        if proposed.is_null() {
            // A destroy: nothing to plan.
            return Ok(Response::new(pb::PlanResourceChangeResponse {
                planned_state: Some(encode(&Value::Null, &ty)?),
                requires_replace: Vec::new(),
                planned_private: r.prior_private.clone(),
                diagnostics: Vec::new(),
            }));
        }
        let prior = (!prior.is_null()).then_some(prior);
        let (planned, replace, diags) = match resource.plan(prior.as_ref(), proposed.clone()) {
            Ok(p) => (p.state, p.requires_replace, Vec::new()),
            Err(diags) => (proposed, Vec::new(), diags),
        };
        Ok(Response::new(pb::PlanResourceChangeResponse {
            planned_state: Some(encode(&planned, &ty)?),
            requires_replace: replace.into_iter().map(diag::attr_path).collect(),
            planned_private: r.prior_private.clone(),
            diagnostics: diag::to_proto(&diags),
        }))
    }

    async fn apply_resource_change(
        &self,
        request: Request<pb::ApplyResourceChangeRequest>,
    ) -> Answer<pb::ApplyResourceChangeResponse> {
        let r = request.get_ref();
        let resource = self.resource(&r.type_name)?;
        let ty = resource.schema().ty();
        let prior = decode(r.prior_state.as_ref(), &ty)?;
        let planned = decode(r.planned_state.as_ref(), &ty)?;
        let (new_state, diags) = match self.conn() {
            Err(diags) => (prior, diags),
            Ok(conn) => match (prior.is_null(), planned.is_null()) {
                (_, true) => match resource.delete(&conn, &prior).await {
                    Ok(()) => (Value::Null, Vec::new()),
                    Err(diags) => (prior, diags),
                },
                (true, false) => match resource.create(&conn, &planned).await {
                    Ok(v) => (v, Vec::new()),
                    Err(f) => (f.state.unwrap_or(Value::Null), f.diags),
                },
                (false, false) => match resource.update(&conn, &prior, &planned).await {
                    Ok(v) => (v, Vec::new()),
                    Err(f) => (f.state.unwrap_or(prior), f.diags),
                },
            },
        };
        Ok(Response::new(pb::ApplyResourceChangeResponse {
            new_state: Some(encode(&new_state, &ty)?),
            private: Vec::new(),
            diagnostics: diag::to_proto(&diags),
        }))
    }

    async fn import_resource_state(
        &self,
        request: Request<pb::ImportResourceStateRequest>,
    ) -> Answer<pb::ImportResourceStateResponse> {
        let r = request.get_ref();
        let resource = self.resource(&r.type_name)?;
        let ty = resource.schema().ty();
        let result = match self.conn() {
            Ok(conn) => resource.import(&conn, &r.id).await,
            Err(diags) => Err(diags),
        };
        let (imported, diags) = match result {
            Ok(state) => (
                vec![pb::ImportedResource {
                    type_name: r.type_name.clone(),
                    state: Some(encode(&state, &ty)?),
                    private: Vec::new(),
                }],
                Vec::new(),
            ),
            Err(diags) => (Vec::new(), diags),
        };
        Ok(Response::new(pb::ImportResourceStateResponse {
            imported_resources: imported,
            diagnostics: diag::to_proto(&diags),
        }))
    }

    async fn read_data_source(
        &self,
        request: Request<pb::ReadDataSourceRequest>,
    ) -> Answer<pb::ReadDataSourceResponse> {
        let r = request.get_ref();
        let data = self.data_source(&r.type_name)?;
        let ty = data.schema().ty();
        let config = decode(r.config.as_ref(), &ty)?;
        let (state, diags) = match self.conn() {
            Ok(conn) => match data.read(&conn, &config).await {
                Ok(v) => (v, Vec::new()),
                Err(diags) => (Value::Null, diags),
            },
            Err(diags) => (Value::Null, diags),
        };
        Ok(Response::new(pb::ReadDataSourceResponse {
            state: Some(encode(&state, &ty)?),
            diagnostics: diag::to_proto(&diags),
        }))
    }

    async fn stop_provider(
        &self,
        _request: Request<pb::StopProviderRequest>,
    ) -> Answer<pb::StopProviderResponse> {
        // Every operation is a bounded request to the mesh; there is nothing long-running
        // to interrupt.
        Ok(Response::new(pb::StopProviderResponse {
            error: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_attributes_are_checked_offline_and_named() {
        let mut config = Value::Object(BTreeMap::new());
        config.set("control", Value::str("http://10.0.0.1:15012"));
        config.set("ca_certificate", Value::str("not a certificate"));
        let diags = validate_provider(&config);
        assert_eq!(diags.len(), 2);
        assert_eq!(diags[0].path_string(), "control");
        assert!(diags[0].detail.contains("TLS only"), "{}", diags[0].detail);
        assert_eq!(diags[1].path_string(), "ca_certificate");
        let ca = isthmus_core::ca::CertificateAuthority::generate("east.isthmus.local").unwrap();
        for good in ["isthmus.example:15012", "https://10.0.0.1:15012"] {
            config.set("control", Value::str(good));
            config.set("ca_certificate", Value::str(ca.cert_pem()));
            assert!(validate_provider(&config).is_empty(), "{good}");
        }
    }
}
