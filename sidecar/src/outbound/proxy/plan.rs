//! What to do with one outbound HTTP request, decided without I/O: the *planner*.
//!
//! Given the route table, the service the application dialled and the request's head, in
//! Istio's (Envoy's) order: normalize the path (400 when it cannot be); match the first route
//! (404, `NR`, when a VirtualService has routes and none matches); CORS (a preflight is
//! answered here); the local rate limit (429, `RL`); fault injection (a delay, an abort:
//! `FI`); a redirect or a direct response; else pick a destination by weight and apply the
//! route's rewrites and request header operations to the head. Randomness comes in as
//! [`Rolls`] and the rate limiter as a function, so every decision is a table test.
//!
//! What follows a [`Plan::Forward`] (admission, attempts, retries, timeouts, the mirror) is
//! `attempts.rs`'s.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use isthmus_core::http_path::PathNormalization;
use isthmus_core::policy::networking::Percent;

use crate::cors::Decision;
use crate::routing::{
    apply_header_ops, rewrite_path, HttpRoute, RequestView, RouteAction, RouteTable, ServiceKey,
    SourceWorkload, WeightedDestination,
};

/// The random draws one request's decisions use, each in [0, 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rolls {
    /// The weighted pick among the route's destinations.
    pub route: f64,
    /// Whether the fault's delay applies (below its percentage).
    pub delay: f64,
    /// Whether the fault's abort applies (below its percentage).
    pub abort: f64,
}

impl Rolls {
    pub(crate) fn random() -> Rolls {
        Rolls {
            route: rand::random(),
            delay: rand::random(),
            abort: rand::random(),
        }
    }
}

/// A response the caller's sidecar gives itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The Envoy response flag the request's metrics carry, when it has one.
    pub flag: Option<&'static str>,
}

impl Answer {
    fn text(status: StatusCode, body: &str, flag: Option<&'static str>) -> Answer {
        Answer {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
            flag,
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    /// Answer it here, after `delay` (a fault's).
    Answer {
        answer: Answer,
        delay: Option<Duration>,
    },
    /// Send it (its head rewritten) to `dest` by `route`, after `delay`; `cors` headers go on
    /// whatever response it gets.
    Forward {
        route: Box<HttpRoute>,
        dest: WeightedDestination,
        delay: Option<Duration>,
        cors: Option<HeaderMap>,
    },
}

/// Where the request came in and how its path is read.
pub(crate) struct Inbound<'a> {
    /// The port the application dialled.
    pub port: u16,
    pub source: &'a SourceWorkload,
    pub paths: PathNormalization,
}

/// Plans `parts` (a request to `service`), as the module docs say. `rate_limit` is asked once,
/// with the matched route's name, when the request would otherwise go on; `Err` names the
/// policy that refused it.
pub(crate) fn plan(
    table: &RouteTable,
    service: &ServiceKey,
    parts: &mut http::request::Parts,
    inbound: &Inbound<'_>,
    rolls: Rolls,
    rate_limit: impl FnOnce(Option<&str>) -> Result<(), String>,
) -> Plan {
    let answer = |answer: Answer| Plan::Answer {
        answer,
        delay: None,
    };
    // Routes match, and the destination is sent, the normalized path.
    match isthmus_core::http_path::normalize_uri(&parts.uri, inbound.paths) {
        Ok(Some(normal)) => parts.uri = normal,
        Ok(None) => {}
        Err(e) => {
            return answer(Answer::text(
                StatusCode::BAD_REQUEST,
                &format!("{e}\n"),
                None,
            ))
        }
    }
    let view = RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        port: inbound.port,
        authority: authority_of(parts),
        scheme: parts.uri.scheme_str().unwrap_or("http"),
        source: inbound.source,
    };
    let Some(route) = table.http_route(service, &view) else {
        return answer(Answer::text(
            StatusCode::NOT_FOUND,
            "no route matched\n",
            Some("NR"),
        ));
    };
    let prefix = route.matched_prefix(&view);
    let mut cors = None;
    match route
        .cors
        .as_ref()
        .map(|c| c.decide(&parts.method, &parts.headers))
    {
        Some(Decision::Preflight(headers)) => {
            let mut ok = Answer::text(StatusCode::OK, "", Some("-"));
            ok.headers = headers;
            return answer(ok);
        }
        Some(Decision::RefusePreflight) => {
            return answer(Answer::text(StatusCode::OK, "", Some("-")));
        }
        Some(Decision::Decorate(headers)) => cors = Some(headers),
        Some(Decision::Pass) | None => {}
    }
    if let Err(policy) = rate_limit(route.name.as_deref()) {
        tracing::debug!(%policy, service = %service.0, "request rate limited");
        let mut limited = Answer::text(
            StatusCode::TOO_MANY_REQUESTS,
            "local_rate_limited\n",
            Some("RL"),
        );
        limited
            .headers
            .insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
        return answer(limited);
    }
    let (delay, abort) = fault(&route, rolls);
    if let Some(status) = abort {
        return Plan::Answer {
            answer: Answer::text(status, "fault filter abort\n", Some("FI")),
            delay,
        };
    }
    match &route.action {
        RouteAction::Redirect {
            uri,
            authority,
            code,
        } => {
            return Plan::Answer {
                answer: redirect(parts, uri.as_deref(), authority.as_deref(), *code),
                delay,
            }
        }
        RouteAction::Direct { status, body } => {
            return Plan::Answer {
                answer: Answer {
                    status: StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                    headers: HeaderMap::new(),
                    body: body.clone(),
                    flag: Some("-"),
                },
                delay,
            }
        }
        _ => {}
    }
    let Some(dest) = route.pick(rolls.route).cloned() else {
        return Plan::Answer {
            answer: Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the route has no destination\n",
                None,
            ),
            delay,
        };
    };
    rewrite(parts, &route, prefix.as_deref());
    for ops in [route.headers.as_ref(), dest.headers.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(r) = &ops.request {
            apply_header_ops(&mut parts.headers, r);
        }
    }
    Plan::Forward {
        route: Box::new(route),
        dest,
        delay,
        cors,
    }
}

/// The route's fault: a delay (when `rolls.delay` falls below its percentage) and an abort
/// status (likewise with `rolls.abort`).
fn fault(route: &HttpRoute, rolls: Rolls) -> (Option<Duration>, Option<StatusCode>) {
    let Some(fault) = route.fault.as_ref() else {
        return (None, None);
    };
    let delay = fault.delay.as_ref().and_then(|delay| {
        let fraction = Percent::fault_fraction(delay.percentage.as_ref(), delay.percent);
        (rolls.delay < fraction)
            .then(|| isthmus_core::policy::parse_duration_istio(&delay.fixed_delay))
            .flatten()
    });
    let abort = fault.abort.as_ref().and_then(|abort| {
        let fraction = Percent::fault_fraction(abort.percentage.as_ref(), abort.percent);
        (rolls.abort < fraction).then(|| {
            StatusCode::from_u16(u16::try_from(abort.http_status).unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    });
    (delay, abort)
}

/// The route's `rewrite`: the matched prefix (or the whole path) of the URI, and the
/// authority.
fn rewrite(parts: &mut http::request::Parts, route: &HttpRoute, prefix: Option<&str>) {
    let Some(rw) = &route.rewrite else {
        return;
    };
    if let Some(uri) = &rw.uri {
        let path = rewrite_path(parts.uri.path(), prefix, uri);
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        if let Ok(u) = Uri::builder().path_and_query(pq).build() {
            parts.uri = u;
        }
    }
    if let Some(a) = &rw.authority {
        if let Ok(v) = HeaderValue::from_str(a) {
            parts.headers.insert(http::header::HOST, v);
        }
    }
}

/// The request's authority: HTTP/2's `:authority` (in the URI), else HTTP/1.1's `Host`.
pub(crate) fn authority_of(parts: &http::request::Parts) -> &str {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default()
}

fn redirect(
    parts: &http::request::Parts,
    uri: Option<&str>,
    authority: Option<&str>,
    code: u16,
) -> Answer {
    let host = authority.unwrap_or_else(|| authority_of(parts));
    let path = uri.unwrap_or(parts.uri.path());
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut answer = Answer::text(status, "", None);
    if let Ok(v) = HeaderValue::from_str(&format!("http://{host}{path}")) {
        answer.headers.insert(http::header::LOCATION, v);
    }
    answer
}

#[cfg(test)]
mod tests;
