//! `isthmus_policy`: any one policy document Isthmus accepts (Istio's VirtualService,
//! DestinationRule, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, and Isthmus's RateLimitPolicy
//! and FailoverPolicy), written as YAML or JSON in `yaml`.
//!
//! The document is validated offline exactly as `isthmus apply` validates it, so a bad field
//! is a diagnostic on `yaml` naming the field path, and nothing is applied. The stored
//! document is compared by meaning, not text: reformatting the YAML plans an update that
//! changes nothing, while a change made with the CLI shows as drift, the stored document
//! rendered as YAML. Import ID: `Kind/namespace/name` (or `Kind/name` in `default`).

use std::collections::BTreeMap;

use isthmus_core::policy::{parse_documents, Kind, Policy};

use crate::contract::{Conn, Failure, Planned, Resource};
use crate::cty::{Type, Value};
use crate::diag::{Diag, Diags};
use crate::resources::changed;
use crate::schema::{Attr, Block};

pub struct PolicyResource;

/// Parses the one document `text` must hold.
pub fn parse_one(text: &str) -> Result<Policy, Diag> {
    let invalid = |detail: String| Diag::error("Invalid policy document", detail).at("yaml");
    let mut docs = parse_documents("yaml", text).map_err(|e| invalid(e.to_string()))?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        0 => Err(invalid("yaml holds no document".into())),
        n => Err(invalid(format!(
            "yaml holds {n} documents; an isthmus_policy holds exactly one (use one resource per document, e.g. with for_each)"
        ))),
    }
}

/// The ID of a policy: `Kind/namespace/name`.
pub fn policy_id(p: &Policy) -> String {
    format!("{}/{}/{}", p.kind(), p.namespace, p.name)
}

/// The stored document as YAML, in the shape `isthmus get -o yaml` prints.
pub fn render(p: &Policy) -> String {
    serde_yaml::to_string(&p.to_json()).unwrap_or_default()
}

fn state_of(p: &Policy, yaml: String) -> Value {
    Value::Object(BTreeMap::from([
        ("id".to_string(), Value::str(policy_id(p))),
        ("yaml".to_string(), Value::str(yaml)),
        ("kind".to_string(), Value::str(p.kind().as_str())),
        ("api_version".to_string(), Value::str(p.api_version.clone())),
        ("namespace".to_string(), Value::str(p.namespace.clone())),
        ("name".to_string(), Value::str(p.name.clone())),
    ]))
}

async fn fetch(
    conn: &Conn,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Result<Option<Policy>, Diags> {
    let found = conn
        .control
        .get_policies(Some(kind), Some(namespace), Some(name))
        .await
        .map_err(|e| {
            vec![Diag::error(
                "Reading a policy failed",
                format!(
                    "{kind} {namespace}/{name} from the control plane at {}: {e}",
                    conn.control_addr
                ),
            )]
        })?;
    Ok(found
        .into_iter()
        .find(|p| p.kind() == kind && p.namespace == namespace && p.name == name))
}

async fn apply(conn: &Conn, p: &Policy) -> Result<(), Diags> {
    conn.control
        .apply(std::slice::from_ref(p), false)
        .await
        .map_err(|e| {
            vec![Diag::error(
                "The control plane refused the policy",
                format!("{}: {e}", policy_id(p)),
            )
            .at("yaml")]
        })?;
    Ok(())
}

/// Parses an import ID: `Kind/namespace/name` or `Kind/name`.
pub fn parse_import_id(id: &str) -> Result<(Kind, String, String), Diag> {
    let bad = |why: &str| {
        Diag::error(
            "Invalid import ID",
            format!(
                "{id:?}: {why}; expected Kind/namespace/name, e.g. VirtualService/default/reviews"
            ),
        )
    };
    let parts: Vec<&str> = id.split('/').collect();
    let (kind, namespace, name) = match parts.as_slice() {
        [kind, namespace, name] => (*kind, *namespace, *name),
        [kind, name] => (*kind, "default", *name),
        _ => return Err(bad("wrong number of parts")),
    };
    let kind = Kind::parse(kind).ok_or_else(|| bad("unknown kind"))?;
    if namespace.is_empty() || name.is_empty() {
        return Err(bad("empty namespace or name"));
    }
    Ok((kind, namespace.to_string(), name.to_string()))
}

#[tonic::async_trait]
impl Resource for PolicyResource {
    fn type_name(&self) -> &'static str {
        "isthmus_policy"
    }

    fn schema(&self) -> Block {
        Block::new(
            "One mesh-wide policy document, as `isthmus apply -f` takes it.",
            vec![
                Attr::computed("id", Type::String, "Kind/namespace/name."),
                Attr::required(
                    "yaml",
                    Type::String,
                    "The document, YAML or JSON: apiVersion, kind, metadata (name, namespace), spec.",
                ),
                Attr::computed("kind", Type::String, "The document's kind."),
                Attr::computed("api_version", Type::String, "The document's apiVersion."),
                Attr::computed("namespace", Type::String, "metadata.namespace (default \"default\")."),
                Attr::computed("name", Type::String, "metadata.name."),
            ],
        )
    }

    fn validate(&self, config: &Value) -> Diags {
        match config.get("yaml").as_str() {
            Some(text) => parse_one(text).err().into_iter().collect(),
            None => Vec::new(),
        }
    }

    fn plan(&self, prior: Option<&Value>, mut proposed: Value) -> Result<Planned, Diags> {
        let Some(text) = proposed.get("yaml").as_str() else {
            for attr in ["id", "kind", "api_version", "namespace", "name"] {
                proposed.set(attr, Value::Unknown);
            }
            return Ok(Planned {
                state: proposed,
                requires_replace: Vec::new(),
            });
        };
        let p = parse_one(text).map_err(|d| vec![d])?;
        let planned = state_of(&p, text.to_string());
        // Another kind, namespace or name is another object in the store.
        let requires_replace = changed(prior, &planned, &["kind", "namespace", "name"]);
        Ok(Planned {
            state: planned,
            requires_replace,
        })
    }

    async fn create(&self, conn: &Conn, planned: &Value) -> Result<Value, Failure> {
        let text = planned.get("yaml").as_str().unwrap_or_default();
        let p = parse_one(text)?;
        if fetch(conn, p.kind(), &p.namespace, &p.name)
            .await?
            .is_some()
        {
            return Err(Diag::error(
                "The policy already exists",
                format!(
                    "{} is already stored in the mesh. To manage it with Terraform, import it: \
                     terraform import <address> {}",
                    policy_id(&p),
                    policy_id(&p)
                ),
            )
            .at("yaml")
            .into());
        }
        apply(conn, &p).await?;
        Ok(state_of(&p, text.to_string()))
    }

    async fn update(&self, conn: &Conn, _prior: &Value, planned: &Value) -> Result<Value, Failure> {
        let text = planned.get("yaml").as_str().unwrap_or_default();
        let p = parse_one(text)?;
        apply(conn, &p).await?;
        Ok(state_of(&p, text.to_string()))
    }

    async fn delete(&self, conn: &Conn, prior: &Value) -> Result<(), Diags> {
        let p = parse_one(prior.get("yaml").as_str().unwrap_or_default()).map_err(|d| vec![d])?;
        conn.control
            .delete_policy(p.kind(), &p.namespace, &p.name)
            .await
            .map_err(|e| {
                vec![Diag::error(
                    "Deleting the policy failed",
                    format!("{}: {e}", policy_id(&p)),
                )]
            })?;
        Ok(())
    }

    async fn read(&self, conn: &Conn, state: &Value) -> Result<Option<Value>, Diags> {
        let text = state.get("yaml").as_str().unwrap_or_default();
        let ours = parse_one(text).map_err(|d| vec![d])?;
        let Some(stored) = fetch(conn, ours.kind(), &ours.namespace, &ours.name).await? else {
            return Ok(None);
        };
        if stored == ours {
            // Same meaning: keep the user's text, so formatting never shows as a change.
            return Ok(Some(state_of(&ours, text.to_string())));
        }
        Ok(Some(state_of(&stored, render(&stored))))
    }

    async fn import(&self, conn: &Conn, id: &str) -> Result<Value, Diags> {
        let (kind, namespace, name) = parse_import_id(id).map_err(|d| vec![d])?;
        match fetch(conn, kind, &namespace, &name).await? {
            Some(p) => Ok(state_of(&p, render(&p))),
            None => Err(vec![Diag::error(
                "Cannot import a policy that does not exist",
                format!("no {kind} {namespace}/{name} is stored in the mesh"),
            )]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n";

    #[test]
    fn an_unknown_field_is_a_diagnostic_on_yaml_naming_the_field_path() {
        let bad = VS.replace(
            "  - route:",
            "  - delegate: {name: reviews-routes}\n    route:",
        );
        let d = parse_one(&bad).unwrap_err();
        assert_eq!(d.path_string(), "yaml");
        assert!(
            d.detail.contains("spec.http[0]") && d.detail.contains("delegate"),
            "{}",
            d.detail
        );
        let two = format!("{VS}---\n{VS}");
        assert!(parse_one(&two).unwrap_err().detail.contains("exactly one"));
    }

    #[test]
    fn the_plan_derives_the_identity_and_replaces_only_when_it_changes() {
        let mut proposed = Value::Object(BTreeMap::new());
        proposed.set("yaml", Value::str(VS));
        let planned = PolicyResource.plan(None, proposed.clone()).unwrap();
        assert_eq!(
            planned.state.get("id").as_str(),
            Some("VirtualService/default/reviews")
        );
        let prior = planned.state;
        let reweighted = VS.replace("subset: v1}", "subset: v2}");
        proposed.set("yaml", Value::str(reweighted));
        assert!(PolicyResource
            .plan(Some(&prior), proposed.clone())
            .unwrap()
            .requires_replace
            .is_empty());
        proposed.set(
            "yaml",
            Value::str(VS.replace("name: reviews", "name: other")),
        );
        assert_eq!(
            PolicyResource
                .plan(Some(&prior), proposed)
                .unwrap()
                .requires_replace,
            vec!["name"]
        );
    }

    #[test]
    fn import_ids_name_kind_namespace_and_name() {
        let (k, ns, n) = parse_import_id("virtualservice/prod/reviews").unwrap();
        assert_eq!(
            (k, ns.as_str(), n.as_str()),
            (Kind::VirtualService, "prod", "reviews")
        );
        let (_, ns, _) = parse_import_id("DestinationRule/reviews").unwrap();
        assert_eq!(ns, "default");
        assert!(parse_import_id("Gateway/default/x").is_err());
        assert!(parse_import_id("a/b/c/d").is_err());
    }

    #[test]
    fn a_rendered_document_parses_back_to_the_same_policy() {
        let p = parse_one(VS).unwrap();
        assert_eq!(parse_one(&render(&p)).unwrap(), p);
    }
}
