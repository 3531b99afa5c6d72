//! Helpers shared by the integration tests: a proxy on 127.0.0.1 port 0, DNS clients over UDP
//! and TCP, and fake upstream resolvers.

#![allow(dead_code)] // each test file uses a different subset

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use isthmus_core::mesh::{MeshConfig, MeshService, Protocol};
use isthmus_dns::{start, DnsHandle, DnsOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How long a test waits for any one answer before failing.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// The address every fake upstream answers with.
pub const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

pub fn service(name: &str, vip: &str, ports: &[(&str, u16, Protocol)]) -> MeshService {
    MeshService {
        exported: true,
        ..isthmus_testkit::mesh::service(name, "shop", vip, ports)
    }
}

pub fn config(version: u64, services: Vec<MeshService>) -> Arc<MeshConfig> {
    isthmus_testkit::mesh::config(version, "east", services)
}

/// The mesh most tests use: `web.shop` (IPv4, two named ports) and `db.shop` (IPv6).
pub fn shop() -> Arc<MeshConfig> {
    config(
        1,
        vec![
            service(
                "web",
                "240.240.0.1",
                &[("http", 80, Protocol::Http), ("dns", 53, Protocol::Udp)],
            ),
            service("db", "fd00::5", &[("pg", 5432, Protocol::Tcp)]),
        ],
    )
}

pub fn options(upstreams: Vec<SocketAddr>, upstream_timeout: Duration) -> DnsOptions {
    DnsOptions {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        upstreams,
        upstream_timeout,
        ttl: 5,
        ..Default::default()
    }
}

/// A proxy on 127.0.0.1 port 0 serving `config`, with no upstream.
pub async fn proxy(config: Arc<MeshConfig>) -> (DnsHandle, watch::Sender<Arc<MeshConfig>>) {
    let (tx, rx) = watch::channel(config);
    let handle = start(options(vec![], Duration::from_millis(200)), rx)
        .await
        .unwrap();
    (handle, tx)
}

pub fn request(name: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new(0x4242, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg
}

/// Sends raw bytes over UDP and returns the raw reply.
pub async fn udp_exchange(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (len, from) = timeout(ANSWER_WAIT, socket.recv_from(&mut buf))
        .await
        .expect("no UDP answer in time")
        .unwrap();
    assert_eq!(from, server);
    buf.truncate(len);
    buf
}

pub async fn udp_query(server: SocketAddr, msg: &Message) -> Message {
    Message::from_vec(&udp_exchange(server, &msg.to_vec().unwrap()).await).unwrap()
}

/// Sends one length-prefixed message on `stream` and reads the reply.
pub async fn tcp_exchange(stream: &mut TcpStream, msg: &Message) -> Message {
    let bytes = msg.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await.unwrap();
    timeout(ANSWER_WAIT, async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut reply).await.unwrap();
        Message::from_vec(&reply).unwrap()
    })
    .await
    .expect("no TCP answer in time")
}

pub async fn tcp_query(server: SocketAddr, msg: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    tcp_exchange(&mut stream, msg).await
}

/// The A answers of a response, as addresses.
pub fn a_answers(msg: &Message) -> Vec<Ipv4Addr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect()
}

/// What a fake upstream answers: the question, and [`UPSTREAM_ANSWER`] as its A record.
fn upstream_reply(packet: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.clone();
    let query = request.queries.first()?;
    reply.add_answer(Record::from_rdata(
        query.name.clone(),
        60,
        RData::A(A(UPSTREAM_ANSWER)),
    ));
    reply.to_vec().ok()
}

/// A fake upstream resolver on 127.0.0.1.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    /// How many questions it received.
    pub received: Arc<AtomicUsize>,
    /// Every question it received, as raw bytes.
    pub packets: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    pub fn packets(&self) -> Vec<Vec<u8>> {
        self.packets.lock().unwrap().clone()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP upstream that answers every question with [`UPSTREAM_ANSWER`].
pub async fn udp_upstream() -> FakeUpstream {
    udp_upstream_with(|request| answer_with_a(request, 60), None).await
}

/// The fake upstreams' answer: the question, and [`UPSTREAM_ANSWER`] with `ttl` as its A record.
pub fn answer_with_a(request: &Message, ttl: u32) -> Message {
    let mut reply = reply_header(request);
    if let Some(query) = request.queries.first() {
        reply.add_answer(Record::from_rdata(
            query.name.clone(),
            ttl,
            RData::A(A(UPSTREAM_ANSWER)),
        ));
    }
    reply
}

/// A response to `request` with its id, RD and question, RA set and nothing else.
pub fn reply_header(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.clone();
    reply
}

/// A UDP upstream on 127.0.0.1 answering each question with `respond(question)`. With a
/// `gate`, it takes one permit before answering each question (so a test decides when).
pub async fn udp_upstream_with(
    respond: fn(&Message) -> Message,
    gate: Option<Arc<tokio::sync::Semaphore>>,
) -> FakeUpstream {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let packets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, seen) = (received.clone(), packets.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            count.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(buf[..len].to_vec());
            if let Some(gate) = &gate {
                gate.acquire().await.unwrap().forget();
            }
            let Ok(request) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            if let Ok(reply) = respond(&request).to_vec() {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    FakeUpstream {
        addr,
        received,
        packets,
        task,
    }
}

/// The value of the sample `series` (a metric name with its labels, as exposed) in the
/// proxy's metrics, if it has been recorded.
pub fn metric(dns: &DnsHandle, series: &str) -> Option<f64> {
    let mut registry = prometheus_client::registry::Registry::with_prefix("isthmus_dns");
    dns.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A TCP upstream (length-prefixed) that answers every question with [`UPSTREAM_ANSWER`].
pub async fn tcp_upstream() -> FakeUpstream {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let packets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, seen) = (received.clone(), packets.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut len = [0u8; 2];
            if stream.read_exact(&mut len).await.is_err() {
                continue;
            }
            let mut packet = vec![0u8; u16::from_be_bytes(len) as usize];
            if stream.read_exact(&mut packet).await.is_err() {
                continue;
            }
            count.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(packet.clone());
            if let Some(reply) = upstream_reply(&packet) {
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                let _ = stream.write_all(&framed).await;
            }
        }
    });
    FakeUpstream {
        addr,
        received,
        packets,
        task,
    }
}

/// A UDP socket on 127.0.0.1 that receives questions and never answers. Keep it alive for
/// as long as the proxy should see a silent upstream.
pub async fn silent_upstream() -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap()
}
