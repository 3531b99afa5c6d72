//! The rules every replica checks when it applies a write (docs/security.md §7): what a
//! record at each key may hold, whatever member proposed it. Pure: the state is read through
//! [`Records`], so every replica, given the same state and the same change, decides alike.
//!
//! | key | the value must |
//! |---|---|
//! | every key | ≤ [`MAX_KEY_BYTES`] of printable ASCII; a value ≤ [`MAX_VALUE_BYTES`] |
//! | `clusters/<C>` | be a [`ClusterRecord`] named C, with a valid trust domain held by no other cluster and unchanged once written, a member id held by no other cluster and unchanged once written, a CA bundle that parses and keeps at least one CA of the bundle it replaces |
//! | `exports/<ns>/<svc>/<C>` | name that key (`cluster`, `namespace`, `name`); C has a record; every identity is a SPIFFE ID in C's trust domain |
//! | `policies/<kind>/<ns>/<name>` | be a valid policy whose store key is this key |
//! | `kubernetes-policies/<C>/<kind>/<ns>/<name>` | be a valid policy whose store key is the rest of this key |
//! | `grants/mesh-admin/<td>/<name>` | name `spiffe://<td>/operator/admin/<name>`; the last such grant is never deleted |
//! | `grants/policy-writer/<C>` | name cluster C (`{"cluster": C}`) |
//!
//! A key under one of those prefixes that does not have that shape is refused too, so no
//! record escapes its prefix's rules.

use std::fmt;

use serde::Deserialize;

use super::{ClusterRecord, Key, CLUSTERS_PREFIX, MESH_ADMIN_GRANTS_PREFIX};
use crate::identity::{validate_label, validate_trust_domain, SpiffeId};
use crate::policy::Policy;

/// The largest value the store keeps under one key.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The longest key the store keeps.
pub const MAX_KEY_BYTES: usize = 512;

/// The state the rules read: the records as the replica holds them before the change.
pub trait Records {
    /// The value at `key`.
    fn value(&self, key: &str) -> Option<&[u8]>;
    /// Every record whose key starts with `prefix`, in key order.
    fn values<'a>(&'a self, prefix: &str) -> Vec<(&'a str, &'a [u8])>;
}

/// A change to one key.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// The key is to hold this value.
    Write(&'a [u8]),
    /// The key is to be removed.
    Delete,
}

/// Why a change was refused: the label it is counted under and whether it is the value's
/// fault (`INVALID_ARGUMENT`) or the state's (`FAILED_PRECONDITION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The key is too long, not printable ASCII, or not the shape its prefix requires.
    BadKey,
    /// The value is larger than [`MAX_VALUE_BYTES`].
    TooLarge,
    /// The value does not decode or does not validate as its key's record type.
    Malformed,
    /// The value names another key (another cluster, service, policy or grant).
    NotItsKey,
    /// The trust domain is another cluster's.
    TrustDomainTaken,
    /// The member id is another cluster's.
    MemberIdTaken,
    /// A cluster's trust domain or member id would change.
    Immutable,
    /// A cluster's CA bundle would lose every CA it had (not a rotation).
    CaReplaced,
    /// An export lists an identity outside its cluster's trust domain.
    ForeignIdentity,
    /// An export of a cluster that has no record.
    UnknownCluster,
    /// The last mesh-admin grant would be deleted.
    LastGrant,
    /// The writer may not write this key (`super::writers`).
    NotOwner,
    /// A bound member's entry that needs its signature lacks it, or the signature does not
    /// verify (`crate::entry_signature`).
    BadSignature,
}

impl Reason {
    /// Every reason, for metrics that report zeros too.
    pub const ALL: [Reason; 13] = [
        Reason::BadKey,
        Reason::TooLarge,
        Reason::Malformed,
        Reason::NotItsKey,
        Reason::TrustDomainTaken,
        Reason::MemberIdTaken,
        Reason::Immutable,
        Reason::CaReplaced,
        Reason::ForeignIdentity,
        Reason::UnknownCluster,
        Reason::LastGrant,
        Reason::NotOwner,
        Reason::BadSignature,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::BadKey => "bad_key",
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::NotItsKey => "not_its_key",
            Reason::TrustDomainTaken => "trust_domain_taken",
            Reason::MemberIdTaken => "member_id_taken",
            Reason::Immutable => "immutable",
            Reason::CaReplaced => "ca_replaced",
            Reason::ForeignIdentity => "foreign_identity",
            Reason::UnknownCluster => "unknown_cluster",
            Reason::LastGrant => "last_grant",
            Reason::NotOwner => "not_owner",
            Reason::BadSignature => "bad_signature",
        }
    }

    /// Whether the refusal is about the state the change meets (`FAILED_PRECONDITION`)
    /// rather than the change itself (`INVALID_ARGUMENT`).
    pub fn is_precondition(self) -> bool {
        matches!(
            self,
            Reason::TrustDomainTaken
                | Reason::MemberIdTaken
                | Reason::Immutable
                | Reason::CaReplaced
                | Reason::UnknownCluster
                | Reason::LastGrant
        )
    }
}

/// A refused change: why, and a message naming the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

fn refuse(reason: Reason, key: &str, what: impl fmt::Display) -> Refusal {
    Refusal {
        reason,
        message: format!("{key}: {what}"),
    }
}

/// Checks a key alone: non-empty, at most [`MAX_KEY_BYTES`], printable ASCII without spaces.
/// The store checks this before it proposes a write, and again on apply.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return Err("the key is longer than 512 bytes");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a key is printable ASCII without spaces");
    }
    Ok(())
}

/// Whether `change` to `key` may be applied to `records`.
pub fn admit(records: &impl Records, key: &str, change: Change<'_>) -> Result<(), Refusal> {
    check_key(key).map_err(|why| refuse(Reason::BadKey, &format!("{key:?}"), why))?;
    let parsed = Key::parse(key);
    if parsed == Key::Other {
        if let Some((prefix, shape)) = governed(key) {
            return Err(refuse(
                Reason::BadKey,
                key,
                format!("a key under {prefix} has the shape {shape}"),
            ));
        }
    }
    let value = match change {
        Change::Delete => {
            return match parsed {
                Key::MeshAdminGrant { .. } => admit_grant_delete(records, key),
                _ => Ok(()),
            }
        }
        Change::Write(value) => value,
    };
    if value.len() > MAX_VALUE_BYTES {
        return Err(refuse(
            Reason::TooLarge,
            key,
            format!(
                "the value is {} bytes; the federation store takes at most {MAX_VALUE_BYTES} \
                 bytes per record",
                value.len()
            ),
        ));
    }
    match parsed {
        Key::Cluster { name } => admit_cluster(records, key, name, value),
        Key::Export {
            namespace,
            service,
            cluster,
        } => admit_export(records, key, (namespace, service, cluster), value),
        Key::Policy { .. } => admit_policy(key, key, value),
        Key::KubernetesPolicy { .. } => {
            let policy_key = super::parse_kubernetes_policy(key)
                .map(|(_, policy_key)| policy_key)
                .unwrap_or_default();
            admit_policy(key, &policy_key, value)
        }
        Key::MeshAdminGrant { trust_domain, name } => admit_grant(key, trust_domain, name, value),
        Key::PolicyWriterGrant { cluster } => admit_policy_writer_grant(key, cluster, value),
        Key::Other => Ok(()),
    }
}

/// The prefixes whose records have rules, and their keys' shapes.
const GOVERNED: [(&str, &str); 6] = [
    (CLUSTERS_PREFIX, "clusters/<cluster>"),
    (
        super::EXPORTS_PREFIX,
        "exports/<namespace>/<service>/<cluster>",
    ),
    (super::POLICIES_PREFIX, "policies/<kind>/<namespace>/<name>"),
    (
        super::KUBERNETES_POLICIES_PREFIX,
        "kubernetes-policies/<cluster>/<kind>/<namespace>/<name>",
    ),
    (
        MESH_ADMIN_GRANTS_PREFIX,
        "grants/mesh-admin/<trust-domain>/<name>",
    ),
    (
        super::POLICY_WRITER_GRANTS_PREFIX,
        "grants/policy-writer/<cluster>",
    ),
];

/// The governed prefix `key` falls under, with its keys' shape.
fn governed(key: &str) -> Option<(&'static str, &'static str)> {
    GOVERNED
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .copied()
}

fn decode<'a, T: Deserialize<'a>>(key: &str, what: &str, value: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(value).map_err(|e| {
        refuse(
            Reason::Malformed,
            key,
            format!("the value is not {what}: {e}"),
        )
    })
}

/// The CA certificates of a bundle, DER, or why it does not parse.
fn bundle_cas(trust_domain: &str, pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let certs = crate::tls::certs_from_pem("caBundlePem", pem).map_err(|e| e.to_string())?;
    for der in &certs {
        webpki::anchor_from_trusted_cert(der).map_err(|e| {
            format!("caBundlePem: a certificate of {trust_domain} is not a CA: {e}")
        })?;
    }
    Ok(certs.iter().map(|c| c.as_ref().to_vec()).collect())
}

fn admit_cluster(
    records: &impl Records,
    key: &str,
    name: &str,
    value: &[u8],
) -> Result<(), Refusal> {
    validate_label("cluster", name).map_err(|e| refuse(Reason::BadKey, key, e))?;
    let record: ClusterRecord = decode(key, "a cluster record", value)?;
    if record.name != name {
        return Err(refuse(
            Reason::NotItsKey,
            key,
            format!(
                "the value is the record of cluster {:?}; a cluster's record lives at its own key",
                record.name
            ),
        ));
    }
    validate_trust_domain(&record.trust_domain)
        .map_err(|e| refuse(Reason::Malformed, key, format!("trustDomain: {e}")))?;
    let cas = bundle_cas(&record.trust_domain, &record.ca_bundle_pem)
        .map_err(|e| refuse(Reason::Malformed, key, e))?;
    for (other_key, other) in records.values(CLUSTERS_PREFIX) {
        if other_key == key {
            continue;
        }
        let Ok(other) = serde_json::from_slice::<ClusterRecord>(other) else {
            continue;
        };
        if other.trust_domain == record.trust_domain {
            return Err(refuse(
                Reason::TrustDomainTaken,
                key,
                format!(
                    "trust domain {} belongs to cluster {}; cluster {name} cannot claim it",
                    record.trust_domain, other.name
                ),
            ));
        }
        if other.member_id.is_some() && other.member_id == record.member_id {
            return Err(refuse(
                Reason::MemberIdTaken,
                key,
                format!(
                    "member id {} belongs to cluster {}; cluster {name} cannot claim it",
                    other.member_id.unwrap_or_default(),
                    other.name
                ),
            ));
        }
    }
    let Some(current) = records
        .value(key)
        .and_then(|v| serde_json::from_slice::<ClusterRecord>(v).ok())
    else {
        return Ok(());
    };
    if current.trust_domain != record.trust_domain {
        return Err(refuse(
            Reason::Immutable,
            key,
            format!(
                "cluster {name}'s trust domain is {}; it cannot become {} (remove the cluster \
                 and join it again)",
                current.trust_domain, record.trust_domain
            ),
        ));
    }
    if let (Some(was), Some(now)) = (current.member_id, record.member_id) {
        if was != now {
            return Err(refuse(
                Reason::Immutable,
                key,
                format!("cluster {name}'s member id is {was}; it cannot become {now}"),
            ));
        }
    }
    let kept = bundle_cas(&current.trust_domain, &current.ca_bundle_pem)
        .map(|old| old.iter().any(|ca| cas.contains(ca)))
        // A current bundle that does not parse has nothing to keep.
        .unwrap_or(true);
    if !kept {
        return Err(refuse(
            Reason::CaReplaced,
            key,
            format!(
                "the new caBundlePem keeps none of cluster {name}'s current CAs: a rotation \
                 publishes the old and the new CA together first; a lost CA is replaced by \
                 removing the cluster and joining it again"
            ),
        ));
    }
    Ok(())
}

/// The fields of an export the rules check (the rest is the owning cluster's business).
#[derive(Deserialize)]
struct ExportClaim {
    cluster: String,
    namespace: String,
    name: String,
    #[serde(default)]
    identities: Vec<String>,
}

fn admit_export(
    records: &impl Records,
    key: &str,
    (namespace, service, cluster): (&str, &str, &str),
    value: &[u8],
) -> Result<(), Refusal> {
    for (what, label) in [
        ("namespace", namespace),
        ("service", service),
        ("cluster", cluster),
    ] {
        validate_label(what, label).map_err(|e| refuse(Reason::BadKey, key, e))?;
    }
    let claim: ExportClaim = decode(key, "an export record", value)?;
    if (
        claim.namespace.as_str(),
        claim.name.as_str(),
        claim.cluster.as_str(),
    ) != (namespace, service, cluster)
    {
        return Err(refuse(
            Reason::NotItsKey,
            key,
            format!(
                "the value is cluster {:?}'s export of {}/{}; an export lives at its own key",
                claim.cluster, claim.namespace, claim.name
            ),
        ));
    }
    let Some(owner) = records
        .value(&super::cluster(cluster))
        .and_then(|v| serde_json::from_slice::<ClusterRecord>(v).ok())
    else {
        return Err(refuse(
            Reason::UnknownCluster,
            key,
            format!("cluster {cluster} has no record (clusters/{cluster}); it exports nothing"),
        ));
    };
    for identity in &claim.identities {
        let id: SpiffeId = identity
            .parse()
            .map_err(|e| refuse(Reason::Malformed, key, format!("identities: {e}")))?;
        if id.trust_domain() != owner.trust_domain {
            return Err(refuse(
                Reason::ForeignIdentity,
                key,
                format!(
                    "identity {identity} is not in {cluster}'s trust domain ({})",
                    owner.trust_domain
                ),
            ));
        }
    }
    Ok(())
}

fn admit_policy(key: &str, policy_key: &str, value: &[u8]) -> Result<(), Refusal> {
    let policy = Policy::from_json(value).map_err(|e| {
        refuse(
            Reason::Malformed,
            key,
            format!("the policy does not validate: {e}"),
        )
    })?;
    let own = policy.store_key();
    if own != policy_key {
        return Err(refuse(
            Reason::NotItsKey,
            key,
            format!("the value is the policy stored at {own}"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct GrantClaim {
    identity: String,
}

fn admit_grant(key: &str, trust_domain: &str, name: &str, value: &[u8]) -> Result<(), Refusal> {
    let grant: GrantClaim = decode(key, "a grant record", value)?;
    let expected = format!("spiffe://{trust_domain}/operator/admin/{name}");
    if grant.identity != expected {
        return Err(refuse(
            Reason::NotItsKey,
            key,
            format!(
                "the grant names {}; the grant at this key is for {expected}",
                grant.identity
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct PolicyWriterClaim {
    cluster: String,
}

fn admit_policy_writer_grant(key: &str, cluster: &str, value: &[u8]) -> Result<(), Refusal> {
    validate_label("cluster", cluster).map_err(|e| refuse(Reason::BadKey, key, e))?;
    let grant: PolicyWriterClaim = decode(key, "a policy-writer grant", value)?;
    if grant.cluster != cluster {
        return Err(refuse(
            Reason::NotItsKey,
            key,
            format!(
                "the grant names cluster {:?}; the grant at this key is for {cluster}",
                grant.cluster
            ),
        ));
    }
    Ok(())
}

fn admit_grant_delete(records: &impl Records, key: &str) -> Result<(), Refusal> {
    let grants = records.values(MESH_ADMIN_GRANTS_PREFIX);
    if grants.len() == 1 && grants[0].0 == key {
        return Err(refuse(
            Reason::LastGrant,
            key,
            "this is the last mesh-admin grant: grant another mesh admin first",
        ));
    }
    Ok(())
}

pub mod snapshot;

#[cfg(test)]
mod tests;
