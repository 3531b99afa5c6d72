use super::codec::{decode_entry, decode_snapshot, encode_entry, encode_snapshot, DecodeError};
use super::*;

fn id(seq: u64) -> ProposalId {
    ProposalId {
        node: 1,
        incarnation: 7,
        seq,
    }
}

fn put(key: &str, value: &[u8]) -> Command {
    Command::Put {
        key: key.to_string(),
        value: value.to_vec(),
        lease_ttl_ms: 0,
        at_ms: 0,
    }
}

fn leased(key: &str, ttl_ms: u64, at_ms: u64) -> Command {
    Command::Put {
        key: key.to_string(),
        value: b"v".to_vec(),
        lease_ttl_ms: ttl_ms,
        at_ms,
    }
}

fn cas(key: &str, expected: Option<u64>) -> Command {
    Command::CompareAndSet {
        key: key.to_string(),
        expected,
        value: b"c".to_vec(),
    }
}

fn outcome(applied: Applied) -> Outcome {
    match applied {
        Applied::Done { outcome, .. } => outcome,
        Applied::Duplicate => panic!("unexpected duplicate"),
    }
}

#[test]
fn entry_encoding_round_trips_every_command() {
    for command in [
        put("c/east", b"{\"zone\":\"a\"}"),
        leased("e/a", 3000, 17),
        Command::Delete {
            key: "e/ns/svc/east".to_string(),
        },
        cas("k", None),
        cas("k", Some(9)),
        Command::Renew {
            key: "k".to_string(),
            at_ms: 5,
        },
        Command::ExpireLease {
            key: "k".to_string(),
            epoch: 4,
        },
        Command::MintToken {
            id: "t".to_string(),
            digest: vec![1, 2],
            expires_at_ms: 9,
            at_ms: 2,
        },
        Command::ConsumeToken {
            id: "t".to_string(),
            digest: vec![1, 2],
            at_ms: 3,
            record: None,
        },
        Command::ConsumeToken {
            id: "t".to_string(),
            digest: vec![1, 2],
            at_ms: 3,
            record: Some(("c/north".to_string(), b"{}".to_vec())),
        },
    ] {
        let data = encode_entry(id(3), &Writer::Member, &command, None);
        let decoded = decode_entry(&data).expect("decodes");
        let (decoded_id, decoded) = (decoded.id, decoded.command);
        assert_eq!(decoded_id, id(3));
        assert_eq!(decoded, command);
    }
}

#[test]
fn garbage_entry_data_is_an_error_not_a_panic() {
    assert!(decode_entry(&[0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(matches!(decode_entry(&[]), Err(DecodeError::Missing(_))));
    assert!(decode_snapshot(&[0xff, 0x01]).is_err());
}

#[test]
fn record_revision_is_the_index_of_the_last_write() {
    let mut sm = StateMachine::default();
    sm.apply_member(5, id(1), put("a", b"1"));
    sm.apply_member(9, id(2), put("a", b"2"));
    assert_eq!(
        sm.get("a"),
        Some(Record {
            value: b"2".to_vec(),
            revision: 9,
            lease: None,
            writer: Some(RecordWriter {
                member: 1,
                writer: Writer::Member,
            }),
        })
    );
}

#[test]
fn retried_duplicate_proposal_is_applied_once() {
    let mut sm = StateMachine::default();
    assert_eq!(
        outcome(sm.apply_member(5, id(1), put("a", b"1"))),
        Outcome::Done(5)
    );
    assert_eq!(
        sm.apply_member(8, id(1), put("a", b"1")),
        Applied::Duplicate
    );
    assert_eq!(sm.get("a").map(|r| r.revision), Some(5));
}

#[test]
fn same_sequence_from_another_incarnation_is_not_a_duplicate() {
    let mut sm = StateMachine::default();
    sm.apply_member(5, id(1), put("a", b"1"));
    let restarted = ProposalId {
        incarnation: 8,
        ..id(1)
    };
    assert_eq!(
        outcome(sm.apply_member(6, restarted, put("a", b"2"))),
        Outcome::Done(6)
    );
}

#[test]
fn delete_of_missing_key_changes_nothing() {
    let mut sm = StateMachine::default();
    let del = |k: &str| Command::Delete { key: k.to_string() };
    assert_eq!(
        sm.apply_member(3, id(1), del("nope")),
        Applied::Done {
            event: None,
            outcome: Outcome::Done(3)
        }
    );
    sm.apply_member(4, id(2), put("a", b"1"));
    assert_eq!(
        sm.apply_member(5, id(3), del("a")),
        Applied::Done {
            event: Some(WatchEvent::Delete {
                key: "a".to_string(),
                revision: 5
            }),
            outcome: Outcome::Done(5)
        }
    );
    assert_eq!(sm.get("a"), None);
}

#[test]
fn compare_and_set_succeeds_only_on_the_expected_revision() {
    let mut sm = StateMachine::default();
    // Must not exist: succeeds once.
    assert_eq!(
        outcome(sm.apply_member(2, id(1), cas("k", None))),
        Outcome::Done(2)
    );
    assert_eq!(
        outcome(sm.apply_member(3, id(2), cas("k", None))),
        Outcome::Conflict(Some(2))
    );
    assert_eq!(
        outcome(sm.apply_member(4, id(3), cas("k", Some(1)))),
        Outcome::Conflict(Some(2))
    );
    assert_eq!(
        outcome(sm.apply_member(5, id(4), cas("k", Some(2)))),
        Outcome::Done(5)
    );
    assert_eq!(
        outcome(sm.apply_member(6, id(5), cas("missing", Some(5)))),
        Outcome::Conflict(None)
    );
    assert_eq!(sm.get("k").map(|r| r.revision), Some(5));
}

#[test]
fn lease_expiry_applies_only_to_the_epoch_the_leader_timed() {
    let mut sm = StateMachine::default();
    sm.apply_member(2, id(1), leased("e/a", 1000, 500));
    assert_eq!(sm.live_leases(), vec![("e/a".to_string(), 2, 1000)]);
    let state = sm.get("e/a").and_then(|r| r.lease).expect("lease");
    assert_eq!(state.expires_at_unix_ms, 1500);
    assert!(!state.expired);

    // Renewed before the leader's expiry landed: the stale expiry does nothing.
    sm.apply_member(
        3,
        id(2),
        Command::Renew {
            key: "e/a".to_string(),
            at_ms: 900,
        },
    );
    let stale = sm.apply_member(
        4,
        id(3),
        Command::ExpireLease {
            key: "e/a".to_string(),
            epoch: 2,
        },
    );
    assert_eq!(
        stale,
        Applied::Done {
            event: None,
            outcome: Outcome::Done(4)
        }
    );
    let expire = sm.apply_member(
        5,
        id(4),
        Command::ExpireLease {
            key: "e/a".to_string(),
            epoch: 3,
        },
    );
    assert!(matches!(
        expire,
        Applied::Done {
            event: Some(WatchEvent::Lease { expired: true, .. }),
            ..
        }
    ));
    let record = sm.get("e/a").expect("record stays");
    assert_eq!(
        record.revision, 2,
        "expiry does not change the value's revision"
    );
    assert_eq!(
        record.lease,
        Some(LeaseState {
            expires_at_unix_ms: 1900,
            expired: true
        })
    );
    assert!(sm.live_leases().is_empty());
    // The owner comes back.
    let renewed = sm.apply_member(
        6,
        id(5),
        Command::Renew {
            key: "e/a".to_string(),
            at_ms: 3000,
        },
    );
    assert!(matches!(
        renewed,
        Applied::Done {
            event: Some(WatchEvent::Lease { expired: false, .. }),
            ..
        }
    ));
    let no_lease = sm.apply_member(
        7,
        id(6),
        Command::Renew {
            key: "nope".to_string(),
            at_ms: 1,
        },
    );
    assert_eq!(outcome(no_lease), Outcome::NoLease);
}

#[test]
fn join_token_is_consumed_once_and_not_after_expiry() {
    let mut sm = StateMachine::default();
    let mint = |id: &str, exp| Command::MintToken {
        id: id.to_string(),
        digest: vec![7],
        expires_at_ms: exp,
        at_ms: 1,
    };
    let consume = |id: &str, digest: u8, at| Command::ConsumeToken {
        id: id.to_string(),
        digest: vec![digest],
        at_ms: at,
        record: None,
    };
    assert_eq!(
        outcome(sm.apply_member(2, id(1), mint("a", 1000))),
        Outcome::Done(2)
    );
    assert_eq!(
        outcome(sm.apply_member(3, id(2), mint("b", 1000))),
        Outcome::Done(3)
    );
    assert!(matches!(
        outcome(sm.apply_member(4, id(3), consume("a", 8, 10))),
        Outcome::TokenRefused(_)
    ));
    assert_eq!(
        outcome(sm.apply_member(5, id(4), consume("a", 7, 10))),
        Outcome::Done(5)
    );
    assert!(matches!(
        outcome(sm.apply_member(6, id(5), consume("a", 7, 10))),
        Outcome::TokenRefused(_)
    ));
    assert!(matches!(
        outcome(sm.apply_member(7, id(6), consume("b", 7, 1000))),
        Outcome::TokenRefused(_)
    ));
    assert!(sm.tokens.is_empty());
}

#[test]
fn a_token_and_its_cluster_record_are_consumed_and_written_together_or_not_at_all() {
    let mut sm = StateMachine::default();
    let mint = |id: &str| Command::MintToken {
        id: id.to_string(),
        digest: vec![7],
        expires_at_ms: 1000,
        at_ms: 1,
    };
    let admit = |id: &str, key: &str| Command::ConsumeToken {
        id: id.to_string(),
        digest: vec![7],
        at_ms: 10,
        record: Some((key.to_string(), b"{\"name\":\"north\"}".to_vec())),
    };
    sm.apply_member(2, id(1), mint("a"));
    sm.apply_member(3, id(2), put("c/south", b"{}"));
    // The name is taken: nothing is written and the token stays.
    assert_eq!(
        outcome(sm.apply_member(4, id(3), admit("a", "c/south"))),
        Outcome::Conflict(Some(3))
    );
    assert!(sm.tokens.contains_key("a"));
    assert_eq!(sm.get("c/south").map(|r| r.value), Some(b"{}".to_vec()));
    // Both at once.
    assert_eq!(
        outcome(sm.apply_member(5, id(4), admit("a", "c/north"))),
        Outcome::Done(5)
    );
    assert!(!sm.tokens.contains_key("a"));
    assert_eq!(sm.get("c/north").map(|r| r.revision), Some(5));
    // A wrong or spent token writes nothing.
    assert!(matches!(
        outcome(sm.apply_member(6, id(5), admit("a", "c/west"))),
        Outcome::TokenRefused(_)
    ));
    assert!(sm.get("c/west").is_none());
}

#[test]
fn snapshot_round_trips_the_whole_state() {
    let mut sm = StateMachine::default();
    sm.apply_member(2, id(1), put("a", b"1"));
    sm.apply_member(3, id(2), leased("b", 100, 5));
    sm.apply_member(
        4,
        id(3),
        Command::MintToken {
            id: "t".to_string(),
            digest: vec![1],
            expires_at_ms: 10,
            at_ms: 1,
        },
    );
    let operator = Writer::Operator(
        isthmus_core::identity::OperatorId::new(
            "east.local",
            isthmus_core::identity::Role::Admin,
            "ann",
        )
        .unwrap(),
    );
    sm.apply(
        5,
        EntryContent {
            id: id(4),
            writer: operator.clone(),
            command: put("c", b"3"),
            signature: None,
        },
    );
    assert_eq!(
        sm.get("c").unwrap().writer.unwrap().to_string(),
        "spiffe://east.local/operator/admin/ann (through member 1)"
    );
    sm.members.insert(
        4,
        MemberInfo {
            peer_addr: "127.0.0.1:1".to_string(),
            added_at: 3,
        },
    );
    let restored = decode_snapshot(&encode_snapshot(&sm)).expect("decodes");
    assert_eq!(restored, sm);
    // The dedup table came along: a replayed proposal stays a duplicate.
    let mut restored = restored;
    assert_eq!(
        restored.apply_member(9, id(1), put("a", b"x")),
        Applied::Duplicate
    );
}

#[test]
fn list_returns_only_the_prefix_sorted_by_key() {
    let mut sm = StateMachine::default();
    for (seq, key) in ["e/b", "c/x", "e/a", "exportsz", "f"].iter().enumerate() {
        sm.apply_member(seq as u64 + 1, id(seq as u64 + 1), put(key, b"v"));
    }
    let keys: Vec<String> = sm.list("e/").into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["e/a", "e/b"]);
    assert_eq!(sm.list("").len(), 5);
}

#[test]
fn dedup_window_stays_bounded() {
    let mut sm = StateMachine::default();
    for seq in 1..=(DEDUP_WINDOW as u64 + 10) {
        sm.apply_member(seq, id(seq), put("k", b"v"));
    }
    assert_eq!(sm.seen.get(&(1, 7)).map(|s| s.len()), Some(DEDUP_WINDOW));
    // A copy of a proposal older than the whole window (a leader replaying it) is skipped.
    assert_eq!(
        sm.apply_member(DEDUP_WINDOW as u64 + 20, id(3), put("k", b"old")),
        Applied::Duplicate
    );
    assert_eq!(sm.get("k").unwrap().value, b"v");
}

/// Member 1 is bound to east; its writes that need an owner must carry its control plane's
/// signature, which every replica verifies against east's bundle as it holds it.
#[test]
fn a_bound_members_owned_writes_need_its_control_planes_signature() {
    use isthmus_core::ca::CertificateAuthority;
    use isthmus_core::identity::{OperatorId, Role};
    use isthmus_core::tls::Identity;
    isthmus_core::install_crypto_provider();
    let east = CertificateAuthority::generate("east.local").unwrap();
    let impostor = CertificateAuthority::generate("east.local").unwrap();
    let control = |ca: &CertificateAuthority| {
        let id = SpiffeId::control("east.local");
        let cert = ca.issue(&id, std::time::Duration::from_secs(600)).unwrap();
        Identity::from_pem(id, &cert.cert_chain_pem, &cert.key_pem).unwrap()
    };
    let (signer, forger) = (control(&east), control(&impostor));
    let record = |bundle: &str| {
        serde_json::to_vec(
            &serde_json::json!({"name": "east", "trustDomain": "east.local",
            "gateway": null, "caBundlePem": bundle, "memberId": 1}),
        )
        .unwrap()
    };
    let mut sm = StateMachine::default();
    // Binding itself: its record is the first entry, unsigned, accepted while unbound.
    let entry = |seq, writer: &Writer, command: &Command, signer: Option<&Identity>| {
        decode_entry(&encode_entry(id(seq), writer, command, signer)).unwrap()
    };
    let member = Writer::Member;
    let own = put("clusters/east", &record(east.cert_pem()));
    assert_eq!(
        outcome(sm.apply(1, entry(1, &member, &own, None))),
        Outcome::Done(1)
    );
    let refused = |o: Outcome| match o {
        Outcome::Refused(r) => r,
        other => panic!("not refused: {other:?}"),
    };
    // Bound now: unsigned, or signed by a certificate of another CA, is refused.
    let r = refused(outcome(sm.apply(2, entry(2, &member, &own, None))));
    assert_eq!(r.reason, Reason::BadSignature);
    assert!(r.message.contains("not signed"), "{r}");
    let r = refused(outcome(sm.apply(3, entry(3, &member, &own, Some(&forger)))));
    assert_eq!(r.reason, Reason::BadSignature);
    assert!(r.message.contains("CA bundle"), "{r}");
    // A signature over other bytes (a leader swapping the value) does not verify.
    let swapped = {
        use prost::Message as _;
        let signed = encode_entry(id(4), &member, &own, Some(&signer));
        let signature = crate::proto::v1::EntryData::decode(signed.as_slice())
            .unwrap()
            .signature;
        let other = put(
            "clusters/east",
            &record(&format!("{}{}", east.cert_pem(), impostor.cert_pem())),
        );
        let mut data = crate::proto::v1::EntryData::decode(
            encode_entry(id(4), &member, &other, None).as_slice(),
        )
        .unwrap();
        data.signature = signature;
        decode_entry(&data.encode_to_vec()).unwrap()
    };
    let r = refused(outcome(sm.apply(4, swapped)));
    assert!(r.message.contains("does not verify"), "{r}");
    assert_eq!(sm.get("clusters/east").unwrap().revision, 1);
    // Its own signature passes; an operator's write is signed even for an unowned key; an
    // unowned key needs none from the member itself.
    assert_eq!(
        outcome(sm.apply(5, entry(5, &member, &own, Some(&signer)))),
        Outcome::Done(5)
    );
    let admin = Writer::Operator(OperatorId::new("east.local", Role::Admin, "ann").unwrap());
    let r = refused(outcome(
        sm.apply(6, entry(6, &admin, &put("load/1", b"1"), None)),
    ));
    assert_eq!(r.reason, Reason::BadSignature);
    assert_eq!(
        outcome(sm.apply(7, entry(7, &admin, &put("load/1", b"1"), Some(&signer)))),
        Outcome::Done(7)
    );
    assert_eq!(
        outcome(sm.apply(8, entry(8, &member, &put("load/2", b"2"), None))),
        Outcome::Done(8)
    );
    // Expiring a lease is the leader's duty, whoever leads: no signature needed.
    let expire = Command::ExpireLease {
        key: "exports/default/ratings/central".into(),
        epoch: 1,
    };
    assert_eq!(
        outcome(sm.apply(9, entry(9, &member, &expire, None))),
        Outcome::Done(9)
    );
}

#[test]
fn empty_key_is_refused() {
    assert!(validate_key("").is_err());
    assert!(validate_key("c/east").is_ok());
}

#[test]
fn expired_join_tokens_are_purged_when_one_is_minted_and_outstanding_ones_are_bounded() {
    let mut sm = StateMachine::default();
    let mint = |id: String, exp, at| Command::MintToken {
        id,
        digest: vec![7],
        expires_at_ms: exp,
        at_ms: at,
    };
    let mut index = 1;
    let mut apply = |sm: &mut StateMachine, command| {
        index += 1;
        outcome(sm.apply_member(index, id(index), command))
    };
    assert!(matches!(
        apply(&mut sm, mint("old".into(), 100, 10)),
        Outcome::Done(_)
    ));
    // Minted after "old" expired: "old" is gone from every replica.
    assert!(matches!(
        apply(&mut sm, mint("new".into(), 1_000, 200)),
        Outcome::Done(_)
    ));
    assert_eq!(sm.tokens.keys().collect::<Vec<_>>(), vec!["new"]);
    for n in 1..MAX_OUTSTANDING_TOKENS {
        assert!(matches!(
            apply(&mut sm, mint(format!("t{n}"), 1_000, 300)),
            Outcome::Done(_)
        ));
    }
    assert_eq!(sm.tokens.len(), MAX_OUTSTANDING_TOKENS);
    assert!(matches!(
        apply(&mut sm, mint("one-too-many".into(), 1_000, 300)),
        Outcome::TokenRefused(reason) if reason.contains("too many")
    ));
    assert_eq!(sm.tokens.len(), MAX_OUTSTANDING_TOKENS);
    // Once they expire, minting works again.
    assert!(matches!(
        apply(&mut sm, mint("later".into(), 5_000, 2_000)),
        Outcome::Done(_)
    ));
    assert_eq!(sm.tokens.len(), 1);
}

impl StateMachine {
    /// Applies `command` as written by the proposing member's own control plane.
    fn apply_member(&mut self, index: u64, id: ProposalId, command: Command) -> Applied {
        self.apply(
            index,
            EntryContent {
                id,
                writer: Writer::Member,
                command,
                signature: None,
            },
        )
    }
}

#[test]
fn the_lease_clock_reads_only_leased_keys_as_puts_deletes_and_snapshots_leave_them() {
    let mut sm = StateMachine::default();
    sm.apply_member(2, id(1), leased("e/a", 1000, 500));
    sm.apply_member(3, id(2), leased("e/b", 2000, 500));
    sm.apply_member(4, id(3), put("plain", b"v"));
    assert_eq!(
        sm.live_leases(),
        vec![("e/a".to_string(), 2, 1000), ("e/b".to_string(), 3, 2000)]
    );
    // Written again without a lease, a key no longer has one; deleted, it is gone.
    sm.apply_member(5, id(4), put("e/a", b"v"));
    sm.apply_member(
        6,
        id(5),
        Command::Delete {
            key: "e/b".to_string(),
        },
    );
    assert!(sm.live_leases().is_empty());
    assert!(sm.leased.is_empty());
    sm.apply_member(7, id(6), leased("e/c", 3000, 500));
    let restored = decode_snapshot(&encode_snapshot(&sm)).expect("decodes");
    assert_eq!(restored.live_leases(), vec![("e/c".to_string(), 7, 3000)]);
    assert_eq!(restored, sm);
}
