//! The table of docs/security.md §6, cell by cell, for the methods this module decides.

use super::*;
use isthmus_core::identity::SpiffeId;

const TD: &str = "east.isthmus.local";
const OTHER: &str = "west.isthmus.local";

fn op(td: &str, role: Role, name: &str) -> Principal {
    Principal::Operator(OperatorId::new(td, role, name).unwrap())
}

fn workload(td: &str) -> Principal {
    Principal::Workload(SpiffeId::new(td, "default", "ratings"))
}

/// The callers of the table's columns (mesh admin: `admin` named "root").
fn callers() -> Vec<(&'static str, Option<Principal>)> {
    vec![
        ("anon", None),
        ("workload", Some(workload(TD))),
        ("gateway", Some(Principal::Workload(SpiffeId::gateway(TD)))),
        ("dns", Some(Principal::Workload(SpiffeId::dns(TD)))),
        ("cp-this", Some(Principal::Workload(SpiffeId::control(TD)))),
        (
            "cp-other",
            Some(Principal::Workload(SpiffeId::control(OTHER))),
        ),
        ("viewer", Some(op(TD, Role::Viewer, "ann"))),
        ("admin", Some(op(TD, Role::Admin, "bob"))),
        ("mesh-admin", Some(op(TD, Role::Admin, "root"))),
        ("other-workload", Some(workload(OTHER))),
        ("other-admin", Some(op(OTHER, Role::Admin, "root"))),
    ]
}

fn outcome(method: Method, caller: Option<&Principal>) -> &'static str {
    let mesh = |o: &OperatorId| o.name() == "root";
    let local = Local {
        cluster: "east",
        trust_domain: TD,
        is_mesh_admin: &mesh,
    };
    match decide(&local, method, caller) {
        Ok(Allowed::Plain) => "ok",
        Ok(Allowed::Writer { mesh_admin, .. }) => {
            if mesh_admin {
                "mesh"
            } else {
                "own"
            }
        }
        Err(s) if s.code() == Code::Unauthenticated => "U",
        Err(s) if s.code() == Code::PermissionDenied => "x",
        Err(s) => panic!("unexpected {s:?}"),
    }
}

#[test]
fn every_cell_of_the_method_table() {
    use Method::*;
    // Columns: anon, workload, gateway, dns, cp-this, cp-other, viewer, admin, mesh-admin,
    // other-workload, other-admin.
    let table: &[(Method, [&str; 11])] = &[
        (
            StreamConfig,
            ["U", "ok", "ok", "ok", "x", "x", "ok", "ok", "ok", "x", "x"],
        ),
        (
            ReportFailover,
            ["U", "ok", "x", "x", "x", "x", "x", "x", "x", "x", "x"],
        ),
        (
            Explain,
            ["U", "x", "x", "x", "ok", "ok", "ok", "ok", "ok", "x", "ok"],
        ),
        (Sign, ["ok"; 11]),
        (
            PolicyGet,
            ["U", "x", "x", "x", "ok", "x", "ok", "ok", "ok", "x", "ok"],
        ),
        (
            PolicyApply,
            ["U", "x", "x", "x", "x", "x", "x", "x", "mesh", "x", "x"],
        ),
        (
            PolicyDelete,
            ["U", "x", "x", "x", "x", "x", "x", "x", "mesh", "x", "x"],
        ),
        (
            KvRead,
            ["U", "x", "x", "x", "ok", "x", "ok", "ok", "ok", "x", "ok"],
        ),
        (
            KvWrite,
            ["U", "x", "x", "x", "x", "x", "x", "own", "mesh", "x", "x"],
        ),
        (
            KvMintJoinToken,
            ["U", "x", "x", "x", "x", "x", "x", "x", "mesh", "x", "x"],
        ),
        (
            KvRemoveMember,
            ["U", "x", "x", "x", "x", "x", "x", "x", "mesh", "x", "x"],
        ),
        (KvJoin, ["ok"; 11]),
        (KvJoinInfo, ["ok"; 11]),
        (
            Issue,
            ["U", "x", "x", "x", "x", "x", "x", "own", "mesh", "x", "x"],
        ),
    ];
    let callers = callers();
    for (method, row) in table {
        for ((who, caller), want) in callers.iter().zip(row) {
            assert_eq!(
                outcome(*method, caller.as_ref()),
                *want,
                "{method:?} called by {who}"
            );
        }
    }
}

#[test]
fn paths_name_their_methods() {
    assert_eq!(
        Method::from_path("/isthmus.mesh.v1.PolicyService/Apply"),
        Method::PolicyApply
    );
    assert_eq!(
        Method::from_path("/isthmus.federation.v1.Kv/CompareAndSet"),
        Method::KvWrite
    );
    assert_eq!(
        Method::from_path("/isthmus.federation.v1.Kv/Nope"),
        Method::Unknown
    );
}

#[test]
fn refusals_say_who_and_what() {
    let mesh = |_: &OperatorId| false;
    let local = Local {
        cluster: "east",
        trust_domain: TD,
        is_mesh_admin: &mesh,
    };
    let err = decide(&local, Method::PolicyApply, None).unwrap_err();
    assert!(err.message().contains("PolicyService.Apply"), "{err:?}");
    assert!(err.message().contains("credentials issue"), "{err:?}");
    let viewer = op(TD, Role::Viewer, "ann");
    let err = decide(&local, Method::KvWrite, Some(&viewer)).unwrap_err();
    assert!(err.message().contains("operator/viewer/ann"), "{err:?}");
    assert!(err.message().contains("reads only"), "{err:?}");
    let west = op(OTHER, Role::Admin, "bob");
    let err = decide(&local, Method::KvWrite, Some(&west)).unwrap_err();
    assert!(
        err.message().contains("your own cluster's control plane"),
        "{err:?}"
    );
}

#[test]
fn an_admin_writes_only_its_own_clusters_records() {
    let admin = Allowed::Writer {
        operator: OperatorId::new(TD, Role::Admin, "bob").unwrap(),
        mesh_admin: false,
    };
    let none = || Vec::new();
    let put = |key| KvWrite { key, delete: false };
    for key in ["clusters/east", "exports/default/ratings/east"] {
        assert!(
            write_allowed("east", &admin, put(key), &none).is_ok(),
            "{key}"
        );
    }
    for key in [
        "clusters/west",
        "clusters/eastern",
        "exports/default/ratings/west",
        "exports/default/east",
        "policies/AuthorizationPolicy/default/deny",
        "grants/mesh-admin/east.isthmus.local/bob",
    ] {
        let err = write_allowed("east", &admin, put(key), &none).unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{key}");
        assert!(err.message().contains(key), "{err:?}");
    }
    // Without a writer (a data-plane caller got through to Kv somehow) nothing is written.
    assert!(write_allowed("east", &Allowed::Plain, put("clusters/east"), &none).is_err());
}

#[test]
fn the_last_mesh_admin_grant_cannot_be_deleted() {
    let mesh = Allowed::Writer {
        operator: OperatorId::new(TD, Role::Admin, "root").unwrap(),
        mesh_admin: true,
    };
    let key = "grants/mesh-admin/east.isthmus.local/root";
    let only = || vec![key.to_string()];
    let err = write_allowed("east", &mesh, KvWrite { key, delete: true }, &only).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("last mesh-admin grant"), "{err:?}");
    let two = || {
        vec![
            key.to_string(),
            "grants/mesh-admin/west.isthmus.local/x".to_string(),
        ]
    };
    assert!(write_allowed("east", &mesh, KvWrite { key, delete: true }, &two).is_ok());
    assert!(write_allowed(
        "east",
        &mesh,
        KvWrite {
            key: "clusters/west",
            delete: false
        },
        &only
    )
    .is_ok());
}
