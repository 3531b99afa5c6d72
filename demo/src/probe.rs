//! What a user would do against the demo: a DNS query and an HTTP GET, over real sockets.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sample::SampleReply;

const WAIT: Duration = Duration::from_secs(5);

/// Asks `server` (UDP) for the A records of `name`; fails unless the answer is NOERROR.
pub async fn resolve_a(server: SocketAddr, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let (code, ips) = query_a(server, name).await?;
    if code != ResponseCode::NoError {
        bail!("{server} answered {code} for {name}");
    }
    Ok(ips)
}

/// Asks `server` (UDP) for the A records of `name`; returns the response code and addresses.
pub async fn query_a(
    server: SocketAddr,
    name: &str,
) -> anyhow::Result<(ResponseCode, Vec<Ipv4Addr>)> {
    let mut msg = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(
        Name::from_ascii(name).with_context(|| format!("bad name {name}"))?,
        RecordType::A,
    ));
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    socket.send_to(&msg.to_vec()?, server).await?;
    let mut buf = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
        .await
        .with_context(|| format!("no DNS answer from {server}"))??;
    let reply = Message::from_vec(&buf[..len])?;
    if reply.metadata.id != msg.metadata.id {
        bail!("DNS answer id mismatch");
    }
    let ips = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect();
    Ok((reply.metadata.response_code, ips))
}

fn rand_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    #[allow(
        clippy::cast_possible_truncation,
        reason = "any 16 bits of the clock make a query id"
    )]
    let id = (nanos >> 8) as u16;
    id
}

/// `GET path` on `addr` with HTTP/1.1 (`connection: close`); returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: isthmus-demo\r\nconnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .with_context(|| format!("no HTTP answer from {addr}"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP answer from {addr}: {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in HTTP answer from {addr}"))?;
    Ok((status, body.to_string()))
}

/// `GET path` on `addr` with HTTP/2 over cleartext (prior knowledge, as gRPC clients and
/// `curl --http2-prior-knowledge` do); returns status and body.
pub async fn http2_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("user-agent", "isthmus-demo")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).to_string()))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .with_context(|| format!("no HTTP/2 answer from {addr}"))?
}

/// Calls a sample service at `addr` and decodes its JSON reply.
pub async fn call_sample(addr: SocketAddr) -> anyhow::Result<SampleReply> {
    let (status, body) = http_get(addr, "/").await?;
    if status != 200 {
        bail!("HTTP {status} from {addr}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("not a sample reply: {body}"))
}
