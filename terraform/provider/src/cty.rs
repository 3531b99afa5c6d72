//! Terraform's values (cty) as the plugin protocol carries them: MessagePack, typed by the
//! schema, with unknown values as MessagePack extension 0; and JSON, for stored state.
//!
//! [`Value`] is deliberately small: lists, sets and tuples are all [`Value::List`]; objects
//! and maps are both [`Value::Object`]. The [`Type`] given to the codec says which one is
//! meant, so encoding an object always writes every attribute of its type (null when absent).

use std::collections::BTreeMap;

/// A cty type, as far as this provider uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    String,
    Number,
    Bool,
    List(Box<Type>),
    Set(Box<Type>),
    Map(Box<Type>),
    Object(BTreeMap<String, Type>),
}

impl Type {
    pub fn list(of: Type) -> Type {
        Type::List(Box::new(of))
    }

    pub fn map(of: Type) -> Type {
        Type::Map(Box::new(of))
    }

    pub fn object<'a>(attrs: impl IntoIterator<Item = (&'a str, Type)>) -> Type {
        Type::Object(attrs.into_iter().map(|(k, t)| (k.to_string(), t)).collect())
    }

    /// The type as Terraform writes it in JSON: `"string"`, `["list","string"]`, ...
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Type::String => json!("string"),
            Type::Number => json!("number"),
            Type::Bool => json!("bool"),
            Type::List(t) => json!(["list", t.to_json()]),
            Type::Set(t) => json!(["set", t.to_json()]),
            Type::Map(t) => json!(["map", t.to_json()]),
            Type::Object(attrs) => {
                let attrs: serde_json::Map<String, serde_json::Value> = attrs
                    .iter()
                    .map(|(k, t)| (k.clone(), t.to_json()))
                    .collect();
                json!(["object", attrs])
            }
        }
    }
}

/// A cty value (see the module docs for how collections are represented).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// Not known until apply.
    Unknown,
    Bool(bool),
    Number(f64),
    String(String),
    List(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("at {path}: expected {expected}, found {found}")]
    Mismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("at {path}: unexpected attribute {name:?}")]
    UnexpectedAttribute { path: String, name: String },
    #[error("malformed MessagePack: {0}")]
    MessagePack(String),
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// A string, or null when `None`.
    pub fn opt_str(s: Option<impl Into<String>>) -> Value {
        s.map_or(Value::Null, |s| Value::String(s.into()))
    }

    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
        Value::List(items.into_iter().map(|s| Value::String(s.into())).collect())
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Value::Unknown)
    }

    /// True when neither the value nor anything inside it is unknown.
    pub fn is_wholly_known(&self) -> bool {
        match self {
            Value::Unknown => false,
            Value::List(items) => items.iter().all(Value::is_wholly_known),
            Value::Object(attrs) => attrs.values().all(Value::is_wholly_known),
            _ => true,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }

    /// An attribute of an object (null when absent or when this is not an object).
    pub fn get(&self, name: &str) -> &Value {
        static NULL: Value = Value::Null;
        match self {
            Value::Object(attrs) => attrs.get(name).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// Sets an attribute; does nothing unless this is an object.
    pub fn set(&mut self, name: &str, value: Value) {
        if let Value::Object(attrs) = self {
            attrs.insert(name.to_string(), value);
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Unknown => "an unknown value",
            Value::Bool(_) => "a bool",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::List(_) => "a list",
            Value::Object(_) => "an object",
        }
    }
}

fn mismatch(path: &str, expected: &Type, found: impl Into<String>) -> CodecError {
    CodecError::Mismatch {
        path: if path.is_empty() { "." } else { path }.to_string(),
        expected: expected.to_json().to_string(),
        found: found.into(),
    }
}

/// Encodes `value` of type `ty` as MessagePack.
pub fn to_msgpack(value: &Value, ty: &Type) -> Result<Vec<u8>, CodecError> {
    let v = encode(value, ty, "")?;
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).map_err(|e| CodecError::MessagePack(e.to_string()))?;
    Ok(out)
}

fn encode(value: &Value, ty: &Type, path: &str) -> Result<rmpv::Value, CodecError> {
    use rmpv::Value as M;
    Ok(match (value, ty) {
        (Value::Null, _) => M::Nil,
        // cty's marker for an unknown value: fixext1, type 0, one zero byte.
        (Value::Unknown, _) => M::Ext(0, vec![0]),
        (Value::Bool(b), Type::Bool) => M::Boolean(*b),
        (Value::Number(n), Type::Number) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "a whole number below 2^53 in magnitude is exact as an i64"
                )]
                let whole = *n as i64;
                M::from(whole)
            } else {
                M::F64(*n)
            }
        }
        (Value::String(s), Type::String) => M::from(s.as_str()),
        (Value::List(items), Type::List(elem) | Type::Set(elem)) => M::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| encode(v, elem, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Value::Object(attrs), Type::Map(elem)) => M::Map(
            attrs
                .iter()
                .map(|(k, v)| {
                    Ok((
                        M::from(k.as_str()),
                        encode(v, elem, &format!("{path}.{k}"))?,
                    ))
                })
                .collect::<Result<_, CodecError>>()?,
        ),
        (Value::Object(attrs), Type::Object(types)) => {
            if let Some(extra) = attrs.keys().find(|k| !types.contains_key(*k)) {
                return Err(CodecError::UnexpectedAttribute {
                    path: path.to_string(),
                    name: extra.clone(),
                });
            }
            M::Map(
                types
                    .iter()
                    .map(|(k, t)| {
                        let v = attrs.get(k).unwrap_or(&Value::Null);
                        Ok((M::from(k.as_str()), encode(v, t, &format!("{path}.{k}"))?))
                    })
                    .collect::<Result<_, CodecError>>()?,
            )
        }
        (v, t) => return Err(mismatch(path, t, v.describe())),
    })
}

/// Decodes MessagePack holding a value of type `ty`.
pub fn from_msgpack(bytes: &[u8], ty: &Type) -> Result<Value, CodecError> {
    let mut reader = bytes;
    let v = rmpv::decode::read_value(&mut reader)
        .map_err(|e| CodecError::MessagePack(e.to_string()))?;
    decode(&v, ty, "")
}

fn decode(v: &rmpv::Value, ty: &Type, path: &str) -> Result<Value, CodecError> {
    use rmpv::Value as M;
    Ok(match (v, ty) {
        (M::Nil, _) => Value::Null,
        (M::Ext(0, _), _) => Value::Unknown,
        (M::Boolean(b), Type::Bool) => Value::Bool(*b),
        (M::Integer(i), Type::Number) => Value::Number(
            i.as_i64()
                .map(|i| i as f64)
                .or_else(|| i.as_u64().map(|u| u as f64))
                .unwrap_or(0.0),
        ),
        (M::F32(f), Type::Number) => Value::Number(f64::from(*f)),
        (M::F64(f), Type::Number) => Value::Number(*f),
        // Numbers too large for a float travel as decimal strings.
        (M::String(s), Type::Number) => match s.as_str().and_then(|s| s.parse().ok()) {
            Some(n) => Value::Number(n),
            None => return Err(mismatch(path, ty, "a non-numeric string")),
        },
        (M::String(s), Type::String) => match s.as_str() {
            Some(s) => Value::String(s.to_string()),
            None => return Err(mismatch(path, ty, "a string that is not UTF-8")),
        },
        (M::Array(items), Type::List(elem) | Type::Set(elem)) => Value::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| decode(v, elem, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (M::Map(entries), Type::Map(_) | Type::Object(_)) => {
            let mut attrs = BTreeMap::new();
            for (k, v) in entries {
                let Some(k) = k.as_str() else {
                    return Err(mismatch(path, ty, "a map with a non-string key"));
                };
                let elem = match ty {
                    Type::Map(elem) => elem.as_ref(),
                    Type::Object(types) => match types.get(k) {
                        Some(t) => t,
                        None => {
                            return Err(CodecError::UnexpectedAttribute {
                                path: path.to_string(),
                                name: k.to_string(),
                            })
                        }
                    },
                    _ => unreachable!("matched above"),
                };
                attrs.insert(k.to_string(), decode(v, elem, &format!("{path}.{k}"))?);
            }
            if let Type::Object(types) = ty {
                for k in types.keys() {
                    attrs.entry(k.clone()).or_insert(Value::Null);
                }
            }
            Value::Object(attrs)
        }
        (other, t) => return Err(mismatch(path, t, format!("{other}"))),
    })
}

/// Decodes JSON (stored state, or a JSON `DynamicValue`) holding a value of type `ty`.
/// Attributes of the type that the JSON lacks are null; attributes it has that the type
/// lacks are dropped (state written by an older schema).
pub fn from_json(bytes: &[u8], ty: &Type) -> Result<Value, CodecError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    from_json_value(&v, ty, "")
}

fn from_json_value(v: &serde_json::Value, ty: &Type, path: &str) -> Result<Value, CodecError> {
    use serde_json::Value as J;
    Ok(match (v, ty) {
        (J::Null, _) => Value::Null,
        (J::Bool(b), Type::Bool) => Value::Bool(*b),
        (J::Number(n), Type::Number) => Value::Number(n.as_f64().unwrap_or(0.0)),
        (J::String(s), Type::Number) => match s.parse() {
            Ok(n) => Value::Number(n),
            Err(_) => return Err(mismatch(path, ty, "a non-numeric string")),
        },
        (J::String(s), Type::String) => Value::String(s.clone()),
        (J::Array(items), Type::List(elem) | Type::Set(elem)) => Value::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| from_json_value(v, elem, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (J::Object(entries), Type::Map(elem)) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), from_json_value(v, elem, &format!("{path}.{k}"))?)))
                .collect::<Result<_, CodecError>>()?,
        ),
        (J::Object(entries), Type::Object(types)) => Value::Object(
            types
                .iter()
                .map(|(k, t)| {
                    let v = entries.get(k).unwrap_or(&J::Null);
                    Ok((k.clone(), from_json_value(v, t, &format!("{path}.{k}"))?))
                })
                .collect::<Result<_, CodecError>>()?,
        ),
        (other, t) => return Err(mismatch(path, t, other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty() -> Type {
        Type::object([
            ("name", Type::String),
            ("weight", Type::Number),
            ("on", Type::Bool),
            ("tags", Type::list(Type::String)),
            ("labels", Type::map(Type::String)),
            (
                "priority",
                Type::list(Type::object([("clusters", Type::list(Type::String))])),
            ),
        ])
    }

    fn sample() -> Value {
        let mut v = Value::Object(BTreeMap::new());
        v.set("name", Value::str("reviews"));
        v.set("weight", Value::Number(80.0));
        v.set("on", Value::Unknown);
        v.set("tags", Value::strings(["a", "b"]));
        v.set(
            "labels",
            Value::Object(BTreeMap::from([("version".into(), Value::str("v1"))])),
        );
        let mut p = Value::Object(BTreeMap::new());
        p.set("clusters", Value::strings(["west"]));
        v.set("priority", Value::List(vec![p]));
        v
    }

    #[test]
    fn values_survive_a_msgpack_round_trip_with_unknowns_and_absent_attributes_as_null() {
        let bytes = to_msgpack(&sample(), &ty()).unwrap();
        let back = from_msgpack(&bytes, &ty()).unwrap();
        assert_eq!(back, sample());
        assert!(!back.is_wholly_known());
        let mut partial = Value::Object(BTreeMap::new());
        partial.set("name", Value::str("x"));
        let back = from_msgpack(&to_msgpack(&partial, &ty()).unwrap(), &ty()).unwrap();
        assert_eq!(back.get("weight"), &Value::Null);
        assert_eq!(back.get("name").as_str(), Some("x"));
    }

    #[test]
    fn unknown_values_use_ctys_extension_zero_and_integers_stay_integers() {
        let bytes = to_msgpack(&Value::Unknown, &Type::String).unwrap();
        assert_eq!(bytes, vec![0xd4, 0x00, 0x00]);
        assert_eq!(
            to_msgpack(&Value::Number(3.0), &Type::Number).unwrap(),
            vec![3]
        );
        let half = to_msgpack(&Value::Number(0.5), &Type::Number).unwrap();
        assert_eq!(
            from_msgpack(&half, &Type::Number).unwrap(),
            Value::Number(0.5)
        );
    }

    #[test]
    fn type_mismatches_and_stray_attributes_are_errors_naming_the_path() {
        let mut v = Value::Object(BTreeMap::new());
        v.set("weight", Value::str("heavy"));
        let err = to_msgpack(&v, &ty()).unwrap_err().to_string();
        assert!(err.contains(".weight"), "{err}");
        v = Value::Object(BTreeMap::from([("nope".into(), Value::Null)]));
        assert!(matches!(
            to_msgpack(&v, &ty()),
            Err(CodecError::UnexpectedAttribute { .. })
        ));
    }

    #[test]
    fn json_state_decodes_with_missing_attributes_as_null_and_extra_ones_dropped() {
        let json = br#"{"name":"r","weight":"12","tags":["a"],"old":1}"#;
        let v = from_json(json, &ty()).unwrap();
        assert_eq!(v.get("weight"), &Value::Number(12.0));
        assert_eq!(v.get("on"), &Value::Null);
        assert_eq!(v.get("tags"), &Value::strings(["a"]));
    }

    #[test]
    fn types_render_as_terraform_writes_them() {
        assert_eq!(
            Type::list(Type::object([("a", Type::Number)]))
                .to_json()
                .to_string(),
            r#"["list",["object",{"a":"number"}]]"#
        );
    }
}
