//! `data "isthmus_services"`: the services exported into the mesh, from every cluster's
//! `exports/<ns>/<svc>/<cluster>` records, one entry per service.

use std::collections::BTreeMap;

use isthmus_control::records::{ExportRecord, EXPORTS_PREFIX};

use crate::contract::{Conn, DataSource};
use crate::cty::{Type, Value};
use crate::diag::{Diag, Diags};
use crate::schema::{Attr, Block};

pub struct ServicesData;

fn service_type() -> Type {
    Type::object([
        ("namespace", Type::String),
        ("name", Type::String),
        ("clusters", Type::list(Type::String)),
        (
            "ports",
            Type::list(Type::object([
                ("name", Type::String),
                ("port", Type::Number),
                ("protocol", Type::String),
            ])),
        ),
        ("endpoints", Type::Number),
        ("healthy_endpoints", Type::Number),
    ])
}

/// One entry per service: the clusters exporting it, the first exporter's ports, and the
/// endpoint counts summed over clusters.
pub fn summarize(exports: &[ExportRecord], namespace: Option<&str>) -> Vec<Value> {
    let mut by_service: BTreeMap<(String, String), Vec<&ExportRecord>> = BTreeMap::new();
    for x in exports {
        if namespace.is_some_and(|ns| ns != x.namespace) {
            continue;
        }
        by_service
            .entry((x.namespace.clone(), x.name.clone()))
            .or_default()
            .push(x);
    }
    by_service
        .into_iter()
        .map(|((ns, name), mut xs)| {
            xs.sort_by(|a, b| a.cluster.cmp(&b.cluster));
            let ports = xs[0]
                .ports
                .iter()
                .map(|p| {
                    let protocol = serde_json::to_value(p.protocol)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    Value::Object(BTreeMap::from([
                        ("name".to_string(), Value::str(p.name.clone())),
                        ("port".to_string(), Value::Number(f64::from(p.port))),
                        ("protocol".to_string(), Value::str(protocol)),
                    ]))
                })
                .collect();
            Value::Object(BTreeMap::from([
                ("namespace".to_string(), Value::str(ns)),
                ("name".to_string(), Value::str(name)),
                (
                    "clusters".to_string(),
                    Value::strings(xs.iter().map(|x| x.cluster.clone())),
                ),
                ("ports".to_string(), Value::List(ports)),
                (
                    "endpoints".to_string(),
                    Value::Number(xs.iter().map(|x| f64::from(x.endpoints)).sum()),
                ),
                (
                    "healthy_endpoints".to_string(),
                    Value::Number(xs.iter().map(|x| f64::from(x.healthy_endpoints)).sum()),
                ),
            ]))
        })
        .collect()
}

#[tonic::async_trait]
impl DataSource for ServicesData {
    fn type_name(&self) -> &'static str {
        "isthmus_services"
    }

    fn schema(&self) -> Block {
        Block::new(
            "The services exported into the mesh.",
            vec![
                Attr::optional(
                    "namespace",
                    Type::String,
                    "Only services of this namespace.",
                ),
                Attr::computed(
                    "services",
                    Type::list(service_type()),
                    "One entry per service, by namespace and name.",
                ),
            ],
        )
    }

    fn validate(&self, _config: &Value) -> Diags {
        Vec::new()
    }

    async fn read(&self, conn: &Conn, config: &Value) -> Result<Value, Diags> {
        let mut kv = conn.kv().await?;
        let (_, records) = kv
            .list(EXPORTS_PREFIX, false)
            .await
            .map_err(|e| vec![Diag::error("Listing the exports failed", e.to_string())])?;
        let exports: Vec<ExportRecord> = records
            .iter()
            .filter_map(|(_, r)| serde_json::from_slice(&r.value).ok())
            .collect();
        let mut state = config.clone();
        state.set(
            "services",
            Value::List(summarize(&exports, config.get("namespace").as_str())),
        );
        Ok(state)
    }
}
