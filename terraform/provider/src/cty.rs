//! Terraform's values (cty) as the plugin protocol carries them: MessagePack, typed by the
//! schema; and JSON, for stored state.
//!
//! Unknown values are MessagePack extensions (cty's `msgpack` package): any extension of at
//! most one byte is a plain unknown (this provider writes `d4 00 00`, extension 0, as
//! Terraform 1.0 does); Terraform 1.6 and later also send *refined* unknowns, extension 12,
//! whose body is a MessagePack map of refinements: 1 nullness (bool), 2 string prefix
//! (string; strings only), 3 and 4 number bounds (`[number, bool inclusive]`; numbers only),
//! 5 and 6 collection length bounds (integer; lists, sets and maps only). Keys this provider
//! does not know are ignored, as cty does; a body over 1 KiB, a key that cannot apply to the
//! type, or any other extension is an error naming the attribute. A refined unknown keeps its
//! body ([`Refinements`]) and is written back exactly as received, so a planned value that
//! repeats the configuration's unknown equals it.
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
    /// Not known until apply, with Terraform's refinements (known prefix, not null, bounds).
    RefinedUnknown(Refinements),
    Bool(bool),
    Number(f64),
    String(String),
    List(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

/// The refinements of an unknown value, as cty encodes them (extension 12's body), checked
/// against the value's type when decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Refinements {
    /// The extension body as received, written back unchanged.
    raw: Vec<u8>,
    /// Refinement 1: whether the value will be null (`Some(false)`: definitely not null).
    pub null: Option<bool>,
    /// Refinement 2: what a string will start with.
    pub string_prefix: Option<String>,
}

/// cty's extension type for an unknown value with refinements.
const REFINED_UNKNOWN_EXT: i8 = 12;
/// The largest refinement body cty accepts.
const MAX_REFINEMENTS_BYTES: usize = 1024;

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
    #[error("at {path}: MessagePack extension {code} ({len} bytes) is not a value this provider understands: {why}")]
    Extension {
        path: String,
        code: i8,
        len: usize,
        why: String,
    },
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

    /// True for an unknown value, refined or not.
    pub fn is_unknown(&self) -> bool {
        matches!(self, Value::Unknown | Value::RefinedUnknown(_))
    }

    /// True when neither the value nor anything inside it is unknown.
    pub fn is_wholly_known(&self) -> bool {
        match self {
            Value::Unknown | Value::RefinedUnknown(_) => false,
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
            Value::Unknown | Value::RefinedUnknown(_) => "an unknown value",
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
        // Only Terraform 1.6 and later send these, and it gets back what it sent.
        (Value::RefinedUnknown(r), _) => M::Ext(REFINED_UNKNOWN_EXT, r.raw.clone()),
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
        (M::Ext(code, body), _) => unknown(*code, body, ty, path)?,
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

/// An unknown value of type `ty` from a MessagePack extension (see the module docs).
fn unknown(code: i8, body: &[u8], ty: &Type, path: &str) -> Result<Value, CodecError> {
    let path = if path.is_empty() { "." } else { path };
    let bad = |why: String| CodecError::Extension {
        path: path.to_string(),
        code,
        len: body.len(),
        why,
    };
    if body.len() <= 1 {
        return Ok(Value::Unknown);
    }
    if code != REFINED_UNKNOWN_EXT {
        return Err(bad(
            "only extension 0 or 12 (an unknown value) is understood".into(),
        ));
    }
    if body.len() > MAX_REFINEMENTS_BYTES {
        return Err(bad(format!(
            "refinements longer than {MAX_REFINEMENTS_BYTES} bytes"
        )));
    }
    let mut reader = body;
    let map = rmpv::decode::read_value(&mut reader)
        .map_err(|e| bad(format!("the refinements do not decode: {e}")))?;
    let rmpv::Value::Map(entries) = map else {
        return Err(bad(format!("the refinements are {map}, not a map")));
    };
    let mut refinements = Refinements {
        raw: body.to_vec(),
        null: None,
        string_prefix: None,
    };
    let collection = matches!(ty, Type::List(_) | Type::Set(_) | Type::Map(_));
    for (key, value) in &entries {
        let Some(key) = key.as_i64() else {
            return Err(bad(format!("a refinement key {key} is not an integer")));
        };
        match key {
            1 => match value.as_bool() {
                Some(null) => refinements.null = Some(null),
                None => return Err(bad(format!("nullness refinement {value} is not a bool"))),
            },
            2 if *ty != Type::String => {
                return Err(bad(
                    "a string prefix refinement on a value that is not a string".into(),
                ))
            }
            2 => match value.as_str() {
                Some(prefix) => refinements.string_prefix = Some(prefix.to_string()),
                None => {
                    return Err(bad(format!(
                        "string prefix refinement {value} is not a string"
                    )))
                }
            },
            3 | 4 if *ty != Type::Number => {
                return Err(bad(
                    "a number bound refinement on a value that is not a number".into(),
                ))
            }
            3 | 4 => {
                let bound = value.as_array().filter(|b| {
                    b.len() == 2 && (b[0].is_number() || b[0].is_str()) && b[1].is_bool()
                });
                if bound.is_none() {
                    return Err(bad(format!(
                        "number bound refinement {value} is not [number, bool]"
                    )));
                }
            }
            5 | 6 if !collection => {
                return Err(bad(
                    "a length bound refinement on a value that is not a list, set or map".into(),
                ))
            }
            5 | 6 if value.as_i64().is_none() => {
                return Err(bad(format!(
                    "length bound refinement {value} is not an integer"
                )));
            }
            // Refinements added after this provider was written: ignored, as cty does.
            _ => {}
        }
    }
    Ok(Value::RefinedUnknown(refinements))
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

    /// A value with `ext` (fixext/ext header and body) at attribute `ca_certificate` of the
    /// provider block's type, as Terraform sends `ValidateProviderConfig`.
    fn provider_config_with(ext: &[u8]) -> Vec<u8> {
        // fixmap of 4: control (nil), ca_certificate (ext), client_certificate, client_key.
        let mut m = vec![0x84];
        for (name, value) in [
            ("ca_certificate", ext.to_vec()),
            ("client_certificate", vec![0xc0]),
            ("client_key", vec![0xc0]),
            ("control", vec![0xc0]),
        ] {
            m.push(0xa0 | u8::try_from(name.len()).unwrap());
            m.extend_from_slice(name.as_bytes());
            m.extend_from_slice(&value);
        }
        m
    }

    fn provider_type() -> Type {
        Type::object([
            ("control", Type::String),
            ("ca_certificate", Type::String),
            ("client_certificate", Type::String),
            ("client_key", Type::String),
        ])
    }

    #[test]
    fn refined_unknowns_from_terraform_decode_and_are_written_back_as_received() {
        // What Terraform 1.11 sent for `ca_certificate = file(var.ca_file)` during
        // validation: extension 12 with the refinement map {1: false} (not null).
        let not_null = [0xc7, 0x03, 0x0c, 0x81, 0x01, 0xc2];
        let bytes = provider_config_with(&not_null);
        let v = from_msgpack(&bytes, &provider_type()).unwrap();
        let ca = v.get("ca_certificate");
        assert!(ca.is_unknown() && !ca.is_wholly_known());
        let Value::RefinedUnknown(r) = ca else {
            panic!("{ca:?}")
        };
        assert_eq!(r.null, Some(false));
        assert_eq!(to_msgpack(&v, &provider_type()).unwrap(), bytes);

        // A string known to start with "https://" and not null ("https://${var.host}").
        let mut body = vec![0x82, 0x01, 0xc2, 0x02, 0xa8];
        body.extend_from_slice(b"https://");
        let mut ext = vec![0xc7, u8::try_from(body.len()).unwrap(), 0x0c];
        ext.extend_from_slice(&body);
        let v = from_msgpack(&ext, &Type::String).unwrap();
        let Value::RefinedUnknown(r) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(r.string_prefix.as_deref(), Some("https://"));
        assert_eq!(to_msgpack(&v, &Type::String).unwrap(), ext);

        // A number in [1, 10) and a list of at least one element, inside an object and a
        // list, as planned state carries them.
        let number = [
            0xc7, 0x09, 0x0c, 0x82, 0x03, 0x92, 0x01, 0xc3, 0x04, 0x92, 0x0a, 0xc2,
        ];
        let number = &number[..];
        assert!(matches!(
            from_msgpack(number, &Type::Number).unwrap(),
            Value::RefinedUnknown(_)
        ));
        let list = [0xc7, 0x03, 0x0c, 0x81, 0x05, 0x01];
        let ty = Type::object([("weight", Type::Number), ("tags", Type::list(Type::String))]);
        let mut obj = vec![0x82, 0xa4];
        obj.extend_from_slice(b"tags");
        obj.extend_from_slice(&list);
        obj.push(0xa6);
        obj.extend_from_slice(b"weight");
        obj.extend_from_slice(number);
        let v = from_msgpack(&obj, &ty).unwrap();
        assert!(v.get("tags").is_unknown() && v.get("weight").is_unknown());
        assert_eq!(to_msgpack(&v, &ty).unwrap(), obj);
        let mut nested = vec![0x91];
        nested.extend_from_slice(&[0xc7, 0x03, 0x0c, 0x81, 0x01, 0xc2]);
        let v = from_msgpack(&nested, &Type::list(Type::String)).unwrap();
        assert!(v.as_list().unwrap()[0].is_unknown());

        // Refinement keys this provider does not know are ignored, as cty does.
        let future = [0xc7, 0x03, 0x0c, 0x81, 0x2a, 0xc3];
        assert!(from_msgpack(&future, &Type::String).unwrap().is_unknown());
        // Any one-byte (or empty) extension is a plain unknown.
        assert_eq!(
            from_msgpack(&[0xd4, 0x05, 0x00], &Type::String).unwrap(),
            Value::Unknown
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Values captured from Terraform 1.11.4 (`TF_PROVIDER_ISTHMUS_LOG=trace` logs what the
    /// provider decodes) planning a failover policy whose attributes derive from
    /// `timestamp()`: `name = "fo-${...}"`, `min_healthy_percent = length(split(...))`,
    /// `priority { clusters = split(",", timestamp()) }`, and a provider block with
    /// `control = "https://127.0.0.1:1${...}"`.
    #[test]
    fn refined_unknowns_captured_from_terraform_1_11_decode() {
        let failover = hex(concat!(
            "89aa68797374657265736973c0a26964c0b36d696e5f6865616c7468795f70657263656e74c713",
            "0c8301c2039200c30492cf7fffffffffffffffc3a46e616d65d70c8201c202a3666f2da96e616d",
            "657370616365c0ac6f6e5f706172746974696f6ec0a87072696f726974799183ab62795f6c6f63",
            "616c697479c0a8636c757374657273c7030c8101c2a7726567696f6e73c0a77365727669636",
            "5a7726174696e6773ae77697468647261775f6166746572c0"
        ));
        let ty = Type::object([
            ("hysteresis", Type::String),
            ("id", Type::String),
            ("min_healthy_percent", Type::Number),
            ("name", Type::String),
            ("namespace", Type::String),
            ("on_partition", Type::String),
            (
                "priority",
                Type::list(Type::object([
                    ("by_locality", Type::Bool),
                    ("clusters", Type::list(Type::String)),
                    ("regions", Type::list(Type::String)),
                ])),
            ),
            ("service", Type::String),
            ("withdraw_after", Type::String),
        ]);
        let v = from_msgpack(&failover, &ty).unwrap();
        // A string prefix in a fixext8, number bounds [0, 2^63-1] as a uint64, and a list
        // known not to be null.
        let Value::RefinedUnknown(name) = v.get("name") else {
            panic!("{v:?}")
        };
        assert_eq!(name.string_prefix.as_deref(), Some("fo-"));
        assert!(matches!(
            v.get("min_healthy_percent"),
            Value::RefinedUnknown(_)
        ));
        let priority = &v.get("priority").as_list().unwrap()[0];
        assert!(priority.get("clusters").is_unknown());
        assert_eq!(v.get("service").as_str(), Some("ratings"));
        assert_eq!(to_msgpack(&v, &ty).unwrap(), failover);

        let control = hex("c7170c8201c202b268747470733a2f2f3132372e302e302e313a");
        let v = from_msgpack(&control, &Type::String).unwrap();
        let Value::RefinedUnknown(r) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(r.string_prefix.as_deref(), Some("https://127.0.0.1:"));
        assert_eq!(r.null, Some(false));
    }

    #[test]
    fn extensions_that_are_not_unknown_values_are_errors_naming_the_attribute() {
        let cases: [(&[u8], &Type, &str); 6] = [
            // Another extension type with a body.
            (&[0xd5, 0x05, 0x01, 0x02], &Type::String, "extension 5"),
            // A string prefix on a number.
            (
                &[0xc7, 0x03, 0x0c, 0x81, 0x02, 0xa0],
                &Type::Number,
                "not a string",
            ),
            // A length bound on a string.
            (
                &[0xc7, 0x03, 0x0c, 0x81, 0x05, 0x01],
                &Type::String,
                "not a list",
            ),
            // The body is not a map.
            (&[0xc7, 0x02, 0x0c, 0x91, 0x01], &Type::String, "not a map"),
            // Nullness that is not a bool.
            (
                &[0xc7, 0x03, 0x0c, 0x81, 0x01, 0x01],
                &Type::String,
                "not a bool",
            ),
            // A number bound that is not [number, bool].
            (
                &[0xc7, 0x03, 0x0c, 0x81, 0x03, 0x01],
                &Type::Number,
                "[number, bool]",
            ),
        ];
        for (bytes, ty, want) in cases {
            let err = from_msgpack(bytes, ty).unwrap_err().to_string();
            assert!(err.contains(want), "{bytes:x?}: {err}");
        }
        let mut big = vec![0xc8, 0x04, 0x01, 0x0c, 0x81, 0x02, 0xda, 0x03, 0xfc];
        big.extend(std::iter::repeat_n(b'a', 0x3fc));
        let err = from_msgpack(&big, &Type::String).unwrap_err().to_string();
        assert!(err.contains("longer than 1024"), "{err}");
        let err = from_msgpack(
            &provider_config_with(&[0xd5, 0x07, 0x01, 0x02]),
            &provider_type(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(".ca_certificate") && err.contains("extension 7"),
            "{err}"
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
