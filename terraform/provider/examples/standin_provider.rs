//! A stand-in for the registry providers the modules use (hashicorp/helm, kubernetes, tls,
//! random), for tests only: the registry is out of reach on the machines that run them.
//!
//! It declares the part of each provider's schema the `isthmus-cluster` module and the
//! `three-clusters` example use, with the same attribute names, types and modes, and plans
//! as those providers do for a create: configuration as given, computed attributes unknown.
//! It never applies: `ApplyResourceChange` and `ReadDataSource` answer an error saying it is a
//! stand-in. Which provider it is comes from its file name (`terraform-provider-<name>`), so
//! one binary, copied under four names, serves `terraform validate` and `terraform plan` of
//! configurations wired through those modules (`tests/unknown_config.rs`).

use std::collections::BTreeMap;

use terraform_provider_isthmus::cty::{Type, Value};
use terraform_provider_isthmus::plugin::{serve, LaunchEnv};
use terraform_provider_isthmus::proto::tfplugin6 as pb;
use terraform_provider_isthmus::provider::{decode, encode};
use terraform_provider_isthmus::schema::{Attr, Block};
use tonic::{Request, Response, Status};

/// One stand-in provider: its block and its resource and data source schemas.
struct StandIn {
    provider: Block,
    resources: BTreeMap<&'static str, Block>,
    data_sources: BTreeMap<&'static str, Block>,
}

fn s() -> Type {
    Type::String
}

fn kubernetes_block() -> Block {
    Block::new(
        "",
        vec![
            Attr::optional("config_path", s(), ""),
            Attr::optional("config_context", s(), ""),
        ],
    )
}

fn metadata(labels: bool) -> Block {
    let mut attrs = vec![
        Attr::optional_computed("name", s(), ""),
        Attr::optional_computed("namespace", s(), ""),
    ];
    if labels {
        attrs.push(Attr::optional("labels", Type::map(s()), ""));
    }
    Block::new("", attrs)
}

fn stand_in(name: &str) -> Option<StandIn> {
    let none = || Block::new("", Vec::new());
    let id = || Attr::computed("id", s(), "");
    Some(match name {
        "helm" => StandIn {
            provider: none().with_list_block("kubernetes", kubernetes_block()),
            resources: BTreeMap::from([(
                "helm_release",
                Block::new(
                    "",
                    vec![
                        id(),
                        Attr::required("name", s(), ""),
                        Attr::optional_computed("namespace", s(), ""),
                        Attr::required("chart", s(), ""),
                        Attr::optional("wait", Type::Bool, ""),
                        Attr::optional("values", Type::list(s()), ""),
                        Attr::computed("status", s(), ""),
                    ],
                ),
            )]),
            data_sources: BTreeMap::new(),
        },
        "kubernetes" => StandIn {
            provider: kubernetes_block(),
            resources: BTreeMap::from([(
                "kubernetes_namespace",
                Block::new("", vec![id()]).with_list_block("metadata", metadata(true)),
            )]),
            data_sources: BTreeMap::from([(
                "kubernetes_service",
                Block::new(
                    "",
                    vec![
                        id(),
                        Attr::computed(
                            "status",
                            Type::list(Type::object([(
                                "load_balancer",
                                Type::list(Type::object([(
                                    "ingress",
                                    Type::list(Type::object([("ip", s()), ("hostname", s())])),
                                )])),
                            )])),
                            "",
                        ),
                    ],
                )
                .with_list_block("metadata", metadata(false)),
            )]),
        },
        "random" => StandIn {
            provider: none(),
            resources: BTreeMap::from([(
                "random_password",
                Block::new(
                    "",
                    vec![
                        id(),
                        Attr::required("length", Type::Number, ""),
                        Attr::optional("special", Type::Bool, ""),
                        Attr::computed("result", s(), "").sensitive(),
                    ],
                ),
            )]),
            data_sources: BTreeMap::new(),
        },
        "tls" => StandIn {
            provider: none(),
            resources: BTreeMap::from([
                (
                    "tls_private_key",
                    Block::new(
                        "",
                        vec![
                            id(),
                            Attr::required("algorithm", s(), ""),
                            Attr::optional("ecdsa_curve", s(), ""),
                            Attr::computed("private_key_pem", s(), "").sensitive(),
                            Attr::computed("private_key_pem_pkcs8", s(), "").sensitive(),
                            Attr::computed("public_key_pem", s(), ""),
                        ],
                    ),
                ),
                (
                    "tls_self_signed_cert",
                    Block::new(
                        "",
                        vec![
                            id(),
                            Attr::required("private_key_pem", s(), "").sensitive(),
                            Attr::optional("is_ca_certificate", Type::Bool, ""),
                            Attr::required("validity_period_hours", Type::Number, ""),
                            Attr::required("allowed_uses", Type::list(s()), ""),
                            Attr::computed("cert_pem", s(), ""),
                        ],
                    )
                    .with_list_block(
                        "subject",
                        Block::new(
                            "",
                            vec![
                                Attr::optional("common_name", s(), ""),
                                Attr::optional("organization", s(), ""),
                            ],
                        ),
                    ),
                ),
            ]),
            data_sources: BTreeMap::new(),
        },
        _ => return None,
    })
}

impl StandIn {
    fn resource(&self, name: &str) -> Result<&Block, Status> {
        self.resources
            .get(name)
            .ok_or_else(|| Status::not_found(format!("the stand-in has no resource {name:?}")))
    }
}

/// Sets every computed attribute (and optional-computed one left null) of `block` that the
/// value does not hold to unknown, in nested blocks too: a create's plan.
fn unknown_computed(block: &Block, value: &mut Value) {
    use terraform_provider_isthmus::schema::Mode;
    for attr in &block.attrs {
        let unset = value.get(attr.name).is_null();
        let computed = matches!(attr.mode, Mode::Computed | Mode::OptionalComputed);
        if computed && unset {
            value.set(attr.name, Value::Unknown);
        }
    }
    for nested in &block.blocks {
        if let Value::List(items) = value.get(nested.name).clone() {
            let items = items
                .into_iter()
                .map(|mut item| {
                    unknown_computed(&nested.block, &mut item);
                    item
                })
                .collect();
            value.set(nested.name, Value::List(items));
        }
    }
}

fn refuse(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what}: this is a test stand-in for a registry provider; it plans, never applies"
    ))
}

#[tonic::async_trait]
impl pb::provider_server::Provider for StandIn {
    async fn get_provider_schema(
        &self,
        _request: Request<pb::GetProviderSchemaRequest>,
    ) -> Result<Response<pb::GetProviderSchemaResponse>, Status> {
        Ok(Response::new(pb::GetProviderSchemaResponse {
            provider: Some(self.provider.schema()),
            resource_schemas: self
                .resources
                .iter()
                .map(|(n, b)| (n.to_string(), b.schema()))
                .collect(),
            data_source_schemas: self
                .data_sources
                .iter()
                .map(|(n, b)| (n.to_string(), b.schema()))
                .collect(),
            diagnostics: Vec::new(),
            provider_meta: None,
        }))
    }

    async fn validate_provider_config(
        &self,
        request: Request<pb::ValidateProviderConfigRequest>,
    ) -> Result<Response<pb::ValidateProviderConfigResponse>, Status> {
        decode(request.get_ref().config.as_ref(), &self.provider.ty())?;
        Ok(Response::new(pb::ValidateProviderConfigResponse {
            diagnostics: Vec::new(),
        }))
    }

    async fn validate_resource_config(
        &self,
        request: Request<pb::ValidateResourceConfigRequest>,
    ) -> Result<Response<pb::ValidateResourceConfigResponse>, Status> {
        let r = request.get_ref();
        decode(r.config.as_ref(), &self.resource(&r.type_name)?.ty())?;
        Ok(Response::new(pb::ValidateResourceConfigResponse {
            diagnostics: Vec::new(),
        }))
    }

    async fn validate_data_resource_config(
        &self,
        request: Request<pb::ValidateDataResourceConfigRequest>,
    ) -> Result<Response<pb::ValidateDataResourceConfigResponse>, Status> {
        let r = request.get_ref();
        let block = self
            .data_sources
            .get(r.type_name.as_str())
            .ok_or_else(|| Status::not_found(r.type_name.clone()))?;
        decode(r.config.as_ref(), &block.ty())?;
        Ok(Response::new(pb::ValidateDataResourceConfigResponse {
            diagnostics: Vec::new(),
        }))
    }

    async fn upgrade_resource_state(
        &self,
        _request: Request<pb::UpgradeResourceStateRequest>,
    ) -> Result<Response<pb::UpgradeResourceStateResponse>, Status> {
        Err(refuse("UpgradeResourceState"))
    }

    async fn configure_provider(
        &self,
        request: Request<pb::ConfigureProviderRequest>,
    ) -> Result<Response<pb::ConfigureProviderResponse>, Status> {
        decode(request.get_ref().config.as_ref(), &self.provider.ty())?;
        Ok(Response::new(pb::ConfigureProviderResponse {
            diagnostics: Vec::new(),
        }))
    }

    async fn read_resource(
        &self,
        request: Request<pb::ReadResourceRequest>,
    ) -> Result<Response<pb::ReadResourceResponse>, Status> {
        let r = request.get_ref();
        Ok(Response::new(pb::ReadResourceResponse {
            new_state: r.current_state.clone(),
            diagnostics: Vec::new(),
            private: r.private.clone(),
        }))
    }

    async fn plan_resource_change(
        &self,
        request: Request<pb::PlanResourceChangeRequest>,
    ) -> Result<Response<pb::PlanResourceChangeResponse>, Status> {
        let r = request.get_ref();
        let block = self.resource(&r.type_name)?;
        let ty = block.ty();
        let mut planned = decode(r.proposed_new_state.as_ref(), &ty)?;
        if !planned.is_null() {
            unknown_computed(block, &mut planned);
        }
        Ok(Response::new(pb::PlanResourceChangeResponse {
            planned_state: Some(encode(&planned, &ty)?),
            requires_replace: Vec::new(),
            planned_private: r.prior_private.clone(),
            diagnostics: Vec::new(),
        }))
    }

    async fn apply_resource_change(
        &self,
        _request: Request<pb::ApplyResourceChangeRequest>,
    ) -> Result<Response<pb::ApplyResourceChangeResponse>, Status> {
        Err(refuse("ApplyResourceChange"))
    }

    async fn import_resource_state(
        &self,
        _request: Request<pb::ImportResourceStateRequest>,
    ) -> Result<Response<pb::ImportResourceStateResponse>, Status> {
        Err(refuse("ImportResourceState"))
    }

    async fn read_data_source(
        &self,
        _request: Request<pb::ReadDataSourceRequest>,
    ) -> Result<Response<pb::ReadDataSourceResponse>, Status> {
        Err(refuse("ReadDataSource"))
    }

    async fn stop_provider(
        &self,
        _request: Request<pb::StopProviderRequest>,
    ) -> Result<Response<pb::StopProviderResponse>, Status> {
        Ok(Response::new(pb::StopProviderResponse {
            error: String::new(),
        }))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let exe = std::env::args().next().unwrap_or_default();
    let file = std::path::Path::new(&exe)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default()
        .to_string();
    let name = file.strip_prefix("terraform-provider-").unwrap_or(&file);
    let Some(provider) = stand_in(name) else {
        eprintln!("standin_provider: no stand-in for {file:?} (helm, kubernetes, random, tls)");
        return std::process::ExitCode::FAILURE;
    };
    match serve(&LaunchEnv::from_process(), provider).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("standin_provider: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
