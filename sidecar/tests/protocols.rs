//! Protocols through two sidecars and real sockets: HTTP/2 with prior knowledge, gRPC streaming
//! both ways with trailers (and retries on a trailers-only UNAVAILABLE), WebSocket upgrades,
//! protocol detection on undeclared ports, opaque TCP routed and balanced as HTTP is, and
//! Istio's metrics from both reporters.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{MeshConfig, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_sidecar::metrics::Metrics;
use isthmus_testkit::mesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const TD: &str = "proto.isthmus.local";
const PORT: u16 = 7070;

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// A channel-fed body: what is sent on the returned sender goes out as it is sent.
fn streaming() -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, Body) {
    let (tx, rx) = mpsc::channel(8);
    (tx, StreamBody::new(ReceiverStream::new(rx)).boxed())
}

/// A gRPC message frame: uncompressed flag, big-endian length, payload.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    Bytes::from(b)
}

/// The test application: HTTP/1.1 and HTTP/2 (prior knowledge) on one port.
/// - `/echo.Echo/Chat`: gRPC bidirectional echo, each message sent back as it arrives, then
///   `grpc-status: 0` in the trailers;
/// - `/echo.Echo/Flaky`: a trailers-only `grpc-status: 14` for the first two calls, then OK;
/// - `/ws`: accepts a WebSocket-style upgrade and echoes bytes on the upgraded connection;
/// - anything else: `<version> <x-forwarded-client-cert>`.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let flaky = Arc::new(AtomicU32::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let flaky = flaky.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let flaky = flaky.clone();
                    async move { Ok::<_, Infallible>(answer(req, &flaky).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn answer(mut req: Request<Incoming>, flaky: &AtomicU32) -> Response<Body> {
    match req.uri().path() {
        "/echo.Echo/Chat" => {
            let (tx, body) = streaming();
            let mut incoming = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(data) = frame.into_data() {
                        let _ = tx.send(Ok(Frame::data(data))).await;
                    }
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                trailers.insert("grpc-message", "all echoed".parse().unwrap());
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            });
            Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap()
        }
        "/echo.Echo/Flaky" => {
            let _ = req.into_body().collect().await;
            let n = flaky.fetch_add(1, Ordering::SeqCst);
            let builder = Response::builder().header("content-type", "application/grpc");
            if n < 2 {
                builder
                    .header("grpc-status", "14")
                    .body(full(Bytes::new()))
                    .unwrap()
            } else {
                let (tx, body) = streaming();
                tokio::spawn(async move {
                    let _ = tx.send(Ok(Frame::data(grpc_frame(b"ok")))).await;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                });
                builder.body(body).unwrap()
            }
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = upgrade.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(Bytes::new()))
                .unwrap()
        }
        _ => {
            let xfcc = req
                .headers()
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            Response::new(full(format!("{:?} {xfcc}", req.version())))
        }
    }
}

/// An opaque TCP application: sends `banner` at once (server-first), then echoes.
async fn tcp_app(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if tcp.write_all(banner).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

struct Mesh {
    vips: Vec<IpAddr>,
    client_metrics: Metrics,
    server_metrics: Metrics,
    _config: watch::Sender<Arc<MeshConfig>>,
    _sidecars: Vec<isthmus_sidecar::SidecarHandle>,
}

fn identity(ca: &CertificateAuthority, sa: &str) -> Arc<Identity> {
    let id = SpiffeId::new(TD, "default", sa);
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

/// One service per (name, declared protocol, application), each behind its own server
/// sidecar and reachable at `127.<octet>.0.<i+1>:7070` through one client sidecar.
async fn mesh(octet: u8, services: Vec<(&str, Protocol, SocketAddr)>, policies: &str) -> Mesh {
    mesh_with(octet, services, policies, |_| {}).await
}

/// Like [`mesh`], letting `extra` add to (or change) the services the config holds.
async fn mesh_with(
    octet: u8,
    services: Vec<(&str, Protocol, SocketAddr)>,
    policies: &str,
    extra: impl FnOnce(&mut Vec<isthmus_core::mesh::MeshService>),
) -> Mesh {
    isthmus_core::install_crypto_provider();
    let ca = CertificateAuthority::generate(TD).unwrap();
    let trust = TrustBundles::new();
    trust.replace([(TD, ca.cert_pem())]).unwrap();
    let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let (client_metrics, server_metrics) = (Metrics::default(), Metrics::default());
    let options = |id, inbound, outbound, metrics: &Metrics| isthmus_sidecar::SidecarOptions {
        cluster: "test".into(),
        identity: id,
        trust: trust.clone(),
        labels: BTreeMap::new(),
        outbound,
        inbound,
        gateway: None,
        connect_timeout: Duration::from_secs(2),
        metrics: metrics.clone(),
        access_log: Default::default(),
        path_normalization: Default::default(),
        limits: Default::default(),
    };
    let mut sidecars = Vec::new();
    let mut mesh_services = Vec::new();
    let mut vips = Vec::new();
    for (i, (name, protocol, app)) in services.into_iter().enumerate() {
        let inbound = vec![isthmus_sidecar::InboundPort {
            listen: "127.0.0.1:0".parse().unwrap(),
            forward_to: app,
            protocol,
        }];
        let sc = isthmus_sidecar::start(
            options(identity(&ca, name), inbound, false, &server_metrics),
            rx.clone(),
        )
        .await
        .unwrap();
        let vip: IpAddr = format!("127.{octet}.0.{}", i + 1).parse().unwrap();
        vips.push(vip);
        mesh_services.push(mesh::served(
            TD,
            name,
            vip,
            &[("p", PORT, protocol)],
            &[sc.inbound_addrs()[0]],
        ));
        sidecars.push(sc);
    }
    let client = isthmus_sidecar::start(
        options(identity(&ca, "sleep"), vec![], true, &client_metrics),
        rx.clone(),
    )
    .await
    .unwrap();
    sidecars.push(client);
    extra(&mut mesh_services);
    tx.send_replace(Arc::new(MeshConfig {
        version: 1,
        cluster: "test".into(),
        services: mesh_services,
        clusters: vec![mesh::member("test", TD, ca.cert_pem())],
        policies: isthmus_core::policy::parse_documents("test.yaml", policies).unwrap(),
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    for vip in &vips {
        while TcpStream::connect((*vip, PORT)).await.is_err() {
            assert!(Instant::now() < deadline, "the VIP listener never came up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Mesh {
        vips,
        client_metrics,
        server_metrics,
        _config: tx,
        _sidecars: sidecars,
    }
}

/// An HTTP/2 (prior knowledge) client connection to `vip`.
async fn h2_client(vip: IpAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let tcp = TcpStream::connect((vip, PORT)).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn h2_request(vip: IpAddr, path: &str, body: Body) -> Request<Body> {
    Request::post(format!("http://{vip}:{PORT}{path}"))
        .version(http::Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// The next data frame of `body` (skipping none), within a deadline.
async fn next_data(body: &mut Incoming) -> Bytes {
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a frame in time")
        .expect("a frame")
        .unwrap();
    frame.into_data().expect("a data frame")
}

fn scrape(m: &Metrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    m.register(&mut registry);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_from_the_app_travels_as_http2_inside_mtls_to_an_http2_app() {
    let app = app().await;
    let m = mesh(161, vec![("api", Protocol::Http2, app)], "").await;
    let mut client = h2_client(m.vips[0]).await;
    let resp = client
        .send_request(h2_request(m.vips[0], "/hello", full("")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    // The app was spoken to in HTTP/2 and saw the caller's verified identity.
    assert!(text.starts_with("HTTP/2.0 "), "{text}");
    assert!(
        text.contains("URI=spiffe://proto.isthmus.local/ns/default/sa/sleep"),
        "{text}"
    );

    // An HTTP/1.1 caller on the same port is answered too (the app still gets HTTP/2).
    let (status, body) = h1_get(m.vips[0], "/hello").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("HTTP/2.0 "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_both_ways_and_its_trailers_reach_the_caller() {
    let app = app().await;
    let m = mesh(162, vec![("echo", Protocol::Grpc, app)], "").await;
    let mut client = h2_client(m.vips[0]).await;
    let (tx, body) = streaming();
    let resp = client
        .send_request(h2_request(m.vips[0], "/echo.Echo/Chat", body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut incoming = resp.into_body();
    // Each message comes back before the next is sent: nothing waits for the whole stream.
    for i in 0..5u8 {
        let msg = grpc_frame(&[b'm', b'0' + i]);
        tx.send(Ok(Frame::data(msg.clone()))).await.unwrap();
        assert_eq!(next_data(&mut incoming).await, msg);
    }
    drop(tx);
    let trailers = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), incoming.frame())
            .await
            .unwrap()
            .expect("the trailers")
            .unwrap();
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "all echoed");
    let out = scrape(&m.client_metrics);
    assert!(out.contains("request_protocol=\"grpc\""), "{out}");
}

const RETRY_UNAVAILABLE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky}
spec:
  hosts: [flaky]
  http:
  - route: [{destination: {host: flaky}}]
    retries: {attempts: 3, retryOn: unavailable}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_when_retry_on_says_so() {
    let app = app().await;
    let m = mesh(163, vec![("flaky", Protocol::Grpc, app)], RETRY_UNAVAILABLE).await;
    let mut client = h2_client(m.vips[0]).await;
    // As gRPC clients send a unary call: one message, no content-length.
    let (tx, body) = streaming();
    tx.send(Ok(Frame::data(grpc_frame(b"hi")))).await.unwrap();
    drop(tx);
    let request = h2_request(m.vips[0], "/echo.Echo/Flaky", body);
    assert!(request.headers().get("content-length").is_none());
    let resp = client.send_request(request).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("grpc-status").is_none(),
        "a trailers-only failure came back"
    );
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), grpc_frame(b"ok"));
}

/// A plain HTTP/1.1 GET with `connection: close`: (status, body).
async fn h1_get(vip: IpAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect((vip, PORT)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut raw))
        .await
        .expect("an answer")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Reads from `tcp` until `want` bytes arrived.
async fn read_exactly(tcp: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut buf = vec![0u8; want];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_relayed_both_ways_through_both_sidecars() {
    let app = app().await;
    let m = mesh(164, vec![("chat", Protocol::Http, app)], "").await;
    let mut tcp = TcpStream::connect((m.vips[0], PORT)).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nhost: chat\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = read_exactly(&mut tcp, 1).await;
        head.extend_from_slice(&b);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"hello"[..], b"over the upgrade", &[0u8, 255, 1, 254]] {
        tcp.write_all(msg).await.unwrap();
        assert_eq!(read_exactly(&mut tcp, msg.len()).await, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_ports_are_detected_http_at_l7_anything_else_as_tcp() {
    let web = app().await;
    let echo = tcp_app(b"").await;
    let banner = tcp_app(b"220 server speaks first\r\n").await;
    let m = mesh(
        165,
        vec![
            ("web", Protocol::Auto, web),
            ("echo", Protocol::Auto, echo),
            ("smtp", Protocol::Auto, banner),
        ],
        "",
    )
    .await;
    // HTTP/1.1 is detected: served at L7 (the app sees the identity header only L7 adds).
    let (status, body) = h1_get(m.vips[0], "/").await;
    assert_eq!(status, 200);
    assert!(
        body.starts_with("HTTP/1.1 URI=") || body.contains("URI=spiffe://"),
        "{body}"
    );
    // HTTP/2 prior knowledge is detected, and the app is spoken to in HTTP/2.
    let mut client = h2_client(m.vips[0]).await;
    let resp = client
        .send_request(h2_request(m.vips[0], "/", full("")))
        .await
        .unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(text.starts_with(b"HTTP/2.0 "), "{text:?}");
    // Client-first bytes that are not HTTP are relayed untouched.
    let mut redis = TcpStream::connect((m.vips[1], PORT)).await.unwrap();
    redis.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut redis, 14).await, b"*1\r\n$4\r\nPING\r\n");
    drop(redis);
    // A server-first protocol works too: after the detection timeout, as opaque TCP.
    let started = Instant::now();
    let mut tcp = TcpStream::connect((m.vips[2], PORT)).await.unwrap();
    let greeting = read_exactly(&mut tcp, 25).await;
    assert_eq!(greeting, b"220 server speaks first\r\n");
    assert!(started.elapsed() >= isthmus_sidecar::outbound::DETECTION_TIMEOUT);
    tcp.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut tcp, 6).await, b"QUIT\r\n");
    drop(tcp);

    // Both sides count: requests at L7 from the destination, TCP bytes from the source.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let server = scrape(&m.server_metrics);
        let client = scrape(&m.client_metrics);
        let ok = server.contains("istio_requests_total{reporter=\"destination\"")
            && server
                .contains("source_principal=\"spiffe://proto.isthmus.local/ns/default/sa/sleep\"")
            && server.contains("destination_service_name=\"web\"")
            && client.contains("istio_tcp_connections_closed_total{reporter=\"source\"")
            && client.contains("destination_service=\"smtp.default.svc.cluster.local\"")
            && server.contains("istio_tcp_connections_opened_total{reporter=\"destination\"");
        if ok {
            // 14 bytes from the client to echo (received), echoed back (sent).
            let counted = |name: &str| {
                client.lines().any(|l| {
                    l.starts_with(name) && l.contains("echo.default") && l.ends_with(" 14")
                })
            };
            if counted("istio_tcp_received_bytes_total{") && counted("istio_tcp_sent_bytes_total{")
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics missing:\n{server}\n---\n{client}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first byte each of `n` connections to `vip` receives (the banner of the app it
/// reached).
async fn banners(vip: IpAddr, n: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let mut tcp = TcpStream::connect((vip, PORT)).await.unwrap();
        seen.push(read_exactly(&mut tcp, 1).await[0]);
    }
    seen
}

/// Opaque TCP follows the VirtualService `tcp` route and the DestinationRule's load balancer,
/// as HTTP does: connections to `db` (declared TCP) go to the `pair` service, whose two
/// endpoints (apps A and B) take turns by default and stay one per source IP with
/// `consistentHash.useSourceIp`.
#[tokio::test]
async fn tcp_connections_follow_tcp_routes_and_the_destination_rules_balancer() {
    let route = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db, namespace: default}\n\
                 spec:\n  hosts: [db]\n  tcp:\n  - match: [{port: 7070}]\n    route: [{destination: {host: pair}}]\n";
    let by_source_ip = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pair, namespace: default}\n\
                        spec:\n  host: pair\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {useSourceIp: true}\n";
    for (octet, policies, sticky) in [
        (166, route.to_string(), false),
        (167, format!("{route}{by_source_ip}"), true),
    ] {
        let (a, b, db) = (
            tcp_app(b"A").await,
            tcp_app(b"B").await,
            tcp_app(b"D").await,
        );
        let pair_vip: IpAddr = format!("127.{octet}.0.9").parse().unwrap();
        let m = mesh_with(
            octet,
            vec![
                ("a", Protocol::Tcp, a),
                ("b", Protocol::Tcp, b),
                ("db", Protocol::Tcp, db),
            ],
            &policies,
            |services| {
                let mut pair =
                    mesh::served(TD, "pair", pair_vip, &[("p", PORT, Protocol::Tcp)], &[]);
                for s in &services[..2] {
                    pair.local_endpoints
                        .extend(s.local_endpoints.iter().cloned());
                    pair.identities.extend(s.identities.iter().cloned());
                }
                services.push(pair);
            },
        )
        .await;
        let seen = banners(m.vips[2], 10).await;
        assert!(
            !seen.contains(&b'D'),
            "the tcp route sends db's traffic to pair: {seen:?}"
        );
        let distinct: std::collections::BTreeSet<u8> = seen.iter().copied().collect();
        if sticky {
            assert_eq!(distinct.len(), 1, "one endpoint per source IP: {seen:?}");
        } else {
            assert_eq!(
                distinct,
                [b'A', b'B'].into(),
                "round robin over both endpoints: {seen:?}"
            );
        }
    }
}

/// The first bytes a TLS client (rustls) sends to `server_name`.
fn client_hello(server_name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// TLS the application originates itself follows the VirtualService `tls` route matching
/// the server name of its ClientHello (exact or `*.` suffix), in the routes' order; TLS to
/// any other name, and bytes that are not TLS, follow the `tcp` route. The destination
/// receives the ClientHello untouched.
#[tokio::test]
async fn tls_connections_follow_the_tls_route_of_their_server_name() {
    let policies = concat!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n",
        "metadata: {name: db, namespace: default}\n",
        "spec:\n",
        "  hosts: [db]\n",
        "  tls:\n",
        "  - match: [{port: 7070, sniHosts: [a.example.com]}]\n",
        "    route: [{destination: {host: a}}]\n",
        "  - match: [{port: 7071, sniHosts: ['*']}, {sniHosts: ['*.b.example.com']}]\n",
        "    route: [{destination: {host: b}}]\n",
        "  tcp:\n",
        "  - route: [{destination: {host: db}}]\n",
    );
    let (a, b, db) = (
        tcp_app(b"A").await,
        tcp_app(b"B").await,
        tcp_app(b"D").await,
    );
    let m = mesh(
        168,
        vec![
            ("a", Protocol::Tcp, a),
            ("b", Protocol::Tcp, b),
            ("db", Protocol::Tcp, db),
        ],
        policies,
    )
    .await;
    let db_vip = m.vips[2];
    let via_db = |first: Vec<u8>| async move {
        let mut tcp = TcpStream::connect((db_vip, PORT)).await.unwrap();
        tcp.write_all(&first).await.unwrap();
        let banner = read_exactly(&mut tcp, 1).await[0];
        // The destination echoes what it received: the ClientHello, byte for byte.
        let echoed = read_exactly(&mut tcp, first.len()).await;
        assert_eq!(echoed, first, "the bytes arrive untouched");
        banner as char
    };
    for (first, want, what) in [
        (client_hello("a.example.com"), 'A', "an exact server name"),
        (client_hello("A.Example.COM"), 'A', "in any case"),
        (
            client_hello("x.b.example.com"),
            'B',
            "a name under a *. suffix",
        ),
        (
            client_hello("b.example.com"),
            'D',
            "the suffix itself is not under it",
        ),
        (
            client_hello("other.example.com"),
            'D',
            "no tls route names it: the tcp route",
        ),
        (
            client_hello("10.0.0.1"),
            'D',
            "no server name: the tcp route",
        ),
        (b"plain bytes".to_vec(), 'D', "not TLS: the tcp route"),
    ] {
        assert_eq!(via_db(first).await, want, "{what}");
    }
}

/// `connectionPool.tcp.maxConnections` bounds open TCP connections per destination: one more
/// is closed at once, unserved, and counted; a freed slot serves again.
#[tokio::test]
async fn tcp_connections_beyond_max_connections_are_refused_at_once() {
    let a = tcp_app(b"A").await;
    let m = mesh(
        168,
        vec![("a", Protocol::Tcp, a)],
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a, namespace: default}\n\
         spec:\n  host: a\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}}\n",
    )
    .await;
    // (The mesh's own readiness probe holds the slot a moment: the first is served once free.)
    let first = served(m.vips[0]).await;
    let refused_before = overflows(&m.client_metrics);
    let mut second = TcpStream::connect((m.vips[0], PORT)).await.unwrap();
    let mut buf = [0u8; 1];
    let got = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "served beyond the limit: {got:?}"
    );
    assert_eq!(overflows(&m.client_metrics), refused_before + 1);
    drop(first);
    served(m.vips[0]).await;
}

/// How many outbound connections were refused for overflow.
fn overflows(metrics: &Metrics) -> u64 {
    scrape(metrics)
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "isthmus_sidecar_connections_refused_total{listener=\"outbound\",reason=\"overflow\"} ",
            )
        })
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A connection to `vip` that the app's banner `A` reached (retried while refused).
async fn served(vip: IpAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut tcp = TcpStream::connect((vip, PORT)).await.unwrap();
        let mut buf = [0u8; 1];
        if let Ok(Ok(1)) =
            tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await
        {
            assert_eq!(&buf, b"A");
            return tcp;
        }
        assert!(Instant::now() < deadline, "no connection was served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
