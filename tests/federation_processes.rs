//! The federation store as operators run it: three `isthmus control` processes, each with
//! its raft log on disk, written to through the `Kv` API of their control-plane API ports by
//! operators with credentials (the federation ports refuse writes; reads stay there).
//!
//! - The leader is SIGKILLed under load and restarted on its data directory; then all three
//!   are SIGKILLed at once and restarted. Every write that was acknowledged is present on
//!   every member afterwards.
//! - Membership through the CLI: `isthmus cluster token`, `isthmus cluster join` with a fourth
//!   control plane started with `federation.join: true`, `isthmus status -o json`, and
//!   `isthmus cluster remove NAME`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_core::client::ControlClient;
use isthmus_core::identity::{OperatorId, Role};
use isthmus_federation::KvClient;
use support::{addr, daemon, free_port, metric};
use tokio::process::Child;

mod support;

/// A control plane's config: member `id` of the federation whose peer ports are `peers`.
/// A joining member's `peers` lists the existing members too (whom it will hear from).
/// Members authenticate each other: every other member is named with its trust domain and
/// its CA's certificate file (made beforehand by [`make_cas`]).
fn control_config(id: u64, peers: &BTreeMap<u64, u16>, join: bool) -> String {
    let peer_list: Vec<String> = peers
        .iter()
        .map(|(&other, port)| {
            if other == id {
                format!("{other}: \"{}\"", addr(*port))
            } else {
                format!(
                    "{other}: {{addr: \"{}\", trustDomain: c{other}.isthmus.local, \
                     caFile: data-{other}/ca.pem}}",
                    addr(*port)
                )
            }
        })
        .collect();
    format!(
        "cluster: c{id}\ndataDir: data-{id}\ndiscovery: {{file: services.yaml, pollInterval: 100ms}}\n\
         vipRange: 127.{}.0.0/16\nlisten: {{grpc: \"{}\", admin: \"127.0.0.1:0\"}}\n\
         federation: {{nodeId: {id}, listen: \"{}\", join: {join}, tick: 20ms, peers: {{{}}}}}\n",
        60 + id,
        addr(api_port(peers[&id])),
        addr(peers[&id]),
        peer_list.join(", "),
    )
}

/// Makes the CA of each member in `ids` in its data directory (where `isthmus control` finds
/// it), as an operator does before writing the members' configs: each config names the other
/// members' CA certificates.
fn make_cas(dir: &Path, ids: impl IntoIterator<Item = u64>) {
    for id in ids {
        let data = dir.join(format!("data-{id}"));
        std::fs::create_dir_all(&data).unwrap();
        let ca = isthmus_core::ca::CertificateAuthority::generate(&format!("c{id}.isthmus.local"))
            .unwrap();
        std::fs::write(data.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(data.join("ca-key.pem"), ca.key_pem()).unwrap();
    }
}

/// The control-plane API port of the member whose federation port is `peer`: picked once,
/// kept across restarts.
fn api_port(peer: u16) -> u16 {
    static PORTS: Mutex<BTreeMap<u16, u16>> = Mutex::new(BTreeMap::new());
    *PORTS.lock().unwrap().entry(peer).or_insert_with(free_port)
}

/// Member `id`'s operator `admin` credential, issued from its CA files (as `isthmus credentials
/// issue` does): (CA file, certificate PEM, key PEM).
fn admin_credential(dir: &Path, id: u64) -> (String, String, String) {
    let data = dir.join(format!("data-{id}"));
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let key_pem = std::fs::read_to_string(data.join("ca-key.pem")).unwrap();
    let td = format!("c{id}.isthmus.local");
    let ca = isthmus_core::ca::CertificateAuthority::from_pem(&td, &ca_pem, &key_pem).unwrap();
    let op = OperatorId::new(&td, Role::Admin, "admin").unwrap();
    let issued = ca.issue_operator(&op, Duration::from_secs(3600)).unwrap();
    (ca_pem, issued.cert_chain_pem, issued.key_pem)
}

/// The `Kv` API of member `id` (federation port `peer`) through its control plane's TLS
/// port, as that cluster's operator `admin`.
fn api_client(dir: &Path, id: u64, peer: u16) -> KvClient {
    let (ca, cert, key) = admin_credential(dir, id);
    let credential = isthmus_core::tls::StaticClientCert::from_pem(&cert, &key).unwrap();
    let control = ControlClient::authenticated(&addr(api_port(peer)), &ca, credential).unwrap();
    KvClient::from_channel(control.channel())
}

/// Makes every member's operator `admin` a mesh admin (member 1's admin, the first one,
/// writes the grants), so writers may go through any member; returns once every member's
/// replica holds every grant.
async fn grant_every_admin(dir: &Path, peers: &BTreeMap<u64, u16>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first = api_client(dir, 1, peers[&1]);
    for &id in peers.keys().filter(|id| **id != 1) {
        let key = format!("grants/mesh-admin/c{id}.isthmus.local/admin");
        let value = serde_json::to_vec(&serde_json::json!({
            "identity": format!("spiffe://c{id}.isthmus.local/operator/admin/admin"),
            "grantedBy": "spiffe://c1.isthmus.local/operator/admin/admin",
            "grantedAtMs": 1,
        }))
        .unwrap();
        while let Err(e) = first.put(&key, value.clone()).await {
            assert!(Instant::now() < deadline, "granting {key}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (&id, &port) in peers {
            let mut c = api_client(dir, id, port);
            while !matches!(c.get(&key, false).await, Ok(Some(_))) {
                assert!(
                    Instant::now() < deadline,
                    "{key} never reached every member"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn start_member(dir: &Path, id: u64, peers: &BTreeMap<u64, u16>, join: bool) -> Child {
    start_member_with_admin(dir, id, peers, join).await.0
}

/// Starts member `id` and returns it with its admin address (`/metrics`).
async fn start_member_with_admin(
    dir: &Path,
    id: u64,
    peers: &BTreeMap<u64, u16>,
    join: bool,
) -> (Child, String) {
    let (child, ready) = daemon(
        dir,
        &format!("control-{id}"),
        "control",
        &control_config(id, peers, join),
    )
    .await;
    assert_eq!(ready["member"], id);
    let admin = ready["admin"].as_str().expect("admin address").to_string();
    (child, admin)
}

async fn sigkill(child: &mut Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

/// The member every member of `peers` agrees leads, once they do (asked through each
/// member's control-plane API).
async fn leader(dir: &Path, peers: &BTreeMap<u64, u16>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut leaders = Vec::new();
        for (&id, &port) in peers {
            // A member that has just started may not have made its CA yet.
            if !dir.join(format!("data-{id}/ca.pem")).exists() {
                continue;
            }
            if let Ok(s) = api_client(dir, id, port).status().await {
                leaders.push(s.leader_id);
            }
        }
        if leaders.len() == peers.len()
            && leaders[0].is_some()
            && leaders.iter().all(|l| *l == leaders[0])
        {
            return leaders[0].unwrap();
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Acknowledged writes: key and value.
type Acked = Vec<(String, Vec<u8>)>;

/// Writers that put distinct keys through any member, moving on to the next member when
/// one fails, and record every key whose write was acknowledged.
struct Load {
    acked: Arc<Mutex<Acked>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `writers` writers through the members' control-plane APIs (member ids `1..`, whose
    /// federation ports are `ports`).
    fn start(dir: &Path, ports: Vec<u16>, writers: usize, max_per_writer: usize) -> Load {
        let dir = dir.to_path_buf();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = (0..writers)
            .map(|w| {
                let (acked, ports, stopped) = (acked.clone(), ports.clone(), stopped.clone());
                let dir = dir.clone();
                tokio::spawn(async move {
                    let mut target = w % ports.len();
                    let mut conn: Option<KvClient> = None;
                    for n in 0..max_per_writer {
                        if *stopped.borrow() {
                            return;
                        }
                        let key = format!("load/{w:02}/{n:05}");
                        let value = format!("value of {key}").into_bytes();
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => {
                                let id = u64::try_from(target).unwrap() + 1;
                                conn.insert(api_client(&dir, id, ports[target]))
                            }
                        };
                        let put = tokio::time::timeout(
                            Duration::from_secs(2),
                            c.put(&key, value.clone()),
                        );
                        match put.await {
                            Ok(Ok(_)) => acked.lock().unwrap().push((key, value)),
                            _ => {
                                // Unknown outcome: the key may or may not be there; only
                                // acknowledged keys are checked.
                                conn = None;
                                target = (target + 1) % ports.len();
                            }
                        }
                    }
                })
            })
            .collect();
        Load { acked, stop, tasks }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn wait_for(&self, count: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked() < count {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} writes acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Acked {
        self.stop.send_replace(true);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Every acknowledged key, read linearizably from member `id` (federation port `port`).
async fn assert_all_present(dir: &Path, id: u64, port: u16, acked: &[(String, Vec<u8>)]) {
    let who = format!("member {id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        // A restarted member may still be electing or catching up.
        let mut c = api_client(dir, id, port);
        if c.get("probe", true).await.is_ok() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "{who} never served a linearizable read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, records) = c.list("load/", true).await.unwrap();
    let stored: BTreeMap<String, Vec<u8>> =
        records.into_iter().map(|(k, r)| (k, r.value)).collect();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|(k, v)| stored.get(k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "{who} lost {} of {} acknowledged writes, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_members_restart_from_disk_without_losing_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    isthmus_testkit::discovery::Discovery::new().write(&dir.path().join("services.yaml"));
    let peers: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
    let ports: Vec<u16> = peers.values().copied().collect();
    make_cas(dir.path(), 1..=3);
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, start_member(dir.path(), id, &peers, false).await);
    }
    let first_leader = leader(dir.path(), &peers).await;
    grant_every_admin(dir.path(), &peers).await;

    // The leader dies mid-load (SIGKILL: no shutdown, no flush) and comes back from disk.
    let load = Load::start(dir.path(), ports.clone(), 8, 2_000);
    load.wait_for(150, "before the kill").await;
    sigkill(members.get_mut(&first_leader).unwrap()).await;
    let at_kill = load.acked();
    load.wait_for(at_kill + 150, "with the leader dead").await;
    members.insert(
        first_leader,
        start_member(dir.path(), first_leader, &peers, false).await,
    );
    let at_restart = load.acked();
    load.wait_for(at_restart + 150, "after the restart").await;
    let acked = load.finish().await;
    for (&id, &port) in &peers {
        assert_all_present(dir.path(), id, port, &acked).await;
    }
    assert_ne!(leader(dir.path(), &peers).await, 0);

    // All three at once: only what is on disk survives.
    for child in members.values_mut() {
        sigkill(child).await;
    }
    let mut admins = BTreeMap::new();
    for id in 1..=3 {
        let (child, admin) = start_member_with_admin(dir.path(), id, &peers, false).await;
        members.insert(id, child);
        admins.insert(id, admin);
    }
    leader(dir.path(), &peers).await;
    for (&id, &port) in &peers {
        assert_all_present(dir.path(), id, port, &acked).await;
    }
    // Having replayed the whole log, no replica met an entry its rules refuse: in
    // particular, no restarted first member proposed a second "first" mesh-admin grant
    // before it had caught up with the committed one.
    for (id, admin) in &admins {
        let refused = metric(
            admin,
            "isthmus_control_federation_entries_refused_total{reason=\"not_owner\"}",
        )
        .await;
        assert_eq!(
            refused, 0.0,
            "member {id} refused {refused} entries on apply"
        );
    }
    // And it still takes writes.
    api_client(dir.path(), 1, ports[0])
        .put("after/restart", b"yes".to_vec())
        .await
        .unwrap();
    for child in members.values_mut() {
        sigkill(child).await;
    }
}

fn cli(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(args)
        .output()
        .unwrap()
}

fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "isthmus {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Member 1's operator `admin`, with a credential from `isthmus credentials issue`: the CLI
/// arguments that reach member 1's control-plane API as it.
#[derive(Clone)]
struct Admin(Vec<String>);

impl Admin {
    fn issue(dir: &Path, api: &str) -> Admin {
        let data = dir.join("data-1");
        let creds = dir.join("creds");
        cli_ok(&[
            "credentials",
            "issue",
            "--name",
            "admin",
            "--role",
            "admin",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            creds.to_str().unwrap(),
        ]);
        let path = |p: std::path::PathBuf| p.display().to_string();
        Admin(vec![
            "--control".into(),
            api.into(),
            "--ca-file".into(),
            path(data.join("ca.pem")),
            "--cert".into(),
            path(creds.join("admin.pem")),
            "--key".into(),
            path(creds.join("admin-key.pem")),
        ])
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.0.iter().map(String::as_str));
        cli(&all)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "isthmus {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Polls `isthmus status -o json` (as member 1's admin) until `check` holds.
async fn status_until(
    admin: &Admin,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = admin.clone();
        let out = tokio::task::spawn_blocking(move || a.ok(&["status", "-o", "json"]))
            .await
            .unwrap();
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}; last status: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_join_with_a_one_time_token_and_leave_by_name() {
    let dir = tempfile::tempdir().unwrap();
    isthmus_testkit::discovery::Discovery::new().write(&dir.path().join("services.yaml"));
    // Members 1-3 found the federation; 4 joins later; 5 only ever tries to.
    make_cas(dir.path(), 1..=5);
    let mut peers: BTreeMap<u64, u16> = (1..=3).map(|id| (id, free_port())).collect();
    let mut members = Vec::new();
    for id in 1..=3 {
        members.push(start_member(dir.path(), id, &peers, false).await);
    }
    leader(dir.path(), &peers).await;
    // Minting, joining, removing and status go through a control plane's TLS API; the
    // federation port is the members' own (mutual TLS with member certificates).
    let api1 = addr(api_port(peers[&1]));
    let admin = Admin::issue(dir.path(), &api1);
    let initial = status_until(&admin, "three named members", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["cluster"].is_string())
    })
    .await;
    assert_eq!(initial["members"].as_array().unwrap().len(), 3);

    // A fourth cluster: start its control plane empty, then join it with a token. Joining
    // needs no credential, only the token and the CA of the control plane it goes through.
    peers.insert(4, free_port());
    let mut fourth = start_member(dir.path(), 4, &peers, true).await;
    let token = admin.ok(&["cluster", "token", "--ttl", "5m"]);
    let token = token.trim().to_string();
    assert!(token.contains('.'), "{token}");
    let ca1 = dir.path().join("data-1/ca.pem").display().to_string();
    let fed = addr(peers[&1]);
    let through_api: [&str; 4] = ["--control", &api1, "--ca-file", &ca1];
    let through_peer_port: [&str; 2] = ["--via", &fed];
    let join = |token: &str, id: u64, peer: &str, through: &[&str]| -> Output {
        let bundle = dir.path().join(format!("data-{id}/ca.pem"));
        cli(&[
            "cluster",
            "join",
            "--token",
            token,
            "--id",
            &id.to_string(),
            "--peer-addr",
            peer,
            "--cluster",
            &format!("c{id}"),
            "--trust-domain",
            &format!("c{id}.isthmus.local"),
            "--bundle-file",
            bundle.to_str().unwrap(),
        ]
        .iter()
        .chain(through)
        .copied()
        .collect::<Vec<_>>())
    };
    // Through a member's peer port, with no CA file: the joiner checks the federation's
    // bundle set against the digest in the token first. A token whose digest is not this
    // federation's is never sent (it still works afterwards).
    let (rest, digest) = token.rsplit_once('.').unwrap();
    assert_eq!(digest.len(), 64, "{token}");
    let flipped = if digest.ends_with('0') { '1' } else { '0' };
    let forged = format!("{rest}.{}{flipped}", &digest[..63]);
    let refused = join(&forged, 4, &addr(peers[&4]), &through_peer_port);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("not the federation") && err.contains("not sent"),
        "{err}"
    );
    let joined = join(&token, 4, &addr(peers[&4]), &through_peer_port);
    let out = String::from_utf8_lossy(&joined.stdout);
    assert!(
        joined.status.success() && out.contains("member 4") && out.contains("voter"),
        "{out} {}",
        String::from_utf8_lossy(&joined.stderr)
    );

    // The token is one-time.
    let again = join(&token, 5, "127.0.0.1:9", &through_api);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("token"), "{err}");
    // A garbage token names what is wrong.
    let bad = join("nonsense", 5, "127.0.0.1:9", &through_api);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("token"), "{err}");

    // The other members authenticate c4's control plane from the record its join wrote, so
    // it catches up.
    let s = status_until(&admin, "c4 caught up and published its record", |s| {
        s["members"].as_array().unwrap().iter().any(|m| {
            m["id"] == 4 && m["cluster"] == "c4" && m["lag"] == 0 && m["membership"] == "voter"
        })
    })
    .await;
    assert_eq!(s["members"].as_array().unwrap().len(), 4);
    assert!(s["leader"].as_u64().is_some());
    let table = admin.ok(&["status"]);
    assert!(table.contains("c4") && table.contains("LAG"), "{table}");

    // A connection c4's control plane holds to member 1's peer port (a watch, as a member
    // that does not stop itself after its removal would keep it): open while c4 is a member.
    let c4_ca = {
        let data = dir.path().join("data-4");
        isthmus_core::ca::CertificateAuthority::from_pem(
            "c4.isthmus.local",
            &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
        )
        .unwrap()
    };
    let c4_control = {
        let id = isthmus_core::identity::SpiffeId::control("c4.isthmus.local");
        let issued = c4_ca.issue(&id, Duration::from_secs(600)).unwrap();
        isthmus_core::tls::Identity::from_pem(id, &issued.cert_chain_pem, &issued.key_pem).unwrap()
    };
    let ca1_pem = std::fs::read_to_string(&ca1).unwrap();
    let mut held = KvClient::from_channel(
        ControlClient::authenticated(
            &fed,
            &ca1_pem,
            isthmus_core::tls::identity_resolver(c4_control),
        )
        .unwrap()
        .channel(),
    )
    .watch("clusters/", 0)
    .await
    .expect("c4, a member, watches member 1's records");

    // Leaving by name.
    let removed = admin.ok(&["cluster", "remove", "c4"]);
    assert!(removed.contains("member 4"), "{removed}");
    status_until(&admin, "member 4 gone", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["id"] != 4)
    })
    .await;
    // Its record went with it, so no member binds c4's trust domain any more.
    let mut kv = api_client(dir.path(), 1, peers[&1]);
    assert!(kv.get("clusters/c4", true).await.unwrap().is_none());
    assert!(kv.get("clusters/c1", true).await.unwrap().is_some());
    // Member 1 closed the connection c4 held when the removal applied: the watch ends with
    // an error instead of streaming the federation's records to a non-member.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match held.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the removed member's open watch is cut off");
    assert!(
        ended.is_err(),
        "the watch ended without an error: {ended:?}"
    );

    // The removed member hears from no one, asks its old peers, learns it was removed and
    // exits non-zero (its stderr says so) rather than campaigning for ever.
    let exit = tokio::time::timeout(Duration::from_secs(30), fourth.wait())
        .await
        .expect("the removed member's control plane exits on its own")
        .unwrap();
    assert!(!exit.success(), "it exits with a failure: {exit}");
    // Unknown names get a clear error.
    let unknown = admin.run(&["cluster", "remove", "nowhere"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no cluster named \"nowhere\""));

    drop(fourth);
    drop(members);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_data_directory_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    isthmus_testkit::discovery::Discovery::new().write(&dir.path().join("services.yaml"));
    let peers = BTreeMap::from([(1, free_port())]);
    let mut first = start_member(dir.path(), 1, &peers, false).await;
    let holder = first.id().expect("running");

    // The same member (same data directory) started again on other ports.
    let again = BTreeMap::from([(1, free_port())]);
    let path = dir.path().join("control-again.yaml");
    std::fs::write(&path, control_config(1, &again, false)).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
            .args(["control", "--config", path.to_str().unwrap()])
            .current_dir(dir.path())
            .output(),
    )
    .await
    .expect("the second process exits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second member started: {stderr}");
    assert!(
        stderr.contains("held by another process") && stderr.contains(&format!("pid {holder}")),
        "{stderr}"
    );
    assert!(stderr.contains("data-1"), "names the directory: {stderr}");

    // The first member is untouched and still serves.
    api_client(dir.path(), 1, peers[&1])
        .put("load/still", b"here".to_vec())
        .await
        .unwrap();
    sigkill(&mut first).await;
    // Its lock died with it: the directory can be used again at once.
    let mut restarted = start_member(dir.path(), 1, &again, false).await;
    sigkill(&mut restarted).await;
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A small tmpfs mounted on a directory for the test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "resizing the tmpfs on {}", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_exits_loudly_and_restarts_cleanly_once_space_returns() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    isthmus_testkit::discovery::Discovery::new().write(&dir.path().join("services.yaml"));
    // The member's data directory is a 2 MiB disk of its own.
    let disk = SmallDisk::mount(&dir.path().join("data-1"), "2m");
    let peers = BTreeMap::from([(1, free_port())]);
    let path = dir.path().join("control-1.yaml");
    std::fs::write(&path, control_config(1, &peers, false)).unwrap();
    let mut member = tokio::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args(["control", "--config", path.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _ = leader(dir.path(), &peers).await;

    // Write 64 KiB values until the disk is full and a write is refused.
    let mut c = api_client(dir.path(), 1, peers[&1]);
    let mut acked = Vec::new();
    for i in 0..200 {
        let key = format!("fill/{i:03}");
        match c.put(&key, vec![b'x'; 64 * 1024]).await {
            Ok(_) => acked.push(key),
            Err(_) => break,
        }
    }
    assert!(
        !acked.is_empty() && acked.len() < 200,
        "{} writes",
        acked.len()
    );

    // The member exits non-zero, naming the log file and the error.
    let exit = tokio::time::timeout(Duration::from_secs(20), member.wait())
        .await
        .expect("the member exits once its log cannot be written")
        .unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(member.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(!exit.success(), "exited with {exit}: {stderr}");
    assert!(
        stderr.contains("the federation member stopped")
            && (stderr.contains("wal-") || stderr.contains("snapshot-"))
            && stderr.contains("No space left on device"),
        "{stderr}"
    );

    // Space returns: it starts again on the same directory with every acknowledged write.
    disk.resize("64m");
    let mut restarted = start_member(dir.path(), 1, &peers, false).await;
    let _ = leader(dir.path(), &peers).await;
    let mut c = api_client(dir.path(), 1, peers[&1]);
    for key in &acked {
        let got = c
            .get(key, false)
            .await
            .unwrap()
            .expect("acknowledged write kept");
        assert_eq!(got.value.len(), 64 * 1024);
    }
    drop(c);
    api_client(dir.path(), 1, peers[&1])
        .put("after/refill", b"ok".to_vec())
        .await
        .unwrap();
    // Gone before the disk is unmounted.
    sigkill(&mut restarted).await;
}

/// A control plane whose config carries `federation.joinWith` joins itself at start (the
/// token from a file, through a member verified against the token's digest), restarts as the
/// member it became, and a second control plane given the spent token exits non-zero saying
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_joins_itself_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    isthmus_testkit::discovery::Discovery::new().write(&dir.path().join("services.yaml"));
    make_cas(dir.path(), 1..=3);
    let mut peers: BTreeMap<u64, u16> = BTreeMap::from([(1, free_port())]);
    let _first = start_member(dir.path(), 1, &peers, false).await;
    leader(dir.path(), &peers).await;
    let admin = Admin::issue(dir.path(), &addr(api_port(peers[&1])));
    let token = admin.ok(&["cluster", "token", "--ttl", "5m"]);
    std::fs::write(dir.path().join("join-token"), token.trim()).unwrap();
    let joining = |id: u64, peers: &BTreeMap<u64, u16>| {
        control_config(id, peers, true).replace(
            "join: true,",
            &format!(
                "join: true, joinWith: {{tokenFile: join-token, via: \"{}\"}},",
                addr(peers[&1])
            ),
        )
    };

    peers.insert(2, free_port());
    let config = joining(2, &peers);
    let (second, ready) = daemon(dir.path(), "control-2", "control", &config).await;
    assert_eq!(ready["member"], 2);
    status_until(&admin, "c2 joined by itself and caught up", |s| {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == 2 && m["cluster"] == "c2" && m["lag"] == 0)
    })
    .await;
    // Restarted with the same config (the token is spent): it is a member already.
    support::stop(second, "control-2").await;
    let (_second, ready) = daemon(dir.path(), "control-2", "control", &config).await;
    assert_eq!(ready["member"], 2);

    // Another control plane with the spent token: refused, and it says so.
    peers.insert(3, free_port());
    let path = dir.path().join("control-3.yaml");
    std::fs::write(&path, joining(3, &peers)).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_isthmus"))
            .args(["control", "--config", path.to_str().unwrap()])
            .output(),
    )
    .await
    .expect("it gives up at once on a refusal")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("federation.joinWith") && err.contains("token"),
        "{err}"
    );
}
