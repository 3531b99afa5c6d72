use super::*;
use crate::ca::CertificateAuthority;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn identity(ca: &CertificateAuthority, id: SpiffeId) -> Arc<Identity> {
    let issued = ca.issue(&id, Duration::from_secs(600)).unwrap();
    Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
}

/// Runs one handshake between a server and a client and returns what each side saw of the
/// other: Ok(peer id) or the handshake error text.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> (Result<SpiffeId, String>, Result<SpiffeId, String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let peer = peer_identity(tls.get_ref().1.peer_certificates());
                let mut buf = [0u8; 1];
                let _ = tls.read(&mut buf).await;
                peer.ok_or_else(|| "no peer identity".to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let client_seen = match connector.connect(mesh_server_name(), tcp).await {
        Ok(mut tls) => {
            // TLS 1.3: the server verifies the client certificate after the client finishes,
            // so write something to learn whether the server accepted us.
            let _ = tls.write_all(b"x").await;
            let _ = tls.flush().await;
            peer_identity(tls.get_ref().1.peer_certificates()).ok_or_else(|| "none".to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    (server_task.await.unwrap(), client_seen)
}

struct Mesh {
    east: CertificateAuthority,
    west: CertificateAuthority,
    trust: Arc<TrustBundles>,
}

fn mesh() -> Mesh {
    crate::install_crypto_provider();
    let east = CertificateAuthority::generate("east.isthmus.local").unwrap();
    let west = CertificateAuthority::generate("west.isthmus.local").unwrap();
    let trust = TrustBundles::new();
    trust
        .replace([
            ("east.isthmus.local", east.cert_pem()),
            ("west.isthmus.local", west.cert_pem()),
        ])
        .unwrap();
    Mesh { east, west, trust }
}

#[tokio::test]
async fn mutual_tls_across_trust_domains_exposes_both_spiffe_ids() {
    let m = mesh();
    let server_id = SpiffeId::new("west.isthmus.local", "default", "ratings");
    let client_id = SpiffeId::new("east.isthmus.local", "default", "sleep");
    let server = server_config(
        identity(&m.west, server_id.clone()),
        m.trust.clone(),
        accept_any_member(),
        &[],
    )
    .unwrap();
    let client = client_config(
        identity(&m.east, client_id.clone()),
        m.trust.clone(),
        accept_any_member(),
        &[],
    )
    .unwrap();
    let (server_saw, client_saw) = handshake(server, client).await;
    assert_eq!(server_saw.unwrap(), client_id);
    assert_eq!(client_saw.unwrap(), server_id);
}

#[tokio::test]
async fn a_ca_cannot_vouch_for_another_trust_domain() {
    let m = mesh();
    // The east CA signs a certificate claiming a west identity: it must be refused.
    let forged = identity(
        &m.east,
        SpiffeId::new("west.isthmus.local", "default", "ratings"),
    );
    let server = server_config(
        identity(&m.west, SpiffeId::new("west.isthmus.local", "default", "x")),
        m.trust.clone(),
        accept_any_member(),
        &[],
    )
    .unwrap();
    let client = client_config(forged, m.trust.clone(), accept_any_member(), &[]).unwrap();
    let (server_saw, _) = handshake(server, client).await;
    assert!(
        server_saw.is_err(),
        "forged identity was accepted: {server_saw:?}"
    );
}

#[tokio::test]
async fn removing_a_bundle_stops_trusting_its_cluster() {
    let m = mesh();
    let server = server_config(
        identity(&m.west, SpiffeId::gateway("west.isthmus.local")),
        m.trust.clone(),
        accept_gateways(),
        &[],
    )
    .unwrap();
    let client = client_config(
        identity(&m.east, SpiffeId::gateway("east.isthmus.local")),
        m.trust.clone(),
        accept_gateways(),
        &[],
    )
    .unwrap();
    m.trust
        .replace([("west.isthmus.local", m.west.cert_pem())])
        .unwrap();
    let (server_saw, _) = handshake(server, client).await;
    assert!(server_saw.is_err());
}

#[tokio::test]
async fn acceptance_rule_refuses_non_gateway_identities() {
    let m = mesh();
    let server = server_config(
        identity(&m.west, SpiffeId::gateway("west.isthmus.local")),
        m.trust.clone(),
        accept_gateways(),
        &[],
    )
    .unwrap();
    let client = client_config(
        identity(
            &m.east,
            SpiffeId::new("east.isthmus.local", "default", "sleep"),
        ),
        m.trust.clone(),
        accept_any_member(),
        &[],
    )
    .unwrap();
    let (server_saw, _) = handshake(server, client).await;
    assert!(server_saw.is_err());
}

#[test]
fn a_bad_bundle_changes_nothing() {
    let m = mesh();
    let before = m.trust.trust_domains();
    assert!(m.trust.replace([("x.isthmus.local", "garbage")]).is_err());
    assert_eq!(m.trust.trust_domains(), before);
}

#[test]
fn a_bundle_left_out_is_reported_and_counted_once_per_stretch() {
    let east = CertificateAuthority::generate("east.isthmus.local").unwrap();
    let west = CertificateAuthority::generate("west.isthmus.local").unwrap();
    let trust = TrustBundles::new();
    let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let install = |west_pem: &str| {
        trust
            .replace_each([
                ("east.isthmus.local", east.cert_pem()),
                ("west.isthmus.local", west_pem),
            ])
            .into_iter()
            .map(|(td, _)| td)
            .collect::<Vec<_>>()
    };
    assert!(install(west.cert_pem()).is_empty());
    assert!(trust.excluded_counts().is_empty());
    // West's bundle breaks: reported the first time, not again while it stays broken; east
    // is still installed.
    assert_eq!(install(bad), vec!["west.isthmus.local".to_string()]);
    assert!(install(bad).is_empty());
    assert!(trust
        .trust_domains()
        .contains(&"east.isthmus.local".to_string()));
    assert!(!trust
        .trust_domains()
        .contains(&"west.isthmus.local".to_string()));
    assert_eq!(
        trust.excluded_counts(),
        vec![("west.isthmus.local".to_string(), 1)]
    );
    // Fixed, then broken again: a second stretch.
    assert!(install(west.cert_pem()).is_empty());
    assert_eq!(install(bad), vec!["west.isthmus.local".to_string()]);
    assert_eq!(
        trust.excluded_counts(),
        vec![("west.isthmus.local".to_string(), 2)]
    );
}
