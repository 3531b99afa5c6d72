//! `isthmus_failover_policy`: a `FailoverPolicy` (docs/failover.md) with Terraform-shaped
//! attributes: one `priority` block per priority, in order.
//!
//! ```hcl
//! resource "isthmus_failover_policy" "details" {
//!   name                = "details"
//!   service             = "details"
//!   priority { clusters = ["west"] }
//!   priority { by_locality = true }
//!   min_healthy_percent = 50
//!   hysteresis          = "10s"
//!   on_partition        = "keepLastKnown"   # or withdraw_after = "30s"
//! }
//! ```
//!
//! The attributes map one to one onto the stored document, so what is read back equals
//! what was written and a change made with the CLI shows as drift on the attribute it
//! touched. Validation is the control plane's own, with its field paths translated to the
//! attributes (`spec.priorities[1].byLocality` → `priority[1].by_locality`).
//! Import ID: `namespace/name` (or `name` in `default`).

use std::collections::BTreeMap;

use isthmus_core::policy::isthmus::{
    FailoverPolicySpec, OnPartitionSpec, PriorityEntry, WithdrawAfter,
};
use isthmus_core::policy::{Kind, Policy, PolicyError, Spec};

use crate::contract::{Conn, Failure, Planned, Resource};
use crate::cty::{Type, Value};
use crate::diag::{Diag, Diags, Step};
use crate::resources::changed;
use crate::schema::{Attr, Block};

pub struct FailoverPolicyResource;

const API_VERSION: &str = "isthmus.io/v1alpha1";
const SOURCE: &str = "isthmus_failover_policy";

fn invalid(attr: &str, detail: impl Into<String>) -> Diag {
    Diag::error(format!("Invalid {attr}"), detail).at(attr)
}

/// The list of strings at `attr` of a priority block; Err when given but empty.
fn names(block: &Value, index: usize, attr: &str, diags: &mut Diags) -> Vec<String> {
    match block.get(attr).as_list() {
        None => Vec::new(),
        Some([]) => {
            diags.push(
                Diag::error(
                    format!("Invalid {attr}"),
                    format!(
                        "an empty {attr} list names nothing: give at least one, or leave it out"
                    ),
                )
                .at_nested("priority", index, attr),
            );
            Vec::new()
        }
        Some(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
    }
}

/// Builds the document from a wholly known configuration or state; the checks here are the
/// ones the stored form cannot express (e.g. `by_locality = false`), then the control
/// plane's own validation.
pub fn to_policy(v: &Value) -> Result<Policy, Diags> {
    let mut diags = Vec::new();
    let name = v.get("name").as_str().unwrap_or_default().to_string();
    let namespace = v.get("namespace").as_str().unwrap_or("default").to_string();
    let mut priorities = Vec::new();
    for (i, block) in v
        .get("priority")
        .as_list()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let by_locality = match block.get("by_locality").as_bool() {
            Some(false) => {
                diags.push(
                    Diag::error(
                        "Invalid by_locality",
                        "by_locality = false means nothing: set it to true, or leave it out",
                    )
                    .at_nested("priority", i, "by_locality"),
                );
                false
            }
            other => other.unwrap_or(false),
        };
        priorities.push(PriorityEntry {
            clusters: names(block, i, "clusters", &mut diags),
            regions: names(block, i, "regions", &mut diags),
            by_locality,
        });
    }
    let min_healthy_percent = match v.get("min_healthy_percent").as_f64() {
        None => None,
        Some(n) if n.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&n) => {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "checked above: a whole number in u32's range"
            )]
            let whole = n as u32;
            Some(whole)
        }
        Some(n) => {
            diags.push(invalid(
                "min_healthy_percent",
                format!("{n} is not a percentage (a whole number from 0 to 100)"),
            ));
            None
        }
    };
    let on_partition = match (
        v.get("on_partition").as_str(),
        v.get("withdraw_after").as_str(),
    ) {
        (Some(_), Some(_)) => {
            diags.push(invalid(
                "withdraw_after",
                "withdraw_after is itself the partition mode (withdrawAfter): leave on_partition out",
            ));
            None
        }
        (Some(mode), None) => Some(OnPartitionSpec::Mode(mode.to_string())),
        (None, Some(after)) => Some(OnPartitionSpec::WithdrawAfter(WithdrawAfter {
            withdraw_after: after.to_string(),
        })),
        (None, None) => None,
    };
    if !diags.is_empty() {
        return Err(diags);
    }
    let spec = FailoverPolicySpec {
        service: v.get("service").as_str().map(str::to_string),
        priorities,
        min_healthy_percent,
        hysteresis: v.get("hysteresis").as_str().map(str::to_string),
        on_partition,
    };
    let draft = Policy {
        api_version: API_VERSION.to_string(),
        name,
        namespace,
        spec: Spec::FailoverPolicy(spec),
    };
    // The control plane's validation, on the document it would receive.
    let json = draft.to_json().to_string();
    Policy::from_json_at(SOURCE, 1, json.as_bytes())
        .map_err(|e| vec![translate(&e, v.get("withdraw_after").is_null())])
}

/// A validation error on the document, pinned to the attribute it came from.
fn translate(e: &PolicyError, on_partition_is_mode: bool) -> Diag {
    let detail = e.message.clone();
    let summary = "Invalid failover policy";
    let d = Diag::error(summary, format!("{}: {detail}", e.field));
    let field = e.field.as_str();
    let simple = [
        ("metadata.name", "name"),
        ("metadata.namespace", "namespace"),
        ("spec.service", "service"),
        ("spec.minHealthyPercent", "min_healthy_percent"),
        ("spec.hysteresis", "hysteresis"),
    ];
    if let Some((_, attr)) = simple.iter().find(|(f, _)| field.starts_with(f)) {
        return Diag::error(format!("Invalid {attr}"), detail).at(attr);
    }
    if field.starts_with("spec.onPartition") {
        let attr = if on_partition_is_mode {
            "on_partition"
        } else {
            "withdraw_after"
        };
        return Diag::error(format!("Invalid {attr}"), detail).at(attr);
    }
    if let Some(rest) = field.strip_prefix("spec.priorities[") {
        if let Some((index, tail)) = rest.split_once(']') {
            if let Ok(i) = index.parse::<usize>() {
                let attr = if tail.starts_with(".clusters") {
                    Some("clusters")
                } else if tail.starts_with(".regions") {
                    Some("regions")
                } else if tail.starts_with(".byLocality") {
                    Some("by_locality")
                } else {
                    None
                };
                return match attr {
                    Some(attr) => Diag::error(format!("Invalid {attr}"), detail)
                        .at_nested("priority", i, attr),
                    None => {
                        let mut d = Diag::error("Invalid priority", detail);
                        d.path = vec![
                            Step::Attr("priority".into()),
                            Step::Index(i64::try_from(i).unwrap_or(i64::MAX)),
                        ];
                        d
                    }
                };
            }
        }
    }
    d
}

/// The resource's state for a stored policy (the inverse of [`to_policy`]).
pub fn from_policy(p: &Policy) -> Option<Value> {
    let Spec::FailoverPolicy(spec) = &p.spec else {
        return None;
    };
    let list = |items: &[String]| {
        if items.is_empty() {
            Value::Null
        } else {
            Value::strings(items.iter().cloned())
        }
    };
    let priorities = spec
        .priorities
        .iter()
        .map(|e| {
            Value::Object(BTreeMap::from([
                ("clusters".to_string(), list(&e.clusters)),
                ("regions".to_string(), list(&e.regions)),
                (
                    "by_locality".to_string(),
                    if e.by_locality {
                        Value::Bool(true)
                    } else {
                        Value::Null
                    },
                ),
            ]))
        })
        .collect();
    let (on_partition, withdraw_after) = match &spec.on_partition {
        None => (Value::Null, Value::Null),
        Some(OnPartitionSpec::Mode(m)) => (Value::str(m.clone()), Value::Null),
        Some(OnPartitionSpec::WithdrawAfter(w)) => {
            (Value::Null, Value::str(w.withdraw_after.clone()))
        }
    };
    Some(Value::Object(BTreeMap::from([
        (
            "id".to_string(),
            Value::str(format!("{}/{}", p.namespace, p.name)),
        ),
        ("name".to_string(), Value::str(p.name.clone())),
        ("namespace".to_string(), Value::str(p.namespace.clone())),
        ("service".to_string(), Value::opt_str(spec.service.clone())),
        ("priority".to_string(), Value::List(priorities)),
        (
            "min_healthy_percent".to_string(),
            spec.min_healthy_percent
                .map_or(Value::Null, |m| Value::Number(f64::from(m))),
        ),
        (
            "hysteresis".to_string(),
            Value::opt_str(spec.hysteresis.clone()),
        ),
        ("on_partition".to_string(), on_partition),
        ("withdraw_after".to_string(), withdraw_after),
    ])))
}

async fn fetch(conn: &Conn, namespace: &str, name: &str) -> Result<Option<Policy>, Diags> {
    let found = conn
        .control
        .get_policies(Some(Kind::FailoverPolicy), Some(namespace), Some(name))
        .await
        .map_err(|e| {
            vec![Diag::error(
                "Reading a failover policy failed",
                format!(
                    "{namespace}/{name} from the control plane at {}: {e}",
                    conn.control_addr
                ),
            )]
        })?;
    Ok(found
        .into_iter()
        .find(|p| p.namespace == namespace && p.name == name))
}

async fn store(conn: &Conn, planned: &Value) -> Result<Value, Failure> {
    let p = to_policy(planned)?;
    conn.control
        .apply(std::slice::from_ref(&p), false)
        .await
        .map_err(|e| {
            Diag::error(
                "The control plane refused the failover policy",
                format!("{}/{}: {e}", p.namespace, p.name),
            )
        })?;
    Ok(from_policy(&p).unwrap_or_else(|| planned.clone()))
}

#[tonic::async_trait]
impl Resource for FailoverPolicyResource {
    fn type_name(&self) -> &'static str {
        "isthmus_failover_policy"
    }

    fn schema(&self) -> Block {
        Block::new(
            "A FailoverPolicy: where a service's traffic goes when its nearer capacity is gone.",
            vec![
                Attr::computed("id", Type::String, "namespace/name."),
                Attr::required("name", Type::String, "metadata.name."),
                Attr::optional_computed("namespace", Type::String, "metadata.namespace (default \"default\")."),
                Attr::optional("service", Type::String, "The service it governs; absent: every service of the namespace without its own policy."),
                Attr::optional("min_healthy_percent", Type::Number, "A priority keeps the traffic while at least this share of its endpoints is healthy (default 0)."),
                Attr::optional("hysteresis", Type::String, "How long a nearer priority must stay healthy before traffic returns (default 5s)."),
                Attr::optional("on_partition", Type::String, "drainToNext (default) or keepLastKnown."),
                Attr::optional("withdraw_after", Type::String, "Instead of on_partition: keep a cut-off cluster this long, then withdraw it (e.g. 30s)."),
            ],
        )
        .with_list_block(
            "priority",
            Block::new(
                "One priority after the caller's own cluster, in order: exactly one of clusters, regions or by_locality.",
                vec![
                    Attr::optional("clusters", Type::list(Type::String), "These clusters."),
                    Attr::optional("regions", Type::list(Type::String), "Clusters whose locality is in these regions."),
                    Attr::optional("by_locality", Type::Bool, "Every remaining cluster, nearest first (must be last)."),
                ],
            ),
        )
    }

    fn validate(&self, config: &Value) -> Diags {
        if !config.is_wholly_known() {
            // Values known only at apply time are checked by the plan.
            return Vec::new();
        }
        to_policy(config).err().unwrap_or_default()
    }

    fn plan(&self, prior: Option<&Value>, mut proposed: Value) -> Result<Planned, Diags> {
        if proposed.get("namespace").is_null() {
            proposed.set("namespace", Value::str("default"));
        }
        let id = match (
            proposed.get("namespace").as_str(),
            proposed.get("name").as_str(),
        ) {
            (Some(ns), Some(name)) => Value::str(format!("{ns}/{name}")),
            _ => Value::Unknown,
        };
        proposed.set("id", id);
        if proposed.is_wholly_known() {
            to_policy(&proposed)?;
        }
        let requires_replace = changed(prior, &proposed, &["name", "namespace"]);
        Ok(Planned {
            state: proposed,
            requires_replace,
        })
    }

    async fn create(&self, conn: &Conn, planned: &Value) -> Result<Value, Failure> {
        let ns = planned.get("namespace").as_str().unwrap_or("default");
        let name = planned.get("name").as_str().unwrap_or_default();
        if fetch(conn, ns, name).await?.is_some() {
            return Err(Diag::error(
                "The failover policy already exists",
                format!(
                    "FailoverPolicy {ns}/{name} is already stored in the mesh. To manage it with \
                     Terraform, import it: terraform import <address> {ns}/{name}"
                ),
            )
            .at("name")
            .into());
        }
        store(conn, planned).await
    }

    async fn update(&self, conn: &Conn, _prior: &Value, planned: &Value) -> Result<Value, Failure> {
        store(conn, planned).await
    }

    async fn delete(&self, conn: &Conn, prior: &Value) -> Result<(), Diags> {
        let ns = prior.get("namespace").as_str().unwrap_or("default");
        let name = prior.get("name").as_str().unwrap_or_default();
        conn.control
            .delete_policy(Kind::FailoverPolicy, ns, name)
            .await
            .map_err(|e| {
                vec![Diag::error(
                    "Deleting the failover policy failed",
                    format!("{ns}/{name}: {e}"),
                )]
            })?;
        Ok(())
    }

    async fn read(&self, conn: &Conn, state: &Value) -> Result<Option<Value>, Diags> {
        let ns = state.get("namespace").as_str().unwrap_or("default");
        let name = state.get("name").as_str().unwrap_or_default();
        Ok(fetch(conn, ns, name).await?.as_ref().and_then(from_policy))
    }

    async fn import(&self, conn: &Conn, id: &str) -> Result<Value, Diags> {
        let (ns, name) = match id.split('/').collect::<Vec<_>>().as_slice() {
            [ns, name] if !ns.is_empty() && !name.is_empty() => (ns.to_string(), name.to_string()),
            [name] if !name.is_empty() => ("default".to_string(), name.to_string()),
            _ => {
                return Err(vec![Diag::error(
                    "Invalid import ID",
                    format!("{id:?}: expected namespace/name, e.g. default/reviews"),
                )])
            }
        };
        match fetch(conn, &ns, &name)
            .await?
            .as_ref()
            .and_then(from_policy)
        {
            Some(v) => Ok(v),
            None => Err(vec![Diag::error(
                "Cannot import a failover policy that does not exist",
                format!("no FailoverPolicy {ns}/{name} is stored in the mesh"),
            )]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Value {
        let mut v = Value::Object(BTreeMap::new());
        v.set("name", Value::str("details"));
        v.set("service", Value::str("details"));
        // Terraform sends every attribute of a block, null when unset.
        let block = || {
            Value::Object(BTreeMap::from([
                ("clusters".to_string(), Value::Null),
                ("regions".to_string(), Value::Null),
                ("by_locality".to_string(), Value::Null),
            ]))
        };
        let mut first = block();
        first.set("clusters", Value::strings(["west"]));
        let mut last = block();
        last.set("by_locality", Value::Bool(true));
        v.set("priority", Value::List(vec![first, last]));
        v.set("min_healthy_percent", Value::Number(50.0));
        v.set("withdraw_after", Value::str("30s"));
        v
    }

    fn planned(v: Value) -> Value {
        FailoverPolicyResource.plan(None, v).unwrap().state
    }

    #[test]
    fn what_is_read_back_equals_what_was_planned() {
        let planned = planned(config());
        let policy = to_policy(&planned).unwrap();
        let back = from_policy(&policy).unwrap();
        // Every attribute of the schema is in both, with the same value.
        let Value::Object(attrs) = &back else {
            panic!()
        };
        for (k, v) in attrs {
            let p = planned.get(k);
            let same = p == v || (p.is_null() && v.is_null());
            assert!(same, "{k}: planned {p:?}, read {v:?}");
        }
        assert_eq!(back.get("id").as_str(), Some("default/details"));
    }

    #[test]
    fn validation_errors_name_the_attribute_not_the_document_field() {
        let mut v = planned(config());
        v.set("min_healthy_percent", Value::Number(150.0));
        let d = &to_policy(&v).unwrap_err()[0];
        assert_eq!(d.path_string(), "min_healthy_percent");
        assert!(d.detail.contains("150"), "{}", d.detail);

        let mut v = planned(config());
        let mut p = v.get("priority").as_list().unwrap().to_vec();
        p.reverse();
        v.set("priority", Value::List(p));
        let d = &to_policy(&v).unwrap_err()[0];
        assert_eq!(d.path_string(), "priority[0].by_locality");

        let mut v = planned(config());
        v.set("withdraw_after", Value::str("soon"));
        assert_eq!(
            to_policy(&v).unwrap_err()[0].path_string(),
            "withdraw_after"
        );
        v.set("withdraw_after", Value::Null);
        v.set("on_partition", Value::str("panic"));
        assert_eq!(to_policy(&v).unwrap_err()[0].path_string(), "on_partition");
    }

    #[test]
    fn settings_the_stored_form_cannot_hold_are_refused() {
        let mut v = planned(config());
        let mut block = Value::Object(BTreeMap::new());
        block.set("by_locality", Value::Bool(false));
        let mut empty = Value::Object(BTreeMap::new());
        empty.set("regions", Value::List(vec![]));
        v.set("priority", Value::List(vec![block, empty]));
        let diags = to_policy(&v).unwrap_err();
        let paths: Vec<String> = diags.iter().map(Diag::path_string).collect();
        assert_eq!(paths, ["priority[0].by_locality", "priority[1].regions"]);
    }

    #[test]
    fn renaming_replaces_and_tuning_updates_in_place() {
        let prior = planned(config());
        let mut next = prior.clone();
        next.set("min_healthy_percent", Value::Number(20.0));
        assert!(FailoverPolicyResource
            .plan(Some(&prior), next.clone())
            .unwrap()
            .requires_replace
            .is_empty());
        next.set("name", Value::str("other"));
        assert_eq!(
            FailoverPolicyResource
                .plan(Some(&prior), next)
                .unwrap()
                .requires_replace,
            vec!["name"]
        );
    }
}
