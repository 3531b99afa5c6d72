//! Rotating a cluster's CA without an outage (docs/security.md §5), as files in the control
//! plane's CA directory (its `dataDir`, or its `caDir`):
//!
//! | file | what it is |
//! |---|---|
//! | `ca.pem`, `ca-key.pem` | the CA that signs |
//! | `ca-next.pem`, `ca-next-key.pem` | the CA that will sign: trusted and published, not signing yet |
//! | `ca-previous.pem` | the CA that signed before (no key): trusted until what it signed has expired |
//!
//! [`rotate`] takes one step from what the directory holds, and [`overlapping`] is what the
//! control plane loads at start: the signing CA, trusting the other two. Each step is taken
//! with the control plane's restart after it:
//!
//! 1. **stage** (neither file): a new CA is written as `ca-next*`. Restarted, the control plane
//!    publishes old + new in its cluster record and still signs with the old one.
//! 2. **activate** (`ca-next.pem` present): the old certificate becomes `ca-previous.pem` and
//!    the new CA `ca.pem`/`ca-key.pem`. Restarted, it signs with the new CA; the bundle is
//!    still old + new, so nothing the old CA signed stops verifying.
//! 3. **retire** (`ca-previous.pem` present, one `certLifetime` after step 2): the old
//!    certificate is removed. Restarted, the bundle is the new CA alone.
//!
//! Every step is written so that an interrupted one is finished by running it again.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use isthmus_core::ca::CertificateAuthority;
use isthmus_core::durable::{write_atomic, Access};

pub const CERT: &str = "ca.pem";
pub const KEY: &str = "ca-key.pem";
pub const NEXT_CERT: &str = "ca-next.pem";
pub const NEXT_KEY: &str = "ca-next-key.pem";
pub const PREVIOUS_CERT: &str = "ca-previous.pem";

/// What [`rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A new CA was written as `ca-next.pem`/`ca-next-key.pem`.
    Staged,
    /// The next CA now signs; the old certificate is `ca-previous.pem`.
    Activated,
    /// `ca-previous.pem` was removed.
    Retired,
}

impl Step {
    /// What the operator does next, for the CLI to print.
    pub fn next(&self) -> &'static str {
        match self {
            Step::Staged => {
                "restart the control plane: it publishes the old and the new CA and keeps \
                 signing with the old one. Once its data plane and every member have the new \
                 bundle (`isthmus records clusters/ --values`), run `isthmus ca rotate` again \
                 to make the new CA sign."
            }
            Step::Activated => {
                "restart the control plane: it signs with the new CA and still trusts the old \
                 one. After one certLifetime, when every certificate the old CA signed has \
                 expired, run `isthmus ca rotate` again to stop trusting it."
            }
            Step::Retired => {
                "restart the control plane: its bundle is the new CA alone. Operator \
                 credentials issued by the old CA no longer work."
            }
        }
    }
}

/// Why a rotation step was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("{}: {reason}", dir.display())]
    Files { dir: PathBuf, reason: String },
    #[error(
        "{}: the previous CA may still have signed certificates that are valid: it stopped \
         signing {ago}s ago and certLifetime is {lifetime}s; retire it in {wait}s (or pass \
         --force if the control plane's certLifetime is shorter)",
        file.display(),
        ago = .since.as_secs(),
        lifetime = .lifetime.as_secs(),
        wait = (.lifetime.saturating_sub(*.since)).as_secs().max(1)
    )]
    TooEarly {
        file: PathBuf,
        since: Duration,
        lifetime: Duration,
    },
}

/// Where a rotation's next CA comes from.
pub enum NextCa {
    /// A new self-signed root for this trust domain.
    Generate { trust_domain: String },
    /// An operator-supplied CA (certificate and key, PEM).
    Supplied { cert_pem: String, key_pem: String },
}

/// Takes the next rotation step in `dir`. `next` is used only when staging; retiring waits
/// until `cert_lifetime` has passed since the activation (`ca-previous.pem`'s modification
/// time) unless `force`.
pub fn rotate(
    dir: &Path,
    next: impl FnOnce() -> Result<NextCa, String>,
    cert_lifetime: Duration,
    now: SystemTime,
    force: bool,
) -> Result<Step, RotationError> {
    let err = |reason: String| RotationError::Files {
        dir: dir.to_path_buf(),
        reason,
    };
    let path = |name: &str| dir.join(name);
    let read = |name: &str| {
        std::fs::read_to_string(path(name))
            .map_err(|e| err(format!("reading {}: {e}", path(name).display())))
    };
    let write = |name: &str, text: &str, access: Access| {
        write_atomic(&path(name), text.as_bytes(), access).map_err(|e| err(e.to_string()))
    };
    let remove = |name: &str| match std::fs::remove_file(path(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(format!("removing {}: {e}", path(name).display()))),
    };
    let current = read(CERT)?;
    // Loading a pair only checks it (the trust domain is not looked at).
    let check = |cert: &str, key: &str| CertificateAuthority::from_pem("", cert, key).map(drop);

    if path(NEXT_CERT).exists() {
        // Activate. Run again after a crash past ca.pem's write, only the leftovers go
        // (ca-key.pem is written before ca.pem).
        let next_cert = read(NEXT_CERT)?;
        if current.trim() == next_cert.trim() {
            remove(NEXT_KEY)?;
            remove(NEXT_CERT)?;
            return Ok(Step::Activated);
        }
        // The next CA must be whole before anything moves.
        let next_key = read(NEXT_KEY)?;
        check(&next_cert, &next_key)
            .map_err(|e| err(format!("{NEXT_CERT} and {NEXT_KEY}: {e}")))?;
        write(PREVIOUS_CERT, &current, Access::Default)?;
        write(KEY, &next_key, Access::Private)?;
        write(CERT, &next_cert, Access::Default)?;
        remove(NEXT_KEY)?;
        remove(NEXT_CERT)?;
        return Ok(Step::Activated);
    }

    if path(PREVIOUS_CERT).exists() {
        let file = path(PREVIOUS_CERT);
        let since = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .map_err(|e| err(format!("reading the time of {}: {e}", file.display())))?;
        let since = now.duration_since(since).unwrap_or_default();
        if since < cert_lifetime && !force {
            return Err(RotationError::TooEarly {
                file,
                since,
                lifetime: cert_lifetime,
            });
        }
        remove(PREVIOUS_CERT)?;
        return Ok(Step::Retired);
    }

    // Stage: the key first, as at a CA's creation; a key without its certificate is what
    // an interrupted stage leaves, and is replaced.
    let (cert_pem, key_pem) = match next().map_err(err)? {
        NextCa::Generate { trust_domain } => {
            let ca = CertificateAuthority::generate(&trust_domain)
                .map_err(|e| err(format!("generating the next CA: {e}")))?;
            (ca.cert_pem().to_string(), ca.key_pem().to_string())
        }
        NextCa::Supplied { cert_pem, key_pem } => {
            check(&cert_pem, &key_pem).map_err(|e| err(format!("the supplied next CA: {e}")))?;
            (cert_pem, key_pem)
        }
    };
    if cert_pem.trim() == current.trim() {
        return Err(err(format!(
            "the next CA is the one that signs now ({CERT})"
        )));
    }
    write(NEXT_KEY, &key_pem, Access::Private)?;
    write(NEXT_CERT, &cert_pem, Access::Default)?;
    Ok(Step::Staged)
}

/// The signing CA `ca` loaded from `dir`, trusting the CAs a rotation in progress overlaps
/// with it (`ca-next.pem`, `ca-previous.pem`): what the control plane publishes as its
/// trust domain's bundle.
pub fn overlapping(dir: &Path, ca: CertificateAuthority) -> Result<CertificateAuthority, String> {
    let mut ca = ca;
    for name in [NEXT_CERT, PREVIOUS_CERT] {
        let file = dir.join(name);
        match std::fs::read_to_string(&file) {
            Ok(pem) => {
                ca = ca
                    .also_trusting(&pem)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        }
    }
    Ok(ca)
}

#[cfg(test)]
mod tests;
