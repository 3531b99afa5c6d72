//! A route's `corsPolicy`, as Envoy's CORS filter applies Istio's: a browser's preflight
//! from an allowed origin is answered by the sidecar itself; an allowed origin's actual
//! request goes on, and its response is given the CORS headers that let the page read it.
//! Pure: a request's method and headers in, a decision out.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use isthmus_core::policy::networking::{CorsPolicy, StringMatch};
use isthmus_core::policy::parse_duration_istio;

use crate::routing::Matcher;

/// A compiled `corsPolicy`.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<Matcher>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
    /// A preflight from an origin that is not allowed goes on to the service (`FORWARD`,
    /// the default) rather than being answered without CORS headers (`IGNORE`).
    forward_unmatched: bool,
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not a cross-origin request, or one from an origin the policy does not allow: route
    /// it as any other (the browser enforces the missing headers).
    Pass,
    /// A preflight from an allowed origin: answer 200 with these headers, at once.
    Preflight(HeaderMap),
    /// A preflight from another origin, under `unmatchedPreflights: IGNORE`: answer 200 with
    /// no CORS headers.
    RefusePreflight,
    /// An allowed origin's request: route it, then add these headers to the response.
    Decorate(HeaderMap),
}

fn joined(values: &[String]) -> Option<HeaderValue> {
    if values.is_empty() {
        return None;
    }
    HeaderValue::from_str(&values.join(",")).ok()
}

impl Cors {
    /// Compiles a validated policy (anything that still does not compile is left out).
    pub fn compile(p: &CorsPolicy) -> Cors {
        let exact_origins = p.allow_origin.iter().map(|o| StringMatch {
            exact: Some(o.clone()),
            ..StringMatch::default()
        });
        Cors {
            origins: p
                .allow_origins
                .iter()
                .cloned()
                .chain(exact_origins)
                .filter_map(|m| Matcher::compile(&m))
                .collect(),
            methods: joined(&p.allow_methods),
            headers: joined(&p.allow_headers),
            expose: joined(&p.expose_headers),
            max_age: p
                .max_age
                .as_deref()
                .and_then(parse_duration_istio)
                .map(|d: Duration| HeaderValue::from(d.as_secs())),
            credentials: p.allow_credentials.unwrap_or(false),
            forward_unmatched: p.unmatched_preflights.as_deref() != Some("IGNORE"),
        }
    }

    /// `*` (exactly) allows any origin, as in Envoy.
    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| matches!(m, Matcher::Exact(e) if e == "*") || m.matches(origin))
    }

    /// Decides for a request with `method` and `headers`.
    pub fn decide(&self, method: &Method, headers: &HeaderMap) -> Decision {
        let Some(origin) = headers.get(http::header::ORIGIN) else {
            return Decision::Pass;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let preflight = method == Method::OPTIONS
            && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        let mut out = HeaderMap::new();
        if allowed {
            out.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            if self.credentials {
                out.insert(
                    http::header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
        match (preflight, allowed) {
            (true, true) => {
                for (name, value) in [
                    (http::header::ACCESS_CONTROL_ALLOW_METHODS, &self.methods),
                    (http::header::ACCESS_CONTROL_ALLOW_HEADERS, &self.headers),
                    (http::header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
                ] {
                    if let Some(v) = value {
                        out.insert(name, v.clone());
                    }
                }
                Decision::Preflight(out)
            }
            (true, false) if !self.forward_unmatched => Decision::RefusePreflight,
            (false, true) => {
                if let Some(v) = &self.expose {
                    out.insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
                }
                Decision::Decorate(out)
            }
            _ => Decision::Pass,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(yaml: &str) -> Cors {
        Cors::compile(&isthmus_core::config::parse_yaml::<CorsPolicy>(yaml).unwrap())
    }

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    // Istio's documented example.
    const ISTIO: &str = r#"
allowOrigins:
- exact: https://example.com
- regex: "https://.*\\.example\\.org"
allowMethods: [POST, GET]
allowCredentials: false
allowHeaders: [X-Foo-Bar]
exposeHeaders: [X-Expose]
maxAge: "24h"
"#;

    #[test]
    fn an_allowed_preflight_is_answered_with_the_policy() {
        let c = cors(ISTIO);
        let d = c.decide(
            &Method::OPTIONS,
            &request(&[
                ("origin", "https://a.example.org"),
                ("access-control-request-method", "POST"),
            ]),
        );
        let Decision::Preflight(h) = d else {
            panic!("{d:?}")
        };
        assert_eq!(h["access-control-allow-origin"], "https://a.example.org");
        assert_eq!(h["access-control-allow-methods"], "POST,GET");
        assert_eq!(h["access-control-allow-headers"], "X-Foo-Bar");
        assert_eq!(h["access-control-max-age"], "86400");
        assert!(!h.contains_key("access-control-allow-credentials"));
    }

    #[test]
    fn an_allowed_request_is_decorated_and_others_pass() {
        let c = cors(ISTIO);
        let d = c.decide(&Method::GET, &request(&[("origin", "https://example.com")]));
        let Decision::Decorate(h) = d else {
            panic!("{d:?}")
        };
        assert_eq!(h["access-control-allow-origin"], "https://example.com");
        assert_eq!(h["access-control-expose-headers"], "X-Expose");
        // No origin, another origin, a regex that must match whole: not CORS's business.
        for headers in [
            request(&[]),
            request(&[("origin", "https://evil.com")]),
            request(&[("origin", "https://example.com.evil.com")]),
            request(&[("origin", "https://a.example.org.evil")]),
        ] {
            assert_eq!(c.decide(&Method::GET, &headers), Decision::Pass);
        }
    }

    #[test]
    fn unmatched_preflights_go_on_unless_ignored_and_star_allows_any_origin() {
        let preflight = request(&[
            ("origin", "https://evil.com"),
            ("access-control-request-method", "DELETE"),
        ]);
        assert_eq!(
            cors(ISTIO).decide(&Method::OPTIONS, &preflight),
            Decision::Pass
        );
        let ignore = cors(&format!("{ISTIO}unmatchedPreflights: IGNORE\n"));
        assert_eq!(
            ignore.decide(&Method::OPTIONS, &preflight),
            Decision::RefusePreflight
        );
        let any = cors("allowOrigins: [{exact: \"*\"}]\nallowCredentials: true\n");
        let Decision::Preflight(h) = any.decide(&Method::OPTIONS, &preflight) else {
            panic!()
        };
        assert_eq!(h["access-control-allow-origin"], "https://evil.com");
        assert_eq!(h["access-control-allow-credentials"], "true");
        // The deprecated exact list still works.
        let old = cors("allowOrigin: [https://example.com]\n");
        assert!(matches!(
            old.decide(&Method::GET, &request(&[("origin", "https://example.com")])),
            Decision::Decorate(_)
        ));
    }
}
