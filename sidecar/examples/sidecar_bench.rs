//! The sidecar benchmark's processes (run them through `bench/sidecar`, which also starts
//! wrk, Envoy and HAProxy and measures CPU from /proc). Each subcommand is one process, so the
//! proxies' CPU time can be told apart from the load generator's and the backend's:
//!
//! - `backend --listen ADDR [--body BYTES]`: an HTTP/1.1 server (keep-alive) that reads the
//!   request body and answers every request with a body of `--body` bytes (default 1024).
//! - `sidecars --backend ADDR --vip ADDR --inbound ADDR --pem-dir DIR [--workers N]`: the
//!   client-side sidecar (outbound listener on the VIP) and the server-side sidecar (mTLS on
//!   `--inbound`, forwarding to the backend), each on its own runtime thread, from a fresh CA
//!   and a static `MeshConfig`. Writes the CA and a client and a server certificate and key
//!   (PEM, SPIFFE URI SANs) into `--pem-dir` for the Envoy pair, then prints one line
//!   `READY vip=.. inbound=..` and runs until killed. With `--jwt-key FILE` (an RSA private
//!   key, PKCS#1 DER), the server sidecar also has an RS256 `RequestAuthentication` for that
//!   key and an `AuthorizationPolicy` admitting only end users in group `bench`; a token for
//!   such a user (valid for a day) is written to `--pem-dir`/`token`.
//! - `memory --pem-dir DIR --endpoint ADDR [--services N] [--workers N]`: one client-side
//!   sidecar (the `client` identity from `--pem-dir`, written by `sidecars`) with a
//!   `MeshConfig` of N services (default 1000), each with a VIP on 127.78.x.y and one HTTP
//!   port, all served by the server sidecar at `--endpoint` (in the `sidecars` process). Prints
//!   `MEMORY services=.. idle_kb=.. traffic_kb=.. all_kb=.. hwm_kb=..`: VmRSS once every
//!   listener is bound, after 20 requests to each of 10 services, and after one request to
//!   every service, then the peak (VmHWM).
//! - `load --target ADDR[,ADDR..] [--rate R] [--seconds S] [--warmup S] [--conns C]
//!   [--body BYTES]`: an open-loop client: `R` requests per second to each target (POST with
//!   a body of `--body` bytes), over `C` keep-alive connections per target, for `S` seconds
//!   after `--warmup` seconds that are not counted. One pacer interleaves the targets (the
//!   second's requests half a period after the first's), so a proxied path and the direct
//!   one measured together share the machine's noisy moments. A
//!   request's latency runs from just before its request is written until its whole
//!   response body has arrived. `--header "Name: value"` adds a header to every request.
//!   Prints one line per target:
//!   `LATENCY target=.. n=.. errors=.. rate=.. p50_ms=.. p90_ms=.. p99_ms=.. max_ms=..`.
//!
//! `--workers 1` (the default) runs each sidecar on a current-thread runtime: one worker per
//! proxy, as the Envoys get with `--concurrency 1`; above 1, a multi-thread runtime with that
//! many workers per sidecar. Every address is on loopback (127.0.0.0/8).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use isthmus_core::ca::CertificateAuthority;
use isthmus_core::identity::SpiffeId;
use isthmus_core::mesh::{ClusterInfo, MeshConfig, MeshService, Protocol};
use isthmus_core::tls::{Identity, TrustBundles};
use isthmus_sidecar::{InboundPort, SidecarOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TD: &str = "bench.isthmus.local";
const CLUSTER: &str = "bench";
const SERVICE_PORT: u16 = 8080;
/// How long a process may take to get ready before it gives up.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// `--flag value` pairs after the subcommand.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: impl Iterator<Item = String>, known: &[&str]) -> Res<Flags> {
        let mut map = HashMap::new();
        let mut it = args;
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .filter(|n| known.contains(n))
                .ok_or_else(|| {
                    format!(
                        "unknown flag {flag} (expected one of --{})",
                        known.join(" --")
                    )
                })?;
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            map.insert(name.to_string(), value);
        }
        Ok(Flags(map))
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Res<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.get(name) {
            Some(v) => v.parse().map_err(|e| format!("--{name} {v:?}: {e}").into()),
            None => default.ok_or_else(|| format!("--{name} is required").into()),
        }
    }
}

fn main() -> Res<()> {
    isthmus_core::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    match command.as_str() {
        "backend" => {
            let f = Flags::parse(args, &["listen", "body"])?;
            let listen = f.get::<SocketAddr>("listen", None)?;
            let body = f.get("body", Some(1024usize))?;
            current_thread()?.block_on(backend(listen, body))
        }
        "sidecars" => {
            let f = Flags::parse(
                args,
                &["backend", "vip", "inbound", "pem-dir", "workers", "jwt-key"],
            )?;
            let jwt_key = f.0.get("jwt-key").map(PathBuf::from);
            sidecars(
                f.get("backend", None)?,
                f.get("vip", None)?,
                f.get("inbound", None)?,
                f.get("pem-dir", None)?,
                f.get("workers", Some(1))?,
                jwt_key,
            )
        }
        "memory" => {
            let f = Flags::parse(args, &["pem-dir", "endpoint", "services", "workers"])?;
            let pem_dir = f.get("pem-dir", None)?;
            let endpoint = f.get("endpoint", None)?;
            let services = f.get("services", Some(1000usize))?;
            if !(1..=60_000).contains(&services) {
                return Err("--services must be between 1 and 60000".into());
            }
            runtime(f.get("workers", Some(1))?)?.block_on(memory(pem_dir, endpoint, services))
        }
        "load" => {
            let f = Flags::parse(
                args,
                &[
                    "target", "rate", "seconds", "warmup", "conns", "body", "header",
                ],
            )?;
            let header = match f.0.get("header") {
                None => None,
                Some(h) => {
                    let (name, value) = h
                        .split_once(':')
                        .ok_or_else(|| format!("--header {h:?}: expected Name: value"))?;
                    Some((
                        http::HeaderName::from_bytes(name.trim().as_bytes())?,
                        http::HeaderValue::from_str(value.trim())?,
                    ))
                }
            };
            let targets: String = f.get("target", None)?;
            let load = Load {
                targets: targets
                    .split(',')
                    .map(|t| t.parse().map_err(|e| format!("--target {t:?}: {e}")))
                    .collect::<Result<_, _>>()?,
                rate: f.get("rate", Some(1000.0))?,
                seconds: f.get("seconds", Some(5.0))?,
                warmup: f.get("warmup", Some(0.5))?,
                conns: f.get("conns", Some(4))?,
                body: f.get("body", Some(1024))?,
                header,
            };
            if load.rate <= 0.0 || load.seconds <= 0.0 || load.warmup < 0.0 || load.conns == 0 {
                return Err("--rate, --seconds and --conns must be above zero".into());
            }
            current_thread()?.block_on(run_load(load))
        }
        other => Err(format!(
            "unknown subcommand {other:?} (expected backend, sidecars, memory or load)"
        )
        .into()),
    }
}

fn current_thread() -> Res<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// One worker: a current-thread runtime; more: a multi-thread runtime with that many.
fn runtime(workers: usize) -> Res<tokio::runtime::Runtime> {
    if workers <= 1 {
        return current_thread();
    }
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

// ---- backend -------------------------------------------------------------------------------

async fn backend(listen: SocketAddr, body: usize) -> Res<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("READY backend={}", listener.local_addr()?);
    let answer = Bytes::from(vec![b'b'; body]);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let answer = answer.clone();
                    async move {
                        // Read the whole request body, as an application would.
                        req.into_body().collect().await?;
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(answer)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

// ---- the mesh --------------------------------------------------------------------------------

fn spiffe(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", sa)
}

/// A certificate for `sa` from `ca`, as an identity and as (chain PEM, key PEM).
fn issue(ca: &CertificateAuthority, sa: &str) -> Res<(Arc<Identity>, String, String)> {
    let id = spiffe(sa);
    let issued = ca.issue(&id, Duration::from_secs(24 * 3600))?;
    let identity = Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem)?;
    Ok((identity, issued.cert_chain_pem, issued.key_pem))
}

fn cluster_info(ca_pem: &str) -> ClusterInfo {
    ClusterInfo {
        name: CLUSTER.into(),
        trust_domain: TD.into(),
        gateway: None,
        ca_bundle_pem: ca_pem.into(),
        locality: None,
    }
}

/// An HTTP service `name` on `vip`:8080 served by one endpoint (a sidecar's inbound port).
///
/// Built through serde rather than a struct literal so that fields added to `MeshService`
/// later with a serde default (as optional ones are) do not break this benchmark.
fn service(name: String, vip: IpAddr, endpoint: SocketAddr, server: &SpiffeId) -> Res<MeshService> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": name,
        "namespace": "default",
        "vip": vip,
        "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": Protocol::Http}],
        "identities": [server.to_string()],
        "local_endpoints": [{
            "address": endpoint,
            "labels": {},
            "identity": server.to_string(),
            "healthy": true,
        }],
        "remote": [],
        "exported": false,
    }))?)
}

fn options(identity: Arc<Identity>, trust: Arc<TrustBundles>) -> SidecarOptions {
    let app = identity.id().service_account().to_string();
    SidecarOptions {
        cluster: CLUSTER.into(),
        identity,
        trust,
        labels: BTreeMap::from([("app".to_string(), app)]),
        outbound: false,
        inbound: vec![],
        gateway: None,
        connect_timeout: Duration::from_secs(2),
        metrics: Default::default(),
        access_log: Default::default(),
        path_normalization: Default::default(),
        limits: Default::default(),
    }
}

/// Starts a sidecar on a runtime of its own thread; returns once it has started (or failed).
fn spawn_sidecar(
    name: &'static str,
    workers: usize,
    opts: SidecarOptions,
    config: watch::Receiver<Arc<MeshConfig>>,
) -> Res<std::sync::mpsc::Receiver<Res<Vec<SocketAddr>>>> {
    let (started, wait) = std::sync::mpsc::channel();
    let rt = runtime(workers)?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            rt.block_on(async move {
                match isthmus_sidecar::start(opts, config).await {
                    Ok(handle) => {
                        let _ = started.send(Ok(handle.inbound_addrs().to_vec()));
                        // Runs until the process is killed.
                        std::future::pending::<()>().await;
                        drop(handle);
                    }
                    Err(e) => {
                        let _ = started.send(Err(e.into()));
                    }
                }
            })
        })?;
    Ok(wait)
}

fn started(wait: std::sync::mpsc::Receiver<Res<Vec<SocketAddr>>>) -> Res<Vec<SocketAddr>> {
    wait.recv_timeout(READY_WITHIN)
        .map_err(|_| "a sidecar did not start")?
}

/// Polls until `addr` accepts a connection.
async fn wait_listening(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + READY_WITHIN;
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {addr}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn sidecars(
    backend: SocketAddr,
    vip: SocketAddr,
    inbound: SocketAddr,
    pem_dir: PathBuf,
    workers: usize,
    jwt_key: Option<PathBuf>,
) -> Res<()> {
    if vip.port() != SERVICE_PORT {
        return Err(format!("--vip must use port {SERVICE_PORT}").into());
    }
    let ca = CertificateAuthority::generate(TD)?;
    let trust = TrustBundles::new();
    trust.replace([(TD, ca.cert_pem())])?;
    let (client, client_pem, client_key) = issue(&ca, "client")?;
    let (server, server_pem, server_key) = issue(&ca, "server")?;
    std::fs::create_dir_all(&pem_dir)?;
    for (file, pem) in [
        ("ca.pem", ca.cert_pem()),
        ("client.pem", &client_pem),
        ("client-key.pem", &client_key),
        ("server.pem", &server_pem),
        ("server-key.pem", &server_key),
    ] {
        std::fs::write(pem_dir.join(file), pem)?;
    }

    let (config, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let server_id = server.id().clone();
    let mut server_opts = options(server, trust.clone());
    server_opts.inbound = vec![InboundPort {
        listen: inbound,
        forward_to: backend,
        protocol: Protocol::Http,
    }];
    let inbound = started(spawn_sidecar(
        "server-sidecar",
        workers,
        server_opts,
        rx.clone(),
    )?)?
    .first()
    .copied()
    .ok_or("the server sidecar has no inbound port")?;
    let mut client_opts = options(client, trust);
    client_opts.outbound = true;
    started(spawn_sidecar("client-sidecar", workers, client_opts, rx)?)?;
    config.send_replace(Arc::new(MeshConfig {
        version: 1,
        cluster: CLUSTER.into(),
        services: vec![service("backend".into(), vip.ip(), inbound, &server_id)?],
        clusters: vec![cluster_info(ca.cert_pem())],
        policies: match &jwt_key {
            Some(key) => end_user_policies(key, &pem_dir)?,
            None => vec![],
        },
    }));
    current_thread()?.block_on(wait_listening(vip))?;
    println!("READY vip={vip} inbound={inbound}");
    // The config sender lives on this thread, which parks until the process is killed.
    loop {
        std::thread::park();
    }
}

// ---- end users -------------------------------------------------------------------------------

const JWT_ISSUER: &str = "https://idp.bench.example";

/// The next DER element of `der`: (tag, contents, rest).
fn der_next(der: &[u8]) -> Res<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first().ok_or("DER: truncated")?;
    let (&first, rest) = rest.split_first().ok_or("DER: truncated")?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        let (bytes, rest) = rest.split_at_checked(n).ok_or("DER: truncated length")?;
        (
            bytes.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b)),
            rest,
        )
    };
    let (contents, rest) = rest
        .split_at_checked(len)
        .ok_or("DER: truncated contents")?;
    Ok((tag, contents, rest))
}

/// The RS256 RequestAuthentication and the claims AuthorizationPolicy for the key in
/// `key_file` (PKCS#1 DER); writes a token of an end user in group `bench` to `pem_dir`.
fn end_user_policies(
    key_file: &std::path::Path,
    pem_dir: &std::path::Path,
) -> Res<Vec<isthmus_core::policy::Policy>> {
    use base64::Engine;
    let der = std::fs::read(key_file)?;
    let pair =
        ring::rsa::KeyPair::from_der(&der).map_err(|e| format!("{}: {e}", key_file.display()))?;
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    let (_, public, _) = der_next(pair.public().as_ref())?;
    let (_, n, rest) = der_next(public)?;
    let (_, e, _) = der_next(rest)?;
    let b64 = |b: &[u8]| {
        let b = b.strip_prefix(&[0]).unwrap_or(b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "n": b64(n), "e": b64(e)}]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("bench".into());
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": JWT_ISSUER, "sub": "user-1", "exp": now + 24 * 3600, "groups": ["bench", "users"]}),
        &jsonwebtoken::EncodingKey::from_rsa_der(&der),
    )?;
    std::fs::write(pem_dir.join("token"), &token)?;
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: bench-jwt}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  jwtRules:\n  - issuer: {JWT_ISSUER}\n    jwks: '{jwks}'\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-users}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from:\n    - source: {{requestPrincipals: ['{JWT_ISSUER}/*']}}\n    when:\n    - key: request.auth.claims[groups]\n      values: [bench]\n"
    );
    Ok(isthmus_core::policy::parse_documents(
        "bench-jwt.yaml",
        &yaml,
    )?)
}

// ---- memory ----------------------------------------------------------------------------------

/// The n-th service's VIP: 127.78.x.y with y in 1..=250.
fn memory_vip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        78 + (n / 62_500) as u8,
        ((n / 250) % 250) as u8,
        (n % 250 + 1) as u8,
    ))
}

fn vm_status(field: &str) -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status").into())
}

async fn memory(pem_dir: PathBuf, endpoint: SocketAddr, services: usize) -> Res<()> {
    let read = |file: &str| std::fs::read_to_string(pem_dir.join(file));
    let ca_pem = read("ca.pem")?;
    let trust = TrustBundles::new();
    trust.replace([(TD, ca_pem.as_str())])?;
    let identity = Identity::from_pem(
        spiffe("client"),
        &read("client.pem")?,
        &read("client-key.pem")?,
    )?;
    let server = spiffe("server");
    let (config, rx) = watch::channel(Arc::new(MeshConfig::default()));
    let mut opts = options(identity, trust);
    opts.outbound = true;
    let handle = isthmus_sidecar::start(opts, rx).await?;
    let vips: Vec<IpAddr> = (0..services).map(memory_vip).collect();
    config.send_replace(Arc::new(MeshConfig {
        version: 1,
        cluster: CLUSTER.into(),
        services: vips
            .iter()
            .enumerate()
            .map(|(i, vip)| service(format!("svc-{i}"), *vip, endpoint, &server))
            .collect::<Res<_>>()?,
        clusters: vec![cluster_info(&ca_pem)],
        policies: vec![],
    }));
    let deadline = Instant::now() + READY_WITHIN;
    while handle.outbound_addrs().len() < services {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {services} VIP listeners were bound",
                handle.outbound_addrs().len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle = vm_status("VmRSS")?;
    let body = Bytes::from(vec![b'x'; 1024]);
    for vip in vips.iter().take(10) {
        let mut conn = connect(SocketAddr::new(*vip, SERVICE_PORT)).await?;
        for _ in 0..20 {
            post(&mut conn, body.clone(), None).await?;
        }
    }
    let traffic = vm_status("VmRSS")?;
    for vip in &vips {
        let mut conn = connect(SocketAddr::new(*vip, SERVICE_PORT)).await?;
        post(&mut conn, body.clone(), None).await?;
    }
    let all = vm_status("VmRSS")?;
    println!(
        "MEMORY services={services} idle_kb={idle} traffic_kb={traffic} all_kb={all} hwm_kb={}",
        vm_status("VmHWM")?
    );
    handle.shutdown().await;
    Ok(())
}

// ---- load ------------------------------------------------------------------------------------

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Res<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One POST on `conn`; the size of the response body, which must be a 200.
async fn post(
    conn: &mut Conn,
    body: Bytes,
    header: Option<&(http::HeaderName, http::HeaderValue)>,
) -> Res<usize> {
    conn.ready().await?;
    let mut req = http::Request::post("/")
        .header(http::header::HOST, "backend")
        .body(Full::new(body))?;
    if let Some((name, value)) = header {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    let resp = conn.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&bytes)).into());
    }
    Ok(bytes.len())
}

struct Load {
    /// Every target gets `rate` requests per second, paced by the same ticks.
    targets: Vec<SocketAddr>,
    rate: f64,
    seconds: f64,
    warmup: f64,
    conns: usize,
    body: usize,
    header: Option<(http::HeaderName, http::HeaderValue)>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// What one target's requests recorded.
#[derive(Default)]
struct Record {
    latencies: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

/// Starts `conns` connections to `target`, each taking request numbers from `ticks` and
/// sending one request per number.
async fn workers(
    a: &Load,
    target: SocketAddr,
    ticks: tokio::sync::mpsc::Receiver<u64>,
    record: &Arc<Mutex<Record>>,
    set: &mut tokio::task::JoinSet<()>,
) -> Res<()> {
    let counted_from = (a.rate * a.warmup).round() as u64;
    let body = Bytes::from(vec![b'x'; a.body]);
    let size = a.body;
    // An idle connection takes the next number when it comes.
    let ticks = Arc::new(tokio::sync::Mutex::new(ticks));
    for _ in 0..a.conns {
        let mut conn = connect(target).await?;
        let (ticks, record, body) = (ticks.clone(), record.clone(), body.clone());
        let header = a.header.clone();
        set.spawn(async move {
            loop {
                let Some(n) = ticks.lock().await.recv().await else {
                    break;
                };
                let sent = std::time::Instant::now();
                let outcome = post(&mut conn, body.clone(), header.as_ref()).await;
                let took = sent.elapsed().as_secs_f64() * 1e3;
                match outcome {
                    Ok(len) if len == size || size == 0 => {
                        if n >= counted_from {
                            lock(&record).latencies.push(took);
                        }
                    }
                    other => {
                        let what = match other {
                            Ok(len) => format!("a {len}-byte body"),
                            Err(e) => e.to_string(),
                        };
                        {
                            let mut r = lock(&record);
                            r.errors += 1;
                            r.first_error.get_or_insert(what);
                        }
                        // A broken connection is replaced; a fresh one may fail too.
                        if let Ok(fresh) = connect(target).await {
                            conn = fresh;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// Paces requests to every target with one pacer, so that targets measured together see
/// the same moments of the machine (other processes' bursts land on all of them alike).
async fn run_load(a: Load) -> Res<()> {
    let total = (a.rate * (a.warmup + a.seconds)).round() as u64;
    let mut set = tokio::task::JoinSet::new();
    let mut senders = Vec::new();
    let mut records = Vec::new();
    for target in &a.targets {
        let (tx, rx) = tokio::sync::mpsc::channel::<u64>(total as usize + 1);
        let record = Arc::new(Mutex::new(Record::default()));
        workers(&a, *target, rx, &record, &mut set).await?;
        senders.push(tx);
        records.push(record);
    }
    let started = Instant::now();
    // tokio's timers tick in whole milliseconds, so the pacing runs on a thread of its own
    // with the OS's sleep: request n to target j is due at (n + j / targets) / rate, which
    // interleaves the targets instead of sending to all of them at the same instant (where
    // they would queue behind each other for the two cores).
    let rate = a.rate;
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            let origin = std::time::Instant::now();
            let slots = senders.len() as f64;
            for n in 0..total {
                for (j, tx) in senders.iter().enumerate() {
                    let due =
                        origin + Duration::from_secs_f64((n as f64 + j as f64 / slots) / rate);
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if tx.blocking_send(n).is_err() {
                        return;
                    }
                }
            }
        })?;
    let limit = Duration::from_secs_f64(a.warmup + a.seconds + 10.0);
    let drained = tokio::time::timeout_at(started + limit, async {
        while set.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        set.abort_all();
        return Err("requests were still outstanding 10 s after the last was due".into());
    }
    let elapsed = started.elapsed().as_secs_f64();
    pacer.join().map_err(|_| "the pacer thread panicked")?;
    for (target, record) in a.targets.iter().zip(&records) {
        let mut r = std::mem::take(&mut *lock(record));
        r.latencies.sort_by(|x, y| x.total_cmp(y));
        if let Some(e) = &r.first_error {
            eprintln!(
                "load: {target}: {} failed requests, the first: {e}",
                r.errors
            );
        }
        let v = &r.latencies;
        println!(
            "LATENCY target={target} n={} errors={} rate={:.0} p50_ms={:.4} p90_ms={:.4} p99_ms={:.4} max_ms={:.4}",
            v.len(),
            r.errors,
            total as f64 / elapsed,
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
