//! One request's attempts at its destination: the circuit breaker's admission, then up to
//! `1 + retries` attempts, each to an upstream the destination's balancer picks among the
//! failover table's candidates, bounded by the per-try timeout; every outcome feeds outlier
//! detection. Also the mirror, fired and forgotten.

use super::*;

impl HttpProxy {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn attempts(
        &self,
        config: &MeshConfig,
        table: &RouteTable,
        target: &MeshService,
        dest: &WeightedDestination,
        port: u16,
        route: &HttpRoute,
        parts: http::request::Parts,
        mut body: Replay,
        hash_key: Option<String>,
        report: &mut Report,
    ) -> Response<Body> {
        let dkey: DestKey = (dest.service.clone(), dest.subset.clone());
        let policy = table.policy(&dest.service, dest.subset.as_deref(), port);
        let algorithm = Algorithm::from_settings(policy.load_balancer.as_ref());
        let outlier = policy
            .outlier_detection
            .as_ref()
            .map(OutlierSettings::from_policy);
        let limits = Limits::from_policy(policy.connection_pool.as_ref());
        let labels = match &dest.subset {
            Some(s) => match table.subset_labels(&dest.service, s) {
                Some(l) => Some(l.clone()),
                None => {
                    let resp = text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("no DestinationRule defines subset {s}\n"),
                    );
                    report.set(&dest.service, "NR");
                    return resp;
                }
            },
            None => None,
        };
        let health = self.connector.health().clone();
        let gateway = self.connector.has_gateway();
        let remote_retries = route.retries.as_ref().is_some_and(|r| r.remote_localities);
        let candidates_now = |attempt: u32| {
            health.candidates_for_attempt(
                config,
                target,
                labels.as_ref(),
                dest.subset.as_deref(),
                gateway,
                crate::failover::Pick {
                    attempt: remote_retries.then_some(attempt),
                    roll: rand::random(),
                },
            )
        };
        let candidates = candidates_now(0);
        if candidates.is_empty() {
            let resp = text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
            report.set(&dest.service, "UH");
            return resp;
        }
        let subset_arg = labels.as_ref().map(isthmus_core::tunnel::subset_selector);
        // Circuit breaker: a slot, or a place in the pending queue, or an overflow.
        let Some(_permit) = self.admit(&dkey, limits).await else {
            let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n");
            resp.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            report.set(&dest.service, "UO");
            return resp;
        };
        let retry = route
            .retries
            .clone()
            .unwrap_or_else(RetryPolicy::mesh_default);
        let mut last = None;
        for attempt in 0..=retry.attempts {
            let Some(req_body) = body.take() else { break };
            // Asked again each attempt: a failure may just have moved the traffic on (and
            // with retryRemoteLocalities, each retry goes to the next priority in turn).
            let candidates = if attempt == 0 {
                candidates.clone()
            } else {
                candidates_now(attempt)
            };
            let Some(upstream) =
                self.pick_upstream(&dkey, &candidates, &algorithm, hash_key.as_deref())
            else {
                break;
            };
            report.cluster = match &upstream {
                Upstream::Local(_) => self.source.cluster.clone(),
                Upstream::Remote(c) => c.clone(),
            };
            let req = Request::from_parts(parts.clone(), req_body);
            let fut = self.send(target, port, &upstream, subset_arg.clone(), req);
            let result = match retry.per_try_timeout {
                Some(t) => tokio::time::timeout(t, fut)
                    .await
                    .unwrap_or(Attempt::Failed {
                        connect: false,
                        reason: "per-try timeout".into(),
                    }),
                None => fut.await,
            };
            let (outcome, retriable) = match &result {
                Attempt::Response(r) => {
                    let s = r.status().as_u16();
                    // A gRPC failure answered at once comes as a trailers-only response.
                    let grpc = r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u32>().ok());
                    let retriable = retry.retriable(Some(s), false)
                        || grpc.is_some_and(|g| retry.retriable_grpc(g));
                    (Outcome::Status(s), retriable)
                }
                Attempt::Failed { connect, .. } => {
                    (Outcome::Failed, retry.retriable(None, *connect))
                }
            };
            {
                let mut balancers = self.balancers.lock().unwrap_or_else(|e| e.into_inner());
                let b = balancers.entry(dkey.clone()).or_default();
                b.finished(
                    &upstream,
                    outcome,
                    outlier.as_ref(),
                    candidates.len(),
                    Instant::now(),
                );
            }
            let last_attempt = attempt == retry.attempts || !body.replayable();
            if !retriable || last_attempt {
                last = Some(result);
                break;
            }
            tracing::debug!(service = %target.key(), ?upstream, attempt, "retrying");
            last = Some(result);
        }
        let resp = match last {
            Some(Attempt::Response(r)) => r.map(|b| b.boxed()),
            Some(Attempt::Failed { reason, .. }) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream connect error or disconnect/reset before headers: {reason}\n"),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream could be tried\n",
            ),
        };
        resp
    }

    pub(super) async fn admit(
        &self,
        dkey: &DestKey,
        limits: Limits,
    ) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        if limits.max_requests == u32::MAX {
            return Some(None);
        }
        let permits = {
            let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
            let b = breakers.entry(dkey.clone()).or_insert_with(|| Breaker {
                limits,
                permits: Arc::new(Semaphore::new(limits.max_requests as usize)),
                pending: 0,
            });
            if b.limits != limits {
                *b = Breaker {
                    limits,
                    permits: Arc::new(Semaphore::new(limits.max_requests as usize)),
                    pending: 0,
                };
            }
            if let Ok(p) = b.permits.clone().try_acquire_owned() {
                return Some(Some(p));
            }
            if b.pending >= limits.max_pending {
                return None;
            }
            b.pending += 1;
            b.permits.clone()
        };
        let permit = permits.acquire_owned().await.ok();
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = breakers.get_mut(dkey) {
            b.pending = b.pending.saturating_sub(1);
        }
        permit.map(Some)
    }

    pub(super) async fn send(
        &self,
        target: &MeshService,
        port: u16,
        upstream: &Upstream,
        subset: Option<String>,
        req: Request<Body>,
    ) -> Attempt {
        let h2 = req.version() == http::Version::HTTP_2;
        let key = (
            upstream.clone(),
            (target.name.clone(), target.namespace.clone()),
            subset.clone(),
            h2,
        );
        let mut conn = match self.pool.take(&key, h2) {
            Some(c) => c,
            None => {
                let alpn = if h2 {
                    protocol::ALPN_H2
                } else {
                    protocol::ALPN_HTTP11
                };
                let tls = match self
                    .connector
                    .connect_to(target, port, upstream, subset, Some(alpn))
                    .await
                {
                    Ok(tls) => tls,
                    Err(e) => {
                        self.connector.record_failure(target, port, upstream, &e);
                        return Attempt::Failed {
                            connect: true,
                            reason: e.to_string(),
                        };
                    }
                };
                match Conn::handshake(tls, h2).await {
                    Ok(c) => c,
                    Err(e) => {
                        return Attempt::Failed {
                            connect: true,
                            reason: e.to_string(),
                        }
                    }
                }
            }
        };
        match conn.send(req).await {
            Ok(resp) => {
                // An upgraded connection belongs to its upgrade from now on.
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    self.pool.put(key, conn);
                }
                Attempt::Response(resp)
            }
            Err(e) => Attempt::Failed {
                connect: false,
                reason: e.to_string(),
            },
        }
    }

    pub(super) fn mirror(
        &self,
        config: &MeshConfig,
        key: &ServiceKey,
        subset: Option<String>,
        port: u16,
        parts: &http::request::Parts,
        body: Bytes,
    ) {
        let Some(target) = config.service(&key.1, &key.0).cloned() else {
            return;
        };
        let candidates = self.connector.health().candidates(
            config,
            &target,
            None,
            None,
            self.connector.has_gateway(),
        );
        let Some(upstream) = candidates.first().cloned() else {
            return;
        };
        let mut parts = parts.clone();
        if let Some(host) = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            if let Ok(v) = HeaderValue::from_str(&format!("{host}-shadow")) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        let h2 = parts.version == http::Version::HTTP_2;
        let req: Request<Body> = Request::from_parts(
            parts,
            Full::new(body).map_err(|never| match never {}).boxed(),
        );
        let alpn = if h2 {
            protocol::ALPN_H2
        } else {
            protocol::ALPN_HTTP11
        };
        let connector = self.connector.clone();
        tokio::spawn(async move {
            if let Ok(tls) = connector
                .connect_to(&target, port, &upstream, subset, Some(alpn))
                .await
            {
                if let Ok(mut conn) = Conn::handshake(tls, h2).await {
                    let _ = conn.send(req).await;
                }
            }
        });
    }
}
