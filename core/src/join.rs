//! What a joining cluster verifies the federation with before it sends its join token
//! (docs/security.md §5), in the spirit of kubeadm's `--discovery-token-ca-cert-hash`.
//!
//! The federation's *bundle set* is its `clusters/<name>` records in key order, each reduced
//! to its name, trust domain and CA certificates. A join token carries the SHA-256 of the set
//! as it was when the token was minted (`<id>.<secret>.<digest>`). The joiner asks any member
//! for the set (`Kv.JoinInfo`, public and unauthenticated), checks it hashes to the token's
//! digest, and then accepts only a server whose certificate chains to the bundle of its own
//! trust domain in that set. A man in the middle can replay the public set but cannot present
//! a member's chain, so the token is never sent to anyone else.
//!
//! Canonical encoding: for each cluster in key order, its name, its trust domain and the DER
//! of each CA certificate in its bundle's order, every item preceded by its length as a
//! big-endian `u32`.

use ring::digest::{Context, SHA256};

use crate::keyspace::{ClusterRecord, CLUSTERS_PREFIX};
use crate::tls::TlsError;

/// One member cluster's entry in the bundle set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEntry {
    pub name: String,
    pub trust_domain: String,
    pub ca_bundle_pem: String,
}

/// The bundle set of the `clusters/` records among `records` (key, value), in key order.
/// Records that do not decode are left out, on the minting member and the joiner alike.
pub fn bundle_set<'a>(records: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<BundleEntry> {
    let mut clusters: Vec<(&str, ClusterRecord)> = records
        .into_iter()
        .filter(|(key, _)| key.starts_with(CLUSTERS_PREFIX))
        .filter_map(|(key, value)| Some((key, serde_json::from_slice(value).ok()?)))
        .collect();
    clusters.sort_by(|a, b| a.0.cmp(b.0));
    clusters
        .into_iter()
        .map(|(_, r)| BundleEntry {
            name: r.name,
            trust_domain: r.trust_domain,
            ca_bundle_pem: r.ca_bundle_pem,
        })
        .collect()
}

/// The SHA-256 of the set's canonical encoding, in lowercase hex (64 characters). Fails on a
/// bundle that does not parse, naming its cluster.
pub fn digest(set: &[BundleEntry]) -> Result<String, JoinError> {
    let mut sha = Context::new(&SHA256);
    let mut item = |bytes: &[u8]| -> Result<(), JoinError> {
        let len = u32::try_from(bytes.len()).map_err(|_| JoinError::TooLarge)?;
        sha.update(&len.to_be_bytes());
        sha.update(bytes);
        Ok(())
    };
    for entry in set {
        item(entry.name.as_bytes())?;
        item(entry.trust_domain.as_bytes())?;
        let certs =
            crate::tls::certs_from_pem("CA bundle", &entry.ca_bundle_pem).map_err(|source| {
                JoinError::Bundle {
                    cluster: entry.name.clone(),
                    source,
                }
            })?;
        for cert in &certs {
            item(cert.as_ref())?;
        }
    }
    Ok(sha
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether `s` has the form of a digest (64 hex digits).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the CA bundle of cluster {cluster} does not parse: {source}")]
    Bundle {
        cluster: String,
        #[source]
        source: TlsError,
    },
    #[error("an item of the bundle set is larger than 4 GiB")]
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    fn record(name: &str, td: &str, pem: &str) -> (String, Vec<u8>) {
        let r = ClusterRecord {
            name: name.into(),
            trust_domain: td.into(),
            gateway: Some("127.0.0.1:1".parse().expect("addr")),
            ca_bundle_pem: pem.into(),
            locality: None,
            member_id: Some(1),
            control: None,
        };
        (
            crate::keyspace::cluster(name),
            serde_json::to_vec(&r).expect("json"),
        )
    }

    fn set_of(records: &[(String, Vec<u8>)]) -> Vec<BundleEntry> {
        bundle_set(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    #[test]
    fn the_digest_covers_names_trust_domains_and_bundles_in_key_order() {
        let east = CertificateAuthority::generate("east.local").expect("ca");
        let west = CertificateAuthority::generate("west.local").expect("ca");
        let other = CertificateAuthority::generate("west.local").expect("ca");
        let records = vec![
            record("west", "west.local", west.cert_pem()),
            record("east", "east.local", east.cert_pem()),
            ("exports/default/a/east".into(), b"{}".to_vec()),
            ("clusters/broken".into(), b"not json".to_vec()),
        ];
        let set = set_of(&records);
        assert_eq!(
            set.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["east", "west"],
            "key order; other keys and undecodable records left out"
        );
        let base = digest(&set).expect("digest");
        assert!(is_digest(&base), "{base}");
        // Deterministic, whatever order the records came in.
        let mut reversed = records.clone();
        reversed.reverse();
        assert_eq!(digest(&set_of(&reversed)).expect("digest"), base);
        // A record's gateway is not covered; its bundle, trust domain and name are.
        let mut moved = records.clone();
        moved[0] = {
            let mut r: ClusterRecord = serde_json::from_slice(&moved[0].1).expect("json");
            r.gateway = Some("10.0.0.1:15443".parse().expect("addr"));
            (moved[0].0.clone(), serde_json::to_vec(&r).expect("json"))
        };
        assert_eq!(digest(&set_of(&moved)).expect("digest"), base);
        for changed in [
            record("west", "west.local", other.cert_pem()),
            record("west", "west2.local", west.cert_pem()),
            record("wester", "west.local", west.cert_pem()),
        ] {
            let mut records = records.clone();
            records[0] = changed;
            assert_ne!(digest(&set_of(&records)).expect("digest"), base);
        }
        // Two certificates in a bundle (a rotation's overlap) are both covered.
        let both = format!("{}{}", west.cert_pem(), other.cert_pem());
        let mut records2 = records.clone();
        records2[0] = record("west", "west.local", &both);
        assert_ne!(digest(&set_of(&records2)).expect("digest"), base);
    }

    #[test]
    fn a_bundle_that_does_not_parse_is_named() {
        let set = vec![BundleEntry {
            name: "zzz".into(),
            trust_domain: "zzz.local".into(),
            ca_bundle_pem: "garbage".into(),
        }];
        let err = digest(&set).expect_err("garbage").to_string();
        assert!(err.contains("zzz"), "{err}");
        assert!(!is_digest("abc") && !is_digest(&"g".repeat(64)));
    }
}
