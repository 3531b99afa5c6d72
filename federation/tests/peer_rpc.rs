//! The peer `RaftPeer.Send` RPC facing bad input: a member rejects what is not a raft
//! message for it, and keeps working.

mod support;

use support::*;

/// The peer protocol as a client outside the crate sees it.
#[allow(dead_code, clippy::all)]
mod pb {
    tonic::include_proto!("isthmus.federation.v1");
}

use pb::raft_peer_client::RaftPeerClient;
use pb::RaftBatch;

async fn client(addr: std::net::SocketAddr) -> RaftPeerClient<tonic::transport::Channel> {
    RaftPeerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the peer port")
}

#[tokio::test]
async fn garbage_bytes_sent_to_peer_send_are_rejected_and_the_member_keeps_working() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let target = &stores[&1];
    let mut peer = client(target.peer_addr()).await;

    let status = peer
        .send(RaftBatch {
            from: 2,
            to: 1,
            messages: vec![b"not a raft message \xff\xff\xff".to_vec()],
        })
        .await
        .expect_err("garbage must be rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A truncated varint.
    let status = peer
        .send(RaftBatch {
            from: 2,
            to: 1,
            messages: vec![vec![0x08, 0xff, 0xff]],
        })
        .await
        .expect_err("truncated message must be rejected");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    assert!(
        target.status().rejected_peer_batches >= 2,
        "rejections are counted: {:?}",
        target.status()
    );

    // The member still takes part: a write through it reaches everyone.
    target
        .put("c/still-alive", b"yes".to_vec())
        .await
        .expect("put after garbage");
    visible_everywhere(&stores, "c/still-alive", b"yes").await;
    shutdown_all(stores).await;
}

#[tokio::test]
async fn batches_for_another_member_or_from_a_stranger_are_rejected() {
    let stores = start_federation(3).await;
    agreed_leader(&stores).await;
    let mut peer = client(stores[&1].peer_addr()).await;

    for (from, to) in [(2, 3), (99, 1), (1, 1)] {
        let status = peer
            .send(RaftBatch {
                from,
                to,
                messages: Vec::new(),
            })
            .await
            .expect_err("misaddressed batch must be rejected");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "from {from} to {to}: {status:?}"
        );
    }
    shutdown_all(stores).await;
}
