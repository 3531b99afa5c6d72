//! The meaning checks every policy passes before it is stored: what serde's structure cannot
//! say (exactly one match kind, weights summing to 100, regexes that compile, durations,
//! percentages, status codes, enumerations). Each failure names the field path.

use std::time::Duration;

use super::networking::{
    Destination, HttpRoute, LoadBalancerSettings, OutlierDetection, Percent, StringMatch, TlsRoute,
    TrafficPolicy,
};
use super::{Policy, Spec};

type Check = Result<(), (String, String)>;

fn fail<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, (String, String)> {
    Err((field.into(), message.into()))
}

/// The longest duration any policy field takes: longer ones are refused at validation, so
/// no deadline computed from one can overflow (Istio's protobuf allows 10,000 years).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses an Istio (protobuf) duration: `10s`, `0.5s`, `100ms`, `2m`, `1h`, `1.5s`; `None`
/// when malformed or longer than [`MAX_DURATION`].
pub fn parse_duration_istio(s: &str) -> Option<Duration> {
    parse_unbounded(s).filter(|d| *d <= MAX_DURATION)
}

fn parse_unbounded(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "us" | "µs" => n / 1_000_000.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Resolves a host as Istio does, relative to the policy's namespace: `reviews`,
/// `reviews.default`, `reviews.default.svc`, `reviews.default.svc.cluster.local` and
/// `reviews.default.svc.clusterset.local` all name service `reviews` in `default`.
/// Returns `(service, namespace)`, or None for a host that is not a mesh service name.
pub fn resolve_host(host: &str, namespace: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [svc] => Some((svc.to_string(), namespace.to_string())),
        [svc, ns] | [svc, ns, "svc"] => Some((svc.to_string(), ns.to_string())),
        [svc, ns, "svc", "cluster", "local"] | [svc, ns, "svc", "clusterset", "local"] => {
            Some((svc.to_string(), ns.to_string()))
        }
        _ => None,
    }
}

fn duration(field: &str, value: &str) -> Check {
    match parse_unbounded(value) {
        Some(d) if d > MAX_DURATION => fail(
            field,
            format!("duration {value:?} is longer than the maximum, 720h (30 days)"),
        ),
        Some(_) => Ok(()),
        None => fail(
            field,
            format!("invalid duration {value:?} (write e.g. 10s, 0.5s or 250ms)"),
        ),
    }
}

fn percent(field: &str, p: &Percent) -> Check {
    match p.value.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(()),
        _ => fail(
            format!("{field}.value"),
            format!("invalid percentage {:?} (0 to 100)", p.value),
        ),
    }
}

fn string_match(field: &str, m: &StringMatch) -> Check {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if set != 1 {
        return fail(field, "exactly one of exact, prefix or regex is required");
    }
    if let Some(re) = &m.regex {
        if let Err(e) = regex::Regex::new(&format!("^(?:{re})$")) {
            return fail(
                format!("{field}.regex"),
                format!("invalid regex {re:?}: {e}"),
            );
        }
    }
    Ok(())
}

fn port(field: &str, p: u32) -> Check {
    if (1..=65535).contains(&p) {
        Ok(())
    } else {
        fail(field, format!("invalid port {p} (1 to 65535)"))
    }
}

fn destination(field: &str, d: &Destination) -> Check {
    if d.host.is_empty() {
        return fail(format!("{field}.host"), "a destination needs a host");
    }
    if let Some(p) = d.port {
        port(&format!("{field}.port.number"), p.number)?;
    }
    Ok(())
}

fn weights(field: &str, weights: &[Option<u32>]) -> Check {
    if weights.len() > 1 || weights.iter().any(|w| w.is_some()) {
        let sum: u32 = weights.iter().map(|w| w.unwrap_or(0)).sum();
        if weights.len() > 1 && sum != 100 {
            return fail(
                field,
                format!("the weights add up to {sum}; they must add up to 100"),
            );
        }
    }
    Ok(())
}

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "refused-stream",
    "retriable-4xx",
    // gRPC status names, matched on a trailers-only response's grpc-status.
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    "retriable-status-codes",
];

fn http_route(at: &str, r: &HttpRoute) -> Check {
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    match actions.iter().filter(|set| **set).count() {
        0 => {
            return fail(
                format!("{at}.route"),
                "an http route needs a route, a redirect or a directResponse",
            )
        }
        1 => {}
        _ => {
            let second = if r.direct_response.is_some() {
                "directResponse"
            } else {
                "redirect"
            };
            return fail(
                format!("{at}.{second}"),
                "an http route has one of route, redirect and directResponse",
            );
        }
    }
    if let Some(direct) = &r.direct_response {
        if !(200..=599).contains(&direct.status) {
            return fail(
                format!("{at}.directResponse.status"),
                format!("invalid status {} (200 to 599)", direct.status),
            );
        }
        if let Some(body) = &direct.body {
            if body.string.is_some() && body.bytes.is_some() {
                return fail(
                    format!("{at}.directResponse.body"),
                    "set one of string and bytes",
                );
            }
            match body.to_bytes() {
                None => return fail(format!("{at}.directResponse.body.bytes"), "not base64"),
                Some(b) if b.len() > 1024 * 1024 => {
                    return fail(
                        format!("{at}.directResponse.body"),
                        format!("{} bytes; at most 1 MiB", b.len()),
                    )
                }
                Some(_) => {}
            }
        }
    }
    for (j, m) in r.matches.iter().enumerate() {
        let mf = format!("{at}.match[{j}]");
        if let Some(u) = &m.uri {
            string_match(&format!("{mf}.uri"), u)?;
        }
        if let Some(u) = &m.method {
            string_match(&format!("{mf}.method"), u)?;
        }
        for (name, h) in &m.headers {
            string_match(&format!("{mf}.headers.{name}"), h)?;
        }
        for (name, q) in &m.query_params {
            string_match(&format!("{mf}.queryParams.{name}"), q)?;
        }
        for (name, h) in &m.without_headers {
            string_match(&format!("{mf}.withoutHeaders.{name}"), h)?;
        }
        if let Some(a) = &m.authority {
            string_match(&format!("{mf}.authority"), a)?;
        }
        if let Some(a) = &m.scheme {
            string_match(&format!("{mf}.scheme"), a)?;
        }
        if let Some(p) = m.port {
            port(&format!("{mf}.port"), p)?;
        }
    }
    for (j, d) in r.route.iter().enumerate() {
        destination(&format!("{at}.route[{j}].destination"), &d.destination)?;
    }
    weights(
        &format!("{at}.route"),
        &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
    )?;
    if let Some(red) = &r.redirect {
        if red.uri.is_none() && red.authority.is_none() {
            return fail(
                format!("{at}.redirect"),
                "a redirect needs uri or authority",
            );
        }
        if let Some(code) = red.redirect_code {
            if !(300..=399).contains(&code) {
                return fail(
                    format!("{at}.redirect.redirectCode"),
                    format!("invalid redirect code {code} (3xx)"),
                );
            }
        }
    }
    if let Some(t) = &r.timeout {
        duration(&format!("{at}.timeout"), t)?;
    }
    if let Some(cors) = &r.cors_policy {
        let at = format!("{at}.corsPolicy");
        for (i, m) in cors.allow_origins.iter().enumerate() {
            string_match(&format!("{at}.allowOrigins[{i}]"), m)?;
        }
        if let Some(age) = &cors.max_age {
            duration(&format!("{at}.maxAge"), age)?;
        }
        for (field, values) in [
            ("allowMethods", &cors.allow_methods),
            ("allowHeaders", &cors.allow_headers),
            ("exposeHeaders", &cors.expose_headers),
        ] {
            for (i, v) in values.iter().enumerate() {
                if v.is_empty() || http::HeaderValue::from_str(v).is_err() || v.contains(',') {
                    return fail(
                        format!("{at}.{field}[{i}]"),
                        format!("{v:?} is not a single header token"),
                    );
                }
            }
        }
        if let Some(mode) = &cors.unmatched_preflights {
            if !matches!(mode.as_str(), "FORWARD" | "IGNORE" | "UNSPECIFIED") {
                return fail(
                    format!("{at}.unmatchedPreflights"),
                    format!("unknown mode {mode:?} (FORWARD or IGNORE)"),
                );
            }
        }
    }
    if let Some(retry) = &r.retries {
        if retry.attempts > 100 {
            return fail(
                format!("{at}.retries.attempts"),
                format!("{} attempts is too many (at most 100)", retry.attempts),
            );
        }
        if let Some(t) = &retry.per_try_timeout {
            duration(&format!("{at}.retries.perTryTimeout"), t)?;
        }
        if let Some(on) = &retry.retry_on {
            for cond in on.split(',').map(str::trim) {
                if !RETRY_ON.contains(&cond)
                    && cond
                        .parse::<u16>()
                        .map(|c| !(100..=599).contains(&c))
                        .unwrap_or(true)
                {
                    return fail(
                        format!("{at}.retries.retryOn"),
                        format!("unsupported retry condition {cond:?} (supported: {}, or a status code)", RETRY_ON.join(", ")),
                    );
                }
            }
        }
    }
    if let Some(fault) = &r.fault {
        if fault.delay.is_none() && fault.abort.is_none() {
            return fail(format!("{at}.fault"), "a fault needs a delay or an abort");
        }
        if let Some(d) = &fault.delay {
            duration(&format!("{at}.fault.delay.fixedDelay"), &d.fixed_delay)?;
            if d.percent.is_some_and(|p| p > 100) {
                return fail(
                    format!("{at}.fault.delay.percent"),
                    "a percentage from 0 to 100",
                );
            }
            if let Some(p) = &d.percentage {
                percent(&format!("{at}.fault.delay.percentage"), p)?;
            }
        }
        if let Some(a) = &fault.abort {
            if a.percent.is_some_and(|p| p > 100) {
                return fail(
                    format!("{at}.fault.abort.percent"),
                    "a percentage from 0 to 100",
                );
            }
            if !(200..=599).contains(&a.http_status) {
                return fail(
                    format!("{at}.fault.abort.httpStatus"),
                    format!("invalid status {} (200 to 599)", a.http_status),
                );
            }
            if let Some(p) = &a.percentage {
                percent(&format!("{at}.fault.abort.percentage"), p)?;
            }
        }
    }
    if let Some(m) = &r.mirror {
        destination(&format!("{at}.mirror"), m)?;
    }
    if let Some(p) = &r.mirror_percentage {
        percent(&format!("{at}.mirrorPercentage"), p)?;
    }
    Ok(())
}

fn load_balancer(at: &str, lb: &LoadBalancerSettings) -> Check {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        return fail(at, "simple and consistentHash cannot both be set");
    }
    if let Some(s) = &lb.simple {
        if !["ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN", "RANDOM"].contains(&s.as_str()) {
            return fail(
                format!("{at}.simple"),
                format!("unsupported load balancer {s:?} (ROUND_ROBIN, LEAST_REQUEST, RANDOM)"),
            );
        }
    }
    if let Some(h) = &lb.consistent_hash {
        let set = [
            h.http_header_name.is_some(),
            h.http_cookie.is_some(),
            h.use_source_ip == Some(true),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if set != 1 {
            return fail(
                format!("{at}.consistentHash"),
                "exactly one of httpHeaderName, httpCookie or useSourceIp is required",
            );
        }
        if let Some(ttl) = h.http_cookie.as_ref().and_then(|c| c.ttl.as_ref()) {
            duration(&format!("{at}.consistentHash.httpCookie.ttl"), ttl)?;
        }
    }
    if let Some(setting) = &lb.locality_lb_setting {
        locality_lb_setting(&format!("{at}.localityLbSetting"), setting)?;
    }
    Ok(())
}

/// `distribute`, as Istio checks it: each rule a `from` locality and `to` weights that add up
/// to 100; not together with `failover` or `failoverPriority`.
fn locality_lb_setting(at: &str, setting: &serde_json::Value) -> Check {
    let Some(rules) = setting.get("distribute") else {
        return Ok(());
    };
    for other in ["failover", "failoverPriority"] {
        if setting.get(other).is_some() {
            return fail(at, format!("distribute and {other} cannot both be set"));
        }
    }
    let Some(rules) = rules.as_array() else {
        return fail(format!("{at}.distribute"), "a list of {from, to} rules");
    };
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{at}.distribute[{i}]");
        if rule
            .get("from")
            .and_then(|f| f.as_str())
            .is_none_or(|f| f.trim().is_empty())
        {
            return fail(
                format!("{at}.from"),
                "a locality (region/zone/subzone, * for any) is required",
            );
        }
        let Some(to) = rule.get("to").and_then(|t| t.as_object()) else {
            return fail(
                format!("{at}.to"),
                "a map of locality to weight is required",
            );
        };
        let mut total = 0u64;
        for (locality, weight) in to {
            let Some(w) = weight.as_u64().filter(|w| *w <= 100) else {
                return fail(
                    format!("{at}.to.{locality}"),
                    format!("weight {weight} is not a whole number from 0 to 100"),
                );
            };
            total += w;
        }
        if total != 100 {
            return fail(
                format!("{at}.to"),
                format!("the weights add up to {total}; they must add up to 100"),
            );
        }
    }
    Ok(())
}

fn outlier(at: &str, o: &OutlierDetection) -> Check {
    for (name, v) in [
        ("interval", &o.interval),
        ("baseEjectionTime", &o.base_ejection_time),
    ] {
        if let Some(v) = v {
            duration(&format!("{at}.{name}"), v)?;
        }
    }
    if let Some(p) = o.max_ejection_percent {
        if p > 100 {
            return fail(
                format!("{at}.maxEjectionPercent"),
                format!("{p} is over 100"),
            );
        }
    }
    Ok(())
}

fn traffic_policy(at: &str, tp: &TrafficPolicy) -> Check {
    if let Some(lb) = &tp.load_balancer {
        load_balancer(&format!("{at}.loadBalancer"), lb)?;
    }
    if let Some(o) = &tp.outlier_detection {
        outlier(&format!("{at}.outlierDetection"), o)?;
    }
    if let Some(tls) = &tp.tls {
        if tls.mode != "ISTIO_MUTUAL" {
            return fail(
                format!("{at}.tls.mode"),
                format!("unsupported TLS mode {:?} (only ISTIO_MUTUAL)", tls.mode),
            );
        }
    }
    if let Some(t) = tp
        .connection_pool
        .as_ref()
        .and_then(|c| c.tcp.as_ref())
        .and_then(|t| t.connect_timeout.as_ref())
    {
        duration(&format!("{at}.connectionPool.tcp.connectTimeout"), t)?;
    }
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{at}.portLevelSettings[{i}]");
        port(&format!("{pf}.port.number"), p.port.number)?;
        if let Some(lb) = &p.load_balancer {
            load_balancer(&format!("{pf}.loadBalancer"), lb)?;
        }
        if let Some(o) = &p.outlier_detection {
            outlier(&format!("{pf}.outlierDetection"), o)?;
        }
    }
    Ok(())
}

/// A `tls` route: at least one match, each naming server names, and destinations as a `tcp`
/// route's.
fn tls_route(at: &str, r: &TlsRoute) -> Check {
    if r.matches.is_empty() {
        return fail(
            format!("{at}.match"),
            "a tls route needs at least one match with sniHosts",
        );
    }
    for (i, m) in r.matches.iter().enumerate() {
        let at = format!("{at}.match[{i}]");
        if m.sni_hosts.is_empty() {
            return fail(
                format!("{at}.sniHosts"),
                "at least one server name is required",
            );
        }
        for (j, host) in m.sni_hosts.iter().enumerate() {
            sni_host(&format!("{at}.sniHosts[{j}]"), host)?;
        }
        if let Some(port) = m.port {
            if port == 0 || port > u32::from(u16::MAX) {
                return fail(
                    format!("{at}.port"),
                    format!("{port} is not a port (1-65535)"),
                );
            }
        }
    }
    if r.route.is_empty() {
        return fail(
            format!("{at}.route"),
            "a tls route needs at least one destination",
        );
    }
    for (j, d) in r.route.iter().enumerate() {
        destination(&format!("{at}.route[{j}].destination"), &d.destination)?;
    }
    weights(
        &format!("{at}.route"),
        &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
    )
}

/// A server name an SNI match may name: `*`, or a DNS name, optionally `*.` followed by one.
fn sni_host(at: &str, host: &str) -> Check {
    if host == "*" {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return fail(
            at,
            format!("{host:?} is not a server name (a DNS name, `*.` and a DNS name, or `*`)"),
        );
    }
    Ok(())
}

/// Validates a parsed policy; the error is (field path, message).
pub(super) fn validate(policy: &Policy) -> Check {
    match &policy.spec {
        Spec::VirtualService(vs) => {
            if vs.hosts.is_empty() {
                return fail("spec.hosts", "at least one host is required");
            }
            for (i, g) in vs.gateways.iter().enumerate() {
                if g != "mesh" {
                    return fail(
                        format!("spec.gateways[{i}]"),
                        format!("gateway {g:?} is not supported (only the mesh)"),
                    );
                }
            }
            if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
                return fail("spec", "a VirtualService needs http, tls or tcp routes");
            }
            for (i, r) in vs.http.iter().enumerate() {
                http_route(&format!("spec.http[{i}]"), r)?;
            }
            for (i, r) in vs.tls.iter().enumerate() {
                tls_route(&format!("spec.tls[{i}]"), r)?;
            }
            for (i, r) in vs.tcp.iter().enumerate() {
                let at = format!("spec.tcp[{i}]");
                if r.route.is_empty() {
                    return fail(
                        format!("{at}.route"),
                        "a tcp route needs at least one destination",
                    );
                }
                for (j, d) in r.route.iter().enumerate() {
                    destination(&format!("{at}.route[{j}].destination"), &d.destination)?;
                }
                weights(
                    &format!("{at}.route"),
                    &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
                )?;
            }
            Ok(())
        }
        Spec::DestinationRule(dr) => {
            if dr.host.is_empty() {
                return fail("spec.host", "a host is required");
            }
            if let Some(tp) = &dr.traffic_policy {
                traffic_policy("spec.trafficPolicy", tp)?;
            }
            for (i, s) in dr.subsets.iter().enumerate() {
                let at = format!("spec.subsets[{i}]");
                if s.name.is_empty() {
                    return fail(format!("{at}.name"), "a subset needs a name");
                }
                if dr.subsets[..i].iter().any(|o| o.name == s.name) {
                    return fail(
                        format!("{at}.name"),
                        format!("subset {:?} is defined twice", s.name),
                    );
                }
                if let Some(tp) = &s.traffic_policy {
                    traffic_policy(&format!("{at}.trafficPolicy"), tp)?;
                }
            }
            Ok(())
        }
        Spec::AuthorizationPolicy(ap) => {
            if let Some(a) = &ap.action {
                if a != "ALLOW" && a != "DENY" {
                    return fail(
                        "spec.action",
                        format!("unsupported action {a:?} (ALLOW or DENY)"),
                    );
                }
            }
            for (i, rule) in ap.rules.iter().enumerate() {
                for (j, to) in rule.to.iter().enumerate() {
                    for (k, p) in to.operation.ports.iter().enumerate() {
                        let field = format!("spec.rules[{i}].to[{j}].operation.ports[{k}]");
                        match p.parse::<u32>() {
                            Ok(n) => port(&field, n)?,
                            Err(_) => return fail(field, format!("invalid port {p:?}")),
                        }
                    }
                }
                for (j, w) in rule.when.iter().enumerate() {
                    let ok = (w.key.starts_with("request.headers[")
                        && w.key.ends_with(']')
                        && w.key.len() > 17)
                        || claim_path(&w.key).is_some_and(|p| !p.is_empty())
                        || [
                            "source.principal",
                            "source.namespace",
                            "request.auth.principal",
                            "request.auth.audiences",
                            "request.auth.presenter",
                        ]
                        .contains(&w.key.as_str());
                    if !ok {
                        return fail(
                            format!("spec.rules[{i}].when[{j}].key"),
                            format!("unsupported condition key {:?} (request.headers[<name>], source.principal, source.namespace, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[<name>])", w.key),
                        );
                    }
                }
            }
            Ok(())
        }
        Spec::RateLimitPolicy(rl) => {
            if rl.host.is_empty() {
                return fail("spec.host", "a host is required");
            }
            if rl.token_bucket.max_tokens == 0 {
                return fail("spec.tokenBucket.maxTokens", "must be at least 1");
            }
            if rl.token_bucket.tokens_per_fill == Some(0) {
                return fail("spec.tokenBucket.tokensPerFill", "must be at least 1");
            }
            match parse_duration_istio(&rl.token_bucket.fill_interval) {
                Some(d) if d >= Duration::from_millis(1) => Ok(()),
                _ => fail(
                    "spec.tokenBucket.fillInterval",
                    format!(
                        "invalid interval {:?} (at least 1ms, e.g. 1s)",
                        rl.token_bucket.fill_interval
                    ),
                ),
            }
        }
        Spec::FailoverPolicy(fp) => {
            if let Some(s) = &fp.service {
                if crate::identity::validate_label("spec.service", s).is_err() {
                    return fail("spec.service", format!("{s:?} is not a service name"));
                }
            }
            for (i, p) in fp.priorities.iter().enumerate() {
                let given = usize::from(!p.clusters.is_empty())
                    + usize::from(!p.regions.is_empty())
                    + usize::from(p.by_locality);
                if given != 1 {
                    return fail(
                        format!("spec.priorities[{i}]"),
                        "give exactly one of clusters, regions or byLocality: true",
                    );
                }
                for (j, c) in p.clusters.iter().enumerate() {
                    if crate::identity::validate_label("cluster", c).is_err() {
                        return fail(
                            format!("spec.priorities[{i}].clusters[{j}]"),
                            format!("{c:?} is not a cluster name"),
                        );
                    }
                }
                if p.by_locality && i + 1 != fp.priorities.len() {
                    return fail(
                        format!("spec.priorities[{i}].byLocality"),
                        "byLocality takes every remaining cluster, so it must be the last priority",
                    );
                }
            }
            if let Some(m) = fp.min_healthy_percent {
                if m > 100 {
                    return fail(
                        "spec.minHealthyPercent",
                        format!("{m} is not a percentage (0-100)"),
                    );
                }
            }
            if let Some(h) = &fp.hysteresis {
                duration("spec.hysteresis", h)?;
            }
            super::isthmus::parse_on_partition(fp.on_partition.as_ref())
                .map(|_| ())
                .map_err(|e| ("spec.onPartition".to_string(), e))
        }
        Spec::RequestAuthentication(ra) => {
            for (i, rule) in ra.jwt_rules.iter().enumerate() {
                let at = format!("spec.jwtRules[{i}]");
                if rule.issuer.is_empty() {
                    return fail(format!("{at}.issuer"), "an issuer is required");
                }
                if ra.jwt_rules[..i].iter().any(|o| o.issuer == rule.issuer) {
                    return fail(
                        format!("{at}.issuer"),
                        format!("issuer {:?} has two rules", rule.issuer),
                    );
                }
                let Some(jwks) = &rule.jwks else {
                    return fail(
                        format!("{at}.jwks"),
                        "the issuer's key set is required inline (jwksUri is not supported)",
                    );
                };
                crate::jwt::KeySet::parse(jwks).map_err(|e| (format!("{at}.jwks"), e))?;
                let header =
                    |field: String, name: &str| match http::HeaderName::from_bytes(name.as_bytes())
                    {
                        Ok(_) => Ok(()),
                        Err(_) => fail(field, format!("{name:?} is not a header name")),
                    };
                for (j, h) in rule.from_headers.iter().enumerate() {
                    header(format!("{at}.fromHeaders[{j}].name"), &h.name)?;
                }
                for (j, p) in rule.from_params.iter().enumerate() {
                    if p.is_empty() {
                        return fail(
                            format!("{at}.fromParams[{j}]"),
                            "a parameter name is required",
                        );
                    }
                }
                for (j, c) in rule.from_cookies.iter().enumerate() {
                    if c.is_empty() {
                        return fail(
                            format!("{at}.fromCookies[{j}]"),
                            "a cookie name is required",
                        );
                    }
                }
                if let Some(h) = &rule.output_payload_to_header {
                    header(format!("{at}.outputPayloadToHeader"), h)?;
                }
                for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
                    header(format!("{at}.outputClaimToHeaders[{j}].header"), &c.header)?;
                    if c.claim.is_empty() {
                        return fail(
                            format!("{at}.outputClaimToHeaders[{j}].claim"),
                            "a claim name is required",
                        );
                    }
                }
            }
            Ok(())
        }
        Spec::PeerAuthentication(pa) => {
            let mode = |field: String, m: &super::security::MutualTls| {
                if ["STRICT", "PERMISSIVE", "UNSET"].contains(&m.mode.as_str()) {
                    Ok(())
                } else {
                    fail(
                        field,
                        format!(
                            "unsupported mode {:?} (STRICT, PERMISSIVE or UNSET)",
                            m.mode
                        ),
                    )
                }
            };
            if let Some(m) = &pa.mtls {
                mode("spec.mtls.mode".into(), m)?;
            }
            if !pa.port_level_mtls.is_empty()
                && pa
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.match_labels.is_empty())
            {
                return fail(
                    "spec.portLevelMtls",
                    "port-level mTLS needs a workload selector (as in Istio)",
                );
            }
            for (p, m) in &pa.port_level_mtls {
                let p = &p.0;
                let at = format!("spec.portLevelMtls[{p}]");
                match p.parse::<u32>() {
                    Ok(n) => port(&at, n)?,
                    Err(_) => return fail(at, format!("{p:?} is not a port number")),
                }
                mode(format!("{at}.mode"), m)?;
            }
            Ok(())
        }
    }
}

/// The claim names of a `request.auth.claims[a][b]` condition key (`None`: not such a key;
/// an empty name makes it invalid).
pub fn claim_path(key: &str) -> Option<Vec<&str>> {
    let mut rest = key.strip_prefix("request.auth.claims")?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        let (name, after) = rest.strip_prefix('[')?.split_once(']')?;
        if name.is_empty() {
            return None;
        }
        path.push(name);
        rest = after;
    }
    Some(path)
}
