use super::*;

const TD: &str = "east.isthmus.local";
const HOUR: Duration = Duration::from_secs(3600);

fn generate() -> Result<NextCa, String> {
    Ok(NextCa::Generate {
        trust_domain: TD.into(),
    })
}

/// A CA directory as a control plane's first start leaves it.
fn ca_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::config::load_or_create_ca(dir.path(), TD).unwrap();
    (dir, ca.cert_pem().to_string())
}

fn certs(pem: &str) -> Vec<Vec<u8>> {
    isthmus_core::tls::certs_from_pem("test", pem)
        .unwrap()
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// The contents of every file in `dir`, by name.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut all: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    all.sort();
    all
}

#[test]
fn the_three_steps_overlap_the_cas_and_end_with_the_new_one_alone() {
    let (dir, old) = ca_dir();
    let now = SystemTime::now();

    assert_eq!(
        rotate(dir.path(), generate, HOUR, now, false).unwrap(),
        Step::Staged
    );
    let next = read(dir.path(), NEXT_CERT);
    let loaded = crate::config::load_or_create_ca(dir.path(), TD).unwrap();
    assert_eq!(loaded.cert_pem(), old, "the old CA still signs");
    assert_eq!(
        certs(&loaded.bundle_pem()),
        [certs(&old), certs(&next)].concat()
    );

    assert_eq!(
        rotate(dir.path(), generate, HOUR, now, false).unwrap(),
        Step::Activated
    );
    assert!(!dir.path().join(NEXT_CERT).exists() && !dir.path().join(NEXT_KEY).exists());
    let loaded = crate::config::load_or_create_ca(dir.path(), TD).unwrap();
    assert_eq!(loaded.cert_pem(), next, "the new CA signs");
    assert_eq!(read(dir.path(), PREVIOUS_CERT), old);
    assert_eq!(
        certs(&loaded.bundle_pem()),
        [certs(&next), certs(&old)].concat()
    );

    // Retiring waits one certificate lifetime after the activation.
    let before = files(dir.path());
    let err = rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap_err();
    assert!(
        err.to_string().contains("ca-previous.pem")
            && err.to_string().contains("certLifetime is 3600s"),
        "{err}"
    );
    assert_eq!(files(dir.path()), before, "a refused step changes nothing");

    assert_eq!(
        rotate(dir.path(), generate, HOUR, SystemTime::now() + HOUR, false).unwrap(),
        Step::Retired
    );
    let loaded = crate::config::load_or_create_ca(dir.path(), TD).unwrap();
    assert_eq!(certs(&loaded.bundle_pem()), certs(&next));
}

#[test]
fn an_interrupted_activation_is_named_at_start_and_finished_by_running_it_again() {
    let (dir, old) = ca_dir();
    rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap();
    let next = read(dir.path(), NEXT_CERT);
    // A crash between the key's write and the certificate's.
    std::fs::write(dir.path().join(KEY), read(dir.path(), NEXT_KEY)).unwrap();
    let err = crate::config::load_or_create_ca(dir.path(), TD).unwrap_err();
    assert!(
        err.to_string().contains("does not belong") && err.to_string().contains("run it again"),
        "{err}"
    );
    assert_eq!(
        rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap(),
        Step::Activated
    );
    let loaded = crate::config::load_or_create_ca(dir.path(), TD).unwrap();
    assert_eq!(loaded.cert_pem(), next);
    assert_eq!(read(dir.path(), PREVIOUS_CERT), old);

    // A crash after ca.pem's write, before the leftovers went.
    let (dir, _) = ca_dir();
    rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap();
    let (next, next_key) = (read(dir.path(), NEXT_CERT), read(dir.path(), NEXT_KEY));
    rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap();
    std::fs::write(dir.path().join(NEXT_CERT), &next).unwrap();
    let previous = read(dir.path(), PREVIOUS_CERT);
    assert_eq!(
        rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap(),
        Step::Activated
    );
    assert_eq!(read(dir.path(), CERT), next);
    assert_eq!(read(dir.path(), KEY), next_key);
    assert_eq!(read(dir.path(), PREVIOUS_CERT), previous, "kept as it was");
    assert!(!dir.path().join(NEXT_CERT).exists());
}

#[test]
fn a_bad_supplied_ca_is_refused_and_nothing_is_written() {
    let (dir, _) = ca_dir();
    let before = files(dir.path());
    let a = CertificateAuthority::generate(TD).unwrap();
    let b = CertificateAuthority::generate(TD).unwrap();
    let mismatched = || {
        Ok(NextCa::Supplied {
            cert_pem: a.cert_pem().into(),
            key_pem: b.key_pem().into(),
        })
    };
    let err = rotate(dir.path(), mismatched, HOUR, SystemTime::now(), false).unwrap_err();
    assert!(err.to_string().contains("the supplied next CA"), "{err}");
    let current = read(dir.path(), CERT);
    let key = read(dir.path(), KEY);
    let same = || {
        Ok(NextCa::Supplied {
            cert_pem: current.clone(),
            key_pem: key.clone(),
        })
    };
    let err = rotate(dir.path(), same, HOUR, SystemTime::now(), false).unwrap_err();
    assert!(err.to_string().contains("the one that signs now"), "{err}");
    // A next CA that is not a CA certificate at all.
    let garbage = || {
        Ok(NextCa::Supplied {
            cert_pem: "not pem".into(),
            key_pem: b.key_pem().into(),
        })
    };
    assert!(rotate(dir.path(), garbage, HOUR, SystemTime::now(), false).is_err());
    assert_eq!(files(dir.path()), before);

    // A staged next CA that is torn is not activated.
    let ok = || {
        Ok(NextCa::Supplied {
            cert_pem: a.cert_pem().into(),
            key_pem: a.key_pem().into(),
        })
    };
    rotate(dir.path(), ok, HOUR, SystemTime::now(), false).unwrap();
    std::fs::write(dir.path().join(NEXT_KEY), b.key_pem()).unwrap();
    let staged = files(dir.path());
    let err = rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap_err();
    assert!(
        err.to_string().contains("ca-next.pem and ca-next-key.pem"),
        "{err}"
    );
    assert_eq!(files(dir.path()), staged);
}

#[test]
fn force_retires_early() {
    let (dir, _) = ca_dir();
    rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap();
    rotate(dir.path(), generate, HOUR, SystemTime::now(), false).unwrap();
    assert_eq!(
        rotate(dir.path(), generate, HOUR, SystemTime::now(), true).unwrap(),
        Step::Retired
    );
    assert!(!dir.path().join(PREVIOUS_CERT).exists());
}
