//! The per-peer metrics as an operator scrapes them: open streams, bytes each way, round-trip
//! time, handshakes and streams by reason code, under their Prometheus names.

mod support;

use std::time::Duration;

use isthmus_gateway::Metrics;
use prometheus_client::registry::Registry;
use support::*;

/// The gateway's metrics in the Prometheus text format, as the admin server serves them.
fn scrape(metrics: &Metrics) -> String {
    let mut registry = Registry::with_prefix("isthmus_gateway");
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// The value of the sample whose name and labels start with `prefix` (labels in the order the
/// label set declares them), if there is one.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn per_peer_metrics_count_streams_bytes_rtt_handshakes_and_reason_codes() {
    let c = TwoClusters::start().await;
    let local = c.east.handle.local_addr();
    let (east, west) = (c.east.handle.metrics(), c.west.handle.metrics());

    let (mut tcp, resp) = open(local, &request("ratings.default", "west")).await;
    assert!(resp.is_ok(), "{resp:?}");
    let data = vec![7u8; 10_000];
    assert_eq!(echo_round_trip(&mut tcp, &data).await, data);
    let text = scrape(&east);
    assert_eq!(
        sample(
            &text,
            r#"isthmus_gateway_peer_open_streams{peer="west",direction="outbound"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &scrape(&west),
            r#"isthmus_gateway_peer_open_streams{peer="east",direction="inbound"}"#
        ),
        Some(1.0)
    );
    drop(tcp);

    // A refusal is counted under its code.
    let (_, resp) = open(local, &request("nope.default", "west")).await;
    assert_eq!(resp.code, isthmus_gateway::ReasonCode::UnknownService);

    // The RTT gauge is sampled once a second; the open-stream gauge drops when the tunnel has
    // wound down on both gateways.
    let text = eventually(Duration::from_secs(5), "rtt sampled, tunnel closed", || {
        let (east, west) = (east.clone(), west.clone());
        async move {
            let text = scrape(&east);
            let rtt = sample(&text, r#"isthmus_gateway_peer_rtt_seconds{peer="west"}"#)?;
            let open = r#"isthmus_gateway_peer_open_streams{peer="west",direction="outbound"}"#;
            let west_open = r#"isthmus_gateway_peer_open_streams{peer="east",direction="inbound"}"#;
            (rtt > 0.0
                && sample(&text, open) == Some(0.0)
                && sample(&scrape(&west), west_open) == Some(0.0))
            .then_some(text)
        }
    })
    .await;
    let rtt = sample(&text, r#"isthmus_gateway_peer_rtt_seconds{peer="west"}"#).unwrap();
    assert!(rtt < 0.5, "loopback RTT {rtt} s");
    for (name, at_least) in [
        (
            r#"isthmus_gateway_peer_bytes_total{peer="west",flow="sent"}"#,
            10_000.0,
        ),
        (
            r#"isthmus_gateway_peer_bytes_total{peer="west",flow="received"}"#,
            10_000.0,
        ),
        (
            r#"isthmus_gateway_peer_handshakes_total{peer="west",role="client"}"#,
            1.0,
        ),
        (r#"isthmus_gateway_peer_connections{peer="west"}"#, 1.0),
    ] {
        let got = sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert!(got >= at_least, "{name} = {got}");
    }
    assert_eq!(
        sample(
            &text,
            r#"isthmus_gateway_peer_streams_total{peer="west",direction="outbound",code="ok"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"isthmus_gateway_peer_streams_total{peer="west",direction="outbound",code="unknown_service"}"#
        ),
        Some(1.0),
        "{text}"
    );
    let west_text = scrape(&west);
    assert_eq!(
        sample(
            &west_text,
            r#"isthmus_gateway_peer_handshakes_total{peer="east",role="server"}"#
        ),
        Some(1.0),
        "{west_text}"
    );
    assert_eq!(
        sample(
            &west_text,
            r#"isthmus_gateway_peer_streams_total{peer="east",direction="inbound",code="unknown_service"}"#
        ),
        Some(1.0),
        "{west_text}"
    );
}
