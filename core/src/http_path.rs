//! Request paths normalized before anything matches them (authorization, routing), as
//! Istio's `meshConfig.pathNormalization` does, so `/admin`, `//admin`, `/./admin`,
//! `/x/../admin` and `/%61dmin` are one path to every rule and to the application, which is
//! sent the normalized path.
//!
//! The modes are Istio's:
//!
//! - `NONE`: the path as received.
//! - `BASE`: RFC 3986 normalization: percent-encoded unreserved characters (`A-Z a-z 0-9 - .
//!   _ ~`) decoded and other escapes' hex digits upper-cased (§6.2.2.1-2), backslashes made
//!   slashes (as Envoy's canonicalizer does), dot segments removed (§5.2.4).
//! - `MERGE_SLASHES` (Isthmus's default, Istio's is `BASE`): `BASE`, then runs of slashes
//!   merged into one.
//! - `DECODE_AND_MERGE_SLASHES`: also decodes the escaped slashes `%2F` and `%5C` first.
//!
//! A `%` not followed by two hex digits is refused ([`PathError`]: the request gets 400).

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// How request paths are normalized (Istio's `pathNormalization.normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    None,
    Base,
    #[default]
    MergeSlashes,
    DecodeAndMergeSlashes,
}

impl std::str::FromStr for PathNormalization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "NONE" => Ok(PathNormalization::None),
            "BASE" | "DEFAULT" => Ok(PathNormalization::Base),
            "MERGE_SLASHES" => Ok(PathNormalization::MergeSlashes),
            "DECODE_AND_MERGE_SLASHES" => Ok(PathNormalization::DecodeAndMergeSlashes),
            other => Err(format!(
                "unknown path normalization {other:?} (expected NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES)"
            )),
        }
    }
}

/// A path that cannot be normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    /// Byte offset of the bad escape in the path.
    pub at: usize,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid percent-encoding at byte {} of the request path (expected % and two hex digits)",
            self.at
        )
    }
}

impl std::error::Error for PathError {}

/// `path` (no query) normalized by `mode`; borrowed when nothing changes.
pub fn normalize(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    if mode == PathNormalization::None || !path.starts_with('/') {
        // `*` (OPTIONS) and authority-form targets have no path to normalize.
        return Ok(Cow::Borrowed(path));
    }
    let merge = mode != PathNormalization::Base;
    if is_normal(path, merge) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, mode == PathNormalization::DecodeAndMergeSlashes)?;
    let slashed = decoded.replace('\\', "/");
    let merged = if merge {
        merge_slashes(&slashed)
    } else {
        slashed
    };
    Ok(Cow::Owned(remove_dot_segments(&merged)))
}

/// `uri` with its path normalized by `mode` (scheme, authority and query kept); `None` when
/// the path is already normal.
pub fn normalize_uri(
    uri: &http::Uri,
    mode: PathNormalization,
) -> Result<Option<http::Uri>, PathError> {
    let Cow::Owned(path) = normalize(uri.path(), mode)? else {
        return Ok(None);
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    // Normalized from a path the server parsed: still a valid path (escapes kept as
    // escapes); a failure would leave the request as it came, so refuse it instead.
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| PathError { at: 0 })?);
    http::Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError { at: 0 })
}

/// Whether `path` has nothing to normalize (the common case: no allocation).
fn is_normal(path: &str, merge: bool) -> bool {
    let bytes = path.as_bytes();
    if bytes.iter().any(|&b| b == b'%' || b == b'\\') {
        return false;
    }
    if merge && path.contains("//") {
        return false;
    }
    !path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes escaped unreserved characters (and escaped slashes when `slashes`); upper-cases
/// the hex digits of the escapes that stay.
fn decode(path: &str, slashes: bool) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // Multi-byte characters are copied whole (a `%` is never inside one).
            let end = path[i..]
                .char_indices()
                .nth(1)
                .map_or(bytes.len(), |(n, _)| i + n);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError { at: i });
        };
        let value = hi * 16 + lo;
        if is_unreserved(value) || (slashes && matches!(value, b'/' | b'\\')) {
            out.push(char::from(value));
        } else {
            let _ = write!(out, "%{value:02X}");
        }
        i += 3;
    }
    Ok(out)
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments dropped, `..` drops the one before
/// (never above the root); a path ending in either ends with a slash.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        if i == last && matches!(segment, "." | "..") {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathNormalization::*;

    fn n(path: &str, mode: PathNormalization) -> String {
        normalize(path, mode).expect("normalizes").into_owned()
    }

    #[test]
    fn every_bypass_form_of_a_path_becomes_the_path() {
        for form in [
            "/admin",
            "//admin",
            "///admin",
            "/./admin",
            "/x/../admin",
            "/x/y/../../admin",
            "/../admin",
            "/%61dmin",
            "/%61%64%6D%69%6e",
            "/.%2e/admin",
            "/%2E/admin",
            "\\admin",
            "/x\\..\\admin",
        ] {
            let path = if form.starts_with('\\') {
                // A backslash first is not an origin-form path; it is left as is.
                assert_eq!(n(form, MergeSlashes), form);
                continue;
            } else {
                n(form, MergeSlashes)
            };
            assert_eq!(path, "/admin", "{form}");
        }
    }

    #[test]
    fn modes_differ_as_istios_do() {
        assert_eq!(n("//admin", Base), "//admin");
        assert_eq!(n("//admin", MergeSlashes), "/admin");
        assert_eq!(n("/x/..//admin", Base), "//admin");
        assert_eq!(n("/a%2Fb", MergeSlashes), "/a%2Fb");
        assert_eq!(n("/a%2fb", MergeSlashes), "/a%2Fb");
        assert_eq!(n("/a%2F%2Fb", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(n("/a%5c..%5cadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/x/../%61dmin", None), "/x/../%61dmin");
        assert_eq!(n("/%zz", None), "/%zz");
    }

    #[test]
    fn dot_segments_follow_rfc_3986() {
        for (path, want) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/./", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/", "/"),
            ("/a/.hidden/..x/...", "/a/.hidden/..x/..."),
        ] {
            assert_eq!(n(path, Base), want, "{path}");
        }
    }

    #[test]
    fn escapes_that_stay_are_upper_cased_and_bad_ones_refused() {
        assert_eq!(n("/caf%c3%a9", Base), "/caf%C3%A9");
        assert_eq!(n("/a%20b", Base), "/a%20b");
        assert_eq!(n("/é/./x", Base), "/é/x");
        assert_eq!(normalize("/a%zzb", Base), Err(PathError { at: 2 }));
        assert_eq!(normalize("/a%4", MergeSlashes), Err(PathError { at: 2 }));
        let err = normalize("/%", Base).unwrap_err().to_string();
        assert!(err.contains("byte 1"), "{err}");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in ["/", "/a/b", "/a.b/c..d", "/v1/items?x=1", "*"] {
            assert!(
                matches!(normalize(path, MergeSlashes), Ok(Cow::Borrowed(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn a_uri_keeps_its_authority_and_query() {
        let uri: http::Uri = "http://ratings:9080/x/../%61dmin?a=%2e%2e&b=1"
            .parse()
            .unwrap();
        let normal = normalize_uri(&uri, MergeSlashes).unwrap().unwrap();
        assert_eq!(normal.to_string(), "http://ratings:9080/admin?a=%2e%2e&b=1");
        let origin: http::Uri = "//admin?q".parse().unwrap();
        assert_eq!(
            normalize_uri(&origin, MergeSlashes).unwrap().unwrap(),
            "/admin?q"
        );
        assert_eq!(
            normalize_uri(&"/fine?x".parse().unwrap(), Base),
            Ok(Option::None)
        );
    }

    #[test]
    fn modes_parse_by_istios_names() {
        assert_eq!("BASE".parse(), Ok(Base));
        assert_eq!("DEFAULT".parse(), Ok(Base));
        assert_eq!(
            "DECODE_AND_MERGE_SLASHES".parse(),
            Ok(DecodeAndMergeSlashes)
        );
        let err = "merge".parse::<PathNormalization>().unwrap_err();
        assert!(err.contains("MERGE_SLASHES"), "{err}");
    }
}
