//! The injection webhook over HTTPS, as the Kubernetes API server calls it: a certificate for
//! the webhook Service's DNS name from the cluster CA, `POST /inject` with an AdmissionReview.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use isthmus_control::webhook::{serve, InjectConfig, RotatingCert, MAX_CONNECTIONS};
use isthmus_core::ca::CertificateAuthority;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "isthmus-control.isthmus-system.svc";

/// A TLS connection to the webhook, checking its certificate for the Service name against
/// the CA, as the Kubernetes API server does.
async fn connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(NAME.try_into().unwrap(), tcp)
        .await
        .expect("the webhook's certificate verifies for its Service name")
}

/// POSTs `body` to `path` over TLS (checking the server's name against the CA); returns
/// (status, body).
async fn post(addr: std::net::SocketAddr, ca_pem: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut tls = connect(addr, ca_pem).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {NAME}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[tokio::test]
async fn the_webhook_answers_reviews_over_https_and_rejects_malformed_ones() {
    let ca = Arc::new(CertificateAuthority::generate("east.isthmus.local").unwrap());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (cert, _rotation) = RotatingCert::start(
        ca.clone(),
        vec![NAME.to_string()],
        Duration::from_secs(3600),
        stop.clone(),
    )
    .unwrap();
    let tls = Arc::new(cert.tls_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = InjectConfig {
        image: "isthmus/isthmus:0.1.0".into(),
        cluster: "east".into(),
        trust_domain: "east.isthmus.local".into(),
        control: format!("{NAME}:15012"),
        gateway: "isthmus-gateway.isthmus-system.svc:15444".into(),
        ca_pem: ca.cert_pem().to_string(),
    };
    let server = tokio::spawn(serve(listener, tls, config, stop));

    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b7e1",
            "namespace": "default",
            "object": {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "app"}]}},
        }
    });
    let (status, body) = post(
        addr,
        ca.cert_pem(),
        "/inject",
        review.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "b7e1");
    assert_eq!(answer["response"]["allowed"], true);
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: serde_json::Value = serde_json::from_slice(&patch).unwrap();
    assert_eq!(patch[1]["value"]["name"], "isthmus-proxy");

    let (status, body) = post(
        addr,
        ca.cert_pem(),
        "/inject",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"object":{}}}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("request.uid"), "{body}");
    let (status, _) = post(addr, ca.cert_pem(), "/other", b"{}").await;
    assert_eq!(status, 404);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

/// The leaf certificate a TLS client gets from the webhook at `addr`.
async fn served_leaf(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    let tls = connect(addr, ca_pem).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_serving_certificate_is_rotated_before_it_expires_and_connections_are_bounded() {
    let ca = Arc::new(CertificateAuthority::generate("east.isthmus.local").unwrap());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    // A 2 s certificate is re-issued after 1 s.
    let (cert, rotation) = RotatingCert::start(
        ca.clone(),
        vec![NAME.to_string()],
        Duration::from_secs(2),
        stop.clone(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = InjectConfig {
        image: "isthmus/isthmus:0.1.0".into(),
        cluster: "east".into(),
        trust_domain: "east.isthmus.local".into(),
        control: format!("{NAME}:15012"),
        gateway: "isthmus-gateway.isthmus-system.svc:15444".into(),
        ca_pem: ca.cert_pem().to_string(),
    };
    let server = tokio::spawn(serve(
        listener,
        Arc::new(cert.tls_config().unwrap()),
        config,
        stop,
    ));
    let first = served_leaf(addr, ca.cert_pem()).await;
    assert_eq!(first, cert.leaf_der());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = served_leaf(addr, ca.cert_pem()).await;
    assert_ne!(
        first, second,
        "still the first certificate after half its lifetime"
    );
    assert_eq!(second, cert.leaf_der());

    // Connections beyond the limit are closed as they are accepted: hold every slot with
    // connections that never handshake, and the next one ends at once.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut byte))
        .await
        .expect("the connection over the limit is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(held);

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    rotation.await.unwrap();
}
