//! The managed resource types, and what their plans share.

pub mod cluster;
pub mod failover;
pub mod policy;

use crate::cty::Value;

/// The attributes among `attrs` whose planned value differs from the prior state's.
pub fn changed(
    prior: Option<&Value>,
    planned: &Value,
    attrs: &[&'static str],
) -> Vec<&'static str> {
    match prior {
        None => Vec::new(),
        Some(prior) => attrs
            .iter()
            .copied()
            .filter(|a| prior.get(a) != planned.get(a))
            .collect(),
    }
}

/// A known, non-null string attribute.
pub fn known_str<'a>(v: &'a Value, attr: &str) -> Option<&'a str> {
    v.get(attr).as_str()
}
